"""A clean ending (``--clean_end``): the augmentation and PatchDropout ramped down over the last epochs, so that
the model ends its training on tiles like the test tiles (whole, unjittered, every patch), as the learning rate
goes to zero.

Over the last ``fraction`` of the epochs the strength of every augmentation
(:meth:`~hf_tissue_vit.transforms.augmentation.AugmentationConfig.scaled`) falls linearly from 1 to 0, reached
in the last epoch, and PatchDropout's share of dropped patches with it. The strength is a function of the epoch
only: the collator reads the epoch each training item carries (DataLoader workers included), a callback sets
PatchDropout's share when an epoch begins, so a resumed run trains what an uninterrupted one trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from ..modeling import PatchDropout, patch_dropout_of


def check_clean_end(fraction: float, max_steps: int) -> None:
    """``--clean_end``: a fraction of the epochs in [0, 1), and a run measured in epochs."""
    if not (math.isfinite(fraction) and 0 <= fraction < 1):
        raise ValueError(f"--clean_end must be a fraction of the epochs in [0, 1) (e.g. 0.15; 0 = off), got {fraction}")
    if fraction and max_steps is not None and max_steps > 0:
        raise ValueError("--clean_end ramps over the last epochs: give --num_train_epochs, not --max_steps")


def epoch_index(epoch: float | None) -> int:
    """The 0-based index of the epoch that begins at Trainer's ``state.epoch`` (None before training)."""
    return math.floor(epoch + 1e-6) if epoch else 0


@dataclass(frozen=True)
class CleanEnd:
    """The last ``fraction`` of ``num_epochs`` epochs (at least one) ramps the augmentation down to none."""

    fraction: float
    num_epochs: int

    @property
    def ramp_epochs(self) -> int:
        """How many of the last epochs ramp down."""
        return max(1, round(self.fraction * self.num_epochs))

    def strength(self, epoch: int) -> float:
        """The augmentation's strength in 0-based ``epoch``: 1 before the ramp, then (R-1)/R, ..., 1/R, 0 over its R
        epochs."""
        return min(1.0, max(0.0, (self.num_epochs - 1 - epoch) / self.ramp_epochs))

    def patch_keep(self, keep: float, epoch: int) -> float:
        """PatchDropout's share of kept patches in ``epoch``, from the run's ``keep`` to 1 (every patch)."""
        return 1 - (1 - keep) * self.strength(epoch)


class CleanEndCallback(TrainerCallback):
    """Set PatchDropout's share of kept patches for the epoch that begins."""

    def __init__(self, schedule: CleanEnd, dropout: PatchDropout) -> None:
        self.schedule, self.dropout, self.keep = schedule, dropout, dropout.keep

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dropout.keep = self.schedule.patch_keep(self.keep, epoch_index(state.epoch))


def clean_ending(
    fraction: float, num_epochs: float, model: Any
) -> tuple[Callable[[int], float] | None, list[TrainerCallback]]:
    """A run's clean ending over the last ``fraction`` of ``num_epochs``: the augmentation's strength per epoch
    (for :class:`~hf_tissue_vit.training.tiles.TileCollator`) and the callback that ramps ``model``'s PatchDropout,
    if it has one. ``fraction`` 0: (None, [])."""
    if not fraction:
        return None, []
    schedule = CleanEnd(fraction, math.ceil(num_epochs))
    dropout = patch_dropout_of(model)
    return schedule.strength, [CleanEndCallback(schedule, dropout)] if dropout is not None else []
