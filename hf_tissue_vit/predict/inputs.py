"""Input files of a prediction run: image files, folders (searched recursively) and glob patterns.

Whole-slide images (:data:`WHOLE_SLIDE_EXTENSIONS`) are not tiles: they are skipped, and
:func:`list_input_files` says so once, pointing to ``scripts/tissue_map.py``.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

from ..constants import IMAGE_EXTENSIONS, WHOLE_SLIDE_EXTENSIONS

logger = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")
# Whole-slide formats OpenSlide reads (gigapixel pyramids): tile tools skip them.
# TODO(lead): one list with hf_tissue_vit.slides' extensions when that package is merged.
_EXAMPLES = 3


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
    inputs: Iterable[str | os.PathLike],
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    whole_slides: list[str] | None = None,
) -> Iterator[str]:
    """Yield image paths lazily: files as given, folders recursively (sorted, extensions of any
    case), glob patterns (``**`` allowed) sorted, keeping only image extensions for folders and globs.

    Whole-slide images are never yielded, even when named explicitly; they are appended to
    ``whole_slides`` when a list is given (folders and globs included). A file reached twice (a folder
    and a glob that overlap, a file named twice) is yielded once, at its first place.
    """
    seen: set[str] = set()
    for path in _iter_candidates(inputs, extensions, whole_slides):
        key = os.path.normcase(os.path.realpath(path))
        if key not in seen:
            seen.add(key)
            yield path


def _iter_candidates(
    inputs: Iterable[str | os.PathLike], extensions: Sequence[str], whole_slides: list[str] | None
) -> Iterator[str]:
    for item in inputs:
        text = os.fspath(item)
        if os.path.isdir(text):
            for root, dirs, files in os.walk(text):
                dirs.sort()
                for name in sorted(files):
                    yield from _keep(os.path.join(root, name), extensions, whole_slides)
        elif os.path.exists(text) or not _is_glob(text):
            # an explicit file is tried even with another extension (errors become rows); slides are not
            yield from _keep(text, None, whole_slides)
        else:
            for match in sorted(glob.iglob(text, recursive=True)):
                if os.path.isfile(match):
                    yield from _keep(match, extensions, whole_slides)


def _keep(path: str, extensions: Sequence[str] | None, whole_slides: list[str] | None) -> Iterator[str]:
    """``path`` when it is an image to read (``extensions`` None: any name); a whole-slide image (unless
    ``extensions`` asks for its kind) goes to ``whole_slides`` instead."""
    wanted = extensions is not None and _is_image_name(path, extensions)
    if _is_image_name(path, WHOLE_SLIDE_EXTENSIONS) and not wanted:
        if whole_slides is not None:
            whole_slides.append(path)
    elif extensions is None or wanted:
        yield path


def list_input_files(
    inputs: Sequence[str | os.PathLike], flag: str = "--inputs", extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[str]:
    """All image paths of ``inputs`` (see :func:`iter_input_files`); whole-slide images found are left
    out with one warning. Raises FileNotFoundError (naming ``flag``) when no image file is left."""
    slides: list[str] = []
    paths = list(iter_input_files(inputs, extensions, slides))
    if slides:
        names = ", ".join(os.path.basename(p) for p in slides[:_EXAMPLES]) + (", ..." if len(slides) > _EXAMPLES
                                                                              else "")
        logger.warning("skipped %d whole-slide image(s) (%s): this tool classifies tiles (image files), not "
                       "whole slides; make a tissue map of a slide with scripts/tissue_map.py", len(slides), names)
    if not paths:
        texts = [os.fspath(item) for item in inputs]
        if slides:
            raise FileNotFoundError(f"{flag} {texts}: only whole-slide images ({names}), which this tool does not "
                                    "read; make a tissue map of a slide with scripts/tissue_map.py")
        raise FileNotFoundError(f"{flag} {texts}: no image files found")
    return paths
