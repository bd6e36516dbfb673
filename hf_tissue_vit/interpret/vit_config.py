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

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"--model {model!r}: cannot read a model config ({err})") from err
    require(config, what, name=f"--model {model!r}")
    if num_labels is not None:
        config.num_labels = num_labels  # rebuilds id2label/label2id
    return config
