"""Attention maps of a ViT: attention rollout and the last layer's CLS attention per head.

* :func:`attention_rollout` implements attention rollout (Abnar & Zuidema 2020, "Quantifying Attention
  Flow in Transformers"): heads fused (mean or max), identity added for the residual connection, rows
  renormalised, matrices multiplied over the layers; the CLS row over the patches is the map.
  :func:`cls_attention` is the last layer's CLS->patch attention per head.
* :func:`compute_attention_maps` runs a model with eager attention (SDPA returns no weights) just for
  the call and restores the previous implementation; :func:`explain_tiles` does it for tiles, with
  the saved processor's exact preprocessing.

Models that return attention weights over a CLS token and one token per patch are supported: ViT and DINOv2
(with or without registers, whose register tokens are left out of the maps; see :mod:`hf_tissue_vit.backbones`).
:func:`require_vit` refuses others (timm, Swin, ConvNeXt, ...) in one line.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import backbones
from ..imaging import to_uint8
from ..predict.large_image import downscale
from ..predict.predictor import label_names_of
from ..transforms.processor import ProcessorTransform
from .parameters import pair

if TYPE_CHECKING:  # annotations only; transformers is imported where a model is built
    from transformers import BaseImageProcessor, PreTrainedModel

logger = logging.getLogger(__name__)

HEAD_FUSIONS = ("mean", "max")
SUPPORTED_MODEL_TYPES = tuple(t for f in backbones.FAMILIES if f.attentions for t in f.model_types if t != "vit_mae")


def require_vit(config: Any, what: str = "attention maps", name: str = "the model") -> None:
    """Raise ValueError (one line, naming ``name``) unless ``config`` is a model that returns attention weights over
    a CLS token and patch tokens (ViT, DINOv2 with or without registers)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{name} is a {model_type!r} model; {what} need a ViT or DINOv2 (model_type "
                         f"{' / '.join(SUPPORTED_MODEL_TYPES)}: a CLS token and one token per patch, attention "
                         "weights returned)")


def _stack_attentions(attentions: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """[L, B, H, T, T] float32 from a tuple of per-layer [B, H, T, T] tensors."""
    att = torch.stack(list(attentions)) if not isinstance(attentions, torch.Tensor) else attentions
    if att.dim() != 5 or att.shape[-1] != att.shape[-2]:
        raise ValueError(f"attentions must be L tensors of shape [B, heads, T, T]; got {tuple(att.shape)}")
    return att.float()


def rollout_matrix(
    attentions: Sequence[torch.Tensor] | torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout matrix [B, T, T] (rows sum to 1) from per-layer attentions [B, heads, T, T].

    Per layer: fuse heads (mean or max), optionally zero the lowest ``discard_ratio`` fraction of
    entries (never the attention to the CLS token), add the identity (the residual path), renormalise
    rows; then multiply the layers: R = Â_L · … · Â_1.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}; got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1); got {discard_ratio}")
    att = _stack_attentions(attentions)
    fused = att.mean(dim=2) if head_fusion == "mean" else att.amax(dim=2)  # [L, B, T, T]
    n_layers, batch, tokens, _ = fused.shape
    if discard_ratio > 0:
        flat = fused.reshape(n_layers, batch, -1)
        k = int(flat.shape[-1] * discard_ratio)
        if k > 0:
            threshold = flat.kthvalue(k, dim=-1, keepdim=True).values
            keep = flat > threshold
            keep.view(n_layers, batch, tokens, tokens)[..., 0] = True  # keep attention to CLS
            fused = (flat * keep).view(n_layers, batch, tokens, tokens)
    eye = torch.eye(tokens, dtype=fused.dtype, device=fused.device)
    result = eye.expand(batch, tokens, tokens).clone()
    for layer in fused:
        a = layer + eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def _grid_shape(n_patches: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    if grid_size is not None:
        if grid_size[0] * grid_size[1] != n_patches:
            raise ValueError(f"grid_size {grid_size} does not hold {n_patches} patches")
        return grid_size
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"{n_patches} patches are not a square grid; pass grid_size=(rows, cols)")
    return side, side


def attention_rollout(
    attentions: Sequence[torch.Tensor] | torch.Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    grid_size: tuple[int, int] | None = None,
    prefix: int = 1,
) -> torch.Tensor:
    """CLS→patch rollout map [B, rows, cols] (the CLS row of :func:`rollout_matrix` without the ``prefix`` tokens
    before the patches: CLS, and DINOv2's register tokens)."""
    matrix = rollout_matrix(attentions, head_fusion, discard_ratio)
    cls_row = matrix[:, 0, prefix:]
    return cls_row.reshape(cls_row.shape[0], *_grid_shape(cls_row.shape[1], grid_size))


def cls_attention(
    attentions: Sequence[torch.Tensor] | torch.Tensor, layer: int = -1, grid_size: tuple[int, int] | None = None,
    prefix: int = 1,
) -> torch.Tensor:
    """CLS→patch attention of one layer (default the last) per head: [B, heads, rows, cols] (``prefix``: tokens
    before the patches)."""
    att = _stack_attentions(attentions)[layer]  # [B, H, T, T]
    cls_row = att[:, :, 0, prefix:]
    return cls_row.reshape(*cls_row.shape[:2], *_grid_shape(cls_row.shape[-1], grid_size))


