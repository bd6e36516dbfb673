"""What fine-tuning does with a checkpoint's backbone beyond loading it (:mod:`hf_tissue_vit.modeling`): freezing
it, all but its last blocks, or its position embeddings (any family of :mod:`hf_tissue_vit.backbones`), and
recording how it was pretrained (``pretraining.json`` of ``scripts/pretrain.py``) in all_results.json, where the
model card shows it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .. import backbones
from ..modelfolder import PRETRAINING_FILE  # written by scripts/pretrain.py beside the model it pretrained
from ..modeling import ModelSpec

logger = logging.getLogger(__name__)


def freeze_model_parts(
    model: Any, backbone: bool = False, position_embeddings: bool = False, unfreeze_last_blocks: int | None = None
) -> None:
    """Exclude the whole backbone from training (the linear probe), all of it but its last ``unfreeze_last_blocks``
    transformer blocks and the norms after them (partial fine-tuning), or only its position embeddings; the
    classifier always trains. ValueError (one line) for what the model does not have."""
    if unfreeze_last_blocks is not None:
        blocks = backbones.transformer_blocks(model)
        if not 1 <= unfreeze_last_blocks <= len(blocks):
            raise ValueError(f"--unfreeze_last_blocks {unfreeze_last_blocks}: the backbone has {len(blocks)} blocks; "
                             f"give 1 to {len(blocks)}")
    if backbone or unfreeze_last_blocks is not None:
        for parameter in backbones.backbone_parameters(model).values():
            parameter.requires_grad_(False)
    if unfreeze_last_blocks is not None:
        blocks[len(blocks) - unfreeze_last_blocks:].requires_grad_(True)
        # what comes after the blocks (final norm, timm's fc_norm) feeds the head from the unfrozen blocks
        last = {id(p) for p in blocks[-1].parameters()}
        after = False
        for parameter in backbones.backbone_parameters(model).values():
            if after:
                parameter.requires_grad_(True)
            after = after or id(parameter) in last
    if position_embeddings:
        family = backbones.family_of(model.config)
        if family is None or not family.token_sequence:
            raise ValueError("--freeze_position_embeddings needs a ViT or DINOv2 backbone, not a "
                             f"{family.name if family else model.config.model_type} model")
        backbones.token_embeddings(model).position_embeddings.requires_grad_(False)
    if backbone or position_embeddings or unfreeze_last_blocks is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("trainable parameters: %d of %d", trainable, model.num_parameters())


def read_pretraining_record(checkpoint: str | None) -> dict[str, Any] | None:
    """The ``pretraining.json`` of a local checkpoint folder, or None (none there, or not a local folder)."""
    if not checkpoint:
        return None
    path = Path(checkpoint) / PRETRAINING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable %s: %s", path, err)
        return None
    return record if isinstance(record, dict) else None


def backbone_description(model_args: Any, spec: ModelSpec) -> dict[str, Any]:
    """all_results.json ``model`` entries about the backbone: its checkpoint kind, what was frozen, and (from a
    ``scripts/pretrain.py`` output) its ``pretraining`` record."""
    out: dict[str, Any] = {
        "checkpoint_kind": spec.kind if spec.checkpoint else None,
        "family": spec.family.name,
        "freeze_backbone": bool(model_args.freeze_backbone),
        "freeze_position_embeddings": bool(model_args.freeze_position_embeddings),
    }
    if model_args.unfreeze_last_blocks is not None:
        out["unfreeze_last_blocks"] = model_args.unfreeze_last_blocks
    if model_args.freeze_backbone:
        out["probe_views"] = model_args.probe_views
    record = read_pretraining_record(spec.checkpoint)
    if record is not None:  # the pretraining machine is in pretraining.json; the card shows the recipe
        out["pretraining"] = {key: value for key, value in record.items() if key != "hardware"}
    return out
