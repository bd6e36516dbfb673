"""Reading large images downscaled (for attention maps and figures), with clear errors. Tissue maps of
large images read them through :mod:`hf_tissue_vit.slides`."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from ..imaging import open_image, pixel_limit, to_rgb8, to_uint8

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _read_errors(name: str, flag: str) -> Iterator[None]:
    """PIL's errors while opening/decoding ``name`` as one-line ValueErrors naming ``flag`` and the file."""
    try:
        yield
    except Image.DecompressionBombError as err:
        raise ValueError(f"{flag} {name!r} is larger than the pixel limit ({err}); "
                         "raise it with --max_image_pixels") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{flag} {name!r} cannot be read as an image: {err}") from err


def _existing_file(path: str | os.PathLike, flag: str) -> str:
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{flag} {name!r}: no such file")
    return name


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """8-bit RGB copy of ``image`` at most ``max_side`` px a side (aspect kept): the mode rule of
    :func:`~hf_tissue_vit.imaging.to_rgb8` (no copy for RGB), an integer ``reduce`` (box filter, no
    float copy), then ``thumbnail``'s antialiased resize."""
    rgb = to_rgb8(image)
    factor = max(1, max(rgb.size) // max_side)
    small = rgb.reduce(factor) if factor > 1 else rgb.copy()
    small.thumbnail((max_side, max_side))
    return small


def read_downscaled(
    path: str | os.PathLike, max_side: int, max_image_pixels: int | None = None, flag: str = "--image"
) -> tuple[np.ndarray, tuple[int, int]]:
    """The image file as HxWx3 uint8 RGB, downscaled to at most ``max_side`` px a side when larger, and
    its (width, height) in the file.

    Memory stays at about the decoded image (one byte per pixel and channel): a JPEG is decoded at
    1/2 to 1/8 scale (``Image.draft``), other formats are decoded once and reduced with PIL; no
    full-size float array is made. Missing files raise FileNotFoundError, unreadable ones and
    images over PIL's pixel limit (``max_image_pixels`` raises it) ValueError, naming ``flag`` and the file.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    name = _existing_file(path, flag)
    with _read_errors(name, flag), pixel_limit(max_image_pixels), open_image(name) as image:
        size = image.size
        if max(size) <= max_side:
            return to_uint8(image), size
        scale = max_side / max(size)
        image.draft(None, (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))))  # JPEG only
        image.load()
        return to_uint8(downscale(image, max_side)), size
