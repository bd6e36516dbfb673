"""Reading large images (a few thousand pixels a side) for tissue maps, with clear errors."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from ..imaging import open_image, pixel_limit, to_uint8


@contextlib.contextmanager
def open_large_image(path: str | os.PathLike, max_image_pixels: int | None = None) -> Iterator[Image.Image]:
    """Open and decode an image file once (PIL keeps it in memory; callers crop strips from it).

    PIL refuses images above ``Image.MAX_IMAGE_PIXELS`` (its decompression-bomb limit); pass
    ``max_image_pixels`` to allow bigger ones. Unreadable files raise ValueError naming the file.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"--image {name!r}: no such file")
    try:
        with pixel_limit(max_image_pixels):
            image = open_image(name)
            image.load()
    except Image.DecompressionBombError as err:
        raise ValueError(f"--image {name!r} is larger than the pixel limit ({err}); "
                         "raise it with --max_image_pixels") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"--image {name!r} cannot be read as an image: {err}") from err
    try:
        yield image
    finally:
        image.close()


def read_large_image(path: str | os.PathLike, max_image_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 (see :func:`open_large_image` for limits and errors)."""
    with open_large_image(path, max_image_pixels) as image:
        return to_uint8(image)
