"""Physical units the package checks in one place: micrometres per pixel (µm/px) of tiles, slides and models."""

from __future__ import annotations

import math

# Resolutions (or sizes) closer than this, relative, are taken as equal: no resize, no crop.
SAME_SCALE = 0.02


def same_scale(ratio: float) -> bool:
    """True when a ratio of two resolutions (or sizes) is within :data:`SAME_SCALE` of 1: taken as equal."""
    return abs(ratio - 1) <= SAME_SCALE


def check_mpp(mpp: float | None, argument: str = "mpp") -> float | None:
    """``mpp`` as a float if it is a positive, finite number of micrometres per pixel (None passes)."""
    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not math.isfinite(mpp)
                            or mpp <= 0):
        raise ValueError(
            f"{argument} must be a positive number of micrometres per pixel (e.g. 0.5 at 20x), got {mpp!r}"
        )
    return None if mpp is None else float(mpp)
