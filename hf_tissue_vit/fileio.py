"""Atomic file output: write to a temp file in the target's folder, then ``os.replace`` it into place.

A reader (or a resumed run) then sees either the old file or the complete new one, never a
partial write. ``tempfile.mkstemp`` creates files with mode 0600; the helpers here give the
result the permissions ``open()`` would have given it (``0o666 & ~umask``), so outputs stay
readable by the group/other users the umask allows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
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
