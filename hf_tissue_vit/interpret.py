"""Look inside a ViT: closed-form parameter counts and attention maps.

* :func:`parameter_table` / :func:`parameter_report` give the parameter count of every component of a
  ViT from the config alone (closed form) next to the count from the instantiated model.
* :func:`attention_rollout` implements attention rollout (Abnar & Zuidema 2020, "Quantifying
  Attention Flow in Transformers"): heads fused (mean or max), identity added for the residual
  connection, rows renormalised, matrices multiplied over the layers; the CLS row over the patches is
  the map. :func:`cls_attention` is the last layer's CLS→patch attention per head.
* :func:`compute_attention_maps` runs a model with eager attention (SDPA returns no weights) just for
  the call and restores the previous implementation.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .fileio import save_figure_atomic

if TYPE_CHECKING:  # annotations only; transformers is imported where a model is built
    from transformers import BaseImageProcessor, PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

HEAD_FUSIONS = ("mean", "max")


# --------------------------------------------------------------------------------------------
# Parameter count
# --------------------------------------------------------------------------------------------
@dataclass
class ParameterRow:
    """One component of a ViT: closed-form formula, its value, and (when a model is given) the count."""

    component: str
    formula: str
    expected: int
    counted: int | None = None


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _in_total(row: ParameterRow) -> bool:
    """Rows that add up to the total (per-block rows are already inside the encoder row)."""
    return "per block" not in row.component and row.component not in ("encoder block", "total")


def parameter_table(config: PretrainedConfig) -> list[ParameterRow]:
    """Closed-form parameter count per component of ``ViTForImageClassification(config)``.

    Symbols: C channels, P patch size, D hidden size, N = (H/P)(W/P) patches, L layers,
    M intermediate (MLP) size, K classes. The last row is the total.
    """
    C, D, L, M = config.num_channels, config.hidden_size, config.num_hidden_layers, config.intermediate_size
    (H, W), (PH, PW) = _pair(config.image_size), _pair(config.patch_size)
    N = (H // PH) * (W // PW)
    K = config.num_labels
    heads = config.num_attention_heads
    A = heads * getattr(config, "head_dim", None) if getattr(config, "head_dim", None) else D  # attention width
    qkv_bias = bool(getattr(config, "qkv_bias", True))

    attn = 3 * (D * A + (A if qkv_bias else 0)) + A * D + D
    if A == D and qkv_bias:
        attn_formula = "4·(D·D + D)"
    else:
        attn_formula = f"3·(D·A{' + A' if qkv_bias else ''}) + A·D + D (A = {A})"
    mlp = D * M + M + M * D + D
    norms = 2 * 2 * D
    block = attn + mlp + norms
    rows = [
        ParameterRow("patch embedding (conv P×P, stride P)", "C·P·P·D + D", C * PH * PW * D + D),
        ParameterRow("position embeddings", "(N+1)·D", (N + 1) * D),
        ParameterRow("CLS token", "D", D),
        ParameterRow("attention Q/K/V/output, per block", attn_formula, attn),
        ParameterRow("MLP, per block", "D·M + M + M·D + D", mlp),
        ParameterRow("two LayerNorms, per block", "2·2D", norms),
        ParameterRow("encoder block", "attention + MLP + LayerNorms", block),
        ParameterRow(f"encoder (L = {L} blocks)", "L·block", L * block),
        ParameterRow("final LayerNorm", "2D", 2 * D),
    ]
    # ViTForImageClassification has no pooler; ViTModel has one (dense D→pooler_output_size).
    classifier = D * K + K if K > 0 else 0
    rows.append(ParameterRow(f"classifier head (K = {K})", "D·K + K", classifier))
    rows.append(ParameterRow("total", "sum of the above", sum(r.expected for r in rows if _in_total(r))))
    logger.debug("C=%d P=%dx%d D=%d N=%d L=%d M=%d K=%d", C, PH, PW, D, N, L, M, K)
    return rows


# Parameter name → component; covers transformers 5 names (vit.layers.i.attention.q_proj) and the
# 4.x names (vit.encoder.layer.i.attention.attention.query, intermediate.dense, output.dense).
_COMPONENT_PATTERNS: list[tuple[str, str]] = [
    (r"patch_embeddings\.", "patch embedding (conv P×P, stride P)"),
    (r"position_embeddings", "position embeddings"),
    (r"cls_token", "CLS token"),
    (r"mask_token", "mask token"),
    (r"(layers|layer)\.\d+\.attention\.", "attention Q/K/V/output, per block"),
    (r"(layers|layer)\.\d+\.(mlp|intermediate|output)\.", "MLP, per block"),
    (r"(layers|layer)\.\d+\.layernorm_(before|after)\.", "two LayerNorms, per block"),
    (r"(^|\.)layernorm\.", "final LayerNorm"),
    (r"(^|\.)pooler\.", "pooler"),
    (r"^classifier\.", "classifier head"),
]


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Count ``model``'s parameters by component (names as in :func:`parameter_table`).

    Per-block components are summed over all blocks. Unrecognised names go to ``"other"``; the values
    always add up to ``sum(p.numel() for p in model.parameters())``. Works on meta-device models.
    """
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        component = next((c for pattern, c in _COMPONENT_PATTERNS if re.search(pattern, name)), "other")
        counts[component] = counts.get(component, 0) + param.numel()
    return counts


