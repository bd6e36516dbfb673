"""Decoding and mode conversion of images: the one place in the package that knows image modes.

Every path that turns a file into pixels (dataset build, training decode, prediction, tissue maps,
attention maps, the app) goes through :func:`to_rgb8`, so a tile gets the same uint8 pixels
whichever command reads it. The rule per PIL mode:

========================  =====================================================================
mode                      8-bit RGB result
========================  =====================================================================
``RGB``                   unchanged
``RGBA``, ``LA``, ``PA``,  composited onto white: transparent parts of a tile hold no tissue, and
``P``/``L`` with a         white is what empty glass looks like in H&E (a fully transparent pixel
transparency key           becomes (255, 255, 255))
``I;16*``                 16-bit grey, scaled to 8 bits: ``value >> 8`` (65535 -> 255)
``I``                     32-bit grey read as 16-bit data (how PIL decodes 16-bit PNG/TIFF grey):
                          clipped to [0, 65535], then ``>> 8`` (1000 -> 3)
``F``                     float grey in [0, 1]: ``round(value * 255)``, clipped (0.5 -> 128); an
                          image with values above 2 (0-255 data stored as float, no [0, 1]
                          overshoot) is refused with the reason, never read as white
anything else (``L``,     PIL's own ``convert("RGB")`` (``CMYK`` and ``YCbCr`` by PIL's formulas)
``P``, ``CMYK``, ...)
========================  =====================================================================

The rule depends on the mode only, never on the pixel values of one image, so two crops of one
slide never get different scalings.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "to_rgb8",
    "to_uint8",
    "open_image",
    "decode_bytes",
    "decode_dataset_image",
    "load_rgb8",
    "pixel_limit",
]

_WHITE = (255, 255, 255, 255)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1)), "RGB")


# Overshoot of [0, 1] data (resampling, normalisation) stays near 1 and is clipped; a maximum above
# this is 0-255 (or 16-bit) data stored as float.
_FLOAT_MAX = 2.0


def _check_unit_range(values: np.ndarray) -> None:
    """Refuse float pixels far outside [0, 1]: the rule is per mode (a 0-255 float image would become
    white), so such an image is refused with the reason rather than rescaled by a guess from its values."""
    high = float(values.max()) if values.size else 0.0
    if high > _FLOAT_MAX:
        raise ValueError(f"float image holds values up to {high:g}, but float images are read as 0-1 "
                         "intensities (it would read as white): save it as 8-bit, or divide the values by 255")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Return ``image`` as an 8-bit RGB PIL image by the module's rule per mode (RGB returned as is)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        return _grey_to_rgb((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
    if mode == "I":
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return _grey_to_rgb((values >> 8).astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0)
        _check_unit_range(values)
        return _grey_to_rgb(np.clip(np.floor(values * 255.0 + 0.5), 0, 255).astype(np.uint8))
    if "A" in mode or "transparency" in image.info:
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        if rgba.getchannel("A").getextrema() == (255, 255):  # opaque (e.g. a slide's scanned area): same result,
            return rgba.convert("RGB")  # without the composite's two full-size copies
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def to_uint8(image: Image.Image) -> np.ndarray:
    """``image`` as an HxWx3 RGB uint8 array (a copy), by :func:`to_rgb8`'s rule."""
    return np.array(to_rgb8(image), dtype=np.uint8, copy=True)


@contextmanager
def pixel_limit(max_image_pixels: int | None) -> Iterator[None]:
    """Within the block, PIL refuses images of more than ``max_image_pixels`` (None: PIL's default)."""
    if max_image_pixels is None:
        yield
        return
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(max_image_pixels)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Open a file path or encoded bytes as a PIL image (lazy: pixels are read on first use)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not source:
            raise ValueError("image is empty (0 bytes)")
        try:
            return Image.open(io.BytesIO(bytes(source)))
        except UnidentifiedImageError:  # its message would show "<_io.BytesIO object at 0x...>"
            raise UnidentifiedImageError(f"cannot identify image data ({len(source)} bytes) as an image "
                                         "format PIL reads") from None
    return Image.open(source)


def decode_bytes(data: bytes) -> np.ndarray:
    """Decode encoded image bytes to HxWx3 uint8 RGB."""
    with open_image(data) as image:
        return to_uint8(image)


def decode_dataset_image(value: Any) -> np.ndarray:
    """Decode a ``datasets`` Image value (``{"bytes", "path"}`` dict, or a PIL image) to HxWx3 uint8."""
    if isinstance(value, Image.Image):
        return to_uint8(value)
    if not isinstance(value, dict):
        raise ValueError(f"expected a datasets Image value, got {type(value).__name__}")
    if value.get("bytes"):
        return decode_bytes(value["bytes"])
    if value.get("path"):
        with open_image(value["path"]) as image:
            return to_uint8(image)
    raise ValueError("dataset row has an empty image (no bytes, no path)")


def load_rgb8(path: str | os.PathLike, max_image_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB (PIL's pixel limit raised to ``max_image_pixels``)."""
    with pixel_limit(max_image_pixels), open_image(path) as image:
        return to_uint8(image)


def centre_box(height: int, width: int, field_height: int, field_width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centre ``field_height`` x ``field_width`` of an image of ``height`` x
    ``width`` px (no larger than the image): the one centre crop of prediction and training."""
    h, w = min(height, field_height), min(width, field_width)
    return (height - h) // 2, (width - w) // 2, h, w
