"""Reading the config of the model a tool looks inside; these tools work on ViTs only."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .attention import require_vit

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def load_vit_config(model: str, what: str, num_labels: int | None = None,
                    require: Callable[..., Any] = require_vit) -> PretrainedConfig:
    """The config of ``model`` (output dir, config.json or Hub id), ``num_labels`` overridden when given.

    Raises FileNotFoundError when no config can be read and ValueError when it is not a ViT's (``what``
    names the tool in the message; ``require`` decides, by default :func:`require_vit`: models that return
    attention weights over patch tokens), so a script stops with one line before loading anything else.
    """
    from transformers import AutoConfig

    from ..modelfolder import check_model_path, label_overrides, lacks_label_names

    check_model_path(model, "--model")  # a missing folder is said at once, not after a Hub try
    overrides = label_overrides(model) if num_labels is None else {}
    if num_labels is None and not overrides and lacks_label_names(model):
        raise ValueError(f"--model {model!r}: its config.json has no id2label/label2id and no safetensors weights "
                         "beside it tell the head's size: pass --num_labels N (its number of classes)")
    try:
        config = AutoConfig.from_pretrained(model, **overrides)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"--model {model!r}: cannot read a model config ({err})") from err
    require(config, what, name=f"--model {model!r}")
    if num_labels is not None:
        config.num_labels = num_labels  # rebuilds id2label/label2id
    return config
