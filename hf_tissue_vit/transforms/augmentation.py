"""Training augmentations of uint8 tile batches: dihedral symmetries, random resized crop boxes,
per-tile stain statistics (:mod:`.stain`), HED stain jitter (Tellez et al. 2018) and brightness/contrast,
all batched torch ops.

:class:`~hf_tissue_vit.transforms.TileTransform` applies them; the helpers here are the per-batch
random draws and the colour algebra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
# ITU-R 601 luma weights of R, G, B (torchvision's grey level): grey tiles and the contrast's mean grey level.
LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)
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
    # Each tile's optical-density mean and s.d. moved to random targets (log-factor range; 0 = off), before the
    # HED jitter: stain amount and hue as they differ between centres (transforms.stain.random_od_statistics).
    stain_stats: float = 0.0
    stain_stats_p: float = 1.0  # probability that a tile's statistics are moved (the others keep their colour)
    brightness: float = 0.1
    contrast: float = 0.1
    # Probability that a tile is shown in grey (its luma in every channel), after the stain steps: a tile with no
    # colour to learn, only shape and texture (for other centres' colours; :func:`greyscale`). 0 = off.
    grey_p: float = 0.0

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
        self.stain_stats, self.stain_stats_p = float(self.stain_stats), float(self.stain_stats_p)
        self.grey_p = float(self.grey_p)
        for name in ("stain_stats_p", "grey_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augmentation {name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.stain_stats <= 2:
            raise ValueError(f"augmentation stain_stats must be in [0, 2] (a log-factor range; 0 = off), "
                             f"got {self.stain_stats}")

    @property
    def any_enabled(self) -> bool:
        """True when at least one augmentation is on."""
        return bool(
            self.dihedral or self.random_resized_crop or self.stain_jitter or self.stain_stats or self.brightness
            or self.contrast or self.grey_p
        )

    def scaled(self, strength: float, colour: bool = True) -> AugmentationConfig:
        """This augmentation at ``strength`` in [0, 1] (a clean ending's ramp): every strength and probability times
        ``strength``, the crop's area and aspect ranges shrunk towards the whole tile (at 0, the crop is the whole
        tile, resized as the eval path does). The symmetries stay: tissue has no orientation, so they are no
        departure from the test tiles. ``colour=False`` ramps the crop only: the colour steps (stain, brightness,
        contrast, grey) keep their strength, for models meant to meet other stains than the training slides'."""
        if not 0 <= strength <= 1:
            raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
        if strength == 1:
            return self
        low, high = self.crop_ratio
        crop = replace(
            self,
            crop_scale=tuple(1 - (1 - v) * strength for v in self.crop_scale),
            crop_ratio=(math.exp(math.log(low) * strength), math.exp(math.log(high) * strength)),
        )
        if not colour:
            return crop
        return replace(
            crop,
            stain_jitter=self.stain_jitter * strength,
            stain_stats=self.stain_stats * strength,
            brightness=self.brightness * strength,
            contrast=self.contrast * strength,
            grey_p=self.grey_p * strength,
        )


