#!/usr/bin/env bash
# The GPU check of issue 12 in one command: CUDA tests, then the timing table (see gpu_check.py).
cd "$(dirname "$0")/.." && PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
