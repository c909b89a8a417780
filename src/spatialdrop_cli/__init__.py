"""The ``spatialdrop`` script: checks its command line before torch is imported.

``import spatialdrop`` imports torch, which takes seconds. The script's entry point lives outside
the package so that it can load the package ``spatialdrop`` without running its ``__init__``
yet: :mod:`spatialdrop.cli` parses and checks the options and ``--out`` (a mistyped option fails
at once, exit code 2), then finishes the import of the library (torch with it) and runs the
command. ``python -m spatialdrop`` imports the library first and then does the same checks.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``spatialdrop`` command line, importing the library only after the checks."""
    spec = None if "spatialdrop" in sys.modules else importlib.util.find_spec("spatialdrop")
    if spec is None or spec.loader is None:
        from spatialdrop.cli import main as run

        return run(argv)
    package = importlib.util.module_from_spec(spec)
    sys.modules["spatialdrop"] = package  # the package, its __init__ not run yet
    loaded = False

    def load() -> None:
        nonlocal loaded
        if not loaded:
            loaded = True
            try:
                spec.loader.exec_module(package)  # type: ignore[union-attr]
            except BaseException:
                sys.modules.pop("spatialdrop", None)
                raise

    from spatialdrop.cli import _parser
    from spatialdrop.cli import main as run

    _parser.LOAD_LIBRARY = load
    try:
        return run(argv)
    finally:
        _parser.LOAD_LIBRARY = None