def dihedral_views(pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral symmetries of ``[..., H, W]`` images (identity first), for test-time augmentation."""
    if pixel_values.dim() < 2:
        raise ValueError(f"dihedral_views needs [..., H, W] tensors, got shape {tuple(pixel_values.shape)}")
    dims = (-2, -1)
    flipped = pixel_values.flip(-1)
    return [torch.rot90(pixel_values, k, dims) for k in range(4)] + [torch.rot90(flipped, k, dims) for k in range(4)]


def uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Uniform draws on the CPU (every random number of the augmentations is drawn there, from one CPU
    generator, so a batch augmented on a GPU gets the same draws as on the CPU)."""
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


def crop_box_pixels(
    batch: int, height: int, width: int, aug: AugmentationConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer crop boxes (left, top, width, height), long tensors [B] on the CPU, from :func:`crop_boxes`."""
    cx, cy, w, h = crop_boxes(batch, height, width, aug, generator)
    box_w = w.round().clamp(1, width).long()
    box_h = h.round().clamp(1, height).long()
    left = torch.minimum((cx - box_w / 2).round().clamp(min=0).long(), width - box_w)
    top = torch.minimum((cy - box_h / 2).round().clamp(min=0).long(), height - box_h)
    return left, top, box_w, box_h


def antialias_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """[B, out_size, in_size] float64 weights that resize the span ``start .. start + length`` (per sample) of an
    axis of ``in_size`` pixels to ``out_size`` pixels as ``F.interpolate(mode="bilinear", antialias=True)`` does.

    The same triangle filter, support and window as torch's (and PIL's) separable antialiased kernel
    (``_compute_weights_aa``), with every weight outside the span zero, so a crop and its resize are one
    matrix product per axis.
    """
    length = length.to(torch.float64).view(-1, 1, 1)
    scale = length / out_size
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))  # bilinear: half the 2-tap width, scaled
    inverse = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(out_size, dtype=torch.float64, device=start.device).view(1, -1, 1) + 0.5)
    # box-local index of every input pixel [B,1,in]
    j = torch.arange(in_size, dtype=torch.float64, device=start.device).view(1, 1, -1) - start.view(-1, 1, 1)
    low = (centre - support + 0.5).trunc().clamp(min=0)  # C's integer cast truncates
    high = torch.minimum((centre + support + 0.5).trunc(), length)
    weights = (1 - ((j - centre + 0.5) * inverse).abs()).clamp(min=0) * ((j >= low) & (j < high))
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total == 0, torch.ones_like(total), total)


def _fixed_point(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's uint8 kernel's integer weights: each axis's float weights times 2**p, rounded, with the largest p
    (at most 22) that keeps the largest weight under 2**15 (``_compute_index_ranges_int16_weights``)."""
    w_max = weights.amax(dim=(1, 2))  # [B]
    powers = torch.arange(22, dtype=torch.float64, device=weights.device)
    too_big = torch.floor(0.5 + w_max.unsqueeze(1) * torch.exp2(powers + 1)) >= 2**15
    precision = torch.where(too_big.any(dim=1), too_big.to(torch.uint8).argmax(dim=1), 22).to(torch.float64)
    scale = torch.exp2(precision).view(-1, 1, 1)
    return torch.floor(weights * scale + 0.5), scale


def _fixed_point_pass(x: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One axis of the uint8 kernel on float64 [B,C,*,W] (the last axis): integer sums, exact in float64, rounded
    by adding half the scale and flooring, saturated to 0..255."""
    total = torch.matmul(x, weights.transpose(1, 2).unsqueeze(1))
    half = (scale / 2).unsqueeze(1)
    return torch.floor((total + half) / scale.unsqueeze(1)).clamp_(0, 255)


def crop_resize(x: torch.Tensor, boxes: tuple[torch.Tensor, ...], size: int) -> torch.Tensor:
    """Crop each sample of [B,C,H,W] 0..255 tiles to its box (left, top, width, height) and resize it to SxS
    with the antialiased bilinear filter: float32 [B,C,S,S] on ``x``'s device, the device path of the crop
    (the CPU path resizes tile by tile with torch's uint8 kernel).

    The pixels equal that kernel's: its fixed-point weights, its horizontal-then-vertical passes and its
    rounding and saturation between them, as batched float64 matrix products (integer sums well under 2**53,
    so exact), with every weight outside a sample's box zero.
    """
    left, top, box_w, box_h = (b.to(x.device) for b in boxes)
    cols, col_scale = _fixed_point(antialias_weights(left, box_w, x.shape[-1], size))  # [B,S,W]
    rows, row_scale = _fixed_point(antialias_weights(top, box_h, x.shape[-2], size))  # [B,S,H]
    x = _fixed_point_pass(x.to(torch.float64), cols, col_scale)  # [B,C,H,S]
    x = _fixed_point_pass(x.transpose(-2, -1), rows, row_scale).transpose(-2, -1)  # [B,C,S,S]
    return x.to(torch.float32)


def draw_dihedral(batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """One symmetry per sample, long [B] on the CPU: k = 0..7, a rotation by k % 4 quarter turns, after a
    horizontal flip when k >= 4 (:func:`apply_dihedral`)."""
    return torch.randint(0, 8, (batch,), generator=generator)


def apply_dihedral(x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Each sample of square [B,C,S,S] images (any dtype: tiles, or maps over them) turned by its ``choice``.

    Samples are grouped by the drawn symmetry (8 groups, not a loop over samples): one gather and
    one scatter per group, cheap on uint8.
    """
    out = torch.empty_like(x)
    for k in choice.unique().tolist():
        index = (choice == k).nonzero().squeeze(1).to(x.device)
        view = x.index_select(0, index)
        if k >= 4:
            view = view.flip(-1)
        out.index_copy_(0, index, torch.rot90(view, k % 4, (-2, -1)))
    return out


@dataclass(frozen=True)
class TileGeometry:
    """Where a training batch's pixels came from: each sample's crop box in tile pixels (left, top, width, height;
    long [B]) of tiles of ``tile_size`` (height, width), and the dihedral symmetry applied after the resize (long
    [B], 0 = none). Training-only targets over the tile (a teacher's maps) follow the pixels with it."""

    boxes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    dihedral: torch.Tensor
    tile_size: tuple[int, int]

    @classmethod
    def whole(cls, batch: int, height: int, width: int) -> TileGeometry:
        """Every sample the whole tile, unturned."""
        zero = torch.zeros(batch, dtype=torch.long)
        return cls((zero, zero, torch.full((batch,), width), torch.full((batch,), height)), zero, (height, width))


def stain_jitter(
    x: torch.Tensor, strength: float, generator: torch.Generator | None, out: torch.Tensor | None = None,
    log1p_input: bool = False,
) -> torch.Tensor:
    """HED jitter (Tellez et al. 2018) of contiguous 0..255 float images [B,3,H,W]; returns x' + 1.

    Stains S = OD @ H become S * alpha + beta (alpha ~ U(1-s, 1+s), beta ~ U(-s, s) per sample and
    stain), then OD' = S' @ R, with OD = log(256) - log(1 + x) per pixel (row vector). This is one
    per-sample affine map of L = log(1 + x): L' = L @ T + c, T = H diag(alpha) R,
    c = log(256) (1 - 1 @ T) - beta @ R. Writing L' = (L + d) @ T with d = c @ T^-1 moves the bias
    into the log's argument, log(e^d (1 + x)), so the batch costs one multiply-add, one log, one
    bmm and one exp, all in place except the bmm (written to ``out`` when given, to
    save a large allocation). T^-1 = H diag(1/alpha) R as H = R^-1. With ``log1p_input`` ``x`` holds
    L = log(1 + x) already (the stain-statistics step's output), which saves a log and an exp.
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
    if log1p_input:
        log_x = x.add_(d.to(x.device, x.dtype).view(batch, channels, 1, 1))
    else:
        k = torch.exp(d).to(x.device, x.dtype).view(batch, channels, 1, 1)
        log_x = x.mul_(k).add_(k).log_()  # log(e^d (1 + x)) = L + d
    cols = torch.empty_like(x) if out is None else out
    torch.bmm(
        matrix.transpose(1, 2).to(x.device, x.dtype),
        log_x.view(batch, channels, height * width),
        out=cols.view(batch, channels, height * width),
    )
    # No clamp here: the caller's single final clamp bounds the result to [0, 255] (+ pedestal).
    return cols.exp_()


def greyscale(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each of float images [B,3,H,W] turned grey with probability ``p``: its luma (ITU-R 601 weights, as
    torchvision's Grayscale) in all three channels; in place. The weights sum to 1, so a constant added to every
    channel (the HED jitter's pedestal) stays added."""
    chosen = (torch.rand((x.shape[0],), generator=generator) < p).nonzero().squeeze(1).to(x.device)
    if len(chosen):
        weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        view = x.index_select(0, chosen)
        x.index_copy_(0, chosen, (view * weights).sum(dim=1, keepdim=True).expand_as(view))
    return x


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
    b, c = b.to(x.device), c.to(x.device)
    if contrast:
        grey = torch.tensor(LUMA, dtype=x.dtype, device=x.device)
        mean = x.mean(dim=(2, 3)) @ grey - pedestal  # grey level of each sample before brightness
    else:
        mean = torch.zeros(batch, device=x.device)
    gain = c * b
    offset = (1 - c) * b * mean - gain * pedestal
    return gain.view(batch, 1, 1, 1), offset.view(batch, 1, 1, 1)
