"""Stain colour in optical density: per-tile statistics and moving a tile to other statistics.

Optical density of an 8-bit intensity I is OD = -ln((I + 1) / 256) per RGB channel (Beer-Lambert, +1 so
black pixels stay finite). A tile's colour is summarised by the mean and standard deviation of OD over
its pixels, per channel; :func:`match_od_statistics` moves every pixel's OD by one affine map per channel
so that the tile gets given statistics (Reinhard et al. 2001's transfer, in OD rather than in Lab).
It is both the training augmentation ``stain_stats`` (random targets, RandStainNA-style, Shen et al.
2022) and the re-staining of a test set to another centre's statistics (``benchmarks/restain.py``).
"""

from __future__ import annotations

import math

import torch

LOG_256 = math.log(256.0)
# A channel whose OD barely varies over a tile (a blank tile) keeps its spread: no division by ~0.
_MIN_STD = 1e-3


def optical_density(x: torch.Tensor) -> torch.Tensor:
    """OD = ln(256) - ln(1 + I) of 0..255 images (any shape, float)."""
    return LOG_256 - torch.log1p(x)


def od_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel OD mean and standard deviation of 0..255 float images [B,3,H,W]: two [B,3]."""
    od = optical_density(x.double()).flatten(2)
    return od.mean(dim=2), od.std(dim=2, unbiased=False)


def match_od_statistics(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """0..255 float images [B,3,H,W] whose per-channel OD mean and s.d. are ``mean`` and ``std`` ([B,3] or [3]).

    OD' = (OD - m) * std / s + mean with the tile's own (m, s); returned on the 0..255 scale, clamped,
    in ``x``'s dtype (statistics are exact before the clamp; saturated pixels move them a little).
    """
    return _move_statistics(x, *od_statistics(x), mean, std)


def random_od_statistics(x: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    """The ``stain_stats`` augmentation (RandStainNA-style, Shen et al. 2022) of 0..255 float images [B,3,H,W].

    Each tile gets new per-channel OD statistics, drawn for the mean and the s.d. separately, in log space:
    log t = (1 - w) log own + w log centre + g + h_c, with ``centre`` the batch's geometric mean of the
    statistic, w ~ U(0, 1) per tile (from keeping the tile's own colour to a batch-normalised colour, as a
    stain-normalised centre shows), g ~ U(-s, s) shared by the channels (amount of stain) and
    h_c ~ U(-s/2, s/2) per channel (hue), s = ``strength``. Draws are made on the CPU from ``generator``.
    """
    batch = x.shape[0]
    draws = torch.rand((batch, 2, 5), generator=generator, dtype=torch.float64)
    weight = draws[:, :, :1].to(x.device)  # [B, (mean, std), 1]
    shift = (strength * (2 * draws[:, :, 1:2] - 1) + strength / 2 * (2 * draws[:, :, 2:] - 1)).to(x.device)
    own = torch.stack(od_statistics(x), dim=1).clamp(min=_MIN_STD).log()  # [B, (mean, std), 3]
    target = ((1 - weight) * own + weight * own.mean(dim=0, keepdim=True) + shift).exp()
    return _move_statistics(x, own[:, 0].exp(), own[:, 1].exp(), target[:, 0], target[:, 1])


def _move_statistics(
    x: torch.Tensor, own_mean: torch.Tensor, own_std: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    batch = x.shape[0]
    mean = torch.as_tensor(mean, dtype=torch.float64, device=x.device).expand(batch, 3)
    std = torch.as_tensor(std, dtype=torch.float64, device=x.device).expand(batch, 3)
    gain = std / own_std.clamp(min=_MIN_STD)
    # ln(1 + I') = ln 256 - OD' = gain * ln(1 + I) + (1 - gain) * ln 256 + gain * m - mean
    bias = (1 - gain) * LOG_256 + gain * own_mean - mean
    gain = gain.to(x.dtype).view(batch, 3, 1, 1)
    bias = bias.to(x.dtype).view(batch, 3, 1, 1)
    return torch.log1p(x).mul_(gain).add_(bias).exp_().sub_(1).clamp_(0, 255)