def parameter_report(config: PretrainedConfig, model: torch.nn.Module | None = None) -> list[ParameterRow]:
    """:func:`parameter_table` with ``counted`` filled from ``model`` (per block = total / L)."""
    rows = parameter_table(config)
    if model is None:
        return rows
    counts = count_parameters(model)
    L = config.num_hidden_layers
    by_prefix = {r.component.split(" (")[0].split(",")[0]: r for r in rows}
    for component, n in counts.items():
        key = component.split(" (")[0].split(",")[0]
        row = by_prefix.get(key)
        if row is None and component == "pooler":  # ViTModel only; ViTForImageClassification has none
            out = getattr(config, "pooler_output_size", None) or config.hidden_size
            rows.insert(-1, ParameterRow("pooler", "D·D_pool + D_pool", config.hidden_size * out + out, n))
        elif row is None:  # e.g. a mask token or unknown extra parameters: show them, formula unknown
            rows.insert(-1, ParameterRow(component, "(not in the ViT formula)", 0, n))
        else:
            row.counted = n // L if "per block" in row.component else n
    per_block = [r for r in rows if "per block" in r.component]
    encoder_block = next(r for r in rows if r.component == "encoder block")
    encoder = next(r for r in rows if r.component.startswith("encoder (L"))
    if all(r.counted is not None for r in per_block):
        encoder_block.counted = sum(r.counted for r in per_block)
        encoder.counted = encoder_block.counted * L
    for row in rows:  # components the model lacks (a bare ViTModel has no head): closed form is 0 too
        if row.counted is None and row.component != "total":
            row.counted = row.expected = 0
    rows[-1].expected = sum(r.expected for r in rows[:-1] if _in_total(r))
    rows[-1].counted = sum(p.numel() for p in model.parameters())
    return rows


def parameter_report_from_config(config: PretrainedConfig) -> list[ParameterRow]:
    """:func:`parameter_report` counted on a model built from ``config`` on the meta device (no memory)."""
    from transformers import AutoModelForImageClassification

    with torch.device("meta"):  # shapes only, so even ViT-L costs nothing
        model = AutoModelForImageClassification.from_config(config)
    return parameter_report(config, model)


