"""The randomly initialised ViTs that every section times, built by the library's own
:func:`hf_tissue_vit.modeling.load_model` from a model spec (``config.small_model`` / ``base_model``)."""

from __future__ import annotations

from typing import Any

from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.modeling import load_model


def make_model(spec: dict[str, Any], seed: int, attn: str | None = None) -> Any:
    """A fresh ``ViTForImageClassification`` of ``spec`` for the six classes, seeded; ``attn`` picks
    the attention kernel ("eager" / "sdpa"; None = transformers' default)."""
    from transformers import set_seed

    set_seed(seed)  # the same init on both sides of every comparison
    overrides = {k: v for k, v in spec.items() if k not in ("model_preset", "image_size", "patch_size")}
    return load_model(
        None,
        from_scratch=True,
        preset=spec["model_preset"],
        id2label=list(CLASS_NAMES),
        image_size=spec["image_size"],
        patch_size=spec["patch_size"],
        overrides=overrides,
        attn_implementation=attn,
    )


def model_label(spec: dict[str, Any], model: Any | None = None) -> str:
    """A short description for tables, e.g. ``tiny 112px/p16 w192 L6, 2.4M params``."""
    params = f", {model.num_parameters() / 1e6:.1f}M params" if model is not None else ""
    width = spec.get("hidden_size", "preset")
    depth = spec.get("num_hidden_layers", 12)
    return f"{spec['model_preset']} {spec['image_size']}px/p{spec['patch_size']} w{width} L{depth}{params}"
