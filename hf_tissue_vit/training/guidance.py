"""Dense guidance of a ViT by a CNN teacher's stored maps (``--teacher_epochs``; issue 26, lever 1).

Two training-only losses join the classification loss; the saved model stays a plain ViT:

- soft labels: the teacher's class map (:mod:`.teacher`) averaged over the crop the ViT sees, as logits at a
  temperature (knowledge distillation on the same augmented view, without running the teacher: ReLabel / FKD);
- locality guidance (Li et al., ECCV 2022): at a few depths the ViT's patch tokens, through a linear head that only
  training has, are matched to the teacher's feature maps sampled over the same crop on the token grid and turned
  by the same dihedral symmetry (each target token layer-normalised; mean squared error).

The collator computes each batch's targets from its geometry (:class:`GuidanceTargets`); the trainer adds the
losses (:class:`GuidanceLoss`), whose heads it optimises and checkpoints beside the model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ..fileio import atomic_write_tensors
from ..transforms.augmentation import TileGeometry, apply_dihedral
from .teacher import TeacherMaps

logger = logging.getLogger(__name__)

TARGET_PREFIX = "teacher_"  # batch keys of the targets: teacher_logits, teacher_features_0, ...
HEADS_FILE = "guidance_heads.safetensors"  # the training-only heads inside a checkpoint


def check_guidance(teacher_epochs: float, alpha: float, temperature: float, weight: float) -> None:
    """ValueError for settings out of range."""
    if teacher_epochs < 0:
        raise ValueError(f"--teacher_epochs must be >= 0 (0 = no teacher), got {teacher_epochs}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"--distill_alpha must be in [0, 1] (the soft labels' share of the loss), got {alpha}")
    if temperature <= 0:
        raise ValueError(f"--distill_temperature must be > 0, got {temperature}")
    if weight < 0:
        raise ValueError(f"--guidance_weight must be >= 0, got {weight}")


def default_layers(depth: int, count: int) -> list[int]:
    """``count`` ViT layers (1-based) spread to the last one, for the teacher's ``count`` stages: the middle and
    the last for two."""
    return [max(1, round(depth * (i + 1) / count)) for i in range(count)]


class GuidanceTargets:
    """Per-batch targets from stored teacher maps: ``teacher_logits`` [B, C] and ``teacher_features_i``
    [B, G*G, D_i] (row-major tokens), for the crops and symmetries of a batch's :class:`TileGeometry`."""

    def __init__(self, maps: TeacherMaps, grid: int) -> None:
        self.maps, self.grid = maps, int(grid)

    def _sample(self, maps: torch.Tensor, geometry: TileGeometry, size: int) -> torch.Tensor:
        """[B, C, size, size]: ``maps`` (over whole tiles) sampled bilinearly at the centres of a size x size grid
        laid over each sample's crop box."""
        height, width = geometry.tile_size
        left, top, box_w, box_h = (b.to(torch.float32) for b in geometry.boxes)
        theta = torch.zeros(len(left), 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = box_w / width, (2 * left + box_w) / width - 1
        theta[:, 1, 1], theta[:, 1, 2] = box_h / height, (2 * top + box_h) / height - 1
        points = F.affine_grid(theta, [len(left), 1, size, size], align_corners=False)
        return F.grid_sample(maps.float(), points, mode="bilinear", padding_mode="border", align_corners=False)

    def __call__(self, indices: torch.Tensor, geometry: TileGeometry) -> dict[str, torch.Tensor]:
        class_map = self._sample(self.maps.class_map[indices], geometry, self.grid)
        targets = {f"{TARGET_PREFIX}logits": class_map.mean(dim=(2, 3))}  # a symmetry does not change the mean
        for i, features in enumerate(self.maps.features):
            sampled = apply_dihedral(self._sample(features[indices], geometry, self.grid), geometry.dihedral)
            targets[f"{TARGET_PREFIX}features_{i}"] = sampled.flatten(2).transpose(1, 2).contiguous()
        return targets


def pop_targets(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The guidance targets of a batch, removed from it (the model must not see them)."""
    return {key: inputs.pop(key) for key in [k for k in inputs if k.startswith(TARGET_PREFIX)]}


class GuidanceLoss(nn.Module):
    """The training-only heads (one linear map per guided layer) and the loss
    ``(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T) + weight * mean_l MSE(head_l(tokens_l),
    LN(target_l))``."""

    def __init__(self, hidden_size: int, teacher_dims: list[int], layers: list[int], prefix: int, alpha: float,
                 temperature: float, weight: float) -> None:
        super().__init__()
        if len(layers) != len(teacher_dims):
            raise ValueError(f"--guidance_layers: give {len(teacher_dims)} layers (one per teacher stage), "
                             f"got {layers}")
        self.heads = nn.ModuleList(nn.Linear(hidden_size, dim) for dim in teacher_dims)
        self.layers, self.prefix = [int(layer) for layer in layers], int(prefix)
        self.alpha, self.temperature, self.weight = float(alpha), float(temperature), float(weight)

    def combine(self, classification: torch.Tensor, outputs: Any, targets: dict[str, torch.Tensor],
                kept: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The total loss from the model's own (classification) loss and ``outputs`` (with hidden states);
        ``kept``: the patch positions PatchDropout kept [B, T] (None: every patch). Also its parts, for the log."""
        temperature = self.temperature
        student = F.log_softmax(outputs.logits.float() / temperature, dim=-1)
        teacher = F.softmax(targets[f"{TARGET_PREFIX}logits"].float() / temperature, dim=-1)
        distill = F.kl_div(student, teacher, reduction="batchmean") * temperature**2
        dense = classification.new_zeros(())
        for i, (layer, head) in enumerate(zip(self.layers, self.heads)):
            tokens = outputs.hidden_states[layer][:, self.prefix :]
            target = targets[f"{TARGET_PREFIX}features_{i}"].float()
            if kept is not None:
                target = target.gather(1, kept.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
            target = F.layer_norm(target, target.shape[-1:])
            dense = dense + F.mse_loss(head(tokens).float(), target) / len(self.heads)
        total = (1 - self.alpha) * classification + self.alpha * distill + self.weight * dense
        return total, {"distill": float(distill.detach()), "guidance": float(dense.detach())}


def save_module(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write a module's weights as safetensors (atomically): training-only state kept in a checkpoint."""
    atomic_write_tensors(path, module.state_dict())


@torch.no_grad()
def load_module(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Read weights written by :func:`save_module` into ``module`` (same names and shapes, else ValueError)."""
    from safetensors.torch import load_file

    try:
        module.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: the stored weights do not match ({err})") from err


class GuidanceCallback(TrainerCallback):
    """The heads' gradients, which the Trainer does not handle as they are not part of the model: averaged over the
    processes of a launch before each optimizer step (DDP averages the model's own), cleared after it (the Trainer
    clears only the model's)."""

    def __init__(self, loss: GuidanceLoss) -> None:
        self.loss = loss

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        for param in self.loss.parameters():
            if param.grad is not None and world > 1:
                torch.distributed.all_reduce(param.grad)
                param.grad.div_(world)

    def on_optimizer_step(self, args, state, control, **kwargs):
        for param in self.loss.parameters():
            param.grad = None
