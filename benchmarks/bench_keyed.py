"""Keyed spatial dropout (counter-based masks) against the unkeyed one and torch (issue 6).

A thin script over the package's harness: the same as ``spatialdrop bench --suite keyed``, and it
takes the same options (``--quick``, ``--format markdown``, ``--threads``, ``--out FILE``, ...).
Peers that are not installed are listed with a note.

    PYTHONPATH=src python benchmarks/bench_keyed.py --format markdown
"""

from __future__ import annotations

import sys

from spatialdrop import cli


def main(argv: list[str] | None = None) -> int:
    """``spatialdrop bench --suite keyed`` with ``argv`` (default: the command line)."""
    return cli.main(["bench", "--suite", "keyed", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
