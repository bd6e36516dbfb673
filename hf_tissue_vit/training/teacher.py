"""A small CNN teacher for a ViT trained from few tiles (``--teacher_epochs``), trained once per run, and its maps.

A CNN's locality lets it learn H&E textures from a few thousand tiles better than a ViT trained from scratch
(benchmarks/RESULTS.md section 2: 0.946 against 0.907). The teacher here is a ResNet-10-style network (one basic
block per stage, widths 32-256) whose classifier is a 1x1 convolution: its *class map* (logits per position,
before the global average) and its feature maps at two depths are computed once per training tile and stored, so
the ViT's training never runs the teacher: :mod:`.guidance` pools them over each augmented crop (ReLabel / FKD).

The teacher and its maps live in ``<output_dir>/teacher/`` (written whole or not at all) and are reused by a
resumed run with the same settings; the teacher is never part of the saved model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import atomic_write_tensors
from ..transforms.tile_transform import TileTransform

logger = logging.getLogger(__name__)

TEACHER_DIR = "teacher"
_RECORD, _WEIGHTS, _MAPS = "teacher.json", "model.safetensors", "maps.safetensors"
WIDTHS = (32, 64, 128, 256)
GUIDED_STAGES = (2, 3)  # the stages whose feature maps guide the ViT (strides 8 and 16)
MAP_STRIDE = 16  # of the last stage: one map cell per 16 px of the teacher's input
# optimisation of the teacher (the exploration loop's settings for its CNN, benchmarks/RESULTS.md section 2)
LEARNING_RATE, WEIGHT_DECAY, BATCH_SIZE, WARMUP = 2e-3, 0.05, 64, 0.05


class _Block(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with batch norm, and a projected shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallCNN(nn.Module):
    """ResNet-10-style classifier whose head is a 1x1 convolution: ``forward`` gives the logits (the class map's
    mean), the class map [B, C, H/16, W/16] and the feature maps of :data:`GUIDED_STAGES`."""

    def __init__(self, num_labels: int, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages = nn.ModuleList(
            _Block(widths[max(i - 1, 0)], width, 1 if i == 0 else 2) for i, width in enumerate(widths)
        )
        self.head = nn.Conv2d(widths[-1], num_labels, 1)

    @property
    def feature_dims(self) -> list[int]:
        """Channels of each guided feature map."""
        return [self.stages[i].conv2.out_channels for i in GUIDED_STAGES]

    def forward(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        x = self.stem(pixel_values)
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in GUIDED_STAGES:
                features.append(x)
        class_map = self.head(x)
        return {"logits": class_map.mean(dim=(2, 3)), "class_map": class_map, "features": features}


@dataclass(frozen=True)
class TeacherSettings:
    """What a stored teacher was made from: reused only when all of it is the same."""

    epochs: float
    seed: int
    num_labels: int
    train_tiles: int
    data: str  # the training split's fingerprint ("" when it has none)
    augmentation: str  # repr of the training transform
    map_size: int  # px of the teacher's input when its maps are made


@dataclass(frozen=True)
class TeacherMaps:
    """Per training tile: the class map [N, C, g, g] (float32) and the guided feature maps [N, D, g, g]
    (float16), all on one g x g grid over the whole tile."""

    class_map: torch.Tensor
    features: list[torch.Tensor]


def map_size(tile_size: int) -> int:
    """The teacher's input size for its maps: the tile's size rounded to a whole number of map cells."""
    return MAP_STRIDE * max(1, round(tile_size / MAP_STRIDE))


def _batches(count: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    return list(order.split(BATCH_SIZE))


def train_teacher(pixels: torch.Tensor, labels: torch.Tensor, transform: TileTransform, num_labels: int,
                  epochs: float, seed: int, bf16: bool = False) -> SmallCNN:
    """A :class:`SmallCNN` trained on uint8 tiles [N,H,W,3] with ``transform`` (the ViT's augmentation): AdamW,
    cosine schedule with warm-up, label smoothing 0.1, on the CPU threads of this process."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # channels-last: the CPU's convolutions are about a fifth faster on it (and bf16 twice as fast as float32)
    model = SmallCNN(num_labels).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    total = max(1, math.ceil(epochs * math.ceil(len(labels) / BATCH_SIZE)))
    warmup = max(1, round(WARMUP * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, step - warmup) / max(1, total - warmup))))))
    step = 0
    while step < total:
        for index in _batches(len(labels), generator):
            if step >= total:
                break
            x = transform(pixels[index], generator=generator).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)["logits"]
            loss = F.cross_entropy(logits.float(), labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
        logger.info("teacher: step %d/%d, loss %.3f", step, total, loss.item())
    return model.eval()


@torch.no_grad()
def compute_maps(model: SmallCNN, pixels: torch.Tensor, transform: TileTransform, size: int) -> TeacherMaps:
    """The teacher's maps of every tile, seen whole at ``size`` px (eval path of ``transform``'s normalisation)."""
    view = transform.variant(size)
    class_maps, features = [], [[] for _ in GUIDED_STAGES]
    for index in _batches(len(pixels), None):
        out = model(view(pixels[index]))
        grid = out["class_map"].shape[-2:]
        class_maps.append(out["class_map"].float())
        for store, feature in zip(features, out["features"]):
            store.append(F.adaptive_avg_pool2d(feature, grid).half())  # earlier stages pooled to the same grid
    return TeacherMaps(torch.cat(class_maps), [torch.cat(f) for f in features])


@torch.no_grad()
def accuracy(model: SmallCNN, pixels: torch.Tensor, labels: torch.Tensor, view: TileTransform) -> float:
    """Top-1 accuracy of the teacher on tiles seen whole through ``view``."""
    correct = sum(int((model(view(pixels[i]))["logits"].argmax(-1) == labels[i]).sum())
                  for i in _batches(len(labels), None))
    return correct / max(1, len(labels))


def load_teacher(folder: str | os.PathLike, settings: TeacherSettings) -> tuple[TeacherMaps, dict] | None:
    """The maps and record of the teacher stored in ``folder`` when it was made with ``settings``, else None."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        record = json.loads((folder / _RECORD).read_text(encoding="utf-8"))
        if record.get("settings") != asdict(settings):
            logger.info("%s holds a teacher made with other settings: training a new one", folder)
            return None
        tensors = load_file(str(folder / _MAPS))
    except (OSError, ValueError) as err:
        logger.debug("no stored teacher in %s (%s)", folder, err)
        return None
    maps = TeacherMaps(tensors["class_map"], [tensors[f"features_{i}"] for i in range(len(GUIDED_STAGES))])
    return maps, record


def save_teacher(folder: str | os.PathLike, model: SmallCNN, maps: TeacherMaps, record: dict) -> None:
    """Write the teacher's weights, maps and record into ``folder`` whole: built beside it, then moved into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        atomic_write_tensors(staging / _WEIGHTS, model.state_dict())
        atomic_write_tensors(staging / _MAPS, {"class_map": maps.class_map,
                                               **{f"features_{i}": f for i, f in enumerate(maps.features)}})
        (staging / _RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def teacher_for_run(
    folder: str | os.PathLike, settings: TeacherSettings, pixels: torch.Tensor, labels: torch.Tensor,
    transform: TileTransform, validation: tuple[torch.Tensor, torch.Tensor] | None, bf16: bool = False,
) -> tuple[TeacherMaps, dict]:
    """The stored teacher of ``folder`` made with ``settings``, or a new one trained, mapped and stored there.

    Returns its maps and its record (settings, training time, validation accuracy)."""
    stored = load_teacher(folder, settings)
    if stored is not None:
        logger.info("teacher: reusing %s", folder)
        return stored
    logger.info("teacher: training a %s for %s epochs on %d tiles", SmallCNN.__name__, settings.epochs, len(labels))
    start = time.perf_counter()
    model = train_teacher(pixels, labels, transform, settings.num_labels, settings.epochs, settings.seed, bf16)
    maps = compute_maps(model, pixels, transform, settings.map_size)
    record: dict[str, Any] = {"settings": asdict(settings), "train_time_s": round(time.perf_counter() - start, 1)}
    if validation is not None:
        view = transform.variant()
        record["validation_accuracy"] = accuracy(model, *validation, view)
    logger.info("teacher: %s", record)
    save_teacher(folder, model, maps, record)
    return maps, record
