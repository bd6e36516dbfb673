"""Models for tissue tiles: from-scratch ViT presets, checkpoint loading (ViT, DINOv2, DINOv2 with registers,
timm; see :mod:`hf_tissue_vit.backbones`) through ``AutoModelForImageClassification`` with head swap and
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
    PretrainedConfig,
    ViTConfig,
    ViTForImageClassification,
)

from . import backbones
from .backbones import TIMM, VIT, Family

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
    """:data:`CLASSIFIER` (a model with a head), :data:`HEADLESS` (a backbone without one, as pathology
    foundation models are published: ``ViTModel``, ``Dinov2Model``, a timm model with ``num_classes`` 0),
    :data:`MAE` (a ViTMAE checkpoint, e.g. from ``scripts/pretrain.py``), or None for an unsupported model."""
    family = backbones.family_of(config)
    if family is None:
        return None
    if config.model_type == "vit_mae":
        return MAE
    if family is TIMM:
        return HEADLESS if not getattr(config, "num_labels", 0) or not config.id2label else CLASSIFIER
    arch = list(getattr(config, "architectures", None) or [])
    return HEADLESS if arch and all(a.endswith("Model") for a in arch) else CLASSIFIER


def _read_checkpoint(model_name_or_path: str) -> tuple[PretrainedConfig, str, Family]:
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"--model_name_or_path {model_name_or_path!r}: cannot read a model config ({err}). Give a local "
            "folder with config.json + model.safetensors, a reachable Hub id (gated models: accept the licence "
            "on the Hub and set HF_TOKEN), or use --from_scratch."
        ) from err
    family = backbones.require_family(config, f"--model_name_or_path {model_name_or_path!r}")
    kind = checkpoint_kind(config)
    return (vit_config_from_mae(config) if kind == MAE else config), kind, family


def checkpoint_preprocessing(checkpoint: str, config: Any) -> tuple[list[float] | None, list[float] | None, int | None]:
    """Mean, std and input size (px) of the checkpoint's own ``AutoImageProcessor`` (the centre-crop size when it
    crops, as DINOv2's does), else of a timm config's ``pretrained_cfg``; None for what neither says."""
    mean = std = size = None
    try:
        processor = AutoImageProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError, ImportError, AttributeError) as err:
        logger.info("%s: no image processor read (%s)", checkpoint, err)
        processor = None
    data_config = dict(getattr(processor, "data_config", None) or getattr(config, "pretrained_cfg", None) or {})
    mean = getattr(processor, "image_mean", None) or data_config.get("mean")
    std = getattr(processor, "image_std", None) or data_config.get("std")
    crop, resize = getattr(processor, "crop_size", None), getattr(processor, "size", None)
    sizes = crop if getattr(processor, "do_center_crop", False) and crop else resize
    if isinstance(sizes, dict) or hasattr(sizes, "get"):
        size = sizes.get("height") or sizes.get("shortest_edge")
    if size is None and data_config.get("input_size"):
        size = int(data_config["input_size"][-1])
    as_list = (lambda v: [float(x) for x in v] if v is not None else None)  # noqa: E731
    return as_list(mean), as_list(std), (int(size) if size else None)


def resize_position_embeddings(model: Any, image_size: int) -> None:
    """Resample the patch-grid position embeddings of a ViT or DINOv2 to ``image_size`` in place (CLS kept) and
    update the config, so the saved model loads at the new size without extra flags.

    ViT: as timm's ``resample_abs_pos_embed`` does (bicubic, antialiased). DINOv2 (with or without registers):
    with DINOv2's own interpolation, the one it applies at every forward pass to other sizes, so the resized
    model computes exactly what the checkpoint computes at ``image_size``.
    """
    emb = backbones.token_embeddings(model)
    patch = model.config.patch_size
    check_geometry(image_size, patch)
    old = emb.position_embeddings.data
    old_grid = math.isqrt(old.shape[1] - 1)
    if old_grid * old_grid != old.shape[1] - 1:
        raise ValueError(f"position embeddings of length {old.shape[1]} are not CLS + a square patch grid")
    new_grid = image_size // patch
    if new_grid != old_grid:
        dim = old.shape[-1]
        if backbones.family_of(model.config) is VIT:
            grid = old[:, 1:].reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(old.dtype)
            new = torch.cat([old[:, :1], grid], dim=1)
        else:
            with torch.no_grad():
                new = emb.interpolate_pos_encoding(old.new_zeros(1, new_grid * new_grid + 1, dim), image_size,
                                                   image_size).detach().clone()  # fmt: skip
        emb.position_embeddings = torch.nn.Parameter(new)
        logger.info("resized position embeddings %dx%d -> %dx%d patches", old_grid, old_grid, new_grid, new_grid)
    emb.patch_embeddings.image_size = (image_size, image_size)
    emb.patch_embeddings.num_patches = new_grid * new_grid
    if hasattr(emb, "image_size"):
        emb.image_size = (image_size, image_size)
    model.config.image_size = image_size


@dataclass(frozen=True)
class ModelSpec:
    """A checked description of the model :func:`build_model` makes (see :func:`check_model`)."""

    config: PretrainedConfig  # a preset's config, or the checkpoint's with its dropout overrides; labels not set
    image_size: int  # the resolution to train at
    checkpoint: str | None = None  # None: from scratch
    kind: str = CLASSIFIER  # of the checkpoint (see checkpoint_kind); its head, if any, is replaced either way
    family: Family = VIT
    image_mean: list[float] | None = None  # the checkpoint's normalisation (None: the package's default)
    image_std: list[float] | None = None


_DROPOUT_FIELDS = {"hidden_dropout_prob", "attention_probs_dropout_prob"}


def _check_checkpoint_fields(family: Family, config: Any, patch_size: int | None, overrides: dict[str, Any]) -> None:
    """Refuse what a checkpoint fixes (patch size, architecture) or, for timm models, cannot change (dropout)."""
    checkpoint_patch = getattr(config, "patch_size", None)
    if patch_size is not None and patch_size != checkpoint_patch:
        raise ValueError(
            f"--patch_size {patch_size} differs from the checkpoint's patch size {checkpoint_patch}; "
            "fine-tuning keeps the checkpoint's patch embedding (leave --patch_size out)"
        )
    arch_fields = set(overrides) - _DROPOUT_FIELDS
    if arch_fields:
        raise ValueError(f"{sorted(arch_fields)} can only be set with --from_scratch (the checkpoint fixes them)")
    if family is TIMM and overrides:
        raise ValueError(f"{sorted(overrides)} cannot be set on a timm model (its dropout is fixed at creation); "
                         "leave them out")


def check_model(
    model_name_or_path: str | None = DEFAULT_BASE_MODEL,
    *,
    from_scratch: bool = False,
    preset: str = "tiny",
    image_size: int | None = None,
    patch_size: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> ModelSpec:
    """Check a model description (preset, geometry, checkpoint family, allowed overrides) without reading
    any weights, so bad values fail before the data is read; :func:`build_model` then makes it."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if from_scratch:
        config = scratch_config(preset, [], image_size=image_size, patch_size=patch_size, **overrides)
        return ModelSpec(config, config.image_size)
    if not model_name_or_path:
        raise ValueError("give --model_name_or_path for fine-tuning, or --from_scratch")
    config, kind, family = _read_checkpoint(model_name_or_path)
    _check_checkpoint_fields(family, config, patch_size, overrides)
    mean, std, checkpoint_size = checkpoint_preprocessing(str(model_name_or_path), config)
    if family is TIMM:
        if checkpoint_size is None:
            raise ValueError(f"--model_name_or_path {model_name_or_path!r}: the timm config names no input size "
                             "(pretrained_cfg.input_size)")
        if image_size is not None and image_size != checkpoint_size:
            raise ValueError(f"--image_size {image_size}: timm models run at their pretrained input size "
                             f"({checkpoint_size} px for this one; their position embeddings are not resized); "
                             "leave --image_size out")
        target_size = checkpoint_size
    else:
        target_size = image_size or checkpoint_size or config.image_size
        check_geometry(target_size, config.patch_size)
    for name, value in overrides.items():
        setattr(config, name, value)
    return ModelSpec(config, target_size, str(model_name_or_path), kind, family, mean, std)


