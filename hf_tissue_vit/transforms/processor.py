"""The saved image processor: the package's own, and an exact reproduction of any saved one.

:class:`ProcessorTransform` turns decoded 8-bit RGB tiles into *exactly* the ``pixel_values`` that
the saved image processor (and so ``pipeline("image-classification")``) gives the model, but in a
form that batches: the geometric steps (resize with the processor's ``resample`` filter, shortest-edge
resize, center crops, ConvNeXT's ``crop_pct``) run per tile with PIL, as transformers' PIL backend
runs them, and can run in decode threads; rescale and normalize, which map each 8-bit value to one
float per channel, are a 256-entry table per channel computed once with the processor's own
``rescale``/``normalize`` methods and applied to the whole batch.

That fast path is taken only for PIL-backend processors whose steps it knows (the generic
``PilBackend`` pipeline, e.g. ViT, DeiT, BiT, CLIP, SigLIP, and ConvNeXT's), with a configuration it
can reproduce. Any other processor (e.g. a torchvision-backend one, or one with its own
``_preprocess``) is called itself on each batch: the slow path, announced by a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# ViT checkpoints (google/vit-*) normalise with 0.5/0.5, so that is the default for scratch models too.
DEFAULT_IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
# Processor methods the fast path reproduces; a subclass overriding one of them takes the slow path.
_PIPELINE_METHODS = ("__call__", "preprocess", "_standardize_kwargs", "_preprocess_image_like_inputs",
                     "_prepare_image_like_inputs", "process_image", "center_crop", "rescale", "normalize")
# ConvNeXT resizes the shortest edge to edge / crop_pct and crops below this edge, warps above it.
_CONVNEXT_CROP_BELOW = 384


def make_image_processor(
    image_size: int,
    image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN,
    image_std: Sequence[float] = DEFAULT_IMAGE_STD,
) -> Any:
    """ViT image processor (PIL backend; size SxS, bilinear, rescale 1/255, normalize)."""
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    # The PIL backend is what ViTImageProcessor falls back to without torchvision; asking for it directly
    # keeps the saved processor, training and prediction on one backend and logs no fallback warning.
    from transformers import ViTImageProcessorPil
    from transformers.image_utils import PILImageResampling

    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": int(image_size), "width": int(image_size)},
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(v) for v in image_mean],
        image_std=[float(v) for v in image_std],
    )


class SlowPath(Exception):
    """The processor does something the fast path cannot reproduce (the message says what)."""


@dataclass(frozen=True)
class Geometry:
    """The resize and crops a PIL-backend processor applies to one image, in order.

    ``size`` (height, width) is a fixed output size; ``shortest_edge`` instead resizes the shorter
    side to that length and the longer one to ``int(edge * long / short)``, as transformers'
    ``get_resize_output_image_size`` does. ``crops`` are center crops (height, width).
    """

    resample: int = int(Image.BILINEAR)
    size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    crops: tuple[tuple[int, int], ...] = ()

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step (unchanged when there is none)."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def changes(self, height: int, width: int) -> bool:
        """True when an image of this size is resized or cropped (False: its pixels pass unchanged)."""
        return self.resized_size(height, width) != (height, width) or self.output_size(height, width) != (height, width)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the processed image."""
        height, width = self.resized_size(height, width)
        for crop_h, crop_w in self.crops:
            if crop_h <= height and crop_w <= width:
                height, width = crop_h, crop_w
        return height, width

    def apply(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Resize (PIL, the processor's filter) and crop an RGB image or HxWx3 uint8 array; HxWx3 uint8."""
        old = image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width)
        height, width = self.resized_size(*old)
        if (height, width) != old:  # the processor's resize to the same size is a copy: skipped
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            image = image.resize((width, height), resample=self.resample)
        array = np.asarray(image)
        for crop_h, crop_w in self.crops:
            array = center_crop(array, crop_h, crop_w)
        return array


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop as transformers' ``center_crop`` does it: top = (H - h) // 2, left = (W - w) // 2.

    An image smaller than the crop in either dimension comes back unchanged, as transformers 5
    returns it (its zero padding is computed but not returned).
    """
    rows, cols = array.shape[:2]
    if height > rows or width > cols:
        return array
    top, left = (rows - height) // 2, (cols - width) // 2
    return array[top : top + height, left : left + width]


def _field(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def _pipeline_kind(processor: Any) -> str:
    """``"generic"`` (PilBackend's own steps) or ``"convnext"``; SlowPath for anything else."""
    from transformers.image_processing_backends import PilBackend

    cls = type(processor)
    if not isinstance(processor, PilBackend):
        raise SlowPath(f"{cls.__name__} is not a PIL-backend image processor")
    overridden = [name for name in _PIPELINE_METHODS if getattr(cls, name) is not getattr(PilBackend, name)]
    if overridden:
        raise SlowPath(f"{cls.__name__} overrides {', '.join(overridden)}")
    steps = (cls._preprocess, cls.resize)
    if steps == (PilBackend._preprocess, PilBackend.resize):
        return "generic"
    from transformers import ConvNextImageProcessorPil

    if steps == (ConvNextImageProcessorPil._preprocess, ConvNextImageProcessorPil.resize):
        return "convnext"
    raise SlowPath(f"{cls.__name__} has its own resize or preprocessing steps")


def _resize_step(processor: Any, kind: str) -> tuple[tuple[int, int] | None, int | None, list[tuple[int, int]]]:
    """(size, shortest_edge, crops) of the resize step, as ``PilBackend.resize`` or ConvNeXT's resize."""
    size = processor.size
    edge, longest = _field(size, "shortest_edge"), _field(size, "longest_edge")
    height, width = _field(size, "height"), _field(size, "width")
    if kind == "convnext":
        if edge is None:
            raise SlowPath(f"ConvNeXT processor size {dict(size)} has no shortest_edge")
        if edge >= _CONVNEXT_CROP_BELOW:
            return (edge, edge), None, []
        crop_pct = getattr(processor, "crop_pct", None)
        if not crop_pct:
            raise SlowPath("ConvNeXT processor without crop_pct")
        return None, int(edge / crop_pct), [(edge, edge)]
    if edge is not None and longest is None:
        return None, edge, []
    if edge is None and longest is None and height and width and _field(size, "max_height") is None:
        return (height, width), None, []
    raise SlowPath(f"processor size {dict(size)} (only height/width or shortest_edge are reproduced)")


def processor_geometry(processor: Any) -> Geometry:
    """The :class:`Geometry` of a processor the fast path can reproduce; :class:`SlowPath` otherwise."""
    kind = _pipeline_kind(processor)
    if getattr(processor, "do_pad", None):
        raise SlowPath("the processor pads (do_pad=True)")
    resample = getattr(processor, "resample", None)
    resample = int(Image.BILINEAR) if resample is None else resample  # PilBackend.resize's default
    if isinstance(resample, bool) or not isinstance(resample, int):
        raise SlowPath(f"resample {resample!r} is not a PIL filter")
    size, edge, crops = None, None, []
    if processor.do_resize:
        size, edge, crops = _resize_step(processor, kind)
    if processor.do_center_crop:
        crop_h, crop_w = _field(processor.crop_size or {}, "height"), _field(processor.crop_size or {}, "width")
        if not (crop_h and crop_w):
            raise SlowPath(f"crop_size {processor.crop_size} has no height/width")
        crops.append((crop_h, crop_w))
    return Geometry(int(resample), size, edge, tuple(crops))


def value_table(processor: Any) -> np.ndarray:
    """float32 [3, 256]: pixel value v of channel c becomes ``table[c, v]`` after the processor's
    rescale and normalize (uint8 [3, 256] when it does neither, as the processor keeps uint8).

    Computed by the processor's own ``rescale``/``normalize`` on an image holding every 8-bit value,
    so it is the processor's arithmetic (both are elementwise).
    """
    table = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()  # CHW image
    if processor.do_rescale:
        table = processor.rescale(table, processor.rescale_factor)
    if processor.do_normalize:
        mean, std = processor.image_mean, processor.image_std
        for name, value in (("image_mean", mean), ("image_std", std)):
            if not isinstance(value, (int, float)) and len(value) != 3:
                raise SlowPath(f"{name} {value} has {len(value)} values, not 3 (RGB)")
        table = processor.normalize(table, mean, std)
    return table[:, 0, :]


class ProcessorTransform:
    """Decoded 8-bit RGB tiles -> exactly the ``pixel_values`` of a saved image processor.

    Per tile, :meth:`prepare` does the geometric steps (fast path) or nothing (slow path); per batch,
    :meth:`pixel_values` maps values through the table (fast path) or calls the processor (slow path).
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.name = type(processor).__name__
        try:
            self.geometry: Geometry | None = processor_geometry(processor)
            self.table: np.ndarray | None = value_table(processor)
            self.slow_reason = ""
        except SlowPath as reason:
            self.geometry, self.table, self.slow_reason = None, None, str(reason)
            logger.warning("%s: %s; the processor itself preprocesses each batch (slow path)", self.name, reason)
        else:
            logger.debug("%s reproduced exactly: %s", self.name, self.geometry)

    @property
    def fast(self) -> bool:
        """True when the processor is reproduced by PIL geometry + value table."""
        return self.geometry is not None

    def __repr__(self) -> str:
        how = f"fast, {self.geometry}" if self.fast else f"slow: {self.slow_reason}"
        return f"{type(self).__name__}({self.name}, {how})"

    def prepare(self, tile: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
        """One RGB tile (PIL image or HxWx3 uint8) -> HxWx3 uint8 after resize and crop (fast path),
        or unchanged (slow path). Thread-safe: the decode threads call it."""
        if isinstance(tile, torch.Tensor):
            tile = tile.numpy()
        if isinstance(tile, np.ndarray):
            if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3:
                raise ValueError(f"tiles must be HxWx3 uint8 RGB, got {tile.dtype} {tuple(tile.shape)}")
        elif tile.mode != "RGB":
            raise ValueError(f"tiles must be RGB; got a {tile.mode} image (decode it with hf_tissue_vit.imaging)")
        return np.asarray(tile) if self.geometry is None else self.geometry.apply(tile)

    def changes(self, tile: Image.Image | np.ndarray | torch.Tensor) -> bool:
        """True when :meth:`prepare` resizes or crops ``tile`` (so it is worth a thread)."""
        if self.geometry is None:
            return False
        size = (tile.height, tile.width) if isinstance(tile, Image.Image) else tuple(tile.shape[:2])
        return self.geometry.changes(*size)

    def pixel_values(self, prepared: Sequence[np.ndarray]) -> torch.Tensor:
        """Prepared tiles of one shape -> pixel_values [B, 3, H, W]."""
        shapes = {tile.shape for tile in prepared}
        if len(shapes) != 1:
            raise ValueError(f"tiles of one batch must have one prepared shape, got {sorted(shapes)}")
        if self.table is None:
            images = [Image.fromarray(np.ascontiguousarray(tile)) for tile in prepared]
            return torch.as_tensor(self.processor(images=images, return_tensors="pt")["pixel_values"])
        batch = np.stack(prepared)  # [B, H, W, 3] uint8
        out = np.empty((batch.shape[0], 3, *batch.shape[1:3]), dtype=self.table.dtype)
        for c in range(3):
            np.take(self.table[c], batch[..., c], out=out[:, c], mode="clip")
        return torch.from_numpy(out)

    def batches(self, prepared: Sequence[np.ndarray]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(indices, pixel_values) per group of prepared tiles that share a shape, in first-seen order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, tile in enumerate(prepared):
            groups.setdefault(tuple(tile.shape), []).append(i)
        for index in groups.values():
            yield index, self.pixel_values([prepared[i] for i in index])

    def __call__(self, tiles: Sequence[Image.Image | np.ndarray] | torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] of tiles whose processed size is the same."""
        return self.pixel_values([self.prepare(tile) for tile in tiles])
