"""Lazy imports of the optional dependencies of the command-line tools (the ``demo`` extra)."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

__all__ = ["MissingDependency", "progress", "require"]

INSTALL_HINT = 'pip install "spatialdrop[demo]"'


class MissingDependency(RuntimeError):
    """An optional package that a command needs is not installed."""


def require(module: str, package: str, command: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming the extra that provides it.

    Args:
        module: the module to import, e.g. ``"matplotlib.pyplot"``.
        package: the distribution that provides it, e.g. ``"matplotlib"``.
        command: the command that needs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(
            f"spatialdrop {command}: needs {package}, which is not installed; "
            f"install the optional dependencies with: {INSTALL_HINT}"
        ) from err


def progress(command: str, *, total: int, desc: str, enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm progress bar on stderr (tqdm is part of the ``demo`` extra)."""
    tqdm = require("tqdm", "tqdm", command).tqdm
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
        mininterval=0.1 if interactive else 5.0,
        file=sys.stderr,
    )
