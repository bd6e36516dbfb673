"""Build and write a model folder's card, keeping what a user's own card already says."""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import ModelCard

from ..fileio import atomic_write_text
from .model_card import DEFAULT_MODEL_LICENSE, PACKAGE_TAG, ModelCardInfo, read_json

logger = logging.getLogger(__name__)

USER_CARD_BACKUP = "README.user.md"
CARD_MARK = "<!-- This card was written by hf_tissue_vit"  # the template's first line


def existing_card(output_dir: str | Path) -> ModelCard | None:
    """The folder's README.md as a card, or None when there is none."""
    path = Path(output_dir) / "README.md"
    return ModelCard.load(path) if path.is_file() else None


def is_package_card(card: ModelCard | None) -> bool:
    """True when this package wrote ``card`` (its mark in the text, or its tag), so it may be rewritten."""
    return card is not None and (CARD_MARK in card.text or PACKAGE_TAG in (card.data.tags or []))


def _parameter_table(output_dir: Path) -> str | None:
    """The model's parameters per component: a ViT's closed form beside the count, other supported families
    (DINOv2, timm) counted by part; None for other models, or a timm model without timm installed."""
    model_type = read_json(output_dir / "config.json").get("model_type")
    from transformers import AutoConfig

    from .. import backbones
    from ..interpret.parameters import (
        component_counts,
        format_component_counts,
        format_parameter_table,
        parameter_report_from_config,
    )

    if model_type == "vit":
        return format_parameter_table(parameter_report_from_config(AutoConfig.from_pretrained(output_dir)))
    config = AutoConfig.from_pretrained(output_dir)
    if backbones.family_of(config) is None:
        return None
    import torch
    from transformers import AutoModelForImageClassification

    try:
        with torch.device("meta"):  # shapes only
            model = AutoModelForImageClassification.from_config(config)
    except ImportError as err:  # a timm model where timm is not installed
        logger.info("no parameter table: %s", err)
        return None
    return format_component_counts(component_counts(model))


def _single(value: str | list | None) -> str | None:
    """One id from a card field that may hold a list."""
    if isinstance(value, list):
        return value[0] if len(value) == 1 and isinstance(value[0], str) else None
    return value if isinstance(value, str) else None


def build_model_card(output_dir: str | Path, repo_id: str | None = None, *, license: str | None = None,
                     dataset_id: str | None = None, base_model: str | None = None,
                     space_id: str | None = None) -> ModelCard:
    """The card of a model folder: what the run recorded, flags for what it did not, and the metadata of
    the folder's existing card for what neither says (its base model, datasets, licence, results)."""
    output_dir = Path(output_dir)
    info = ModelCardInfo.from_output_dir(output_dir, repo_id)
    card = existing_card(output_dir)
    existing = card.data.to_dict() if card is not None else {}
    known_datasets = existing.get("datasets") or [None]
    info.base_model = base_model or info.base_model or _single(existing.get("base_model"))
    info.dataset_id = dataset_id or info.dataset_id or _single(known_datasets)
    info.space_id = space_id or read_json(output_dir / "hf_tissue_vit_space.json").get("space_id")
    info.license = license or existing.get("license") or (DEFAULT_MODEL_LICENSE if info.trained_with_package else None)
    return info.render(existing, _parameter_table(output_dir))


def write_model_card(output_dir: str | Path, repo_id: str | None = None, *, replace_user_card: bool = False,
                     **kwargs: str | None) -> Path | None:
    """Render the card into ``output_dir/README.md`` atomically and return its path.

    A README.md this package did not write is the user's: it is kept (None is returned) unless
    ``replace_user_card``, and then first saved as README.user.md.
    """
    output_dir = Path(output_dir)
    path = output_dir / "README.md"
    current = existing_card(output_dir)
    if current is not None and not is_package_card(current):
        if not replace_user_card:
            logger.info("%s is the folder's own card: kept as it is", path)
            return None
        backup = output_dir / USER_CARD_BACKUP
        if not backup.exists():
            atomic_write_text(backup, path.read_text(encoding="utf-8"))
            logger.info("saved the folder's own card as %s", backup)
    card = build_model_card(output_dir, repo_id, **kwargs)
    atomic_write_text(path, str(card))
    logger.info("wrote model card %s", path)
    return path
