"""Lazy imports of the optional dependencies of the command-line tools (the ``demo`` extra)."""

from __future__ import annotations

import functools
import importlib
import sys
from types import ModuleType
from typing import Any

__all__ = ["MissingDependency", "one_line", "peer", "progress", "require"]

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
    except Exception as err:
        if isinstance(err, ImportError) and _is_missing(err, module):
            raise MissingDependency(
                f"spatialdrop {command}: needs {package}, which is not installed; "
                f"install the optional dependencies with: {INSTALL_HINT}"
            ) from err
        # installed but broken, e.g. built for another torch: the reason, not a traceback
        raise MissingDependency(
            f"spatialdrop {command}: needs {package}, which is unavailable ({one_line(err)}); "
            f"reinstall the optional dependencies with: {INSTALL_HINT}"
        ) from err


def one_line(err: BaseException, limit: int = 120) -> str:
    """``"Type: first line of the message"``, at most ``limit`` characters."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_missing(err: ImportError, module: str) -> bool:
    """Whether ``err`` says that ``module`` itself (or a package above it) is not installed."""
    name = getattr(err, "name", None)
    return isinstance(err, ModuleNotFoundError) and name is not None and (module + ".").startswith(name + ".")


@functools.cache
def _import_peer(library: str) -> ModuleType | str:
    try:
        return importlib.import_module(library)
    except ImportError as err:
        return (
            f"{library} not installed"
            if _is_missing(err, library)
            else f"{library} unavailable: {one_line(err)}"
        )
    except Exception as err:
        return f"{library} unavailable: {one_line(err)}"


def peer(library: str, *paths: str) -> Any:
    """The first of ``paths`` (``"module.attribute"``) that a peer library provides, or why not.

    A peer (torchvision, timm, dropblock) is only compared with, never needed: whatever goes wrong
    while importing it (not installed, or installed but broken, e.g. a torchvision built for
    another torch that raises ``RuntimeError`` on import) becomes a one-line reason, returned as
    a ``str``: ``"timm not installed"`` or ``"timm unavailable: RuntimeError: ..."``. The outcome
    for ``library`` itself is remembered for the process (a broken import is not retried).

    Args:
        library: the peer's top-level module, e.g. ``"timm"``.
        paths: where the object lives, tried in order, e.g. ``"timm.layers.drop_block_2d"``
            then ``"timm.models.layers.drop_block_2d"`` (older releases).
    """
    top = _import_peer(library)
    if isinstance(top, str):
        return top
    reason = ""
    for path in paths:
        module, _, attribute = path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attribute)
        except Exception as err:
            reason = reason or f"{library} unavailable: {one_line(err)}"
    return reason


class _NoBar:
    """What :func:`progress` returns when it is off: the calls the commands make, doing nothing."""

    n = 0

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        """Nothing to show."""

    def reset(self, total: int | None = None) -> None:
        """Nothing to reset."""

    def set_postfix_str(self, text: str = "") -> None:
        """Nothing to show."""


def progress(command: str, *, total: int, desc: str, enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm progress bar on stderr (tqdm is part of the ``demo`` extra).

    With ``enabled=False`` (``--no-progress``) nothing is shown and tqdm is not needed.
    """
    if not enabled:
        return _NoBar()
    tqdm = require("tqdm", "tqdm", command).tqdm
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        leave=False,
        mininterval=0.1 if interactive else 5.0,
        file=sys.stderr,
    )
