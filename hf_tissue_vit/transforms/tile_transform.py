"""Batched tile transform: a batch of uint8 tiles -> normalized float32 ``pixel_values``.

Tiles are decoded once and kept as uint8; :class:`TileTransform` turns a whole batch into
``pixel_values`` with a handful of batched torch ops (no torchvision, no per-sample Python loops), so
it is cheap enough to run inside the DataLoader collator. Its eval path (no augmentation) is a square
bilinear resize, rescale and normalize: the training-time stand-in for the package's own processor
(:func:`~hf_tissue_vit.transforms.make_image_processor`), equal to it up to resize rounding. Prediction
reproduces a saved processor exactly with :class:`~hf_tissue_vit.transforms.ProcessorTransform`.

Example::

    processor = make_image_processor(64)
    train_tf = TileTransform.from_processor(processor, AugmentationConfig())
    eval_tf = TileTransform.from_processor(processor)          # deterministic resize only
    pixel_values = train_tf(torch.from_numpy(uint8_tiles))     # [B,3,64,64] float32
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..imaging import to_uint8
from .augmentation import (
    AugmentationConfig,
    TileGeometry,
    apply_dihedral,
    brightness_contrast,
    crop_box_pixels,
    crop_resize,
    draw_dihedral,
    greyscale,
    stain_jitter,
)
from .processor import SlowPath, processor_geometry
from .stain import random_od_statistics

logger = logging.getLogger(__name__)


def _as_batch(images: torch.Tensor | np.ndarray | Sequence[Any]) -> torch.Tensor:
    """[B,3,H,W] view (uint8, or float32 on the 0..255 scale) of [B,H,W,3] / [B,3,H,W] input (or one image)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("TileTransform got an empty list of images")
        parts = [to_uint8(im) if isinstance(im, Image.Image) else im for im in images]
        parts = [torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in parts]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}; resize them first")
        images = torch.stack(parts)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"TileTransform expects a uint8 tensor or array, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"images must be [B,H,W,3] or [B,3,H,W], got shape {tuple(images.shape)}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    elif images.shape[1] != 3:
        raise ValueError(f"images must have 3 RGB channels ([B,H,W,3] or [B,3,H,W]), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if images.is_floating_point():  # assumed on the 0..255 scale; copied as transforms work in place
        return images.to(torch.float32, copy=True)
    raise ValueError(f"images must be uint8 (or float on a 0..255 scale), got dtype {images.dtype}")


class TileTransform:
    """Batch of uint8 tiles -> normalized float32 ``pixel_values`` [B,3,S,S].

    ``augmentation=None`` is the deterministic eval path (bilinear antialiased resize, rescale,
    normalize), identical up to rounding to :func:`make_image_processor`. With an
    :class:`AugmentationConfig`: random resized crop (integer box, antialiased resize) and the
    dihedral symmetry on the uint8 tiles, then stain statistics, stain jitter, grey and brightness/contrast on
    the SxS floats.

    Tiles on a GPU are transformed there (the *device path*: batched ops only, see ``__call__``); the
    random numbers always come from one CPU generator, so both paths draw the same augmentations.
    """

    def __init__(
        self,
        image_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        augmentation: AugmentationConfig | None = None,
    ) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {image_mean} and {image_std}")
        if any(float(s) <= 0 for s in image_std):
            raise ValueError(f"image_std values must be positive, got {image_std}")
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        if augmentation is not None and not isinstance(augmentation, AugmentationConfig):
            raise ValueError(f"augmentation must be an AugmentationConfig or None, got {type(augmentation).__name__}")
        self.augmentation = augmentation
        # Rescale + normalisation folded into one multiply-add on the 0..255 scale: (x/255 - mean) / std.
        self._scale = torch.tensor([1.0 / (255 * s) for s in self.image_std]).view(1, 3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.image_mean, self.image_std)]).view(1, 3, 1, 1)
        # Bounds of the normalised 0..255 range; plain numbers when every channel has the same mean
        # and std (the ViT default), as clamping to scalars is faster than to tensors.
        low, high = self._shift, 255 * self._scale + self._shift
        uniform = bool((low == low[0, 0]).all() and (high == high[0, 0]).all())
        self._bounds = (float(low[0, 0]), float(high[0, 0])) if uniform else (low, high)

    @classmethod
    def from_processor(cls, processor: Any, augmentation: AugmentationConfig | None = None) -> TileTransform:
        """Build from an image processor's size, mean and std (rescale must be 1/255); logs a warning
        when the processor's own resize differs from the eval path's square bilinear resize."""
        size = getattr(processor, "size", None) or {}
        if not isinstance(size, dict):
            size = dict(size)
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ValueError(f"processor size must be square for tiles, got {size}")
            image_size = int(size["height"])
        elif "shortest_edge" in size:
            image_size = int(size["shortest_edge"])
        else:
            raise ValueError(f"processor size {size} has no height/width; save the processor with a square size")
        differences = _eval_differences(processor, image_size)
        if differences:
            logger.warning(
                "TileTransform's eval path resizes to %dx%d px with a bilinear filter, but %s %s: its pixels "
                "differ from the processor's (prediction reproduces the processor itself)",
                image_size, image_size, type(processor).__name__, "; ".join(differences),
            )
        rescale = 1.0
        if getattr(processor, "do_rescale", True):
            rescale = float(getattr(processor, "rescale_factor", 1 / 255))
        if not math.isclose(rescale, 1 / 255, rel_tol=1e-6):
            raise ValueError(
                f"processor rescale_factor {rescale} is not 1/255; TileTransform only supports 8-bit tiles"
            )
        if getattr(processor, "do_normalize", True):
            mean, std = list(processor.image_mean), list(processor.image_std)
            if len(mean) == 1:
                mean, std = mean * 3, std * 3
        else:
            mean, std = [0.0] * 3, [1.0] * 3
        return cls(image_size, mean, std, augmentation=augmentation)

    def variant(self, image_size: int | None = None, augmentation: AugmentationConfig | None = None) -> TileTransform:
        """This transform's normalisation at ``image_size`` (default its own) with ``augmentation`` (default none:
        the eval path, the whole tile resized)."""
        return TileTransform(image_size or self.image_size, self.image_mean, self.image_std, augmentation)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, image_mean={self.image_mean}, "
            f"image_std={self.image_std}, augmentation={self.augmentation})"
        )

    @property
    def is_training(self) -> bool:
        """True when some random augmentation is active."""
        return self.augmentation is not None and self.augmentation.any_enabled

    def __call__(
        self, images: torch.Tensor | np.ndarray, generator: torch.Generator | None = None,
        *, device_path: bool | None = None, return_geometry: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, TileGeometry]:
        """uint8 [B,H,W,3] or [B,3,H,W] (a single [H,W,3] image gives B=1) -> float32 [B,3,S,S] on the
        images' device.

        ``device_path`` (default: on for tensors on an accelerator) augments with batched ops only: the
        crop of every tile is two batched matrix products (:func:`crop_resize`) instead of one resize per
        tile, and the dihedral symmetry runs on the resized floats. It draws the same random numbers from
        ``generator`` (a CPU generator; None = torch's default one) as the CPU path, and its pixels equal
        the CPU path's up to the rounding of the CPU's fixed-point uint8 resize (one grey level, rarely).

        ``return_geometry``: also return the batch's :class:`TileGeometry` (crop boxes, symmetries; the whole tile
        and no symmetry on the eval path).
        """
        x = _as_batch(images)
        result, geometry = self._transform(x, generator, device_path)
        return (result, geometry) if return_geometry else result

    def _transform(
        self, x: torch.Tensor, generator: torch.Generator | None, device_path: bool | None
    ) -> tuple[torch.Tensor, TileGeometry]:
        size, device = self.image_size, x.device
        geometry = TileGeometry.whole(x.shape[0], x.shape[-2], x.shape[-1])
        if device_path is None:
            device_path = device.type != "cpu"
        if x.shape[0] == 0:
            return torch.empty(0, 3, size, size, device=device), geometry
        aug = self.augmentation
        out = torch.empty(x.shape[0], 3, size, size, device=device)
        scale, shift = self._scale.to(device), self._shift.to(device)
        if aug is None or not aug.any_enabled:
            # uint8 resize output is rounded like the PIL processor's, so eval matches it.
            x = self._resize(x, size, size).float()
            # mul + add_ rather than addcmul: a broadcast addcmul is slower on CPU
            return torch.mul(x, scale, out=out).add_(shift), geometry
        x, gain, offset, geometry = self._augment(x, aug, generator, out, device_path)
        # The last pixel-wise step clamp(gain * x + offset, 0, 255) is fused with rescale and
        # normalisation (scale > 0, so clamping after the affine map is the same), written straight
        # into a contiguous NCHW tensor (mul + add_: a broadcast addcmul is slower on CPU).
        torch.mul(x, gain * scale, out=out).add_(offset * scale + shift)
        bounds = self._bounds if isinstance(self._bounds[0], float) else tuple(b.to(device) for b in self._bounds)
        return out.clamp_(*bounds), geometry

    # --- internals ---------------------------------------------------------------------------

    @staticmethod
    def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Bilinear antialiased resize on the 0..255 scale, keeping the dtype (no-op at the size).

        uint8 goes through torch's channels-last uint8 kernel, faster than the float one and close to
        (not bit-exact with) PIL's bilinear filter. That kernel is the CPU's: uint8 elsewhere is resized
        as floats (and returned as rounded floats).
        """
        if x.shape[-2:] == (height, width):
            return x
        if x.dtype == torch.uint8 and x.device.type != "cpu":
            x = x.float()
        elif x.dtype == torch.uint8:
            x = x.contiguous(memory_format=torch.channels_last)
            return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255)

    def _augment(
        self, x: torch.Tensor, aug: AugmentationConfig, generator: torch.Generator | None, out: torch.Tensor,
        device_path: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TileGeometry]:
        """Augment; returns float32 y [B,3,S,S] (possibly ``out`` itself), per-sample gain/offset
        [B,1,1,1] such that the augmented 0..255 image is clamp(gain * y + offset, 0, 255), and the geometry."""
        batch, _, height, width = x.shape
        # crop boxes first, then the symmetries: the order of the draws of both paths
        boxes = (crop_box_pixels(batch, height, width, aug, generator) if aug.random_resized_crop
                 else TileGeometry.whole(batch, height, width).boxes)
        choice = draw_dihedral(batch, generator) if aug.dihedral else torch.zeros(batch, dtype=torch.long)
        geometry = TileGeometry(boxes, choice, (height, width))
        if device_path:
            x = self._geometry_batched(x, geometry)
        else:
            if aug.random_resized_crop:
                x = self._random_resized_crop(x, boxes)  # fresh contiguous NCHW
            else:
                x = self._resize(x, self.image_size, self.image_size).contiguous()
            if aug.dihedral:
                # on uint8 NCHW the dihedral copies are cheaper than on channels-last or float data
                x = apply_dihedral(x, choice)
            # A fresh float copy: later steps work in place (x may still be the caller's tensor; float
            # input was already copied by _as_batch).
            x = x.to(torch.float32)
        pedestal, log1p_input = 0.0, False
        if aug.stain_stats:  # gives log(1 + x): the HED jitter's first step, or an exp away from x
            x, log1p_input = random_od_statistics(x, aug.stain_stats, generator, aug.stain_stats_p), True
        if aug.stain_jitter:
            x = stain_jitter(x, aug.stain_jitter, generator, out=out, log1p_input=log1p_input)
            pedestal = 1.0  # _stain_jitter returns x + 1
        elif log1p_input:
            x = x.exp_().sub_(1)
        if aug.grey_p:
            x = greyscale(x, aug.grey_p, generator)
        gain, offset = brightness_contrast(x, aug.brightness, aug.contrast, pedestal, generator)
        return x, gain, offset, geometry

    def _geometry_batched(self, x: torch.Tensor, geometry: TileGeometry) -> torch.Tensor:
        """The device path's crop (or resize) and dihedral symmetry: float32 contiguous [B,3,S,S] on x's device."""
        x = crop_resize(x, geometry.boxes, self.image_size)
        if self.augmentation.dihedral:
            x = apply_dihedral(x, geometry.dihedral)
        return x.contiguous()

    def _random_resized_crop(self, x: torch.Tensor, boxes: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Random resized crop of each sample to SxS, as torchvision's RandomResizedCrop does: an
        integer box per sample, resized with the antialiased bilinear filter (same dtype as ``x``).

        One small resize call per sample: on uint8 tiles this is faster than a single batched float
        ``grid_sample``, which cannot antialias either.
        """
        size = self.image_size
        left, top, box_w, box_h = boxes
        out = torch.empty(x.shape[0], 3, size, size, dtype=x.dtype)
        for i, (x0, y0, bw, bh) in enumerate(zip(left.tolist(), top.tolist(), box_w.tolist(), box_h.tolist())):
            out[i] = self._resize(x[i : i + 1, :, y0 : y0 + bh, x0 : x0 + bw], size, size)[0]
        return out


def _eval_differences(processor: Any, image_size: int) -> list[str]:
    """How ``processor`` resizes other than the eval path's square bilinear resize (empty: it does not)."""
    try:
        geometry = processor_geometry(processor)
    except SlowPath as reason:
        return [str(reason)]
    differences = []
    if geometry.resample != int(Image.BILINEAR):
        differences.append(f"resamples with PIL filter {geometry.resample}")
    if geometry.size != (image_size, image_size) or geometry.shortest_edge is not None or geometry.crops:
        differences.append(f"resizes as {geometry}")
    return differences
