"""The backbone seam: which image architectures the package fine-tunes, probes and explains, and where each
keeps what the rest of the package needs (its backbone, its classifier, its transformer blocks, its token layout).

Every model is a transformers ``*ForImageClassification`` loaded through ``AutoModelForImageClassification``;
nothing else in the package reaches into a family's attributes (``model.vit``, ``model.dinov2``, ...):

============================  ==============================  ==========================================
family                        checkpoints                      what is family-specific
============================  ==============================  ==========================================
ViT (``vit``, ``vit_mae``)    google/vit-*, owkin/phikon,      position-embedding resize, PatchDropout,
                              scripts/pretrain.py's MAE         MAE hand-off, attention maps
DINOv2 (``dinov2``)           Phikon-v2, Hibou, DINOv2          position-embedding resize (DINOv2's own
DINOv2 with registers         facebook/dinov2-with-registers-*  interpolation), PatchDropout, attention
                                                                maps (register tokens skipped)
timm (``timm_wrapper``)       UNI / UNI2, Virchow / Virchow2,   none of these: runs at its pretrained input
                              H-optimus, Prov-GigaPath          size; needs the ``timm`` package
============================  ==============================  ==========================================

Other architectures (Swin, ConvNeXt, ResNet, ...) are refused in one line by :func:`require_family` before any
weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Family:
    """What the package knows about one architecture family."""

    name: str  # as users know it, in messages and cards
    model_types: tuple[str, ...]  # config.model_type values of this family
    token_sequence: bool  # the backbone exposes CLS (+ registers) + patch tokens: PatchDropout, position resize
    attentions: bool  # returns attention weights with output_attentions=True (eager attention)
    needs: str | None = None  # an extra package the model needs at run time


VIT = Family("ViT", ("vit", "vit_mae"), token_sequence=True, attentions=True)
DINOV2 = Family("DINOv2", ("dinov2",), token_sequence=True, attentions=True)
DINOV2_REGISTERS = Family("DINOv2 with registers", ("dinov2_with_registers",), token_sequence=True, attentions=True)
TIMM = Family("timm (TimmWrapper)", ("timm_wrapper",), token_sequence=False, attentions=False, needs="timm")
FAMILIES = (VIT, DINOV2, DINOV2_REGISTERS, TIMM)
SUPPORTED = ", ".join(family.name for family in FAMILIES)


def family_of(config: Any) -> Family | None:
    """The family of a model config (a config object or a config.json dict), or None when the package does not
    support it."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return next((family for family in FAMILIES if model_type in family.model_types), None)


def require_family(config: Any, name: str, what: str = "fine-tuning") -> Family:
    """The family of ``config``; ValueError in one line (naming ``name`` and what is supported) otherwise."""
    family = family_of(config)
    if family is None:
        arch = list(getattr(config, "architectures", None) or [])
        raise ValueError(
            f"{name} is a {getattr(config, 'model_type', None)!r} model (architectures {arch or 'unknown'}); "
            f"{what} supports {SUPPORTED} image models: pick one of those, or use --from_scratch"
        )
    return family


def num_prefix_tokens(config: Any) -> int:
    """Tokens before the patch tokens in a token-sequence backbone: CLS, then DINOv2's register tokens."""
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def backbone_of(model: Any) -> torch.nn.Module:
    """The pretrained part of a ``*ForImageClassification`` (``model.vit``, ``model.dinov2``, ``model.timm_model``).

    For timm models it holds the classifier too (see :func:`head_of`)."""
    return model.base_model


def head_of(model: Any) -> torch.nn.Module:
    """The classifier that turns the backbone's pooled features into logits."""
    if family_of(model.config) is TIMM:
        return model.timm_model.get_classifier()
    return model.classifier


def backbone_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """Every parameter of ``model`` except the classifier's, by name."""
    head = {id(p) for p in head_of(model).parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) not in head}


def transformer_blocks(model: Any) -> torch.nn.ModuleList | torch.nn.Sequential:
    """The backbone's stack of transformer blocks: the ``ModuleList`` (transformers) or ``Sequential`` (timm)
    holding most of its parameters."""
    stacks = (torch.nn.ModuleList, torch.nn.Sequential)
    lists = [m for m in backbone_of(model).modules() if isinstance(m, stacks) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no stack of blocks to unfreeze")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def token_embeddings(model: Any) -> torch.nn.Module:
    """The module whose output is the token sequence (CLS, registers, patches) of a token-sequence family."""
    family = family_of(model.config)
    if family is None or not family.token_sequence:
        raise ValueError(f"{family.name if family else type(model).__name__} models expose no token embeddings")
    return backbone_of(model).embeddings


def freeze_unused(model: Any) -> list[str]:
    """Exclude from training the parameters a classifier never uses (DINOv2's mask token, kept in its checkpoints
    for masked pretraining): under DDP without ``find_unused_parameters`` a trainable parameter that gets no gradient
    stops the run. Returns their names."""
    embeddings = getattr(backbone_of(model), "embeddings", None)
    mask_token = getattr(embeddings, "mask_token", None)
    if not isinstance(mask_token, torch.nn.Parameter):
        return []
    mask_token.requires_grad_(False)
    return [name for name, p in model.named_parameters() if p is mask_token]


@torch.no_grad()
def pooled_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """What ``model``'s classifier reads for ``pixel_values``: ViT's final CLS token, DINOv2's CLS token beside
    the mean patch token, timm's pre-logits. Captured at the classifier's input, so it is exactly that."""
    captured: list[torch.Tensor] = []
    handle = head_of(model).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        model(pixel_values=pixel_values)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the classifier of {type(model).__name__} ran {len(captured)} times in one forward pass")
    return captured[0]
