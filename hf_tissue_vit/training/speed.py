"""How fast a run trained, measured by the run itself: images/s over the steady part of training, the share of
that time the GPU had work, and the peak GPU memory. ``finetune.py`` writes it to all_results.json as
``train_speed``; ``benchmarks/gpu.py`` reads it there.

The steady part leaves out the first steps (compilation, kernel autotuning, DataLoader workers starting) and
any step in which the Trainer also evaluated or saved a checkpoint. On a GPU the step times come from CUDA
events recorded at each step's begin and end, read once at the end of training (no synchronisation while it
runs): the time from one step's end to the next step's begin is the GPU waiting for its next batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from transformers import TrainerCallback

SPEED_KEY = "train_speed"


class SpeedCallback(TrainerCallback):
    """Per-step timings of a ``Trainer.train()`` call; :meth:`summary` turns them into images/s."""

    def __init__(self, warmup_fraction: float = 0.2, min_warmup_steps: int = 2) -> None:
        self.warmup_fraction, self.min_warmup_steps = float(warmup_fraction), int(min_warmup_steps)
        self._reset(None)

    def _reset(self, device: torch.device | None) -> None:
        self.device = device
        self.ends: list[Any] = []  # per step: perf_counter() on the CPU, a CUDA event on a GPU
        self.begins: list[Any] = []
        self.excluded: set[int] = set()  # steps whose interval also holds an evaluation or a save
        self.images_per_step = 0

    def _mark(self) -> Any:
        if self.device is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def on_train_begin(self, args, state, control, **kwargs):
        cuda = args.device.type == "cuda" and torch.cuda.is_available()
        self._reset(args.device if cuda else None)
        self.images_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        self.ends.append(self._mark())  # the start line of the first step

    def on_step_begin(self, args, state, control, **kwargs):
        if self.device is not None:  # the GPU-busy share needs when each step's work was queued
            self.begins.append(self._mark())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._mark())

    def on_evaluate(self, args, state, control, **kwargs):
        self.excluded.add(len(self.ends))  # the interval that ends at the next step end

    on_save = on_evaluate

    def _seconds(self) -> tuple[list[float], list[float] | None]:
        """Each step's seconds from the previous step's end, and (GPU) the part with the step's work queued."""
        if self.device is None:
            return [b - a for a, b in zip(self.ends, self.ends[1:])], None
        torch.cuda.synchronize(self.device)
        steps = [a.elapsed_time(b) / 1000 for a, b in zip(self.ends, self.ends[1:])]
        busy = [a.elapsed_time(b) / 1000 for a, b in zip(self.begins, self.ends[1:])]
        return steps, busy

    def summary(self) -> dict[str, Any]:
        """``samples_per_second`` (all processes) over the steady steps, how many steps that was, and on a GPU
        ``gpu_busy_fraction`` and ``peak_gpu_memory_gib`` (this process's device)."""
        steps, busy = self._seconds()
        warmup = max(self.min_warmup_steps, math.ceil(self.warmup_fraction * len(steps)))
        kept = [i for i in range(warmup, len(steps)) if i + 1 not in self.excluded]
        total = sum(steps[i] for i in kept)
        out: dict[str, Any] = {
            "samples_per_second": len(kept) * self.images_per_step / total if kept and total > 0 else None,
            "steady_steps": len(kept),
            "warmup_steps": min(warmup, len(steps)),
            "images_per_step": self.images_per_step,
            "timer": "cuda events" if self.device is not None else "perf_counter",
        }
        if self.device is not None:
            out["gpu_busy_fraction"] = sum(busy[i] for i in kept) / total if kept and total > 0 else None
            out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["peak_gpu_memory_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        return out