def build_model(
    spec: ModelSpec, id2label: dict[int, str] | list[str], attn_implementation: str | None = None
) -> Any:
    """The classifier of ``spec`` for ``id2label``: a fresh preset ViT, or the checkpoint (any family of
    :mod:`hf_tissue_vit.backbones`, through ``AutoModelForImageClassification``) with its head swapped for a new
    ``len(id2label)``-way head and its position embeddings resized to ``spec.image_size``.

    ``attn_implementation`` ("eager" / "sdpa"; None = transformers' default, SDPA) selects the attention
    kernel (see :func:`hardware.default_attn_implementation` for which is faster where); timm models choose
    their own. It is a runtime setting: ``save_pretrained`` does not write it into config.json.
    """
    if attn_implementation is not None and attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa' (or None), got {attn_implementation!r}")
    config = copy.deepcopy(spec.config)
    config.id2label, config.label2id = _label_maps(id2label)  # id2label also sets num_labels
    config.problem_type = "single_label_classification"
    if spec.family is TIMM:  # TimmWrapperConfig saves its classes as timm's label_names, which win over id2label
        config.label_names = [config.id2label[i] for i in range(len(config.id2label))]
    if spec.checkpoint is None:
        model = ViTForImageClassification(config)
        logger.info("new ViT from scratch: %d parameters", model.num_parameters())
    else:
        if spec.kind != CLASSIFIER:
            logger.info("%s is a %s checkpoint: its encoder is loaded under a new %d-way head%s", spec.checkpoint,
                        "ViTMAE" if spec.kind == MAE else f"headless {spec.family.name}", len(config.id2label),
                        " (the MAE decoder is not used)" if spec.kind == MAE else "")  # fmt: skip
        model = AutoModelForImageClassification.from_pretrained(
            spec.checkpoint,
            config=config,
            ignore_mismatched_sizes=True,  # the checkpoint's head (e.g. ImageNet's 1000 classes) is replaced by ours
            use_safetensors=True,
        )
        if spec.family.token_sequence and spec.image_size != model.config.image_size:
            resize_position_embeddings(model, spec.image_size)
        backbones.freeze_unused(model)
        model.config.image_size = spec.image_size  # timm configs have none: the training size, for predict/app
        if spec.family is TIMM:
            _match_timm_preprocessing(model.config, spec)
    if attn_implementation is not None and spec.family.attentions:
        model.set_attn_implementation(attn_implementation)
    return model


