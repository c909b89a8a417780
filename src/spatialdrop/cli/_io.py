"""Output paths of the commands: checked before any work, written atomically.

Every command calls :func:`check_file` or :func:`check_folder` on its ``--out`` before it computes
anything, so that a bad path costs a second, not a finished run. Results are written with
:func:`write_atomic` (a temporary file in the target folder, then :func:`os.replace`), so that an
interrupted or failed write never leaves a half file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["OutputError", "SettingsError", "check_file", "check_folder", "write_atomic", "write_text"]


class OutputError(ValueError):
    """An output path that a command cannot or must not write (exit code 2)."""


class SettingsError(ValueError):
    """Settings that the layers a command runs refuse, found before any work (exit code 2)."""


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()  # pragma: no cover - the root always exists


def _probe(folder: Path, what: str, wanted: Path | None = None) -> None:
    """Create and remove a temporary file in ``folder``: the only reliable 'can I write here'.

    ``wanted`` is the missing folder below ``folder`` that the command would create: the message
    names it, as the folder the user asked for.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=".spatialdrop-probe-", dir=folder)
    except OSError as err:
        reason = f"cannot write in {folder} ({err.strerror or err})"
        if wanted is not None and wanted != folder:
            raise OutputError(f"{what}: cannot create the folder {wanted}: {reason}") from None
        raise OutputError(f"{what}: {reason}") from None
    os.close(fd)
    os.unlink(name)


def _check_creatable(folder: Path, what: str) -> None:
    """Check that ``folder`` (missing, or an existing folder) can be created and written in."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputError(f"{what}: {existing} is not a folder")
    _probe(existing, what, wanted=folder)


def check_file(path: Path, *, force: bool, what: str) -> Path:
    """Check that ``path`` can be written as a new file (or overwritten when ``force``).

    Missing parent folders are fine (they are created when the file is written) as long as the
    nearest existing one is a writable folder.

    Args:
        path: the output file.
        force: whether an existing file may be replaced.
        what: the command and option, for the message, e.g. ``"spatialdrop bench --out"``.

    Raises:
        OutputError: with a one-line message naming the path and the problem.
    """
    if path.is_dir():
        raise OutputError(f"{what}: {path} is a folder, expected a file name")
    if path.exists() and not force:
        raise OutputError(f"{what}: {path} exists; pass --force to overwrite it")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what}: {path} is not writable")
    _check_creatable(path.parent, what)
    return path


def check_folder(path: Path, files: Iterable[str], *, force: bool, what: str) -> Path:
    """Check that ``path`` is (or can become) a writable folder without the ``files`` in it.

    Args:
        path: the output folder.
        files: the names the command writes into it; existing ones need ``force``.
        force: whether existing output files may be replaced.
        what: the command and option, for the message.

    Raises:
        OutputError: with a one-line message naming the path and the problem.
    """
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what}: {path} exists and is not a folder")
    if path.is_dir():
        taken = [name for name in files if (path / name).exists()]
        if taken and not force:
            raise OutputError(f"{what}: {path} already holds {', '.join(taken)}; pass --force to overwrite")
        _probe(path, what)
    else:
        _check_creatable(path, what)
    return path


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The rename is atomic on one file system, so ``path`` either keeps its old content or gets the
    whole new one. Missing parent folders are created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    write_atomic(path, write)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
