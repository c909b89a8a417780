"""Spatial dropout against torch's dropout1d/2d/3d and a bare ``x * 2.0`` (issue 2, item 7).

A thin script over the package's harness: the same as ``spatialdrop bench --suite spatial``, and
it takes the same options (``--quick``, ``--format markdown``, ``--threads``, ``--out FILE``, ...).

    PYTHONPATH=src python benchmarks/bench_spatial.py --format markdown
"""

from __future__ import annotations

import sys

from spatialdrop import cli


def main(argv: list[str] | None = None) -> int:
    """``spatialdrop bench --suite spatial`` with ``argv`` (default: the command line)."""
    return cli.main(["bench", "--suite", "spatial", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