def _match_timm_preprocessing(config: Any, spec: ModelSpec) -> None:
    """Make the saved timm config's ``pretrained_cfg`` describe the package's preprocessing (the whole tile resized
    to the input size, bilinear, the checkpoint's mean/std): ``AutoImageProcessor`` builds a timm model's processor
    from it (not from preprocessor_config.json), so ``pipeline()`` then sees the pixels the model was trained on."""
    cfg = dict(getattr(config, "pretrained_cfg", None) or {})
    cfg.update(input_size=[3, spec.image_size, spec.image_size], crop_pct=1.0, crop_mode="center",
               interpolation="bilinear")  # fmt: skip
    if spec.image_mean and spec.image_std:
        cfg.update(mean=list(spec.image_mean), std=list(spec.image_std))
    config.pretrained_cfg = cfg


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
    """Keep a random ``keep`` fraction of the patch tokens (CLS and register tokens always kept) while the model
    trains.

    Liu et al. 2022 (PatchDropout, arXiv:2208.07220): ViTs trained on a random subset of their patch
    tokens learn about as well as on all of them, at a fraction of the compute, and the subset acts as a
    regulariser. It is a forward hook on the backbone's token embeddings (ViT, DINOv2) that acts only in
    training mode, so evaluation, ``save_pretrained`` and ``pipeline()`` see the plain model with every token.
    Tokens are drawn with torch's global generator, whose state Trainer checkpoints, so a resumed run draws the
    same subsets. ``prefix`` is the number of leading tokens that are not patches (1: CLS; DINOv2 with
    registers: 1 + its register tokens).
    """

    def __init__(self, keep: float, prefix: int = 1) -> None:
        if not 0 < keep <= 1:
            raise ValueError(f"--patch_keep must be in (0, 1], got {keep}")
        self.keep = float(keep)
        self.prefix = int(prefix)
        self.kept: torch.Tensor | None = None  # the patches (0-based) the last training forward kept, [B, kept]

    def num_kept(self, num_patches: int) -> int:
        """Patch tokens kept out of ``num_patches`` (at least one)."""
        return max(1, round(num_patches * self.keep))

    def __call__(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = output.shape
        patches = tokens - self.prefix
        kept = self.num_kept(patches)
        if not module.training or kept >= patches:
            self.kept = None
            return output
        index = torch.rand(batch, patches, device=output.device).argsort(dim=1)[:, :kept]
        self.kept = index
        index = index + self.prefix
        chosen = output.gather(1, index.unsqueeze(-1).expand(-1, -1, dim))
        return torch.cat([output[:, : self.prefix], chosen], dim=1)


def patch_dropout_of(model: Any) -> PatchDropout | None:
    """The :class:`PatchDropout` hooked into ``model`` by :func:`add_patch_dropout`, or None."""
    family = backbones.family_of(model.config)
    if family is None or not family.token_sequence:
        return None
    hooks = backbones.token_embeddings(model)._forward_hooks.values()
    return next((hook for hook in hooks if isinstance(hook, PatchDropout)), None)


def add_patch_dropout(model: Any, keep: float) -> torch.utils.hooks.RemovableHandle | None:
    """Train ``model`` (ViT or DINOv2) on a random ``keep`` fraction of its patch tokens (see :class:`PatchDropout`).

    Returns the hook handle (``handle.remove()`` restores the plain model), or None when ``keep`` is 1.
    Raises ValueError for a family without a token sequence (timm models)."""
    dropout = PatchDropout(keep, backbones.num_prefix_tokens(model.config))
    if dropout.keep >= 1:
        return None
    family = backbones.family_of(model.config)
    if family is None or not family.token_sequence:
        raise ValueError(f"--patch_keep {keep}: PatchDropout needs a ViT or DINOv2 backbone, not a "
                         f"{family.name if family else model.config.model_type} model (leave --patch_keep at 1)")
    return backbones.token_embeddings(model).register_forward_hook(dropout)
