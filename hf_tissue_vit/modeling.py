"""ViT models for tissue tiles: from-scratch presets, checkpoint loading with head swap and
position-embedding resize, and loading a trained output dir for inference."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "google/vit-base-patch16-224"

# DeiT/ViT names: tiny/small/base differ in width and heads; 12 layers each. Recipes override
# depth, width and resolution for the small CPU budget.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
_PRESET_COMMON: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "qkv_bias": True,
}
# Config fields a user may override on top of a preset (or, for dropout, on a checkpoint).
OVERRIDABLE_FIELDS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)


def _label_maps(id2label: dict[int, str] | list[str]) -> tuple[dict[int, str], dict[str, int]]:
    if isinstance(id2label, (list, tuple)):
        id2label = dict(enumerate(id2label))
    id2label = {int(i): str(n) for i, n in id2label.items()}
    return id2label, {n: i for i, n in id2label.items()}


def check_geometry(image_size: int, patch_size: int, hidden_size: int | None = None, heads: int | None = None) -> None:
    """Raise ``ValueError`` when the sizes cannot make a ViT (checked before any heavy work)."""
    if image_size <= 0 or patch_size <= 0:
        raise ValueError(f"--image_size ({image_size}) and --patch_size ({patch_size}) must be positive")
    if image_size % patch_size:
        raise ValueError(
            f"--image_size {image_size} is not divisible by --patch_size {patch_size}; pick e.g. "
            f"--image_size {image_size // patch_size * patch_size or patch_size}"
        )
    if hidden_size is not None and heads is not None and hidden_size % heads:
        raise ValueError(f"--hidden_size {hidden_size} is not divisible by --num_attention_heads {heads}")


def scratch_config(preset: str, id2label: dict[int, str] | list[str], **overrides: Any) -> ViTConfig:
    """ViTConfig of a named preset (``MODEL_PRESETS``) with ``overrides`` (None values ignored)."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown --model_preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    unknown = set(overrides) - set(OVERRIDABLE_FIELDS)
    if unknown:
        raise ValueError(f"unknown model overrides {sorted(unknown)}; allowed: {list(OVERRIDABLE_FIELDS)}")
    values = {**_PRESET_COMMON, **MODEL_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    check_geometry(values["image_size"], values["patch_size"], values["hidden_size"], values["num_attention_heads"])
    id2label, label2id = _label_maps(id2label)
    return ViTConfig(
        **values,
        num_labels=len(id2label),
        id2label=id2label,
        label2id=label2id,
        problem_type="single_label_classification",
    )


# Checkpoint kinds that fine-tune into a ViTForImageClassification (ModelSpec.kind).
CLASSIFIER, HEADLESS, MAE = "classifier", "headless", "mae"
# What a ViTMAE encoder shares with a ViT: its weights load into ViTForImageClassification's `vit`
# (the fixed sin-cos position embeddings become ordinary, trainable ones; the decoder is dropped).
_MAE_ENCODER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                       "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
                       "image_size", "patch_size", "num_channels", "qkv_bias")  # fmt: skip


def vit_config_from_mae(config: Any) -> ViTConfig:
    """The ``ViTConfig`` of a ``ViTMAEConfig``'s encoder (no masking or decoder fields, ``model_type`` vit)."""
    return ViTConfig(**{name: getattr(config, name) for name in _MAE_ENCODER_FIELDS})


def checkpoint_kind(config: Any) -> str | None:
    """:data:`CLASSIFIER` (a ViT with a head), :data:`HEADLESS` (a ``ViTModel`` backbone, as pathology
    foundation models are published), :data:`MAE` (a ViTMAE checkpoint, e.g. from ``scripts/pretrain.py``),
    or None for anything else."""
    arch = list(getattr(config, "architectures", None) or [])
    if any(not a.startswith("ViT") for a in arch):
        return None
    if config.model_type == "vit_mae":
        return MAE
    if config.model_type != "vit":
        return None
    return HEADLESS if arch and all(a == "ViTModel" for a in arch) else CLASSIFIER


def check_vit_checkpoint(model_name_or_path: str) -> ViTConfig:
    """Load the checkpoint's config and refuse anything that is not a ViT image model (a classifier, a
    headless ``ViTModel`` or a ViTMAE checkpoint, whose encoder config is returned as a ``ViTConfig``)."""
    return _read_checkpoint(model_name_or_path)[0]


