"""Exponential moving average of the weights during training (``--ema_decay``)."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

from ..fileio import atomic_write_tensors

EMA_FILE = "ema.safetensors"  # the weight average inside a checkpoint


class WeightEMA:
    """Exponential moving average of a model's trainable weights, kept as fp32 copies beside them
    (same device).

    The decay warms up as ``min(decay, (1 + step) / (10 + step))`` (as timm and TensorFlow do), so the
    random initial weights are forgotten quickly instead of dominating the average of a short run.
    The average is bound to the parameters of ``model`` when it is made; weights loaded into them in
    place later (resume, best model) keep it valid.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = self.check_decay(decay)
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        params = dict(model.named_parameters())
        self._pairs = [(params[name], shadow) for name, shadow in self.shadow.items()]

    @staticmethod
    def check_decay(decay: float) -> float:
        """``decay`` as a float, or ``ValueError`` unless it is in (0, 1)."""
        if not 0 < decay < 1:
            raise ValueError(f"--ema_decay must be in (0, 1) (e.g. 0.999), got {decay}")
        return float(decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend the model's current weights into the average (call after each optimizer step)."""
        weight = 1 - min(self.decay, (1 + step) / (10 + step))
        for param, shadow in self._pairs:
            shadow.lerp_(param.detach().float(), weight)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's weights and the average (a second call undoes the first)."""
        for param, shadow in self._pairs:
            current = param.detach().float().clone()
            param.copy_(shadow)
            shadow.copy_(current)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the model's weights with the average."""
        for param, shadow in self._pairs:
            param.copy_(shadow)

    def save(self, path: str | os.PathLike) -> None:
        """Write the average as safetensors (atomically)."""
        atomic_write_tensors(path, self.shadow)

    @torch.no_grad()
    def load(self, path: str | os.PathLike) -> None:
        """Read an average written by :meth:`save` (same parameter names and shapes) into this one."""
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        if set(loaded) != set(self.shadow) or any(loaded[n].shape != t.shape for n, t in self.shadow.items()):
            raise ValueError(f"{path}: the weight average does not match this model's parameters")
        for name, shadow in self.shadow.items():
            shadow.copy_(loaded[name])  # in place: stays on the model's device, still bound to it


class EMACallback(TrainerCallback):
    """Update the trainer's :class:`WeightEMA` (``trainer.ema``, while it is set) after each optimizer step."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.ema is not None:
            self.trainer.ema.update(state.global_step)
