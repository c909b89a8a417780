"""DropBlock against torchvision, timm, the ``dropblock`` package and a bare ``x * 2.0`` (issue 3).

A thin script over the package's harness: the same as ``spatialdrop bench --suite dropblock``, and
it takes the same options (``--quick``, ``--format markdown``, ``--threads``, ``--out FILE``, ...).
Peers that are not installed are listed with a note.

    PYTHONPATH=src python benchmarks/bench_dropblock.py --format markdown
"""

from __future__ import annotations

import sys

from spatialdrop.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "dropblock", *sys.argv[1:]]))
