"""The arguments of ``scripts/finetune.py``: three dataclasses parsed by ``HfArgumentParser``, with a
YAML recipe (``--config``) whose values are defaults that flags on the command line override.

Values that need no file or network are checked in ``__post_init__``; the run's validate phase
(:func:`hf_tissue_vit.training.run.validate_run`) checks what does (checkpoint, output dir).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.integrations import is_tensorboard_available

from .. import hardware
from ..modeling import DEFAULT_BASE_MODEL, MODEL_PRESETS, PatchDropout
from ..transforms.augmentation import AugmentationConfig
from .ema import WeightEMA
from .guidance import check_guidance
from .initialisation import ATTENTION_INITS, POSITION_INITS, check_init
from .recipe import config_flag, load_recipe
from .schedule import check_clean_end

logger = logging.getLogger(__name__)

_OVERRIDE_NAMES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "hidden_dropout_prob", "attention_probs_dropout_prob")  # fmt: skip


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint to fine-tune or a preset to train from scratch."""

    model_name_or_path: str = field(
        default=DEFAULT_BASE_MODEL,
        metadata={"help": "Checkpoint to fine-tune (local dir or Hub id): a ViT, DINOv2 (with or without registers) "
                  "or timm image model; ignored with --from_scratch."},
    )
    from_scratch: bool = field(
        default=False, metadata={"help": "Train a randomly initialised ViT (see --model_preset)."}
    )
    model_preset: str = field(
        default="tiny", metadata={"help": f"Preset for --from_scratch: one of {sorted(MODEL_PRESETS)}."}
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Training resolution (px). Fine-tuning at a new size resizes the position embeddings once."},
    )
    patch_size: int | None = field(default=None, metadata={"help": "Patch size (from scratch only)."})
    hidden_size: int | None = field(default=None, metadata={"help": "Override: transformer width (from scratch)."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Override: depth (from scratch)."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Override: heads (from scratch)."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Override: MLP size (from scratch)."})
    hidden_dropout_prob: float | None = field(default=None, metadata={"help": "Override: dropout."})
    attention_probs_dropout_prob: float | None = field(default=None, metadata={"help": "Override: attention dropout."})
    patch_keep: float = field(
        default=1.0,
        metadata={
            "help": "Train on a random fraction of the patch tokens per image (PatchDropout, Liu et al. 2022); "
            "evaluation and the saved model use all of them. 1 = off."
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel for training: auto, eager or sdpa. auto = eager on CPU with bf16 (the faster "
            "kernel there), sdpa otherwise.",
            "choices": list(hardware.ATTN_IMPLEMENTATIONS),
        },
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={
            "help": "Train only the classifier on the checkpoint's frozen features (linear probe): the features of "
            "each tile and view are computed once (cached) instead of every epoch; the saved model is the whole ViT."
        },
    )
    probe_views: int = field(
        default=1,
        metadata={
            "help": "With --freeze_backbone: feature views per training tile, view 0 the plain tile, the others "
            "augmented; epoch e trains on view e mod probe_views."
        },
    )
    backbone_mpp: float | None = field(
        default=None,
        metadata={
            "help": "With --freeze_backbone: micrometres per pixel of the frozen backbone's pretraining tiles (e.g. "
            "0.5 for a 20x pathology backbone); default its config.mpp. The probe shows it tiles at that scale: the "
            "centre of each tile that fills its input at that µm/px (warned when either scale is unknown)."
        },
    )
    unfreeze_last_blocks: int | None = field(
        default=None,
        metadata={
            "help": "Partial fine-tuning: train only the last N transformer blocks of the checkpoint's backbone (and "
            "the norm after them) with the new head; the earlier blocks and the embeddings stay frozen. None = all."
        },
    )
    freeze_position_embeddings: bool = field(
        default=False,
        metadata={"help": "Keep the position embeddings fixed (e.g. the sin-cos ones of an MAE checkpoint)."},
    )
    position_init: str = field(
        default="random",
        metadata={"help": "From scratch: initial position embeddings, random or sincos (MAE's 2-D sine-cosine).",
                  "choices": list(POSITION_INITS)},
    )
    attention_init: str = field(
        default="random",
        metadata={"help": "From scratch: random, or impulse (every head starts attending to one neighbour in a 3x3 "
                  "window, as a convolution; orthogonal position embeddings).", "choices": list(ATTENTION_INITS)},
    )

    def __post_init__(self) -> None:
        # The preset, geometry and checkpoint are checked once, by modeling.check_model in the validate phase.
        hardware.check_attn_implementation(self.attn_implementation)
        PatchDropout(self.patch_keep)  # checks the fraction
        check_init(self.position_init, self.attention_init, self.from_scratch)
        if self.probe_views < 1:
            raise ValueError(f"--probe_views must be >= 1, got {self.probe_views}")
        if self.freeze_backbone and self.from_scratch:
            raise ValueError("--freeze_backbone needs a pretrained --model_name_or_path, not --from_scratch")
        if self.backbone_mpp is not None and not (math.isfinite(self.backbone_mpp) and self.backbone_mpp > 0):
            raise ValueError(f"--backbone_mpp must be a positive number of micrometres per pixel, got "
                             f"{self.backbone_mpp}")
        if self.unfreeze_last_blocks is not None:
            if self.from_scratch or self.freeze_backbone:
                raise ValueError("--unfreeze_last_blocks fine-tunes part of a pretrained --model_name_or_path; it "
                                 "cannot be combined with --from_scratch or --freeze_backbone")
            if self.unfreeze_last_blocks < 1:
                raise ValueError(f"--unfreeze_last_blocks must be >= 1, got {self.unfreeze_last_blocks}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {value}")

    def overrides(self) -> dict[str, Any]:
        """Config overrides that were set (None = keep the preset's / checkpoint's)."""
        return {n: getattr(self, n) for n in _OVERRIDE_NAMES if getattr(self, n) is not None}


@dataclass
class DataArguments:
    """Where the tiles come from and how they are augmented."""

    config: str | None = field(
        default=None,
        metadata={"help": "YAML recipe whose keys are any of these flags; flags given on the command line win."},
    )
    dataset_dir: str | None = field(default=None, metadata={"help": "Folder written by scripts/prepare_dataset.py."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (instead of --dataset_dir)."})
    mpp: float | None = field(
        default=None,
        metadata={
            "help": "Resolution of the tiles in micrometres per pixel, saved in config.json as `mpp`; default: the "
            "`mpp` of the --dataset_dir folder's metadata. Give it for Hub datasets."
        },
    )
    dihedral: bool = field(default=True, metadata={"help": "Augment with a random one of the 8 dihedral symmetries."})
    random_resized_crop: bool = field(default=True, metadata={"help": "Augment with a random resized crop."})
    crop_scale: list[float] = field(
        default_factory=lambda: [0.6, 1.0], metadata={"help": "Random resized crop area range (fraction)."}
    )
    crop_ratio: list[float] = field(
        default_factory=lambda: [3 / 4, 4 / 3], metadata={"help": "Random resized crop aspect ratio range."}
    )
    stain_jitter: float = field(default=0.05, metadata={"help": "H&E stain jitter strength in HED space (0 = off)."})
    stain_stats: float = field(
        default=0.0,
        metadata={
            "help": "Stain-statistics augmentation (RandStainNA-style): each tile's optical-density mean and s.d. "
            "per channel multiplied by exp(g + h), g ~ U(-s, s) shared, h ~ U(-s/2, s/2) per channel; s is this "
            "value (0 = off). For tiles from other centres and scanners."
        },
    )
    stain_stats_p: float = field(
        default=1.0,
        metadata={"help": "Probability that --stain_stats re-stains a tile (the others keep their colour)."},
    )
    brightness: float = field(default=0.1, metadata={"help": "Brightness jitter (0 = off)."})
    contrast: float = field(default=0.1, metadata={"help": "Contrast jitter (0 = off)."})
    grey_p: float = field(
        default=0.0,
        metadata={"help": "Probability that a training tile is shown in grey (no colour, only shape and texture)."},
    )
    device_augmentation: bool | None = field(
        default=None,
        metadata={
            "help": "Augment training batches on the GPU: the collator only stacks uint8 tiles, the Trainer step "
            "crops, flips and jitters them on the device (same draws and pixels as on the CPU). Default: on when "
            "training on a CUDA GPU, off on the CPU."
        },
    )
    cache_decoded: bool = field(
        default=True,
        metadata={"help": "Keep the decoded uint8 tiles as .npy (keyed by dataset fingerprint) and reuse them."},
    )
    decode_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the decoded-tile cache; default <HF datasets cache>/hf_tissue_vit_decoded."},
    )

    def __post_init__(self) -> None:
        if self.dataset_dir and self.dataset_name:
            raise ValueError("give either --dataset_dir or --dataset_name, not both")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"--mpp must be a positive number of micrometres per pixel (e.g. 0.5), got {self.mpp}")
        self.augmentation()  # validates the values now, before any data is read

    def augmentation(self) -> AugmentationConfig:
        """The training augmentation described by these arguments."""
        return AugmentationConfig(
            dihedral=self.dihedral,
            random_resized_crop=self.random_resized_crop,
            crop_scale=tuple(self.crop_scale),
            crop_ratio=tuple(self.crop_ratio),
            stain_jitter=self.stain_jitter,
            stain_stats=self.stain_stats,
            stain_stats_p=self.stain_stats_p,
            brightness=self.brightness,
            contrast=self.contrast,
            grey_p=self.grey_p,
        )


@dataclass
class TissueTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with defaults for tile classification and a few package options.

    After ``__post_init__``, ``expected_label_names`` holds the ``--label_names`` given (``label_names``
    itself is Trainer's ``["labels"]``) and ``push_after_training`` the ``--push_to_hub`` given
    (``push_to_hub`` itself is False: Trainer must not push checkpoints; the run pushes its output dir once).
    """

    output_dir: str | None = field(default="outputs/vit-tissue", metadata={"help": "Where the run is written."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train in an output dir that holds a different run (its checkpoints are removed)."},
    )
    tta: bool = field(default=False, metadata={"help": "Also report test metrics with 8-view dihedral TTA."})
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "Keep an exponential moving average of the weights with this decay (e.g. 0.999); validation, "
            "checkpoint selection, test and the saved model then use the averaged weights. None = off."
        },
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement (None = off)."}
    )
    teacher_epochs: float = field(
        default=0.0,
        metadata={"help": "Train a small CNN teacher on the training tiles for this many epochs first, and guide the "
                  "ViT by its stored maps: soft labels of each crop and its patch features at a few depths "
                  "(training only: the saved model is the plain ViT). 0 = off."},
    )
    distill_alpha: float = field(
        default=0.5, metadata={"help": "With a teacher: the share of the soft labels in the classification loss."}
    )
    distill_temperature: float = field(default=2.0, metadata={"help": "With a teacher: the soft labels' temperature."})
    guidance_weight: float = field(
        default=1.0,
        metadata={"help": "With a teacher: weight of the patch-feature matching loss (0 = soft labels only)."},
    )
    guidance_layers: list[int] | None = field(
        default=None,
        metadata={"help": "With a teacher: the ViT layers (1-based) matched to its two feature maps (strides 8 "
                  "and 16); default the middle and the last layer."},
    )
    clean_end: float = field(
        default=0.0,
        metadata={"help": "Ramp the augmentation (crop, stain, brightness, contrast, grey) and PatchDropout down to "
                  "none over this last fraction of the epochs, reached in the last epoch (the symmetries stay). "
                  "0 = off."},
    )
    clean_end_keep_colour: bool = field(
        default=False,
        metadata={"help": "With --clean_end: ramp down only the crop and PatchDropout; the colour augmentation (stain, "
                  "brightness, contrast, grey) keeps its strength to the end."},
    )
    progressive_resolution: int | None = field(
        default=None,
        metadata={"help": "Start training at this size (px, whole patches) and grow the images to the model's size "
                  "over the first half of the epochs (a ViT: position embeddings interpolated). None = off."},
    )
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the test 95%% CIs (0 = no CIs)."})
    # Trainer's own `label_names` (names of label tensors) is always ["labels"] here, so the flag
    # is reused for what users mean by it: the class names the dataset must have.
    label_names: list[str] | None = field(
        default=None,
        metadata={"help": "Expected class names in label order; training refuses a dataset whose names differ."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision; default: on when the GPU supports it, or, training on CPU, when the "
            "CPU has native bf16 (AMX-BF16/AVX512-BF16); --bf16 false turns it off."
        },
    )
    dataloader_num_workers: int = field(
        default=-1, metadata={"help": "DataLoader worker processes; -1 = min(4, cpus - 1)."}
    )
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on validation."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    logging_strategy: str = field(default="epoch", metadata={"help": "When to log the training loss."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the best checkpoint by the metric."})
    metric_for_best_model: str | None = field(default="macro_f1", metadata={"help": "Validation metric to select by."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best is always kept)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps, or a fraction of all steps if < 1."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing of the training loss."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size per device."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the package's collator builds pixel_values itself."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "ViT uses every parameter, so DDP need not search for unused ones."}
    )
    report_to: None | str | list[str] = field(
        default="tensorboard" if is_tensorboard_available() else "none",
        metadata={"help": "Loggers (tensorboard, trackio, ..., none); default tensorboard when installed."},
    )

    def __post_init__(self) -> None:
        self._check_package_options()
        check_guidance(self.teacher_epochs, self.distill_alpha, self.distill_temperature, self.guidance_weight)
        check_clean_end(self.clean_end, self.clean_end_keep_colour)
        if self.label_names == ["labels"]:  # re-created from an already processed instance
            self.label_names = None
        self.expected_label_names = list(self.label_names) if self.label_names else None
        self.label_names = ["labels"]
        self.push_after_training = bool(self.push_to_hub)
        self.push_to_hub = False  # pushed once at the end, with the package's card, by hub.push_output_dir
        if self.remove_unused_columns:
            logger.warning("remove_unused_columns is ignored: the package's collator provides the model inputs")
            self.remove_unused_columns = False
        self._resolve_hardware_defaults()
        super().__post_init__()
        if self.early_stopping_patience and not self.load_best_model_at_end:
            raise ValueError("--early_stopping_patience needs --load_best_model_at_end true")

    def _check_schedule(self) -> None:
        """Batch sizes, learning rate and length: errors Trainer would hit only once training (or the first
        evaluation) started, after the output dir was claimed; and a run that would train nothing."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name} must be a whole number >= 1, got {value!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--learning_rate must be a positive number (e.g. 1e-4), got {self.learning_rate}; "
                             "with 0 the model would not train")
        if self.max_steps is None or self.max_steps <= 0:
            epochs = self.num_train_epochs
            if not (math.isfinite(epochs) and epochs > 0):
                raise ValueError(f"--num_train_epochs must be > 0 (or give --max_steps > 0), got {epochs}; "
                                 "with 0 the run would save an untrained model")

    def _check_package_options(self) -> None:
        self._check_schedule()
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"--early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
        if self.n_bootstrap < 0:
            raise ValueError(f"--n_bootstrap must be >= 0, got {self.n_bootstrap}")
        if self.ema_decay is not None:
            WeightEMA.check_decay(self.ema_decay)
        # Checked here, not at the push after training: hub.push_output_dir needs USER/NAME.
        hub_id = self.hub_model_id or ""
        if self.push_to_hub and (hub_id.count("/") != 1 or not all(hub_id.split("/"))):
            raise ValueError(f"--push_to_hub needs --hub_model_id USER/NAME (got {self.hub_model_id!r})")
        if self.hub_token:
            # Trainer pickles its arguments into training_args.bin (and every checkpoint): a token there leaks.
            raise ValueError("--hub_token is not accepted (it would be saved with the run); set HF_TOKEN or run "
                             "`hf auth login` instead")

    def _resolve_hardware_defaults(self) -> None:
        """bf16 / CPU, pinned memory and worker count from the machine, before TrainingArguments sets up."""
        if self.bf16 is None:
            self.bf16 = hardware.default_training_bf16(self.use_cpu)
            if self.bf16 and not self.use_cpu and not hardware.has_accelerator():
                # transformers accepts bf16 without a GPU only with use_cpu; the run is on the CPU anyway
                self.use_cpu = True
        if self.use_cpu or not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator (torch warns otherwise)
        if self.dataloader_num_workers < 0:
            self.dataloader_num_workers = hardware.auto_num_workers()
        if self.dataloader_num_workers == 0 and self.dataloader_persistent_workers:
            # a recipe may ask for persistent workers; with none, torch's DataLoader would refuse to start
            self.dataloader_persistent_workers = False


ARG_CLASSES = (ModelArguments, DataArguments, TissueTrainingArguments)


def parse_args(
    argv: list[str] | None = None, default_config: str | None = None, *,
    arg_classes: tuple[type, ...] = ARG_CLASSES, script: str = "finetune.py",
) -> tuple[Any, ...]:
    """Parse flags, with ``--config recipe.yaml`` values as defaults that flags override.

    With no arguments at all, ``default_config`` (the default recipe) is used. ``arg_classes`` (default
    finetune.py's :data:`ARG_CLASSES`) are the dataclasses returned; ``script`` names them in errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(arg_classes)
    config = config_flag(argv)
    if config is None and not argv and default_config:
        config = default_config
        logger.info("no arguments: running the default recipe %s", default_config)
    if config:
        parser.set_defaults(**load_recipe(parser, config, script), config=config)
    return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))
