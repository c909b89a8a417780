"""SIGTERM ends a command as Ctrl-C does: the same clean-up, exit code 143 instead of 130.

:func:`sigterm_as_interrupt` turns SIGTERM (``kill``, ``timeout``, a job scheduler) into
:class:`Terminated`, a :class:`KeyboardInterrupt`, in the main thread: every ``except
KeyboardInterrupt`` and ``with`` block of the commands runs (training processes are stopped, no
half file is left), and :func:`exit_code` gives 143 (128 + SIGTERM) instead of 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Terminated", "exit_code", "sigterm_as_interrupt", "stopped"]


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled as Ctrl-C, with exit code 143."""


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere: no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def exit_code(err: KeyboardInterrupt) -> int:
    """143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + signal.SIGTERM if isinstance(err, Terminated) else 130


def stopped(err: KeyboardInterrupt) -> str:
    """``"terminated"`` after SIGTERM, ``"interrupted"`` after Ctrl-C."""
    return "terminated" if isinstance(err, Terminated) else "interrupted"
