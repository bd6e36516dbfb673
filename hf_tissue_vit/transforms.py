"""Batched tile transforms on uint8 tensors: dihedral, random resized crop, HED stain jitter.

Tiles are decoded once and kept as uint8; :class:`TileTransform` turns a whole batch into
normalized ``pixel_values`` with a handful of batched torch ops (no torchvision, no per-sample
Python loops), so it is cheap enough to run inside the DataLoader collator.

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .imaging import to_rgb8, to_uint8

logger = logging.getLogger(__name__)

__all__ = [
    "AugmentationConfig",
    "TileTransform",
    "make_image_processor",
    "dihedral_views",
    "image_to_uint8",
    "image_to_rgb8",
    "rgb_to_hed",
    "hed_to_rgb",
    "DEFAULT_IMAGE_MEAN",
    "DEFAULT_IMAGE_STD",
]

# ViT checkpoints (google/vit-*) normalise with 0.5/0.5, so that is the default for scratch models too.
DEFAULT_IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

# Ruifrok & Johnston (2001) stain vectors, rows = H, E, DAB optical densities in RGB; identical to
# skimage.color.rgb_from_hed. HED_FROM_RGB is its inverse (skimage.color.hed_from_rgb), hardcoded so
# neither skimage nor a runtime inversion is needed.
RGB_FROM_HED: tuple[tuple[float, ...], ...] = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)
HED_FROM_RGB: tuple[tuple[float, ...], ...] = (
    (1.87798274, -1.00767869, -0.55611582),
    (-0.06590806, 1.13473037, -0.1355218),
    (-0.60190736, -0.48041419, 1.57358807),
)
# Optical density of an 8-bit intensity I is -log((I + 1) / 256) (Beer-Lambert with the usual +1 so
# black pixels stay finite); in log1p/expm1 form a zero-strength jitter is exactly invertible.
_LOG_256 = math.log(256.0)
# Attempts per sample when drawing a crop box, as torchvision's RandomResizedCrop does.
_CROP_TRIES = 10


@dataclass
class AugmentationConfig:
    """Training augmentations; every field can be switched off (0 / False) from a recipe."""

    dihedral: bool = True  # random one of the 8 dihedral symmetries per sample
    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)  # crop area as a fraction of the tile area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height)
    stain_jitter: float = 0.05  # HED colour space perturbation strength
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # YAML gives lists
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be (low, high) with 0 < low <= high, got {self.crop_ratio}")
        for name in ("stain_jitter", "brightness", "contrast"):
            value = float(getattr(self, name))
            if not 0 <= value < 1:
                raise ValueError(f"augmentation {name} must be in [0, 1) (0 = off), got {value}")
            setattr(self, name, value)

    @property
    def any_enabled(self) -> bool:
        """True when at least one augmentation is on."""
        return bool(
            self.dihedral or self.random_resized_crop or self.stain_jitter or self.brightness or self.contrast
        )


def image_to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB PIL image by the package's one rule per mode (see :mod:`hf_tissue_vit.imaging`)."""
    return to_rgb8(image)


def image_to_uint8(image: Image.Image) -> np.ndarray:
    """HxWx3 RGB uint8 array by the package's one rule per mode (see :mod:`hf_tissue_vit.imaging`)."""
    return to_uint8(image)


def make_image_processor(
    image_size: int,
    image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN,
    image_std: Sequence[float] = DEFAULT_IMAGE_STD,
) -> Any:
    """ViT image processor (size SxS, bilinear, rescale 1/255, normalize) matching TileTransform's eval path."""
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    try:  # The PIL backend is what ViTImageProcessor falls back to without torchvision; ask for it
        # directly so the saved processor and training agree and no fallback warning is logged.
        from transformers import ViTImageProcessorPil as processor_cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import ViTImageProcessor as processor_cls
    from transformers.image_utils import PILImageResampling

    return processor_cls(
        do_resize=True,
        size={"height": int(image_size), "width": int(image_size)},
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(v) for v in image_mean],
        image_std=[float(v) for v in image_std],
    )