def _read_checkpoint(model_name_or_path: str) -> tuple[ViTConfig, str]:
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"--model_name_or_path {model_name_or_path!r}: cannot read a model config ({err}). Give a local "
            "folder with config.json + model.safetensors, a reachable Hub id, or use --from_scratch."
        ) from err
    kind = checkpoint_kind(config)
    if kind is None:
        arch = list(getattr(config, "architectures", None) or [])
        raise ValueError(
            f"--model_name_or_path {model_name_or_path!r} is a {config.model_type!r} checkpoint "
            f"(architectures {arch or 'unknown'}), not a ViT image-classification model; use a ViT checkpoint "
            f"such as {DEFAULT_BASE_MODEL}, a headless ViTModel backbone, a ViTMAE checkpoint, or --from_scratch."
        )
    return (vit_config_from_mae(config) if kind == MAE else config), kind


def resize_position_embeddings(model: ViTForImageClassification, image_size: int) -> None:
    """Resample the patch-grid position embeddings to ``image_size`` in place (CLS kept), as timm's
    ``resample_abs_pos_embed`` does (bicubic, antialiased), and update the config so the saved
    model loads at the new size without extra flags."""
    emb = model.vit.embeddings
    patch = model.config.patch_size
    check_geometry(image_size, patch)
    old = emb.position_embeddings.data
    old_grid = math.isqrt(old.shape[1] - 1)
    if old_grid * old_grid != old.shape[1] - 1:
        raise ValueError(f"position embeddings of length {old.shape[1]} are not CLS + a square patch grid")
    new_grid = image_size // patch
    if new_grid != old_grid:
        dim = old.shape[-1]
        grid = old[:, 1:].reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(old.dtype)
        emb.position_embeddings = torch.nn.Parameter(torch.cat([old[:, :1], grid], dim=1))
        logger.info("resized position embeddings %dx%d -> %dx%d patches", old_grid, old_grid, new_grid, new_grid)
    emb.patch_embeddings.image_size = (image_size, image_size)
    emb.patch_embeddings.num_patches = new_grid * new_grid
    emb.image_size = (image_size, image_size)
    model.config.image_size = image_size


@dataclass(frozen=True)
class ModelSpec:
    """A checked description of the model :func:`build_model` makes (see :func:`check_model`)."""

    config: ViTConfig  # a preset's config, or the checkpoint's with its dropout overrides; labels not set
    image_size: int  # the resolution to train at
    checkpoint: str | None = None  # None: from scratch
    kind: str = CLASSIFIER  # of the checkpoint (see checkpoint_kind); its head, if any, is replaced either way