def format_parameter_table(rows: Sequence[ParameterRow]) -> str:
    """Markdown table of :func:`parameter_report` rows."""
    lines = ["| component | formula | closed form | counted |", "|---|---|---:|---:|"]
    for r in rows:
        counted = "" if r.counted is None else f"{r.counted:,}"
        lines.append(f"| {r.component} | {r.formula} | {r.expected:,} | {counted} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Attention rollout
# --------------------------------------------------------------------------------------------
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
    side = int(round(n_patches**0.5))
    if side * side != n_patches:
        raise ValueError(f"{n_patches} patches are not a square grid; pass grid_size=(rows, cols)")
    return side, side


def attention_rollout(
    attentions: Sequence[torch.Tensor] | torch.Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    grid_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """CLS→patch rollout map [B, rows, cols] (the CLS row of :func:`rollout_matrix` without CLS)."""
    matrix = rollout_matrix(attentions, head_fusion, discard_ratio)
    cls_row = matrix[:, 0, 1:]
    return cls_row.reshape(cls_row.shape[0], *_grid_shape(cls_row.shape[1], grid_size))


def cls_attention(
    attentions: Sequence[torch.Tensor] | torch.Tensor, layer: int = -1, grid_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """CLS→patch attention of one layer (default the last) per head: [B, heads, rows, cols]."""
    att = _stack_attentions(attentions)[layer]  # [B, H, T, T]
    cls_row = att[:, :, 0, 1:]
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


def overlay_heatmap(tile: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heatmap (H×W, same size as the tile) coloured with ``cmap`` onto an RGB uint8 tile."""
    import matplotlib

    if tile.shape[:2] != heatmap.shape:
        raise ValueError(f"heatmap {heatmap.shape} and tile {tile.shape[:2]} differ in size; upsample first")
    colours = matplotlib.colormaps[cmap](np.clip(heatmap, 0.0, 1.0))[..., :3]
    blended = (1 - alpha) * tile.astype(np.float32) / 255.0 + alpha * colours
    return (np.clip(blended, 0.0, 1.0) * 255).round().astype(np.uint8)


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
    """Run ``model`` on preprocessed ``pixel_values`` [B, 3, S, S] and return its attention maps."""
    device = next(model.parameters()).device
    patch_h, patch_w = _pair(model.config.patch_size)
    grid = (pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w)
    with eager_attention(model):
        outputs = model(pixel_values=pixel_values.to(device), output_attentions=True)
    if not outputs.attentions:
        raise RuntimeError("the model returned no attention weights even with eager attention")
    attentions = [a.cpu() for a in outputs.attentions]
    return AttentionMaps(
        probs=outputs.logits.float().softmax(-1).cpu(),
        rollout=attention_rollout(attentions, head_fusion, discard_ratio, grid_size=grid),
        heads=cls_attention(attentions, grid_size=grid),
    )


# --------------------------------------------------------------------------------------------
# Attention figures
# --------------------------------------------------------------------------------------------
@dataclass
class TileAttention:
    """One tile with its prediction and attention maps upsampled to the tile's own size."""

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
) -> list[TileAttention]:
    """Predictions and attention maps (rollout + last-layer heads) for uint8 HxWx3 tiles."""
    from .predict import label_names_of, preprocess_tiles
    from .transforms import TileTransform

    if head_fusion not in HEAD_FUSIONS:  # checked here so bad input fails before any forward pass
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}; got {head_fusion!r}")
    transform = TileTransform.from_processor(processor)
    label_names = label_names_of(model)
    names = list(names) if names is not None else [f"tile_{i:04d}" for i in range(len(tiles))]
    true_labels = list(true_labels) if true_labels is not None else [None] * len(tiles)
    model.eval()
    results: list[TileAttention] = []
    for start in range(0, len(tiles), batch_size):
        chunk = list(tiles[start : start + batch_size])
        maps = compute_attention_maps(model, preprocess_tiles(transform, chunk), head_fusion, discard_ratio)
        for j, tile in enumerate(chunk):
            size = tile.shape[:2]
            k = int(maps.probs[j].argmax())
            results.append(
                TileAttention(
                    name=names[start + j],
                    tile=tile,
                    true_label=true_labels[start + j],
                    pred_label=label_names[k],
                    score=float(maps.probs[j, k]),
                    rollout=upsample_map(maps.rollout[j], size).numpy(),
                    heads=upsample_map(maps.heads[j], size).numpy(),
                )
            )
    return results


def _title(item: TileAttention) -> str:
    true = item.true_label if item.true_label is not None else "?"
    return f"true {true}\npred {item.pred_label} ({item.score:.2f})"


def save_tile_figure(item: TileAttention, path: str | Path, alpha: float = 0.5) -> None:
    """PNG: the tile, its rollout overlay, and one overlay per last-layer head."""
    from matplotlib.figure import Figure

    panels = [("tile", item.tile), ("rollout", overlay_heatmap(item.tile, item.rollout, alpha))]
    panels += [(f"last layer, head {h}", overlay_heatmap(item.tile, m, alpha)) for h, m in enumerate(item.heads)]
    fig = Figure(figsize=(2.2 * len(panels), 2.8))
    for i, (label, picture) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(picture)
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(_title(item).replace("\n", " · "), fontsize=9)
    save_figure_atomic(fig, path, format="png")


def save_attention_grid(
    items: Sequence[TileAttention], path: str | Path, class_order: Sequence[str], alpha: float = 0.5
) -> None:
    """Grid PNG of rollout overlays: one row per class (by true label, or predicted when unknown)."""
    from matplotlib.figure import Figure

    rows: dict[str, list[TileAttention]] = {name: [] for name in class_order}
    for item in items:
        rows.setdefault(item.true_label or item.pred_label, []).append(item)
    rows = {name: group for name, group in rows.items() if group}
    if not rows:
        raise ValueError("no tiles to draw")
    n_cols = max(len(group) for group in rows.values())
    fig = Figure(figsize=(2.0 * n_cols + 0.8, 2.3 * len(rows)))
    for r, (name, group) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = fig.add_subplot(len(rows), n_cols, r * n_cols + c + 1)
            ax.set_axis_off()
            if c < len(group):
                item = group[c]
                ax.imshow(overlay_heatmap(item.tile, item.rollout, alpha))
                ax.set_title(_title(item), fontsize=7, color="black" if item.true_label in (None, item.pred_label)
                             else "red")
            if c == 0:
                ax.text(-0.08, 0.5, name, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=10)
    fig.suptitle("attention rollout (Abnar & Zuidema 2020)", fontsize=11)
    save_figure_atomic(fig, path, format="png")

