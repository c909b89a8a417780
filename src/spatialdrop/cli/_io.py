"""Output paths of the commands: checked before any work, written atomically.

Every command calls :func:`check_file` or :func:`check_folder` on its ``--out`` before it computes
anything, so that a bad path costs a second, not a finished run. The rules, for every command:

- an output name that is a folder, or anything but a regular file (a device such as
  ``/dev/stdout``, a pipe, a socket), is refused, with ``--force`` too;
- a symbolic link is written through: its target gets the new content, the link stays;
- an existing file is replaced only with ``--force``.

Results are written with :func:`write_atomic` / :func:`write_all` (a temporary file in the target
folder, then :func:`os.replace`), so that an interrupted or failed write never leaves a half file
behind, and a command's several files are replaced together, after all of them were written.
:func:`write_new` writes a file under a name not taken yet (a partial result never replaces an
older one).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

__all__ = [
    "OutputError",
    "SettingsError",
    "check_file",
    "check_folder",
    "output_format",
    "write_all",
    "write_atomic",
    "write_new",
    "write_text",
]


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


def _target(path: Path, what: str) -> Path:
    """The file that writing ``path`` replaces: ``path``, or the file its symbolic link names.

    Refuses a folder and anything else that is not a regular file (a device such as
    ``/dev/null``, or a pipe or terminal behind ``/dev/stdout``), and a link that cannot be
    followed (a loop).
    """
    try:
        mode = os.stat(path).st_mode  # through links, to what would be written
    except FileNotFoundError:
        mode = None  # missing, or a link to a missing file: created there
    except OSError as err:
        raise OutputError(f"{what}: {path} cannot be followed ({err.strerror or err})") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"{what}: {path} is a folder, expected a file name")
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(
            f"{what}: {path} is not a regular file (a device, pipe or terminal); spatialdrop writes "
            "regular files only"
        )
    return path.resolve() if path.is_symlink() else path


def check_file(path: Path, *, force: bool, what: str) -> Path:
    """Check that ``path`` can be written as a new file (or overwritten when ``force``).

    Missing parent folders are fine (they are created when the file is written) as long as the
    nearest existing one is a writable folder.

    Args:
        path: the output file.
        force: whether an existing file may be replaced.
        what: the command and option, for the message, e.g. ``"spatialdrop bench --out"``.

    Returns:
        The file to write: ``path``, or the target of the symbolic link ``path``.

    Raises:
        OutputError: with a one-line message naming the path and the problem.
    """
    shown = path
    path = _target(path, what)
    if path.exists() and not force:
        raise OutputError(f"{what}: {shown} exists; pass --force to overwrite it")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what}: {shown} is not writable")
    _check_creatable(path.parent, what)
    return path


def check_folder(path: Path, files: Iterable[str], *, force: bool, what: str) -> Path:
    """Check that ``path`` is (or can become) a writable folder without the ``files`` in it.

    Each of ``files`` inside it is checked as :func:`check_file` checks an output file (a folder
    or device under that name is refused, ``force`` or not).

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
        for name in files:
            _target(path / name, what)
        taken = [name for name in files if (path / name).exists()]
        if taken and not force:
            raise OutputError(f"{what}: {path} already holds {', '.join(taken)}; pass --force to overwrite")
        _probe(path, what)
    else:
        _check_creatable(path, what)
    return path


def output_format(
    path: Path | None, given: str | None, formats: Mapping[str, str], default: str, what: str
) -> str:
    """The format to write ``path`` in: the one its suffix names, or ``given``, or ``default``.

    The one rule of every command that writes a file in a chosen format: a suffix in ``formats``
    (e.g. ``.md``) names the format, and a ``--format`` (``given``) naming another is refused; a
    name without a suffix gets ``given`` or ``default``; a suffix that names no format needs
    ``given``.

    Raises:
        OutputError: for a conflict, or an unknown suffix without ``given`` (one line).
    """
    if path is None or not path.suffix:
        return given or default
    named = formats.get(path.suffix.lower())
    if named is not None:
        if given is not None and given != named:
            raise OutputError(
                f"{what}: {path}: the suffix {path.suffix!r} means --format {named}, not {given}; "
                "change the suffix or leave out --format"
            )
        return named
    if given is not None:
        return given
    *most, last = formats
    raise OutputError(
        f"{what}: {path}: cannot write a {path.suffix!r} file; the suffix chooses the format: "
        f"{', '.join(most)} or {last} (no suffix: {default}), or pass --format"
    )


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    return Path(name)


def write_all(writers: Mapping[Path, Callable[[Path], None]]) -> None:
    """Write every file of ``writers`` (``path -> write(tmp)``) to a temporary file, then rename all.

    No ``path`` is replaced until every one has been written: a failure or Ctrl-C while writing
    leaves all of them as they were (and no temporary file). Missing parent folders are created;
    a ``path`` that is a symbolic link is written through (its target is replaced, not the link).
    """
    temps: dict[Path, Path] = {}
    try:
        for asked, write in writers.items():
            path = asked.resolve() if asked.is_symlink() else asked  # write through a link
            temps[path] = tmp = _temp_beside(path)
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The rename is atomic on one file system, so ``path`` either keeps its old content or gets the
    whole new one. Missing parent folders are created.
    """
    write_all({path: write})


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    write_atomic(path, write)


def write_new(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, or to ``NAME-2.SUFFIX``, ``NAME-3.SUFFIX``... if it is taken.

    The file appears whole (written to a temporary file, then linked under the first free name,
    which fails rather than replaces), and no existing file is ever replaced. Returns the name used.
    """
    tmp = _temp_beside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o666 & ~_umask())
        for k in range(1, 10_000):
            name = path if k == 1 else path.with_name(f"{path.stem}-{k}{path.suffix}")
            try:
                os.link(tmp, name)
            except FileExistsError:
                continue
            return name
        raise OutputError(f"{path}: no free name beside it")  # pragma: no cover
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
