"""What changes from epoch to epoch besides the learning rate: a clean ending (``--clean_end``) and progressive
resolution (``--progressive_resolution``).

- Clean ending: over the last ``clean_end`` fraction of the epochs the strength of every augmentation
  (:meth:`~hf_tissue_vit.transforms.augmentation.AugmentationConfig.scaled`) falls linearly from 1 to 0, reached
  in the last epoch, and PatchDropout's share of dropped patches with it, so the model ends its training on
  tiles like the test tiles (whole, unjittered, every patch) as the learning rate goes to zero. With
  ``--clean_end_keep_colour`` the colour augmentation keeps its strength to the end (crop and PatchDropout ramp).
- Progressive resolution: training images start at ``start`` px and grow by whole patches to the model's own
  size over the first half of the epochs (fewer tokens, cheaper steps early; the position embeddings are
  interpolated to the smaller grids, as ViT's ``interpolate_pos_encoding`` does). Evaluation and the saved model
  stay at the model's size.

Both are functions of the epoch only: the collator reads the epoch each training item carries (DataLoader
workers included), a callback sets PatchDropout's share when an epoch begins, so a resumed run trains what an
uninterrupted one trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from ..backbones import VIT, Family
from ..modeling import PatchDropout, patch_dropout_of


def check_clean_end(fraction: float, keep_colour: bool = False) -> None:
    """``--clean_end``: a fraction of the epochs in [0, 1); ``--clean_end_keep_colour`` only with it."""
    if not (math.isfinite(fraction) and 0 <= fraction < 1):
        raise ValueError(f"--clean_end must be a fraction of the epochs in [0, 1) (e.g. 0.15; 0 = off), got {fraction}")
    if keep_colour and not fraction:
        raise ValueError("--clean_end_keep_colour changes what --clean_end ramps down; give --clean_end too "
                         "(e.g. --clean_end 0.15)")


def check_progressive(
    start: int | None, image_size: int, patch_size: int, family: Family, fixed_grid: bool = False
) -> None:
    """``--progressive_resolution``: whole patches below the model's size, on a ViT; ``fixed_grid``: the run also
    uses what is made for the model's token grid (a teacher's guidance, a linear probe's cached features)."""
    if start is None:
        return
    if fixed_grid:
        raise ValueError(
            "--progressive_resolution changes the token grid, which --teacher_epochs' guidance and "
            "--freeze_backbone's cached features are made for; use it without them"
        )
    if family is not VIT:
        raise ValueError(
            f"--progressive_resolution interpolates a ViT's position embeddings; a {family.name} model "
            "cannot (leave the flag out)"
        )
    if not (patch_size <= start < image_size and start % patch_size == 0):
        example = max(patch_size, image_size // 2 // patch_size * patch_size)
        raise ValueError(
            f"--progressive_resolution {start}: give a multiple of the patch size {patch_size} below the "
            f"image size {image_size} (e.g. {example})"
        )


def epoch_index(epoch: float | None) -> int:
    """The 0-based index of the epoch that begins at Trainer's ``state.epoch`` (None before training)."""
    return math.floor(epoch + 1e-6) if epoch else 0


@dataclass(frozen=True)
class EpochSchedule:
    """A run of ``num_epochs`` epochs whose last ``clean_end`` fraction (at least one epoch, when set) ramps the
    augmentation down to none (its colour steps too, unless ``keep_colour``), and whose images grow from
    ``start_size`` px (None: no growth) to ``image_size`` by whole patches of ``patch_size`` over the first half of
    the epochs."""

    num_epochs: int
    clean_end: float = 0.0
    start_size: int | None = None
    image_size: int = 0
    patch_size: int = 1
    keep_colour: bool = False

    @property
    def ramp_epochs(self) -> int:
        """How many of the last epochs ramp down (0: no clean ending)."""
        return max(1, round(self.clean_end * self.num_epochs)) if self.clean_end else 0

    def strength(self, epoch: int) -> float:
        """The augmentation's strength in 0-based ``epoch``: 1 before the ramp, then (R-1)/R, ..., 1/R, 0 over its R
        epochs."""
        if not self.ramp_epochs:
            return 1.0
        return min(1.0, max(0.0, (self.num_epochs - 1 - epoch) / self.ramp_epochs))

    def patch_keep(self, keep: float, epoch: int) -> float:
        """PatchDropout's share of kept patches in ``epoch``, from the run's ``keep`` to 1 (every patch)."""
        return 1 - (1 - keep) * self.strength(epoch)

    def size(self, epoch: int) -> int | None:
        """The training images' size in ``epoch`` (px), or None when they keep the model's size."""
        if self.start_size is None:
            return None
        growth = min(1.0, epoch / max(1, round(self.num_epochs / 2)))
        size = self.start_size + (self.image_size - self.start_size) * growth
        size = self.patch_size * math.floor(size / self.patch_size + 1e-9)
        return None if size >= self.image_size else max(self.start_size, size)


class CleanEndCallback(TrainerCallback):
    """Set PatchDropout's share of kept patches for the epoch that begins."""

    def __init__(self, schedule: EpochSchedule, dropout: PatchDropout) -> None:
        self.schedule, self.dropout, self.keep = schedule, dropout, dropout.keep

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dropout.keep = self.schedule.patch_keep(self.keep, epoch_index(state.epoch))


def planned_epochs(training_args: Any, num_tiles: int) -> int:
    """The epochs the Trainer will run over ``num_tiles`` training tiles: ``--num_train_epochs`` rounded up, or, with
    ``--max_steps``, as many as those optimizer steps take, counted as the Trainer counts them
    (``Trainer.set_initial_training_values``): the batches of one process (Accelerate deals the loader's batches out
    to the processes, evened up unless the last is dropped), and a last, partial accumulation round is an update."""
    if not (training_args.max_steps and training_args.max_steps > 0):
        return math.ceil(training_args.num_train_epochs)
    rounding = math.floor if training_args.dataloader_drop_last else math.ceil
    batches = rounding(num_tiles / training_args.per_device_train_batch_size)
    per_process = rounding(batches / training_args.world_size)
    updates = max(1, math.ceil(per_process / training_args.gradient_accumulation_steps))
    return math.ceil(training_args.max_steps / updates)


def epoch_schedule(
    training_args: Any, model: Any, num_tiles: int
) -> tuple[EpochSchedule | None, list[TrainerCallback]]:
    """The run's :class:`EpochSchedule` over ``num_tiles`` training tiles (None when neither ``--clean_end`` nor
    ``--progressive_resolution`` is set; for :class:`~hf_tissue_vit.training.tiles.TileCollator`) and the callback
    that ramps ``model``'s PatchDropout down with a clean ending, if the model has one."""
    if not (training_args.clean_end or training_args.progressive_resolution):
        return None, []
    config = model.config
    schedule = EpochSchedule(
        planned_epochs(training_args, num_tiles),
        training_args.clean_end,
        training_args.progressive_resolution,
        config.image_size,
        config.patch_size,
        training_args.clean_end_keep_colour,
    )
    dropout = patch_dropout_of(model)
    return schedule, [CleanEndCallback(schedule, dropout)] if dropout is not None and schedule.clean_end else []
