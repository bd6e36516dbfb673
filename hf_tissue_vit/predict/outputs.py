"""Can the run's outputs be written? Checked before any model is loaded, so a bad ``--output`` or
``--output_dir`` fails in a second with one line, not with a traceback after all the work.

TODO(lead): use fileio.check_writable_dir / fileio.check_writable_file (and run_main's OSError
handling) once they are merged; these private versions stand in for them until then.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _existing_ancestor(path: Path) -> Path:
    """The nearest of ``path``'s parents that exists (``path`` itself excluded)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path(path.absolute().anchor)


def _probe_folder(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a temp file in ``folder``: the only check that sees read-only mounts, ACLs
    and root alike (``chmod`` does not stop root, a read-only file system does)."""
    if not folder.is_dir():
        raise ValueError(f"{flag} {str(target)!r}: {str(folder)!r} is a file, so no folder can be made there; "
                         "give another path")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_check.")
    except OSError as err:
        raise ValueError(f"{flag} {str(target)!r}: cannot write in {str(folder)!r} "
                         f"({err.strerror or err}); give a writable path") from err
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_output_file(path: str | os.PathLike, flag: str) -> Path:  # TODO(lead): use fileio.check_writable_file
    """Raise ValueError (one line naming ``flag`` and ``path``) unless the file ``path`` can be
    written: it must not be a folder, and its folder (or the nearest existing parent) must be writable."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {str(target)!r} is a folder; give a file name, e.g. "
                         f"{str(target / 'predictions.csv')!r}")
    parent = target.absolute().parent
    _probe_folder(parent if parent.exists() else _existing_ancestor(parent), flag, target)
    return target


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:  # TODO(lead): use fileio.check_writable_dir
    """Raise ValueError (one line naming ``flag`` and ``path``) unless files can be written in the
    folder ``path`` (created later when missing): it must not be a file, and it (or its nearest
    existing parent) must be writable."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {str(target)!r} is a file; give a folder (it is created when missing)")
    _probe_folder(target if target.exists() else _existing_ancestor(target), flag, target)
    return target


@contextlib.contextmanager
def output_errors(path: str | os.PathLike, flag: str) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block (disk full, folder removed, permissions changed mid-run)
    into a one-line ValueError naming ``flag`` and the path.

    TODO(lead): drop once cli.run_main turns escaping OSErrors into one-line errors.
    """
    try:
        yield
    except OSError as err:
        where = err.filename if err.filename else os.fspath(path)
        raise ValueError(f"{flag} {os.fspath(path)!r}: cannot write {str(where)!r} ({err.strerror or err})") from err
