"""Slide readers: OpenSlide for pyramidal whole-slide images, PIL for plain images, one interface.

A :class:`SlideReader` knows its pyramid levels (size and downsample from level 0), the µm/px of
level 0 when the file (or ``--slide_mpp``) says it, and reads a region of one level as an 8-bit
RGB PIL image (:func:`hf_tissue_vit.imaging.to_rgb8`: transparent parts, i.e. areas the scanner
did not scan, become white glass).

:class:`OpenSlideReader` keeps one OpenSlide handle per reading thread, all sharing one tile
cache: OpenSlide puts a handle into a permanent error state after a failed read (a corrupt tile),
so the thread that met the error drops its handle and opens a new one, and the other threads'
reads are not affected. :class:`ImageReader` decodes a plain image once (one level).

OpenSlide rather than tiffslide: it reads every vendor format pathologists have (MRXS, VMS, SCN,
DICOM and the TIFF-based ones), tiffslide only TIFF-based ones. tiffslide read the benchmark's
JPEG TIFF with less CPU per window, but reading is a small part of a window's cost next to the
model's forward pass either way (``benchmarks/slide_bench.py`` measures both readers).

Example::

    with open_slide("slide.svs") as reader:
        print(reader.levels, reader.mpp)
        region = reader.read_region(0, 0, level=1, width=512, height=512)
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..constants import IMAGE_EXTENSIONS, WHOLE_SLIDE_EXTENSIONS
from ..imaging import open_image, pixel_limit, to_rgb8

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only (python_requires >= 3.10)

logger = logging.getLogger(__name__)

# Files a folder or glob given to --image expands to: vendor slide formats OpenSlide reads, plus
# the plain image formats the package reads with PIL.
SLIDE_EXTENSIONS = WHOLE_SLIDE_EXTENSIONS + IMAGE_EXTENSIONS
_VENDOR_ONLY = WHOLE_SLIDE_EXTENSIONS
WSI_INSTALL_HINT = "install the [wsi] extra: pip install 'hf_tissue_vit[wsi]'"
# OpenSlide's tile cache shared by a slide's handles: a few window rows of decoded tiles.
DEFAULT_CACHE_BYTES = 64 << 20


class SlideReadError(OSError):
    """A region of a slide could not be read (e.g. a corrupt tile); the run reports it and goes on."""


@dataclass(frozen=True)
class Level:
    """One pyramid level: size in its own pixels and downsample factor from level 0."""

    width: int
    height: int
    downsample: float


class SlideReader:
    """Common interface of the readers (see the module docstring)."""

    kind = "base"
    path: str
    levels: list[Level]
    mpp: float | None  # µm per level-0 pixel (mean of x and y)
    mpp_source: str | None

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.levels[0].width, self.levels[0].height

    def level_mpp(self, level: int) -> float | None:
        """µm/px of ``level`` (None when level 0's is unknown)."""
        return None if self.mpp is None else self.mpp * self.levels[level].downsample

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """RGB image of ``width`` x ``height`` pixels of ``level`` whose top-left corner is at
        level-0 pixel (x, y); raises :class:`SlideReadError` when the slide cannot deliver it."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for the outputs: reader, level sizes, µm/px and where it came from."""
        return {"reader": self.kind, "width": self.dimensions[0], "height": self.dimensions[1],
                "levels": [[lv.width, lv.height, round(lv.downsample, 4)] for lv in self.levels],
                "slide_mpp": self.mpp, "slide_mpp_source": self.mpp_source}

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _mean_mpp(mpp_x: float | None, mpp_y: float | None, path: str) -> float | None:
    if mpp_x is None or mpp_y is None:
        return mpp_x or mpp_y
    if abs(mpp_x - mpp_y) > 0.01 * max(mpp_x, mpp_y):
        logger.warning("%s: pixels are not square (%.4g x %.4g µm); using their mean", path, mpp_x, mpp_y)
    return (mpp_x + mpp_y) / 2


class OpenSlideReader(SlideReader):
    """A slide read through OpenSlide (``openslide-python`` with the ``openslide-bin`` library)."""

    kind = "openslide"

    def __init__(self, path: str | os.PathLike, slide_mpp: float | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        import openslide

        self._openslide = openslide
        self.path = os.fspath(path)
        self._cache = openslide.OpenSlideCache(cache_bytes)
        self._local = threading.local()
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        try:
            slide = self._handle()
        except openslide.OpenSlideError as err:
            raise ValueError(f"--image {self.path!r} cannot be read as a slide: {err}") from err
        self.vendor = slide.properties.get("openslide.vendor")
        self.levels = [Level(int(w), int(h), float(ds))
                       for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples, strict=True)]
        self.mpp_source = None
        self.mpp = _positive(slide_mpp)
        if self.mpp is not None:
            self.mpp_source = "--slide_mpp"
        else:
            props = slide.properties
            self.mpp = _mean_mpp(_positive(props.get("openslide.mpp-x")), _positive(props.get("openslide.mpp-y")),
                                 self.path)
            self.mpp_source = "openslide.mpp-x/-y" if self.mpp is not None else None

    def _handle(self) -> Any:
        slide = getattr(self._local, "slide", None)
        if slide is None:
            slide = self._openslide.OpenSlide(self.path)
            slide.set_cache(self._cache)
            with self._lock:
                self._handles.append(slide)
            self._local.slide = slide
        return slide

    def _discard(self, slide: Any) -> None:
        self._local.slide = None
        with self._lock:
            if slide in self._handles:
                self._handles.remove(slide)
        slide.close()

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        slide = self._handle()
        try:
            region = slide.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        except self._openslide.OpenSlideError as err:
            self._discard(slide)  # the handle stays in error state: the next read opens a fresh one
            raise SlideReadError(f"{self.path}: level {level} region {width}x{height} at level-0 ({x}, {y}): "
                                 f"{err}") from err
        return to_rgb8(region)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "vendor": self.vendor}

    def close(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, []
        for slide in handles:
            slide.close()


def _tiff_cm_mpp(image: Image.Image) -> float | None:
    """µm/px from a TIFF's resolution tags when their unit is the centimetre (what microscope software
    writes); an inch resolution is most often a 72/96 dpi default of photo software, not a scale."""
    tags = getattr(image, "tag_v2", None)
    if not tags or tags.get(296) != 3:  # ResolutionUnit 3 = centimetre
        return None
    per_cm_x, per_cm_y = _positive(tags.get(282)), _positive(tags.get(283))
    mpp_x, mpp_y = (None if v is None else 1e4 / v for v in (per_cm_x, per_cm_y))  # pixels per cm -> µm/px
    return _mean_mpp(mpp_x, mpp_y, getattr(image, "filename", ""))


def image_mpp(path: str | os.PathLike) -> float | None:
    """µm/px a plain image file records (the TIFF rule of :class:`ImageReader`: centimetre resolution
    tags only), read from its header without decoding the pixels; None when it records none."""
    try:
        with open_image(os.fspath(path)) as image:
            return _tiff_cm_mpp(image)
    except (OSError, SyntaxError, ValueError):
        return None


class ImageReader(SlideReader):
    """A plain image (PNG, JPEG, flat TIFF ...) decoded once with PIL: one level."""

    kind = "image"

    def __init__(self, path: str | os.PathLike, slide_mpp: float | None = None,
                 max_image_pixels: int | None = None) -> None:
        self.path = os.fspath(path)
        try:
            with pixel_limit(max_image_pixels):
                image = open_image(self.path)
                image.load()
        except Image.DecompressionBombError as err:
            raise ValueError(f"--image {self.path!r} is larger than the pixel limit ({err}); raise it with "
                             "--max_image_pixels, or for a pyramidal slide " + WSI_INSTALL_HINT) from err
        except (OSError, SyntaxError, ValueError) as err:
            vendor = self.path.lower().endswith(_VENDOR_ONLY)
            hint = f"; to read slide formats {WSI_INSTALL_HINT}" if vendor and not openslide_available() else ""
            raise ValueError(f"--image {self.path!r} is neither a slide nor an image: {err}{hint}") from err
        self._image = image
        self.levels = [Level(image.width, image.height, 1.0)]
        self.mpp = _positive(slide_mpp)
        self.mpp_source = "--slide_mpp" if self.mpp is not None else None
        if self.mpp is None:
            self.mpp = _tiff_cm_mpp(image)
            self.mpp_source = "TIFF resolution" if self.mpp is not None else None

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        if level != 0:
            raise ValueError(f"{self.path}: a plain image has only level 0, not {level}")
        return to_rgb8(self._image.crop((int(x), int(y), int(x) + int(width), int(y) + int(height))))

    def close(self) -> None:
        self._image.close()


def openslide_available() -> bool:
    """Whether ``openslide`` (the [wsi] extra) can be imported."""
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):  # OSError: the Python package without its library
        return False
    return True


def open_slide(path: str | os.PathLike, slide_mpp: float | None = None,
               max_image_pixels: int | None = None) -> SlideReader:
    """Open ``path`` with OpenSlide when it recognises the file, else as a plain image with PIL.

    ``slide_mpp`` overrides the µm/px of level 0 the file records. Missing files raise
    FileNotFoundError, unreadable ones ValueError, both naming the file.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"--image {name!r}: no such file")
    if slide_mpp is not None and _positive(slide_mpp) is None:
        raise ValueError(f"--slide_mpp must be a positive number of µm per pixel, got {slide_mpp}")
    if openslide_available():
        import openslide

        if openslide.OpenSlide.detect_format(name) is not None:
            return OpenSlideReader(name, slide_mpp)
    return ImageReader(name, slide_mpp, max_image_pixels)
