#!/usr/bin/env bash
# The tests, in the two environments they need (README, "Set up"); run from anywhere:
#   bash dev/test.sh
# 1. .venv: torch 2.13.0 (the floor; CPU build) with triton (its interpreter runs the GPU kernels'
#    tests on the CPU): the whole default suite.
# 2. .venv-models: torch 2.14.1 with torchvision 0.29.1 and timm (a CUDA build that runs on the
#    CPU; torchvision from the registry does not import beside 2.13.0): the tests marked `models`
#    (real networks, model conversion), which the first run deselects.
# Extra arguments go to both pytest runs (e.g. -x, -q).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[test,triton]"
.venv/bin/python -m pytest "$@"
python3 -m venv .venv-models
.venv-models/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[test,models]"
.venv-models/bin/python -m pytest -m models -p no:doctest -o addopts="-ra" tests "$@"