def dihedral_views(pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral symmetries of ``[..., H, W]`` images (identity first), for test-time augmentation."""
    if pixel_values.dim() < 2:
        raise ValueError(f"dihedral_views needs [..., H, W] tensors, got shape {tuple(pixel_values.shape)}")
    dims = (-2, -1)
    flipped = pixel_values.flip(-1)
    return [torch.rot90(pixel_values, k, dims) for k in range(4)] + [torch.rot90(flipped, k, dims) for k in range(4)]


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], shape [B,3,H,W] -> HED stain optical densities (Ruifrok & Johnston)."""
    od = _LOG_256 - torch.log1p(rgb * 255)
    matrix = torch.tensor(HED_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
    return torch.einsum("bchw,cd->bdhw", od, matrix)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed`: HED optical densities -> RGB in [0, 1] (not clamped)."""
    matrix = torch.tensor(RGB_FROM_HED, dtype=hed.dtype, device=hed.device)
    od = torch.einsum("bdhw,dc->bchw", hed, matrix)
    return torch.expm1(_LOG_256 - od) / 255


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator) * (high - low) + low


def _as_batch(images: torch.Tensor | np.ndarray | Sequence[Any]) -> torch.Tensor:
    """[B,3,H,W] view (uint8, or float32 on the 0..255 scale) of [B,H,W,3] / [B,3,H,W] input (or one image)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("TileTransform got an empty list of images")
        parts = [image_to_uint8(im) if isinstance(im, Image.Image) else im for im in images]
        parts = [torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in parts]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}; resize them first")
        images = torch.stack(parts)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"TileTransform expects a uint8 tensor or array, got {type(images).__name__}")
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
    dihedral symmetry on the uint8 tiles, then stain jitter and brightness/contrast on the SxS floats.
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
        # and std (the ViT default), as clamping to scalars is about 3x faster than to tensors.
        low, high = self._shift, 255 * self._scale + self._shift
        uniform = bool((low == low[0, 0]).all() and (high == high[0, 0]).all())
        self._bounds = (float(low[0, 0]), float(high[0, 0])) if uniform else (low, high)

    @classmethod
    def from_processor(cls, processor: Any, augmentation: AugmentationConfig | None = None) -> TileTransform:
        """Build from a (ViT) image processor, checking it is a square resize + 1/255 rescale."""
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
        if not getattr(processor, "do_resize", True):
            logger.warning("processor has do_resize=False; TileTransform still resizes to %d px", image_size)
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
        self, images: torch.Tensor | np.ndarray, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """uint8 [B,H,W,3] or [B,3,H,W] (a single [H,W,3] image gives B=1) -> float32 [B,3,S,S]."""
        x = _as_batch(images)
        size = self.image_size
        if x.shape[0] == 0:
            return torch.empty(0, 3, size, size)
        aug = self.augmentation
        out = torch.empty(x.shape[0], 3, size, size)
        if aug is None or not aug.any_enabled:
            # uint8 resize output is rounded like the PIL processor's, so eval matches it.
            x = self._resize(x, size, size).float()
            # mul + add_ rather than addcmul: broadcast addcmul measured ~3x slower on CPU
            return torch.mul(x, self._scale, out=out).add_(self._shift)
        x, gain, offset = self._augment(x, aug, generator, out)
        # The last pixel-wise step clamp(gain * x + offset, 0, 255) is fused with rescale and
        # normalisation (scale > 0, so clamping after the affine map is the same), written straight
        # into a contiguous NCHW tensor (mul + add_: a broadcast addcmul measured ~3x slower on CPU).
        torch.mul(x, gain * self._scale, out=out).add_(offset * self._scale + self._shift)
        return out.clamp_(*self._bounds)

    # --- internals ---------------------------------------------------------------------------

    @staticmethod
    def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Bilinear antialiased resize on the 0..255 scale, keeping the dtype (no-op at the size).

        uint8 goes through torch's channels-last uint8 kernel, which is several times faster than
        the float one and built to match PIL's bilinear filter.
        """
        if x.shape[-2:] == (height, width):
            return x
        if x.dtype == torch.uint8:
            x = x.contiguous(memory_format=torch.channels_last)
            return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255)

    def _augment(
        self, x: torch.Tensor, aug: AugmentationConfig, generator: torch.Generator | None, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment; returns float32 y [B,3,S,S] (possibly ``out`` itself) and per-sample gain/offset
        [B,1,1,1] such that the augmented 0..255 image is clamp(gain * y + offset, 0, 255)."""
        if aug.random_resized_crop:
            x = self._random_resized_crop(x, aug, generator)  # fresh contiguous NCHW
        else:
            x = self._resize(x, self.image_size, self.image_size).contiguous()
        if aug.dihedral:
            # on uint8 NCHW the dihedral copies are ~3x faster than on channels-last or float data
            x = _random_dihedral(x, generator)
        # A fresh float copy: later steps work in place (x may still be the caller's tensor; float
        # input was already copied by _as_batch).
        x = x.to(torch.float32)
        pedestal = 0.0
        if aug.stain_jitter:
            x = _stain_jitter(x, aug.stain_jitter, generator, out=out)
            pedestal = 1.0  # _stain_jitter returns x + 1
        gain, offset = _brightness_contrast(x, aug.brightness, aug.contrast, pedestal, generator)
        return x, gain, offset

    def _crop_boxes(
        self, batch: int, height: int, width: int, aug: AugmentationConfig, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample crop boxes (centre x, centre y, width, height) in pixels, like RandomResizedCrop."""
        area = float(height * width)
        scale = _uniform(aug.crop_scale[0], aug.crop_scale[1], (batch, _CROP_TRIES), generator) * area
        log_ratio = _uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]), (batch, _CROP_TRIES), generator)
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(scale * ratio)
        h = torch.sqrt(scale / ratio)
        ok = (w <= width) & (h <= height)
        first = ok.float().argmax(dim=1, keepdim=True)  # first valid try per sample
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)
        # Fallback when no try fits: largest centred crop with the ratio clamped into range.
        fallback = ~ok.any(dim=1)
        if fallback.any():
            in_ratio = width / height
            if in_ratio < aug.crop_ratio[0]:
                fw, fh = float(width), width / aug.crop_ratio[0]
            elif in_ratio > aug.crop_ratio[1]:
                fw, fh = height * aug.crop_ratio[1], float(height)
            else:
                fw, fh = float(width), float(height)
            w = torch.where(fallback, torch.full_like(w, fw), w)
            h = torch.where(fallback, torch.full_like(h, fh), h)
        offsets = torch.rand((batch, 2), generator=generator)
        cx = w / 2 + offsets[:, 0] * (width - w)
        cy = h / 2 + offsets[:, 1] * (height - h)
        return cx, cy, w, h

    def _random_resized_crop(
        self, x: torch.Tensor, aug: AugmentationConfig, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Random resized crop of each sample to SxS, as torchvision's RandomResizedCrop does: an
        integer box per sample, resized with the antialiased bilinear filter (same dtype as ``x``).

        One small resize call per sample: on uint8 tiles this is about twice as fast as a single
        batched float ``grid_sample`` (which cannot antialias), measured on 1 and 2 CPU threads.
        """
        batch, _, height, width = x.shape
        size = self.image_size
        cx, cy, w, h = self._crop_boxes(batch, height, width, aug, generator)
        box_w = w.round().clamp(1, width).long()
        box_h = h.round().clamp(1, height).long()
        left = torch.minimum((cx - box_w / 2).round().clamp(min=0).long(), width - box_w)
        top = torch.minimum((cy - box_h / 2).round().clamp(min=0).long(), height - box_h)
        out = torch.empty(batch, 3, size, size, dtype=x.dtype)
        for i, (x0, y0, bw, bh) in enumerate(zip(left.tolist(), top.tolist(), box_w.tolist(), box_h.tolist())):
            out[i] = self._resize(x[i : i + 1, :, y0 : y0 + bh, x0 : x0 + bw], size, size)[0]
        return out


def _random_dihedral(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One random symmetry per sample of square [B,C,S,S] images.

    Samples are grouped by the drawn symmetry (8 groups, not a loop over samples): one gather and
    one scatter per group, cheap on uint8.
    """
    choice = torch.randint(0, 8, (x.shape[0],), generator=generator)
    out = torch.empty_like(x)
    for k in choice.unique().tolist():
        index = (choice == k).nonzero().squeeze(1)
        view = x.index_select(0, index)
        if k >= 4:
            view = view.flip(-1)
        out.index_copy_(0, index, torch.rot90(view, k % 4, (-2, -1)))
    return out


def _stain_jitter(
    x: torch.Tensor, strength: float, generator: torch.Generator | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HED jitter (Tellez et al. 2018) of contiguous 0..255 float images [B,3,H,W]; returns x' + 1.

    Stains S = OD @ H become S * alpha + beta (alpha ~ U(1-s, 1+s), beta ~ U(-s, s) per sample and
    stain), then OD' = S' @ R, with OD = log(256) - log(1 + x) per pixel (row vector). This is one
    per-sample affine map of L = log(1 + x): L' = L @ T + c, T = H diag(alpha) R,
    c = log(256) (1 - 1 @ T) - beta @ R. Writing L' = (L + d) @ T with d = c @ T^-1 moves the bias
    into the log's argument, log(e^d (1 + x)), so the batch costs one multiply-add, one log, one
    bmm and one exp, all in place except the bmm (written to ``out`` when given, to
    save a large allocation). T^-1 = H diag(1/alpha) R as H = R^-1.
    """
    batch, channels, height, width = x.shape
    alpha = _uniform(1 - strength, 1 + strength, (batch, 3), generator)
    beta = _uniform(-strength, strength, (batch, 3), generator)
    hed_from_rgb = torch.tensor(HED_FROM_RGB, dtype=torch.float64)  # 3x3 algebra in float64
    rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=torch.float64)
    alpha64, beta64 = alpha.double(), beta.double()
    matrix = (hed_from_rgb * alpha64.unsqueeze(1)) @ rgb_from_hed  # [B,3,3]
    inverse = (hed_from_rgb / alpha64.unsqueeze(1)) @ rgb_from_hed
    bias = _LOG_256 * (1 - matrix.sum(dim=1)) - beta64 @ rgb_from_hed  # [B,3]
    d = (bias.unsqueeze(1) @ inverse).squeeze(1)  # [B,3]
    k = torch.exp(d).to(x.dtype).view(batch, channels, 1, 1)
    log_x = x.mul_(k).add_(k).log_()  # log(e^d (1 + x)) = L + d
    cols = torch.empty_like(x) if out is None else out
    torch.bmm(
        matrix.transpose(1, 2).to(x.dtype),
        log_x.view(batch, channels, height * width),
        out=cols.view(batch, channels, height * width),
    )
    # No clamp here: the caller's single final clamp bounds the result to [0, 255] (+ pedestal).
    return cols.exp_()


def _brightness_contrast(
    x: torch.Tensor, brightness: float, contrast: float, pedestal: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (gain, offset) [B,1,1,1] for brightness then contrast on y = x - pedestal.

    torchvision's definitions: brightness y * b, contrast (z - m) * c + m around the mean grey level
    m of z = y * b; together c*b*y + (1-c)*b*m(y). The clamp torchvision applies between the two is
    skipped (it only matters for saturated pixels); the caller clamps once at the end.
    """
    batch = x.shape[0]
    b = _uniform(1 - brightness, 1 + brightness, (batch,), generator) if brightness else torch.ones(batch)
    c = _uniform(1 - contrast, 1 + contrast, (batch,), generator) if contrast else torch.ones(batch)
    if contrast:
        grey = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype)
        mean = x.mean(dim=(2, 3)) @ grey - pedestal  # grey level of each sample before brightness
    else:
        mean = torch.zeros(batch)
    gain = c * b
    offset = (1 - c) * b * mean - gain * pedestal
    return gain.view(batch, 1, 1, 1), offset.view(batch, 1, 1, 1)