def upsample_map(maps: torch.Tensor, size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """Bilinear upsampling of maps [..., rows, cols] to ``size`` (height, width), min-max scaled to [0, 1]."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    up = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    if normalize:
        lo = up.amin(dim=(-2, -1), keepdim=True)
        hi = up.amax(dim=(-2, -1), keepdim=True)
        up = (up - lo) / (hi - lo).clamp_min(1e-12)
    return up.reshape(*lead, *size)


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Switch ``model`` to eager attention inside the block (SDPA does not return weights)."""
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


@dataclass
class AttentionMaps:
    """Model outputs and attention maps for a batch of tiles (maps at patch-grid resolution)."""

    probs: torch.Tensor  # [B, K] softmax
    rollout: torch.Tensor  # [B, rows, cols]
    heads: torch.Tensor  # [B, heads, rows, cols], last layer CLS→patch


@torch.inference_mode()
def compute_attention_maps(
    model: PreTrainedModel, pixel_values: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> AttentionMaps:
    """Run ``model`` (a ViT or DINOv2) on preprocessed ``pixel_values`` [B, 3, H, W] and return its attention maps."""
    require_vit(model.config)
    device = next(model.parameters()).device
    patch_h, patch_w = pair(model.config.patch_size)
    grid = (pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w)
    with eager_attention(model):
        outputs = model(pixel_values=pixel_values.to(device), output_attentions=True)
    if not outputs.attentions:
        raise RuntimeError("the model returned no attention weights even with eager attention")
    attentions = [a.cpu() for a in outputs.attentions]
    prefix = backbones.num_prefix_tokens(model.config)
    return AttentionMaps(
        probs=outputs.logits.float().softmax(-1).cpu(),
        rollout=attention_rollout(attentions, head_fusion, discard_ratio, grid_size=grid, prefix=prefix),
        heads=cls_attention(attentions, grid_size=grid, prefix=prefix),
    )


def _drawable(tile: np.ndarray, max_side: int | None) -> np.ndarray:
    """``tile`` itself, or a copy at most ``max_side`` px a side."""
    if max_side is None or max(tile.shape[:2]) <= max_side:
        return tile
    from PIL import Image

    return to_uint8(downscale(Image.fromarray(np.ascontiguousarray(tile, dtype=np.uint8)), max_side))


@dataclass
class TileAttention:
    """One tile with its prediction and attention maps upsampled to the tile's own size (the tile as
    drawn: at most ``max_side`` px a side, see :func:`explain_tiles`)."""

    name: str
    tile: np.ndarray  # HxWx3 uint8
    true_label: str | None
    pred_label: str
    score: float
    rollout: np.ndarray  # HxW in [0, 1]
    heads: np.ndarray  # [heads, H, W] in [0, 1], last layer CLS→patch


def explain_tiles(
    model: PreTrainedModel,
    processor: BaseImageProcessor,
    tiles: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    true_labels: Sequence[str | None] | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    batch_size: int = 32,
    max_side: int | None = 1024,
) -> list[TileAttention]:
    """Predictions and attention maps (rollout + last-layer heads) for uint8 HxWx3 RGB tiles.

    Tiles are preprocessed exactly as ``processor`` does it. The maps are drawn over the tile, or,
    when the processor center-crops, over the resized and cropped tile the model saw; a tile drawn
    larger than ``max_side`` px a side (None: no limit) is downscaled for drawing, so the maps and
    figures of a huge image stay small (the maps are computed at the model's input size in any case).
    """
    if head_fusion not in HEAD_FUSIONS:  # checked here so bad input fails before any forward pass
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}; got {head_fusion!r}")
    require_vit(model.config)
    pixels = ProcessorTransform(processor)
    show_prepared = pixels.geometry is not None and bool(pixels.geometry.crops)
    label_names = label_names_of(model)
    names = list(names) if names is not None else [f"tile_{i:04d}" for i in range(len(tiles))]
    true_labels = list(true_labels) if true_labels is not None else [None] * len(tiles)
    model.eval()
    results: list[TileAttention | None] = [None] * len(tiles)
    for start in range(0, len(tiles), batch_size):
        chunk = list(tiles[start : start + batch_size])
        prepared = [pixels.prepare(tile) for tile in chunk]
        for index, pixel_values in pixels.batches(prepared):
            maps = compute_attention_maps(model, pixel_values, head_fusion, discard_ratio)
            for j, i in enumerate(index):
                tile = _drawable(np.ascontiguousarray(prepared[i]) if show_prepared else chunk[i], max_side)
                k = int(maps.probs[j].argmax())
                results[start + i] = TileAttention(
                    name=names[start + i],
                    tile=tile,
                    true_label=true_labels[start + i],
                    pred_label=label_names[k],
                    score=float(maps.probs[j, k]),
                    rollout=upsample_map(maps.rollout[j], tile.shape[:2]).numpy(),
                    heads=upsample_map(maps.heads[j], tile.shape[:2]).numpy(),
                )
    return results