def check_model(
    model_name_or_path: str | None = DEFAULT_BASE_MODEL,
    *,
    from_scratch: bool = False,
    preset: str = "tiny",
    image_size: int | None = None,
    patch_size: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> ModelSpec:
    """Check a model description (preset, geometry, checkpoint type, allowed overrides) without reading
    any weights, so bad values fail before the data is read; :func:`build_model` then makes it."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if from_scratch:
        config = scratch_config(preset, [], image_size=image_size, patch_size=patch_size, **overrides)
        return ModelSpec(config, config.image_size)
    if not model_name_or_path:
        raise ValueError("give --model_name_or_path for fine-tuning, or --from_scratch")
    config, kind = _read_checkpoint(model_name_or_path)
    if patch_size is not None and patch_size != config.patch_size:
        raise ValueError(
            f"--patch_size {patch_size} differs from the checkpoint's patch size {config.patch_size}; "
            "fine-tuning keeps the checkpoint's patch embedding (leave --patch_size out)"
        )
    arch_fields = set(overrides) - {"hidden_dropout_prob", "attention_probs_dropout_prob"}
    if arch_fields:
        raise ValueError(f"{sorted(arch_fields)} can only be set with --from_scratch (the checkpoint fixes them)")
    target_size = image_size or config.image_size
    check_geometry(target_size, config.patch_size)
    for name, value in overrides.items():
        setattr(config, name, value)
    return ModelSpec(config, target_size, str(model_name_or_path), kind)


def build_model(
    spec: ModelSpec, id2label: dict[int, str] | list[str], attn_implementation: str | None = None
) -> ViTForImageClassification:
    """The classifier of ``spec`` for ``id2label``: a fresh preset model, or the checkpoint with its head
    swapped for a new ``len(id2label)``-way head and its position embeddings resized to ``spec.image_size``.

    ``attn_implementation`` ("eager" / "sdpa"; None = transformers' default, SDPA) selects the attention
    kernel (see :func:`hardware.default_attn_implementation` for which is faster where). It is a runtime
    setting: ``save_pretrained`` does not write it into config.json.
    """
    if attn_implementation is not None and attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa' (or None), got {attn_implementation!r}")
    config = copy.deepcopy(spec.config)
    config.id2label, config.label2id = _label_maps(id2label)  # id2label also sets num_labels
    config.problem_type = "single_label_classification"
    if spec.checkpoint is None:
        model = ViTForImageClassification(config)
        logger.info("new ViT from scratch: %d parameters", model.num_parameters())
    else:
        if spec.kind != CLASSIFIER:
            logger.info("%s is a %s checkpoint: its encoder is loaded under a new %d-way head%s", spec.checkpoint,
                        "ViTMAE" if spec.kind == MAE else "headless ViTModel", len(config.id2label),
                        " (the MAE decoder is not used)" if spec.kind == MAE else "")  # fmt: skip
        model = ViTForImageClassification.from_pretrained(
            spec.checkpoint,
            config=config,
            ignore_mismatched_sizes=True,  # the 1000-way ImageNet head is replaced by ours
            use_safetensors=True,
        )
        if spec.image_size != model.config.image_size:
            resize_position_embeddings(model, spec.image_size)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


def load_model(
    model_name_or_path: str | None = DEFAULT_BASE_MODEL,
    *,
    from_scratch: bool = False,
    preset: str = "tiny",
    id2label: dict[int, str] | list[str],
    image_size: int | None = None,
    patch_size: int | None = None,
    overrides: dict[str, Any] | None = None,
    attn_implementation: str | None = None,
) -> ViTForImageClassification:
    """:func:`check_model` then :func:`build_model`: a ViT classifier for ``id2label``, from a preset
    (``from_scratch``) or fine-tuned from a checkpoint at ``image_size``."""
    spec = check_model(
        model_name_or_path,
        from_scratch=from_scratch,
        preset=preset,
        image_size=image_size,
        patch_size=patch_size,
        overrides=overrides,
    )
    return build_model(spec, id2label, attn_implementation)


def load_for_inference(model: str, device: str | torch.device | None = None) -> tuple[torch.nn.Module, Any]:
    """Load a trained classifier (local output dir or Hub id; safetensors only) and its image
    processor, in eval mode on ``device`` (default: CUDA when available, else CPU)."""
    from .modelfolder import check_model_folder, label_overrides

    check_model_folder(model, "--model")  # an unfinished run, a dataset folder, damaged weights: one clear line
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # a config without id2label: the head's size from the weights, not transformers' default of 2
        net = AutoModelForImageClassification.from_pretrained(model, use_safetensors=True, **label_overrides(model))
        processor = AutoImageProcessor.from_pretrained(model)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load a model from {model!r}: {err}. Give an output dir of scripts/finetune.py "
            "(config.json, model.safetensors, preprocessor_config.json) or a Hub model id."
        ) from err
    return net.to(device).eval(), processor


class PatchDropout:
    """Keep a random ``keep`` fraction of the patch tokens (CLS always kept) while the model trains.

    Liu et al. 2022 (PatchDropout, arXiv:2208.07220): ViTs trained on a random subset of their patch
    tokens learn about as well as on all of them, at a fraction of the compute, and the subset acts as a
    regulariser. It is a forward hook on ``vit.embeddings`` that acts only in training mode, so
    evaluation, ``save_pretrained`` and ``pipeline()`` see the plain ViT with every token. Tokens are
    drawn with torch's global generator, whose state Trainer checkpoints, so a resumed run draws the
    same subsets.
    """

    def __init__(self, keep: float) -> None:
        if not 0 < keep <= 1:
            raise ValueError(f"--patch_keep must be in (0, 1], got {keep}")
        self.keep = float(keep)

    def num_kept(self, num_patches: int) -> int:
        """Patch tokens kept out of ``num_patches`` (at least one)."""
        return max(1, round(num_patches * self.keep))

    def __call__(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = output.shape
        kept = self.num_kept(tokens - 1)
        if not module.training or kept >= tokens - 1:
            return output
        index = torch.rand(batch, tokens - 1, device=output.device).argsort(dim=1)[:, :kept] + 1
        patches = output.gather(1, index.unsqueeze(-1).expand(-1, -1, dim))
        return torch.cat([output[:, :1], patches], dim=1)


def add_patch_dropout(model: ViTForImageClassification, keep: float) -> torch.utils.hooks.RemovableHandle | None:
    """Train ``model`` on a random ``keep`` fraction of its patch tokens (see :class:`PatchDropout`).

    Returns the hook handle (``handle.remove()`` restores the plain model), or None when ``keep`` is 1.
    """
    dropout = PatchDropout(keep)
    if dropout.keep >= 1:
        return None
    return model.vit.embeddings.register_forward_hook(dropout)
