"""What fine-tuning does with a checkpoint's backbone beyond loading it (:mod:`hf_tissue_vit.modeling`): freezing
it or its position embeddings, and recording how it was pretrained (``pretraining.json`` of
``scripts/pretrain.py``) in all_results.json, where the model card shows it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..modelfolder import PRETRAINING_FILE  # written by scripts/pretrain.py beside the model it pretrained
from ..modeling import ModelSpec

logger = logging.getLogger(__name__)


def freeze_model_parts(model: Any, backbone: bool = False, position_embeddings: bool = False) -> None:
    """Exclude the whole backbone (``model.vit``), or only its position embeddings, from training."""
    if backbone:
        model.vit.requires_grad_(False)
    if position_embeddings:
        model.vit.embeddings.position_embeddings.requires_grad_(False)
    if backbone or position_embeddings:
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
        "freeze_backbone": bool(model_args.freeze_backbone),
        "freeze_position_embeddings": bool(model_args.freeze_position_embeddings),
    }
    if model_args.freeze_backbone:
        out["probe_views"] = model_args.probe_views
    record = read_pretraining_record(spec.checkpoint)
    if record is not None:  # the pretraining machine is in pretraining.json; the card shows the recipe
        out["pretraining"] = {key: value for key, value in record.items() if key != "hardware"}
    return out
