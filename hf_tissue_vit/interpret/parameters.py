"""Closed-form parameter counts of a ViT, next to the counts of the instantiated model.

:func:`parameter_table` gives the parameter count of every component of ``ViTForImageClassification``
from the config alone; :func:`parameter_report` fills in the counts of a model (by parameter name),
:func:`parameter_report_from_config` builds that model on the meta device (no memory).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only; transformers is imported where a model is built
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)


@dataclass
class ParameterRow:
    """One component of a ViT: closed-form formula, its value, and (when a model is given) the count."""

    component: str
    formula: str
    expected: int
    counted: int | None = None


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a size given as one int or a pair."""
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
    (H, W), (PH, PW) = pair(config.image_size), pair(config.patch_size)
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


def component_counts(model: torch.nn.Module) -> list[tuple[str, int]]:
    """Parameters of any supported image classifier (:mod:`hf_tissue_vit.backbones`: DINOv2, timm, ViT) by part:
    what comes before the transformer blocks, the blocks, what comes after them, the classifier, and the total.
    Counted, not closed form (the formulas of :func:`parameter_table` are the plain ViT's). Works on the meta device."""
    from .. import backbones

    blocks = backbones.transformer_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    head = sum(p.numel() for p in backbones.head_of(model).parameters())
    before = after = 0
    seen_blocks = False
    for parameter in backbones.backbone_parameters(model).values():
        if id(parameter) in in_blocks:
            seen_blocks = True
        elif seen_blocks:
            after += parameter.numel()
        else:
            before += parameter.numel()
    total = sum(p.numel() for p in model.parameters())
    return [("embeddings and tokens (before the blocks)", before),
            (f"transformer blocks (L = {len(blocks)})", total - before - after - head),
            ("after the blocks (final norms)", after), (f"classifier head (K = {model.config.num_labels})", head),
            ("total", total)]  # fmt: skip


def format_component_counts(rows: Sequence[tuple[str, int]]) -> str:
    """Markdown table of :func:`component_counts` rows."""
    return "\n".join(["| component | counted |", "|---|---:|", *(f"| {name} | {n:,} |" for name, n in rows)])
