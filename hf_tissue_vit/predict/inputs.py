"""Input files of a prediction run: image files, folders (searched recursively) and glob patterns."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence

from ..constants import IMAGE_EXTENSIONS

_GLOB_CHARS = set("*?[")


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in _GLOB_CHARS)


def _is_image_name(name: str, extensions: Sequence[str]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in extensions))


def check_inputs(inputs: Sequence[str | os.PathLike]) -> None:
    """Raise ``FileNotFoundError`` for an input that is neither an existing file/folder nor a matching glob."""
    if not inputs:
        raise ValueError("--inputs: give at least one image file, folder or glob pattern")
    for item in inputs:
        text = os.fspath(item)
        if os.path.exists(text):
            continue
        if _is_glob(text) and next(glob.iglob(text, recursive=True), None) is not None:
            continue
        raise FileNotFoundError(f"--inputs {text!r}: no such file or folder, and no file matches it as a glob")


def iter_input_files(
    inputs: Iterable[str | os.PathLike], extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> Iterator[str]:
    """Yield image paths lazily: files as given, folders recursively (sorted, extensions of any
    case), glob patterns (``**`` allowed) sorted, keeping only image extensions for folders and globs."""
    for item in inputs:
        text = os.fspath(item)
        if os.path.isdir(text):
            for root, dirs, files in os.walk(text):
                dirs.sort()
                for name in sorted(files):
                    if _is_image_name(name, extensions):
                        yield os.path.join(root, name)
        elif os.path.exists(text) or not _is_glob(text):
            yield text  # an explicit file is tried even with another extension; errors become rows
        else:
            for match in sorted(glob.iglob(text, recursive=True)):
                if os.path.isfile(match) and _is_image_name(match, extensions):
                    yield match
