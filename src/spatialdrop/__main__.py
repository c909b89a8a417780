"""``python -m spatialdrop``: the same as the ``spatialdrop`` command."""

from __future__ import annotations

import sys

from spatialdrop.cli import main

if __name__ == "__main__":
    sys.exit(main())
