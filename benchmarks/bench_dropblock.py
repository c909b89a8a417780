"""DropBlock against torchvision, timm, the ``dropblock`` package and a bare ``x * 2.0`` (issue 3).

A thin script over the package's harness: the same as ``spatialdrop bench --suite dropblock``, and
it takes the same options (``--quick``, ``--format markdown``, ``--threads``, ``--out FILE``, ...).
Peers that are not installed are listed with a note.

    PYTHONPATH=src python benchmarks/bench_dropblock.py --format markdown
"""

from __future__ import annotations

import sys

from spatialdrop import cli


def main(argv: list[str] | None = None) -> int:
    """``spatialdrop bench --suite dropblock`` with ``argv`` (default: the command line)."""
    return cli.main(["bench", "--suite", "dropblock", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
