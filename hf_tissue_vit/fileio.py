"""Atomic file output: write to a temp file in the target's folder, then ``os.replace`` it into place.

A reader (or a resumed run) then sees either the old file or the complete new one, never a
partial write. :func:`check_writable_dir` / :func:`check_writable_file` refuse an output that cannot be
written before any work starts; :func:`temp_name` / :func:`remove_stale_temps` name temporaries after
the process that made them, so a later run can remove those of a killed one.

``tempfile.mkstemp`` creates files with mode 0600; the helpers here give the result the permissions
``open()`` would have given it (``0o666 & ~umask``), so outputs stay readable by the group/other users
the umask allows.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask (reading it needs setting it; it is restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """Permissions ``open()``/``mkdir()`` would give a new file (0o666) or folder (0o777) under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temp file next to ``path`` for writing; on success chmod it to the default mode and
    ``os.replace`` it over ``path``. On any exception the temp file is removed and ``path`` is untouched.

    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``; ``open_kwargs`` go to
    ``open`` (e.g. ``newline=""`` for csv). The parent folder is created when missing.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last: tools that pick a format from the name (np.save, savefig) still see it.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, default: Any = None) -> Path:
    """Write ``data`` as indented JSON (with a final newline) to ``path`` atomically; returns the path.

    ``default`` converts objects ``json`` cannot (see ``json.dump``).
    """
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, default=default)
        handle.write("\n")
    return Path(path)


def atomic_write_tensors(path: str | os.PathLike, tensors: Mapping[str, Any]) -> Path:
    """Write named torch tensors as safetensors to ``path`` atomically (detached, moved to the CPU, made
    contiguous: any device's state can be given); returns the path."""
    from safetensors.torch import save

    with atomic_write(path, "wb") as handle:
        handle.write(save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}))
    return Path(path)


def save_figure_atomic(figure: Any, path: str | os.PathLike, dpi: int = 100, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib Figure to ``path`` atomically (format from the suffix, PNG by default)."""
    path = Path(path)
    savefig_kwargs.setdefault("bbox_inches", "tight")
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".").lower() or "png")
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, dpi=dpi, **savefig_kwargs)
    return path


def fix_permissions(folder: str | os.PathLike, pattern: str = "*.safetensors") -> list[Path]:
    """Give files matching ``pattern`` in ``folder`` the default mode; returns the files changed.

    safetensors (0.8) writes through a private temp file, so ``save_pretrained`` leaves
    ``model.safetensors`` at 0600 while config.json next to it is 0644.
    """
    mode = default_mode()
    changed = []
    for path in Path(folder).glob(pattern):
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)
            changed.append(path)
    return changed


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (a dangling symlink counts as existing)."""
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def _probe_write(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a temp file in ``folder``; ValueError naming ``flag`` and ``target`` if that fails."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".hf_tissue_vit-write-test-")
    except OSError as err:
        where = "" if folder == target else f" (its nearest existing folder {folder})"
        raise ValueError(f"{flag} {target} cannot be written{where}: {err.strerror or err}; "
                         "choose a location you can write to") from None
    os.close(fd)
    os.unlink(probe)


def check_writable_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """The absolute ``path`` if it is a folder that exists and can be written, or can be created.

    Raises ValueError (naming ``flag``) when a file is where the folder or one of its parents must go,
    or when the folder (or, if it does not exist, its nearest existing parent) is not writable. Nothing
    is left behind: the check is a temp file created and removed at once. Run it before long work.
    """
    target = Path(path).expanduser().absolute()
    existing = _nearest_existing(target)
    if not existing.is_dir():
        what = "is a file" if existing == target else f"cannot be created: {existing} is a file"
        raise ValueError(f"{flag} {target} {what}, not a folder; pass another path or move the file")
    _probe_write(existing, flag, target)
    return target


def check_writable_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """The absolute ``path`` if a file can be written there (by :func:`atomic_write`: a temp file in its
    folder, then renamed); ValueError naming ``flag`` when it is a folder, a parent is a file, or the
    folder is not writable. Creates nothing."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise ValueError(f"{flag} {target} is a folder; give a file path (e.g. {target / 'predictions.csv'})")
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise ValueError(f"{flag} {target} cannot be created: {existing} is a file, not a folder")
    _probe_write(existing, flag, target)
    return target


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder of this process's own, removed when the process exits.

    For working files that outlive one function but not the process (a build's Arrow shards, the app's
    example tiles): a plain ``mkdtemp`` would leave one folder behind per run in the system's temp dir.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def temp_name(prefix: str, suffix: str = "") -> str:
    """``<prefix><pid>-<random><suffix>``: a temporary's name that says which process made it."""
    return f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the :func:`temp_name` files and folders in ``folder`` whose process is gone (e.g. killed);
    returns what was removed. Temporaries of running processes are left alone."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)-[0-9a-f]+{re.escape(suffix)}")
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        logger.info("removed %s, left by a process that is gone", path)
        removed.append(path)
    return removed
