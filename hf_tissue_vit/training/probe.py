"""``--freeze_backbone``: train only the classifier on the frozen backbone's features (the linear-probe protocol
for pathology backbones), computed once per tile and view instead of every epoch.

The features are what the model's classifier reads (:func:`hf_tissue_vit.backbones.pooled_features`): ViT's CLS
token after the final layernorm, DINOv2's CLS token beside its mean patch token, a timm model's pre-logits. They
are kept in the decoded-tile cache folder, keyed by the backbone's weights, the split's fingerprint, the transform
and the view. While :func:`linear_probe` is active the Trainer trains and validates the whole model on those
features (its forward runs only the classifier on them), so checkpoints, resume, the best-model selection and
``save_pretrained`` all see the complete model with its untouched backbone; the test split is then evaluated on
the tiles themselves, through the full model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import ImageClassifierOutput

from .. import backbones
from ..units import SAME_SCALE, same_scale
from .tiles import EpochCallback, TileCollator, TileDataset, decode_cache_file, split_fingerprint, write_decode_cache

logger = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 1  # part of every feature cache key: bump it when the features change


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features [views, N, D] and labels; each (view, tile) is one sample, so an epoch sees every view."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if features.dim() != 3 or features.shape[1] != len(labels):
            raise ValueError(f"features {tuple(features.shape)} do not match {len(labels)} labels")
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.features.shape[0] * self.features.shape[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        view, tile = divmod(int(index), self.features.shape[1])
        return {"features": self.features[view, tile], "labels": int(self.labels[tile])}


def collate_features(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch of :class:`FeatureDataset` items as model inputs (the features ride in ``pixel_values``)."""
    return {"pixel_values": torch.stack([item["features"] for item in items]),
            "labels": torch.tensor([item["labels"] for item in items], dtype=torch.long)}  # fmt: skip


def backbone_fingerprint(model: Any) -> str:
    """A digest of the backbone's weights (names, shapes, values): features computed by it are reusable."""
    digest = hashlib.blake2b(digest_size=12)
    head = {p.data_ptr() for p in backbones.head_of(model).parameters()}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in head:
            continue
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def compute_features(
    model: Any, tiles: TileDataset, collator: TileCollator, batch_size: int, bf16: bool = False
) -> torch.Tensor:
    """Classifier-input features [N, D] (float32, CPU) of ``tiles`` after ``collator``'s transform, with the model
    in eval mode."""
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(tiles, batch_size=batch_size, shuffle=False, collate_fn=collator)
    was_training = model.training
    model.eval()
    parts = []
    try:
        for batch in loader:
            if "pixels" in batch:  # a uint8 training batch that the collator leaves to the device
                batch = collator.augment_on_device({**batch, "pixels": batch["pixels"].to(device)})
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                features = backbones.pooled_features(model, batch["pixel_values"].to(device))
            parts.append(features.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts)


def _read_features(path: Any, length: int) -> torch.Tensor | None:
    with contextlib.suppress(OSError, ValueError):
        cached = np.load(path, allow_pickle=False)
        if cached.ndim == 2 and cached.shape[0] == length and cached.dtype == np.float32:
            logger.info("features from cache %s", path)
            return torch.from_numpy(cached)
    return None


def _view_features(
    model: Any, tiles: TileDataset, collator: TileCollator, args: Any, key: str | None, cache_dir: Any
) -> torch.Tensor:
    """One view's features: from the cache file of ``key`` (backbone, split, transform, view) when there is one."""
    path = None
    if key is not None:
        digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        path = decode_cache_file(f"features-{digest}", len(tiles), cache_dir)
        cached = _read_features(path, len(tiles))
        if cached is not None:
            return cached
    features = compute_features(model, tiles, collator, args.per_device_eval_batch_size, bool(args.bf16))
    if path is not None:
        write_decode_cache(path, features.numpy())
    return features


