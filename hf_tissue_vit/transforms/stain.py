"""Stain colour in optical density: per-tile statistics and moving a tile to other statistics.

Optical density of an 8-bit intensity I is OD = -ln((I + 1) / 256) per RGB channel (Beer-Lambert, +1 so
black pixels stay finite). A tile's colour is summarised by the mean and standard deviation of OD over
its pixels, per channel; :func:`match_od_statistics` moves every pixel's OD by one affine map per channel
so that the tile gets given statistics (Reinhard et al. 2001's transfer, in OD rather than in Lab).
It is both the training augmentation ``stain_stats`` (random targets, RandStainNA-style, Shen et al.
2022) and the re-staining of a test set to another centre's statistics (``benchmarks/restain.py``).
Since OD = ln 256 - ln(1 + I), the work is done on L = ln(1 + I): an affine map of OD is one of L.
"""

from __future__ import annotations

import math

import torch

LOG_256 = math.log(256.0)
# A channel whose OD barely varies over a tile (a blank tile) keeps its spread: no division by ~0.
_MIN_STD = 1e-3


def od_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel OD mean and standard deviation of 0..255 float images [B,3,H,W]: two [B,3]."""
    return _log_statistics(torch.log1p(x))


def match_od_statistics(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """0..255 float images [B,3,H,W] whose per-channel OD mean and s.d. are ``mean`` and ``std`` ([B,3] or [3]).

    OD' = (OD - m) * std / s + mean with the tile's own (m, s); returned on the 0..255 scale, clamped,
    in ``x``'s dtype (statistics are exact before the clamp; saturated pixels move them a little).
    """
    own_mean, own_std = od_statistics(x)
    batch = x.shape[0]
    mean = torch.as_tensor(mean, dtype=torch.float64, device=x.device).expand(batch, 3)
    std = torch.as_tensor(std, dtype=torch.float64, device=x.device).expand(batch, 3)
    gain, bias = _affine(own_mean, own_std.clamp(min=_MIN_STD), mean, std)
    return _apply(torch.log1p(x), gain, bias).exp_().sub_(1).clamp_(0, 255)


def random_od_statistics(x: torch.Tensor, strength: float, generator: torch.Generator | None,
                         p: float = 1.0) -> torch.Tensor:
    """The ``stain_stats`` augmentation (RandStainNA-style, Shen et al. 2022) of 0..255 float images [B,3,H,W];
    returns L' = ln(1 + I') of the new images (what the HED jitter takes next), float, unclamped.

    A tile is re-stained with probability ``p`` (the others keep their colour: L' = L). It gets new per-channel
    OD statistics, drawn for the mean and the s.d. separately, in log space: log t = (1 - w) log own +
    w log centre + g + h_c, with ``centre`` the batch's geometric mean of the statistic, w ~ U(0, 1) per tile
    (from keeping the tile's own colour to a batch-normalised colour, as a stain-normalised centre shows),
    g ~ U(-s, s) shared by the channels (amount of stain) and h_c ~ U(-s/2, s/2) per channel (hue),
    s = ``strength``. Every draw is made on the CPU from ``generator``, whatever ``x``'s device.
    """
    batch = x.shape[0]
    draws = torch.rand((batch, 11), generator=generator, dtype=torch.float64)
    chosen = (draws[:, 0] < p).to(x.device).view(batch, 1, 1)
    params = draws[:, 1:].view(batch, 2, 5).to(x.device)  # [B, (mean, std), (w, g, h_r, h_g, h_b)]
    weight = params[:, :, :1]
    shift = strength * (2 * params[:, :, 1:2] - 1) + strength / 2 * (2 * params[:, :, 2:] - 1)
    log1p_x = torch.log1p(x)
    own_mean, own_std = _log_statistics(log1p_x)
    own_std = own_std.clamp(min=_MIN_STD)  # a log, and the divisor of the gain
    own = torch.stack((own_mean, own_std), dim=1).log()  # [B, (mean, std), 3]
    target = (1 - weight) * own + weight * own.mean(dim=0, keepdim=True) + shift
    target = torch.where(chosen, target, own).exp()
    gain, bias = _affine(own_mean, own_std, target[:, 0], target[:, 1])
    return _apply(log1p_x, gain, bias)


def _log_statistics(log1p_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OD mean and s.d. [B,3] (float64) from L = ln(1 + I) [B,3,H,W] of any float dtype."""
    flat = log1p_x.flatten(2)
    # E[L] and E[L^2] are two plain reductions, several times faster than torch.std_mean on the CPU
    mean, square = flat.mean(dim=2).double(), (flat * flat).mean(dim=2).double()
    return LOG_256 - mean, (square - mean * mean).clamp(min=0).sqrt()


def _affine(own_mean: torch.Tensor, own_std: torch.Tensor, mean: torch.Tensor,
            std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain, bias) [B,3] of L' = gain L + bias that moves OD statistics (own_mean, own_std) to (mean, std);
    ``own_std`` at least ``_MIN_STD`` (the callers clamp it)."""
    gain = std / own_std
    # ln(1 + I') = ln 256 - OD' = gain * ln(1 + I) + (1 - gain) * ln 256 + gain * m - mean
    return gain, (1 - gain) * LOG_256 + gain * own_mean - mean


def _apply(log1p_x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gain * L + bias per image and channel, in place on ``log1p_x``."""
    batch = log1p_x.shape[0]
    view = (batch, 3, 1, 1)
    return log1p_x.mul_(gain.to(log1p_x.dtype).view(view)).add_(bias.to(log1p_x.dtype).view(view))
