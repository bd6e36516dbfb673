"""Training augmentations of uint8 tile batches: dihedral symmetries, random resized crop boxes,
HED stain jitter (Tellez et al. 2018) and brightness/contrast, all batched torch ops.

:class:`~hf_tissue_vit.transforms.TileTransform` applies them; the helpers here are the per-batch
random draws and the colour algebra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def dihedral_views(pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral symmetries of ``[..., H, W]`` images (identity first), for test-time augmentation."""
    if pixel_values.dim() < 2:
        raise ValueError(f"dihedral_views needs [..., H, W] tensors, got shape {tuple(pixel_values.shape)}")
    dims = (-2, -1)
    flipped = pixel_values.flip(-1)
    return [torch.rot90(pixel_values, k, dims) for k in range(4)] + [torch.rot90(flipped, k, dims) for k in range(4)]


def uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator) * (high - low) + low


def crop_boxes(
    batch: int, height: int, width: int, aug: AugmentationConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop boxes (centre x, centre y, width, height) in pixels, like RandomResizedCrop."""
    area = float(height * width)
    scale = uniform(aug.crop_scale[0], aug.crop_scale[1], (batch, _CROP_TRIES), generator) * area
    log_ratio = uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]), (batch, _CROP_TRIES), generator)
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


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
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


def stain_jitter(
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
    alpha = uniform(1 - strength, 1 + strength, (batch, 3), generator)
    beta = uniform(-strength, strength, (batch, 3), generator)
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


def brightness_contrast(
    x: torch.Tensor, brightness: float, contrast: float, pedestal: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (gain, offset) [B,1,1,1] for brightness then contrast on y = x - pedestal.

    torchvision's definitions: brightness y * b, contrast (z - m) * c + m around the mean grey level
    m of z = y * b; together c*b*y + (1-c)*b*m(y). The clamp torchvision applies between the two is
    skipped (it only matters for saturated pixels); the caller clamps once at the end.
    """
    batch = x.shape[0]
    b = uniform(1 - brightness, 1 + brightness, (batch,), generator) if brightness else torch.ones(batch)
    c = uniform(1 - contrast, 1 + contrast, (batch,), generator) if contrast else torch.ones(batch)
    if contrast:
        grey = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype)
        mean = x.mean(dim=(2, 3)) @ grey - pedestal  # grey level of each sample before brightness
    else:
        mean = torch.zeros(batch)
    gain = c * b
    offset = (1 - c) * b * mean - gain * pedestal
    return gain.view(batch, 1, 1, 1), offset.view(batch, 1, 1, 1)