def probe_features(
    model: Any, data: Any, collator: TileCollator, views: int, args: Any, cache: bool = True, cache_dir: Any = None
) -> dict[str, FeatureDataset]:
    """Train (``views`` views: the plain tile, then augmented ones) and validation feature datasets of ``data``
    (:class:`~hf_tissue_vit.training.run.TrainingData`), read from or written to the cache folder ``cache_dir``
    (default: the decoded-tile cache) unless ``cache`` is False."""
    if views > 1 and not collator.train_transform.is_training:
        logger.warning("--probe_views > 1 without augmentation: every view is the plain tile")
    # the centre crop (probe_field) changes the features as much as the transform does
    backbone = (f"{FEATURE_CACHE_VERSION}|{backbone_fingerprint(model)}|{collator.seed}|{bool(args.bf16)}"
                f"|{collator.field}")
    out = {}
    for name, count in (("train", views), ("validation", 1)):
        source, fingerprint = data.tiles[name], split_fingerprint(data.dataset[name]) if cache else None
        stacked = []
        for view in range(count):
            tiles = TileDataset(source.pixels, source.labels, train=view > 0)
            tiles.set_epoch(view)  # seeds the view's augmentation
            transform = collator.train_transform if tiles.train else collator.eval_transform
            key = f"{backbone}|{fingerprint}|{transform!r}|{view}" if fingerprint else None
            stacked.append(_view_features(model, tiles, collator, args, key, cache_dir))
            logger.info("%s features: view %d of %d done", name, view + 1, count)
        out[name] = FeatureDataset(torch.stack(stacked), source.labels)
    return out


def probe_field(tile_size: tuple[int, int], tile_mpp: float | None, backbone_mpp: float | None,
                input_size: int) -> int | None:
    """Side in tile pixels of the field a frozen backbone of ``input_size`` px at ``backbone_mpp`` µm/px sees, when
    tiles of ``tile_size`` at ``tile_mpp`` are larger than it (the probe then takes each tile's centre at that size,
    so that the processor's resize brings it to the backbone's µm/px); None = the whole tile, with one warning when
    a scale is unknown or the tiles are smaller than the field (the backbone then sees them enlarged)."""
    if tile_mpp is None or backbone_mpp is None:
        missing = " and ".join(n for n, v in (("the tiles' µm/px (--mpp)", tile_mpp),
                                               ("the backbone's (--backbone_mpp)", backbone_mpp)) if v is None)
        logger.warning("%s unknown: the probe shows the backbone whole tiles resized to its %d px input, at whatever "
                       "scale that gives", missing, input_size)
        return None
    field = round(input_size * backbone_mpp / tile_mpp)
    side = min(tile_size)
    if field > side * (1 + SAME_SCALE):
        logger.warning("tiles of %d px at %s µm/px cover %.0f µm, less than the backbone's %d px input at %s µm/px "
                       "(%.0f µm): they are enlarged to it, finer than it learnt", side, tile_mpp, side * tile_mpp,
                       input_size, backbone_mpp, input_size * backbone_mpp)
        return None
    if same_scale(field / side):
        return None
    logger.info("probe: the centre %d px of each %d px tile (at %s µm/px) fills the backbone's %d px input at its "
                "%s µm/px", field, side, tile_mpp, input_size, backbone_mpp)
    return field


@contextlib.contextmanager
def _classifier_reads_features(model: Any) -> Iterator[None]:
    """While active, ``model``'s forward runs only its classifier, on a batch of cached features."""
    head = backbones.head_of(model)

    def forward(pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> ImageClassifierOutput:
        logits = head(pixel_values)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    model.forward = forward  # an instance attribute: the module's weights and state dict are unchanged
    try:
        yield
    finally:
        del model.forward


@contextlib.contextmanager
def linear_probe(trainer: Any, data: Any, views: int, cache: bool = True, cache_dir: Any = None) -> Iterator[None]:
    """Make ``trainer`` (whose model's backbone is frozen) train and validate the classifier on cached features
    of ``data``'s train and validation tiles; on exit it is back on the tiles (for the test split)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if any(p.requires_grad for p in backbones.backbone_parameters(model).values()):
        raise ValueError("linear_probe needs a frozen backbone (freeze_model_parts(model, backbone=True))")
    collator = trainer.data_collator
    if not isinstance(collator, TileCollator):
        raise TypeError(f"linear_probe needs the trainer's TileCollator, got {type(collator).__name__}")
    with trainer.args.main_process_first(desc="probe features"):
        features = probe_features(model, data, collator, views, trainer.args, cache, cache_dir)
    saved = trainer.train_dataset, trainer.eval_dataset, trainer.pop_callback(EpochCallback)
    trainer.train_dataset, trainer.eval_dataset = features["train"], features["validation"]
    trainer.data_collator = collate_features
    try:
        with _classifier_reads_features(model):
            yield
    finally:
        trainer.train_dataset, trainer.eval_dataset = saved[0], saved[1]
        trainer.data_collator = collator
        if saved[2] is not None:
            trainer.add_callback(saved[2])
