"""Training time and loss of a whole run, also when it was stopped and resumed (possibly several times).

``Trainer.train`` reports only its own call: a run resumed from a checkpoint would record the runtime
and mean loss of the part after the resume (a resume from the last checkpoint: ~0 s and loss 0.0).
So every checkpoint gets :data:`PROGRESS_FILE` (written before Trainer's ``trainer_state.json``, which
marks the checkpoint complete), saying, up to its step, the pieces trained so far (first and last
step, seconds each) and the sum of the per-step training losses. A resumed run starts from the record
of its checkpoint, and its results report the whole run:

- ``train_runtime``: the seconds of all pieces, summed (the time between a kill and the resume, and
  the set-up of each piece before its first step, are not counted);
- ``train_loss``: the mean per-step loss over all steps of the run, as an uninterrupted run reports it;
- ``train_samples_per_second`` / ``train_steps_per_second``: the whole run's samples and steps over
  that runtime;
- ``train_pieces``: the list of pieces (``from_step``, ``to_step``, ``runtime``); one for a run that
  was never interrupted (whose other metrics are Trainer's own).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json

logger = logging.getLogger(__name__)

PROGRESS_FILE = "hf_tissue_vit_progress.json"


@dataclass
class TrainingProgress:
    """What a run trained up to a checkpoint: its pieces and the sum of its per-step losses."""

    pieces: list[dict[str, float]] = field(default_factory=list)  # from_step, to_step, runtime (s)
    loss_sum: float = 0.0

    @property
    def step(self) -> int:
        """The step the record reaches (0 for a run not yet started)."""
        return int(self.pieces[-1]["to_step"]) if self.pieces else 0

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike | None) -> TrainingProgress | None:
        """The record of a checkpoint; an empty one for a fresh run (None); None when the checkpoint
        has none (saved by an older version: the results then cover only the part after the resume)."""
        if checkpoint is None:
            return cls()
        path = Path(checkpoint) / PROGRESS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(pieces=[dict(p) for p in data["pieces"]], loss_sum=float(data["loss_sum"]))
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("%s has no readable %s: train_runtime and train_loss will cover only the training "
                           "after the resume", checkpoint, PROGRESS_FILE)
            return None

    def extended(self, from_step: int, to_step: int, runtime: float, loss_sum: float) -> TrainingProgress:
        """This record followed by one more piece whose per-step losses sum to ``loss_sum``."""
        piece = {"from_step": int(from_step), "to_step": int(to_step), "runtime": round(float(runtime), 4)}
        return TrainingProgress(pieces=[*self.pieces, piece], loss_sum=self.loss_sum + float(loss_sum))

    def save(self, folder: str | os.PathLike) -> None:
        """Write the record into a checkpoint folder (atomically)."""
        atomic_write_json(Path(folder) / PROGRESS_FILE, asdict(self))

    def whole_run_metrics(self, metrics: dict[str, Any], schedule_samples: float | None,
                          max_steps: int) -> dict[str, Any]:
        """Trainer's metrics of the last piece with runtime, loss and speed of the whole run (this record
        must include the last piece); ``schedule_samples`` is Trainer's sample count of the full schedule."""
        metrics = {**metrics, "train_pieces": self.pieces}
        if len(self.pieces) < 2:
            return metrics
        runtime = sum(p["runtime"] for p in self.pieces)
        steps = self.step
        metrics["train_runtime"] = round(runtime, 4)
        metrics["train_loss"] = self.loss_sum / max(steps, 1)
        if runtime > 0:
            metrics["train_steps_per_second"] = round(steps / runtime, 3)
            if schedule_samples is not None:
                samples = schedule_samples * steps / max(max_steps, 1)
                metrics["train_samples_per_second"] = round(samples / runtime, 3)
        return metrics
