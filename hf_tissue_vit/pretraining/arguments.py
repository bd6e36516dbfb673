"""The arguments of ``scripts/pretrain.py``: the MAE model, the unlabelled tiles and the Trainer settings, parsed
by ``HfArgumentParser`` with a YAML recipe (``--config``) whose values flags override (training's recipe loader).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import ViTMAEConfig

from .. import hardware
from ..modeling import MODEL_PRESETS, scratch_config
from ..training.arguments import DataArguments, TissueTrainingArguments, parse_args

logger = logging.getLogger(__name__)

# Encoder geometry flags (the same names as finetune.py's, so the two recipes read alike).
ENCODER_FLAGS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size")  # fmt: skip
DECODER_FLAGS = ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
                 "decoder_intermediate_size")  # fmt: skip


@dataclass
class MAEModelArguments:
    """The masked autoencoder: a new encoder from a preset (finetune.py's presets) with a small decoder, or a
    ViTMAE checkpoint to continue from."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "ViTMAE checkpoint to continue pretraining (None = a new model)."}
    )
    model_preset: str = field(default="tiny", metadata={"help": f"Encoder preset: one of {sorted(MODEL_PRESETS)}."})
    image_size: int | None = field(
        default=None, metadata={"help": "Pretraining resolution (px); fine-tuning keeps it."}
    )
    patch_size: int | None = field(default=None, metadata={"help": "Patch size (px)."})
    hidden_size: int | None = field(default=None, metadata={"help": "Encoder width (preset's if unset)."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Encoder depth (preset's if unset)."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Encoder heads (preset's if unset)."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Encoder MLP size (preset's if unset)."})
    decoder_hidden_size: int = field(default=128, metadata={"help": "Decoder width (used in pretraining only)."})
    decoder_num_hidden_layers: int = field(default=2, metadata={"help": "Decoder depth."})
    decoder_num_attention_heads: int = field(default=4, metadata={"help": "Decoder heads."})
    decoder_intermediate_size: int = field(default=512, metadata={"help": "Decoder MLP size."})
    mask_ratio: float = field(default=0.75, metadata={"help": "Fraction of the patches hidden from the encoder."})
    norm_pix_loss: bool = field(
        default=True, metadata={"help": "Reconstruct each patch normalised by its own mean and variance (He et al.)."}
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "Attention kernel: auto, eager or sdpa (as in finetune.py).",
                  "choices": list(hardware.ATTN_IMPLEMENTATIONS)},
    )  # fmt: skip

    def __post_init__(self) -> None:
        hardware.check_attn_implementation(self.attn_implementation)
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--mask_ratio must be in (0, 1) (e.g. 0.75), got {self.mask_ratio}")
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ValueError(f"--decoder_hidden_size {self.decoder_hidden_size} is not divisible by "
                             f"--decoder_num_attention_heads {self.decoder_num_attention_heads}")
        if self.model_name_or_path is None:
            self.mae_config()  # checks the preset and geometry now
        elif any(getattr(self, name) is not None for name in ENCODER_FLAGS):
            raise ValueError("--model_name_or_path fixes the encoder geometry; leave out " +
                             ", ".join(f"--{n}" for n in ENCODER_FLAGS if getattr(self, n) is not None))

    def mae_config(self) -> ViTMAEConfig:
        """The ``ViTMAEConfig`` of a new model (from the preset, the overrides and the decoder flags)."""
        encoder = scratch_config(self.model_preset, [], **{name: getattr(self, name) for name in ENCODER_FLAGS})
        fields = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "hidden_dropout_prob", "attention_probs_dropout_prob", "qkv_bias")  # fmt: skip
        return ViTMAEConfig(
            **{name: getattr(encoder, name) for name in fields},
            **{name: getattr(self, name) for name in DECODER_FLAGS},
            mask_ratio=self.mask_ratio,
            norm_pix_loss=self.norm_pix_loss,
        )


@dataclass
class UnlabelledDataArguments(DataArguments):
    """finetune.py's data flags (the train split of --dataset_dir / --dataset_name, augmentation, decode cache)
    plus folders of unlabelled images."""

    inputs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Image files, folders (recursive) or glob patterns of unlabelled tiles, used with or instead "
            "of the dataset's train split. Never give tiles of the validation or test split here."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.dataset_dir or self.dataset_name or self.inputs):
            raise ValueError("give the tiles to pretrain on: --dataset_dir DIR (its train split), --dataset_name "
                             "user/name, and/or --inputs FOLDER ...")


# finetune.py options that have no meaning without labels or evaluation.
_CLASSIFICATION_ONLY = {"tta": False, "early_stopping_patience": None, "expected_label_names": None,
                        "push_after_training": False}  # fmt: skip


@dataclass
class PretrainingArguments(TissueTrainingArguments):
    """``TrainingArguments`` for MAE pretraining: finetune.py's hardware defaults and checks, no evaluation."""

    output_dir: str | None = field(default="outputs/vit-mae", metadata={"help": "Where the run is written."})
    eval_strategy: str = field(default="no", metadata={"help": "Pretraining has no evaluation."})
    load_best_model_at_end: bool = field(default=False, metadata={"help": "Pretraining keeps the last model."})
    metric_for_best_model: str | None = field(default=None, metadata={"help": "Not used in pretraining."})
    label_smoothing_factor: float = field(default=0.0, metadata={"help": "Not used in pretraining."})
    learning_rate: float = field(default=1.5e-4, metadata={"help": "Peak learning rate (AdamW)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (MAE's 0.95)."})
    num_train_epochs: float = field(default=100.0, metadata={"help": "Epochs over the unlabelled tiles."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, unset in _CLASSIFICATION_ONLY.items():
            if getattr(self, name) != unset:
                flag = {"expected_label_names": "label_names", "push_after_training": "push_to_hub"}.get(name, name)
                raise ValueError(f"--{flag} is a finetune.py option; pretrain.py does not use it")


ARG_CLASSES = (MAEModelArguments, UnlabelledDataArguments, PretrainingArguments)


def parse_pretrain_args(
    argv: list[str] | None = None, default_config: str | None = None
) -> tuple[MAEModelArguments, UnlabelledDataArguments, PretrainingArguments]:
    """Parse pretrain.py's flags, with ``--config recipe.yaml`` values as defaults that flags override."""
    parsed: Any = parse_args(argv, default_config, arg_classes=ARG_CLASSES, script="pretrain.py")
    return parsed
