"""Training ViTs on tissue tiles with ``transformers.Trainer`` (works under ``accelerate launch``).

Pipeline: arguments (``ModelArguments``, ``DataArguments``, ``TissueTrainingArguments`` from a
YAML recipe + CLI flags) -> dataset (``data.load_tissue_dataset``) -> tiles decoded once into
uint8 tensors -> :class:`TileDataset` + :class:`TileCollator` (batched augmentation in the
DataLoader workers) -> :class:`TissueTrainer` -> test evaluation (bootstrap CIs, optional
dihedral TTA) -> output dir (model, processor, metrics, predictions, figures, card).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import (
    EarlyStoppingCallback,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import hardware
from .fileio import atomic_write, atomic_write_json, fix_permissions
from .hardware import hardware_info, versions
from .modeling import (
    DEFAULT_BASE_MODEL,
    MODEL_PRESETS,
    PatchDropout,
    add_patch_dropout,
    check_geometry,
    check_vit_checkpoint,
    load_model,
    scratch_config,
)
from .predict import probability_columns
from .transforms import (
    AugmentationConfig,
    TileTransform,
    dihedral_views,
    image_to_uint8,
    make_image_processor,
)

logger = logging.getLogger(__name__)

RUN_FILE = "hf_tissue_vit_run.json"  # identifies the run that owns an output dir
EMA_FILE = "ema.safetensors"  # the weight average inside a checkpoint (--ema_decay)
DECODE_CACHE_VERSION = 1
PREDICTION_COLUMNS = ("filename", "label", "prediction")  # then one probability column per class
NO_DOWNLOAD_HINT = (
    "To train without a download, build the dataset from a local copy of the Kather 2016 release first "
    "(python scripts/prepare_dataset.py --source /path/to/Kather_texture_2016_image_tiles_5000 --output_dir DIR) "
    "and pass --dataset_dir DIR, or pass a Hub dataset with --dataset_name user/name"
)


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint to fine-tune or a preset to train from scratch."""

    model_name_or_path: str = field(
        default=DEFAULT_BASE_MODEL,
        metadata={"help": "ViT checkpoint to fine-tune (local dir or Hub id); ignored with --from_scratch."},
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
            "help": "Attention kernel for training: auto, eager or sdpa. auto = eager on CPU with bf16 (measured on a "
            "2-core AMX Xeon: bf16 eager 116 images/s vs bf16 SDPA 63, fp32 both ~49), sdpa otherwise.",
            "choices": list(hardware.ATTN_IMPLEMENTATIONS),
        },
    )

    def __post_init__(self) -> None:
        if self.from_scratch and self.model_preset not in MODEL_PRESETS:
            raise ValueError(f"unknown --model_preset {self.model_preset!r}; choose one of {sorted(MODEL_PRESETS)}")
        hardware.check_attn_implementation(self.attn_implementation)
        PatchDropout(self.patch_keep)  # checks the fraction
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {value}")

    def overrides(self) -> dict[str, Any]:
        """Config overrides that were set (None = keep the preset's / checkpoint's)."""
        names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        names += ("hidden_dropout_prob", "attention_probs_dropout_prob")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class DataArguments:
    """Where the tiles come from and how they are augmented."""

    config: str | None = field(
        default=None,
        metadata={"help": "YAML recipe whose keys are any of these flags; flags given on the command line win."},
    )
    dataset_dir: str | None = field(default=None, metadata={"help": "Folder written by scripts/prepare_dataset.py."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (instead of --dataset_dir)."})
    dihedral: bool = field(default=True, metadata={"help": "Augment with a random one of the 8 dihedral symmetries."})
    random_resized_crop: bool = field(default=True, metadata={"help": "Augment with a random resized crop."})
    crop_scale: list[float] = field(
        default_factory=lambda: [0.6, 1.0], metadata={"help": "Random resized crop area range (fraction)."}
    )
    crop_ratio: list[float] = field(
        default_factory=lambda: [3 / 4, 4 / 3], metadata={"help": "Random resized crop aspect ratio range."}
    )
    stain_jitter: float = field(default=0.05, metadata={"help": "H&E stain jitter strength in HED space (0 = off)."})
    brightness: float = field(default=0.1, metadata={"help": "Brightness jitter (0 = off)."})
    contrast: float = field(default=0.1, metadata={"help": "Contrast jitter (0 = off)."})
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
        self.augmentation()  # validates the values now, before any data is read

    def augmentation(self) -> AugmentationConfig:
        """The training augmentation described by these arguments."""
        return AugmentationConfig(
            dihedral=self.dihedral,
            random_resized_crop=self.random_resized_crop,
            crop_scale=tuple(self.crop_scale),
            crop_ratio=tuple(self.crop_ratio),
            stain_jitter=self.stain_jitter,
            brightness=self.brightness,
            contrast=self.contrast,
        )


@dataclass
class TissueTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with defaults for tile classification and a few package options."""

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
            "CPU has native bf16 (AMX-BF16/AVX512-BF16: ~2.4x faster training measured); --bf16 false turns it off."
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
        default="tensorboard" if _tensorboard_available() else "none",
        metadata={"help": "Loggers (tensorboard, trackio, ..., none); default tensorboard when installed."},
    )

    def __post_init__(self) -> None:
        if self.label_names == ["labels"]:  # re-created from an already processed instance
            self.label_names = None
        self.expected_label_names = list(self.label_names) if self.label_names else None
        self.label_names = ["labels"]
        if self.remove_unused_columns:
            logger.warning("remove_unused_columns is ignored: the package's collator provides the model inputs")
            self.remove_unused_columns = False
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
        super().__post_init__()
        if self.early_stopping_patience and not self.load_best_model_at_end:
            raise ValueError("--early_stopping_patience needs --load_best_model_at_end true")


ARG_CLASSES = (ModelArguments, DataArguments, TissueTrainingArguments)


def _recipe_defaults(parser: HfArgumentParser, path: str) -> dict[str, Any]:
    """Read a YAML recipe into argparse defaults; a nested ``augmentation:`` mapping is flattened."""
    recipe = Path(path)
    if not recipe.is_file():
        raise FileNotFoundError(f"--config {path}: no such recipe file")
    try:
        values = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    values.update(values.pop("augmentation", None) or {})
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {unknown}; keys must be finetune.py flag names")
    values.pop("config", None)
    # argparse converts string defaults with the flag's type but leaves other values as they are;
    # YAML reads "1e-3" as a string, which the float type then converts.
    return values


def parse_args(
    argv: list[str] | None = None, default_config: str | None = None
) -> tuple[ModelArguments, DataArguments, TissueTrainingArguments]:
    """Parse flags, with ``--config recipe.yaml`` values as defaults that flags override.

    With no arguments at all, ``default_config`` (the default recipe) is used.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARG_CLASSES)
    config = None
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif token.startswith("--config="):
            config = token.split("=", 1)[1]
    if config is None and not argv and default_config:
        config = default_config
        logger.info("no arguments: running the default recipe %s", default_config)
    if config:
        parser.set_defaults(**_recipe_defaults(parser, config))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    data_args.config = config
    return model_args, data_args, training_args


# --------------------------------------------------------------------------------------------
# Data: decode once, batched augmentation in the collator
# --------------------------------------------------------------------------------------------


def _decode_image(value: dict[str, Any]) -> np.ndarray:
    from PIL import Image

    if value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif value.get("path"):
        image = Image.open(value["path"])
    else:
        raise ValueError("dataset row has an empty image (no bytes, no path)")
    with image:
        return image_to_uint8(image)


def default_decode_cache_dir() -> Path:
    """``<HF datasets cache>/hf_tissue_vit_decoded``: decoded tiles keyed by dataset fingerprint."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "hf_tissue_vit_decoded"


def _decode_cache_path(split: Any, cache_dir: str | os.PathLike | None) -> Path | None:
    fingerprint = getattr(split, "_fingerprint", None)
    if not fingerprint or not getattr(split, "cache_files", None):  # in-memory datasets have no stable identity
        return None
    folder = Path(cache_dir) if cache_dir else default_decode_cache_dir()
    return folder / f"v{DECODE_CACHE_VERSION}_{fingerprint}_{len(split)}.npy"


def decode_tiles(split: Any, cache: bool = True, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """All tiles of a ``datasets.Dataset`` split as one uint8 tensor [N,H,W,3], decoded once.

    Tiles of another size than the most common one are resized to it (bilinear) with a warning.
    With ``cache`` the array is kept as .npy in ``cache_dir`` (default
    :func:`default_decode_cache_dir`), keyed by the split's fingerprint, and reused.
    """
    from datasets import Image as ImageFeature
    from PIL import Image

    cache_path = _decode_cache_path(split, cache_dir) if cache else None
    if cache_path is not None and cache_path.is_file():
        try:
            array = np.load(cache_path, allow_pickle=False)
            if array.ndim == 4 and array.shape[0] == len(split) and array.dtype == np.uint8:
                logger.info("decoded tiles from cache %s", cache_path)
                return torch.from_numpy(array)
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable decode cache %s: %s", cache_path, err)
    raw = split.select_columns(["image"]).cast_column("image", ImageFeature(decode=False))
    tiles = [_decode_image(row["image"]) for row in raw]
    if not tiles:
        raise ValueError("dataset split has no tiles")
    shapes = Counter(t.shape for t in tiles)
    (height, width, _), _ = shapes.most_common(1)[0]
    if len(shapes) > 1:
        logger.warning(
            "tiles have %d different sizes; resizing them to the most common %dx%d", len(shapes), width, height
        )
        tiles = [
            t
            if t.shape[:2] == (height, width)
            else np.asarray(Image.fromarray(t).resize((width, height), Image.BILINEAR))
            for t in tiles
        ]
    array = np.stack(tiles)
    if cache_path is not None:
        try:  # atomic: concurrent processes either see the whole file or none
            with atomic_write(cache_path, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
        except OSError as err:
            logger.info("decode cache not written (%s)", err)
    return torch.from_numpy(array)


class TileDataset(torch.utils.data.Dataset):
    """Decoded tiles + labels; items are ``{"pixels": uint8 [H,W,3], "labels": int, ...}``.

    ``train=True`` items ask the collator to augment, seeded by (seed, epoch, sample indices) so
    that a resumed run draws the same augmentations as an uninterrupted one.
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, train: bool = False) -> None:
        if len(pixels) != len(labels):
            raise ValueError(f"{len(pixels)} tiles but {len(labels)} labels")
        self.pixels, self.labels, self.train, self.epoch = pixels, labels, train, 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch that seeds the next augmentations (set by :class:`EpochCallback`)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "pixels": self.pixels[index],
            "labels": int(self.labels[index]),
            "index": int(index),
            "epoch": self.epoch,
            "train": self.train,
        }


class TileCollator:
    """Stack items and turn them into ``pixel_values`` with the train or eval :class:`TileTransform`."""

    def __init__(self, train_transform: TileTransform, eval_transform: TileTransform, seed: int = 0) -> None:
        self.train_transform, self.eval_transform, self.seed = train_transform, eval_transform, int(seed)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([item["pixels"] for item in items])
        labels = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        if items[0].get("train"):
            entropy = [self.seed, items[0]["epoch"], *(item["index"] for item in items)]
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
            pixel_values = self.train_transform(pixels, generator=generator)
        else:
            pixel_values = self.eval_transform(pixels)
        return {"pixel_values": pixel_values, "labels": labels}


class EpochCallback(TrainerCallback):
    """Tell the training dataset the epoch before its DataLoader iterator (and workers) start."""

    def __init__(self, dataset: TileDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: D102
        self.dataset.set_epoch(int(math.floor(state.epoch + 1e-6)) if state.epoch else 0)


class WeightEMA:
    """Exponential moving average of a model's trainable weights, kept as fp32 copies beside them
    (same device).

    The decay warms up as ``min(decay, (1 + step) / (10 + step))`` (as timm and TensorFlow do), so the
    random initial weights are forgotten quickly instead of dominating the average of a short run.
    The average is bound to the parameters of ``model`` when it is made; weights loaded into them in
    place later (resume, best model) keep it valid.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = self.check_decay(decay)
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        params = dict(model.named_parameters())
        self._pairs = [(params[name], shadow) for name, shadow in self.shadow.items()]

    @staticmethod
    def check_decay(decay: float) -> float:
        """``decay`` as a float, or ``ValueError`` unless it is in (0, 1)."""
        if not 0 < decay < 1:
            raise ValueError(f"--ema_decay must be in (0, 1) (e.g. 0.999), got {decay}")
        return float(decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend the model's current weights into the average (call after each optimizer step)."""
        weight = 1 - min(self.decay, (1 + step) / (10 + step))
        for param, shadow in self._pairs:
            shadow.lerp_(param.detach().float(), weight)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's weights and the average (a second call undoes the first)."""
        for param, shadow in self._pairs:
            current = param.detach().float().clone()
            param.copy_(shadow)
            shadow.copy_(current)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the model's weights with the average."""
        for param, shadow in self._pairs:
            param.copy_(shadow)

    def save(self, path: str | os.PathLike) -> None:
        """Write the average as safetensors (atomically)."""
        from safetensors.torch import save

        with atomic_write(path, "wb") as fh:
            fh.write(save({name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}))

    @torch.no_grad()
    def load(self, path: str | os.PathLike) -> None:
        """Read an average written by :meth:`save` (same parameter names and shapes) into this one."""
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        if set(loaded) != set(self.shadow) or any(loaded[n].shape != t.shape for n, t in self.shadow.items()):
            raise ValueError(f"{path}: the weight average does not match this model's parameters")
        for name, shadow in self.shadow.items():
            shadow.copy_(loaded[name])  # in place: stays on the model's device, still bound to it


class _EMAUpdate(TrainerCallback):
    def __init__(self, trainer: TissueTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.trainer.ema is not None:
            self.trainer.ema.update(state.global_step)


class TissueTrainer(Trainer):
    """Trainer whose prediction can average softmax over the 8 dihedral views (``self.tta``).

    It also loads checkpoints (resume, best model) through ``from_pretrained``: in transformers 5
    ViT's modules are renamed and ``save_pretrained`` writes the original key names, which the
    Trainer's raw ``load_state_dict(strict=False)`` silently fails to match (missing keys).
    Saved weights get the usual file permissions (safetensors leaves them 0600).
    """

    tta: bool = False
    ema: WeightEMA | None = None

    def enable_ema(self, decay: float) -> None:
        """Average the weights during training (see :class:`WeightEMA`): evaluation and checkpoint
        selection use the average, each checkpoint stores it (``ema.safetensors``) so a resumed run
        continues it, and after training the model holds the (best) average."""
        self.ema = WeightEMA(self.accelerator.unwrap_model(self.model), decay)
        self.add_callback(_EMAUpdate(self))

    def train(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        result = super().train(*args, **kwargs)
        if self.ema is not None:
            if not (self.args.load_best_model_at_end and self.state.best_model_checkpoint):
                self.ema.copy_to_model()
            self.ema = None  # the model now holds the averaged weights: no more swapping
        return result

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:  # noqa: D102
        if self.ema is None:
            return super().evaluate(*args, **kwargs)
        self.ema.swap()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.ema.swap()

    def _save_checkpoint(self, model, trial):  # noqa: D102
        if self.ema is not None and self.args.should_save:
            # Written before Trainer's trainer_state.json, which marks a checkpoint complete.
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            self.ema.save(folder / EMA_FILE)
        super()._save_checkpoint(model, trial)

    def _load_weights_from(self, folder: str, model: torch.nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        loaded = type(target).from_pretrained(folder, use_safetensors=True)
        target.load_state_dict(loaded.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):  # noqa: D102
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("loading weights from %s", resume_from_checkpoint)
        self._load_weights_from(resume_from_checkpoint, model)
        if self.ema is not None:
            path = Path(resume_from_checkpoint) / EMA_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{resume_from_checkpoint} has no {EMA_FILE}: it was not saved by an "
                                        "--ema_decay run; resume it without --ema_decay")
            self.ema.load(path)

    def _load_best_model(self):  # noqa: D102
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        logger.info("loading the best model %s (%s)", self.state.best_model_checkpoint, self.state.best_metric)
        if self.ema is None:
            self._load_weights_from(self.state.best_model_checkpoint)
            return
        # the selection was made on the averaged weights: load those
        self.ema.load(Path(self.state.best_model_checkpoint) / EMA_FILE)
        self.ema.copy_to_model()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            fix_permissions(output_dir if output_dir is not None else self.args.output_dir)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: D102
        if not self.tta:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            probs = sum(
                model(pixel_values=view).logits.float().softmax(-1) for view in dihedral_views(inputs["pixel_values"])
            ) / 8
        # log of the mean probability: argmax and softmax of it give the TTA prediction and probabilities
        return None, probs.clamp_min(1e-12).log(), inputs.get("labels")


# --------------------------------------------------------------------------------------------
# Output dir ownership and resume
# --------------------------------------------------------------------------------------------

_SIGNATURE_TRAINING_FIELDS = (
    "seed", "data_seed", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
    "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "label_smoothing_factor",
    "max_grad_norm", "optim", "metric_for_best_model", "ema_decay",
)  # fmt: skip


def run_signature(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """What makes a run the same run (for resume / refusing a foreign output dir)."""
    data = {
        k: v
        for k, v in dataclasses.asdict(data_args).items()
        if k not in ("config", "cache_decoded", "decode_cache_dir")
    }
    if data.get("dataset_dir"):
        data["dataset_dir"] = str(Path(data["dataset_dir"]).resolve())
    # The attention kernel changes speed, not what is learned: left out, so a run resumes under either.
    model = {k: v for k, v in dataclasses.asdict(model_args).items() if k != "attn_implementation"}
    training = {k: getattr(training_args, k) for k in _SIGNATURE_TRAINING_FIELDS}
    training = {k: (v.value if hasattr(v, "value") else v) for k, v in training.items()}
    return json.loads(json.dumps({"model": model, "data": data, "training": training}))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Newest ``checkpoint-N`` whose trainer_state.json is readable (a SIGKILL can leave a partial one)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("skipping incomplete checkpoint %s", path)
            continue
        if any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            return str(path)
    return None


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def prepare_output_dir(signature: dict, training_args: TissueTrainingArguments) -> str | None:
    """Check the output dir belongs to this run and return the checkpoint to resume from (or None).

    Raises ``ValueError`` when it holds another run (or unrelated files) and ``--overwrite_output_dir``
    is not set; with it, old checkpoints are removed so they cannot be resumed by mistake.
    """
    out = Path(training_args.output_dir)
    run_file = out / RUN_FILE
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    if isinstance(resume, str) and resume.lower() in ("false", "none", ""):
        resume = None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file; give a folder")
    contents = [p for p in out.iterdir()] if out.is_dir() else []
    if contents and not training_args.overwrite_output_dir:
        if not run_file.is_file():
            raise ValueError(
                f"--output_dir {out} is not empty and holds no {RUN_FILE} (not a finetune.py run); "
                "choose another folder or pass --overwrite_output_dir"
            )
        old = json.loads(run_file.read_text(encoding="utf-8"))
        differences = _diff(old, signature)
        if differences:
            raise ValueError(
                f"--output_dir {out} holds a different run ({'; '.join(differences[:8])}); use another "
                "--output_dir or pass --overwrite_output_dir to replace it"
            )
    if training_args.overwrite_output_dir and out.is_dir() and resume is None and training_args.should_save:
        for path in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    if resume is True:
        resume = last_complete_checkpoint(out)
        if resume is None:
            raise FileNotFoundError(f"--resume_from_checkpoint: no complete checkpoint in {out}")
    elif isinstance(resume, str):
        if not Path(resume, "trainer_state.json").is_file():
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume}: not a checkpoint folder (no trainer_state.json)"
            )
    elif not training_args.overwrite_output_dir:
        resume = last_complete_checkpoint(out)
        if resume:
            logger.info("resuming from the last checkpoint %s", resume)
    if training_args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, signature)
    return resume


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` atomically; numpy scalars/arrays and enums are converted."""
    atomic_write_json(path, data, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "value"):  # enums
        return value.value
    return str(value)


def write_predictions_csv(
    path: str | os.PathLike, filenames: list[str], labels: np.ndarray, probs: np.ndarray, label_names: list[str]
) -> None:
    """``filename,label,prediction,<prob per class>`` (names, not ids), written atomically."""
    with atomic_write(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*PREDICTION_COLUMNS, *probability_columns(label_names, PREDICTION_COLUMNS)])
        for name, label, row in zip(filenames, labels, probs):
            writer.writerow([name, label_names[int(label)], label_names[int(row.argmax())], *(f"{p:.6f}" for p in row)])


def _figure(path: Path, draw: Any, *args: Any, **kwargs: Any) -> None:
    """Call a metrics.plot_* function (it writes atomically); a failed figure must not cost the model."""
    try:
        draw(*args, str(path), **kwargs)
    except Exception as err:  # noqa: BLE001 - matplotlib failures vary
        logger.warning("could not write %s: %s", path, err)


def _dataset_info(data_args: DataArguments, dataset: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "dataset_dir": data_args.dataset_dir,
        "dataset_name": data_args.dataset_name,
        "splits": {name: len(split) for name, split in dataset.items()},
    }
    if data_args.dataset_dir:
        from .data import read_dataset_metadata

        saved = read_dataset_metadata(data_args.dataset_dir)
        info.update({key: saved[key] for key in ("source", "split_by", "seed", "hub_dataset_id")
                     if saved.get(key) is not None})
    return info


def _processor_stats(model_args: ModelArguments) -> tuple[list[float], list[float]]:
    """Mean/std of the checkpoint's processor when fine-tuning (the weights expect them)."""
    from .transforms import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD

    if not model_args.from_scratch:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
            return list(processor.image_mean), list(processor.image_std)
        except (OSError, ValueError, AttributeError):
            logger.info(
                "no image processor with the checkpoint; using mean/std %s/%s", DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD
            )
    return list(DEFAULT_IMAGE_MEAN), list(DEFAULT_IMAGE_STD)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def load_dataset_for_training(data_args: DataArguments, label_names: list[str] | None = None) -> Any:
    """``--dataset_dir`` / ``--dataset_name``, or else the default source of ``data.build_dataset``
    (the Kather release from Zenodo), built once into the HF cache and reused."""
    from . import data

    if data_args.dataset_dir or data_args.dataset_name:
        return data.load_tissue_dataset(
            dataset_dir=data_args.dataset_dir, dataset_name=data_args.dataset_name, label_names=label_names
        )
    default_dir = data.default_cache_dir().parent / "kather2016_stratified"
    if not (default_dir / "dataset_dict.json").is_file():
        logger.info("no --dataset_dir/--dataset_name: building the default dataset into %s", default_dir)
        try:
            data.save_dataset(data.build_dataset(None), default_dir)
        except data.DownloadError as err:  # its default hint names prepare_dataset.py's --source
            raise err.with_hint(NO_DOWNLOAD_HINT) from err
    data_args.dataset_dir = str(default_dir)
    return data.load_tissue_dataset(dataset_dir=default_dir, label_names=label_names)


def _validate_model_args(model_args: ModelArguments) -> None:
    """Fail on bad geometry / presets / checkpoints before the data is read."""
    if model_args.from_scratch:
        scratch_config(
            model_args.model_preset,
            ["a", "b"],  # labels are not known yet; geometry is what is checked
            image_size=model_args.image_size,
            patch_size=model_args.patch_size,
            **model_args.overrides(),
        )
    else:
        config = check_vit_checkpoint(model_args.model_name_or_path)
        check_geometry(model_args.image_size or config.image_size, model_args.patch_size or config.patch_size)


def _check_label_names(actual: list[str], expected: list[str] | None, where: str) -> None:
    if expected and list(actual) != list(expected):
        raise ValueError(f"{where} has class names {list(actual)} but --label_names expects {list(expected)}")


def run_finetune(
    model_args: ModelArguments, data_args: DataArguments, training_args: TissueTrainingArguments
) -> dict[str, Any]:
    """Train, select the best checkpoint on validation, evaluate test once, write the output dir.

    Returns the all_results.json dictionary.
    """
    from . import metrics as tissue_metrics

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "WORLD_SIZE" not in os.environ:
        # accelerate 1.x's `launch --cpu --num_processes N` starts ONE process (N CPU processes need
        # mpirun); torchrun-based `accelerate launch --multi_gpu --num_processes N` works on CPU too.
        logger.warning(
            "accelerate launch --cpu started a single process; for N CPU processes use "
            "`accelerate launch --config_file accelerate_config.yaml --num_processes N scripts/finetune.py "
            "--use_cpu true ...` (or --multi_gpu instead of --config_file)"
        )
    _validate_model_args(model_args)
    with training_args.main_process_first(desc="dataset"):
        dataset = load_dataset_for_training(data_args, training_args.expected_label_names)
    signature = run_signature(model_args, data_args, training_args)
    for split in ("train", "validation"):
        if split not in dataset:
            raise ValueError(f"the dataset has splits {list(dataset)}; training needs 'train' and 'validation'")
    label_feature = dataset["train"].features.get("label")
    if label_feature is None or not hasattr(label_feature, "names"):
        raise ValueError(f"the dataset has no ClassLabel 'label' column (columns: {dataset['train'].column_names})")
    label_names = list(label_feature.names)
    _check_label_names(label_names, training_args.expected_label_names, "the dataset")
    resume = prepare_output_dir(signature, training_args)

    attn_implementation = hardware.resolve_attn_implementation(
        model_args.attn_implementation, training_args.device, bool(training_args.bf16)
    )
    set_seed(training_args.seed)  # the same random init for the same seed
    model = load_model(
        model_args.model_name_or_path,
        from_scratch=model_args.from_scratch,
        preset=model_args.model_preset,
        id2label=label_names,
        image_size=model_args.image_size,
        patch_size=model_args.patch_size,
        overrides=model_args.overrides(),
        attn_implementation=attn_implementation,
    )
    add_patch_dropout(model, model_args.patch_keep)
    mean, std = _processor_stats(model_args)
    processor = make_image_processor(model.config.image_size, mean, std)
    eval_tf = TileTransform.from_processor(processor)
    train_tf = TileTransform.from_processor(processor, data_args.augmentation())

    def tiles(name: str, train: bool = False) -> TileDataset:
        split = dataset[name]
        labels = torch.as_tensor(np.asarray(split["label"]), dtype=torch.long)
        return TileDataset(
            decode_tiles(split, data_args.cache_decoded, data_args.decode_cache_dir), labels, train=train
        )

    train_ds, eval_ds = tiles("train", train=True), tiles("validation")
    base_metrics = tissue_metrics.make_compute_metrics(label_names)

    def compute_metrics(prediction: Any) -> dict[str, float]:
        result = dict(base_metrics(prediction))
        result["n_samples"] = int(len(prediction.label_ids))  # shows each sample is counted once
        return result

    callbacks: list[TrainerCallback] = [EpochCallback(train_ds)]
    if training_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    push = training_args.push_to_hub
    training_args.push_to_hub = False  # pushed once at the end, with our card, by hub.push_output_dir
    trainer = TissueTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=TileCollator(train_tf, eval_tf, seed=training_args.data_seed or training_args.seed),
        compute_metrics=compute_metrics,
        processing_class=processor,
        callbacks=callbacks,
    )
    if training_args.ema_decay:
        trainer.enable_ema(training_args.ema_decay)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # the selected (best) model + processor
    trainer.save_state()
    results: dict[str, Any] = dict(train_result.metrics)
    results.update(trainer.evaluate(metric_key_prefix="eval"))

    if "test" in dataset:
        results.update(
            _evaluate_test(trainer, dataset["test"], tiles("test"), label_names, training_args, tissue_metrics)
        )
    else:
        logger.warning("the dataset has no 'test' split: no test metrics")

    results.update(
        label_names=label_names,
        seed=training_args.seed,
        hardware=hardware_info(training_args),
        versions=versions(),
        hyperparameters={**_hyperparameters(data_args, training_args), "patch_keep": model_args.patch_keep},
        dataset=_dataset_info(data_args, dataset),
        model={
            "from_scratch": model_args.from_scratch,
            "base_model": None if model_args.from_scratch else model_args.model_name_or_path,
            "preset": model_args.model_preset if model_args.from_scratch else None,
            "image_size": model.config.image_size,
            "patch_size": model.config.patch_size,
            "hidden_size": model.config.hidden_size,
            "num_hidden_layers": model.config.num_hidden_layers,
            "num_attention_heads": model.config.num_attention_heads,
            "intermediate_size": model.config.intermediate_size,
            "num_parameters": trainer.model.num_parameters(),
            "attn_implementation": attn_implementation,
            "patch_keep": model_args.patch_keep,
        },
        recipe=data_args.config,
    )
    predictions = results.pop("_predictions", None)
    if trainer.is_world_process_zero():
        _write_outputs(trainer, results, predictions, push)
    return results


def _hyperparameters(data_args: DataArguments, args: TissueTrainingArguments) -> dict[str, Any]:
    keys = _SIGNATURE_TRAINING_FIELDS + ("per_device_eval_batch_size", "bf16", "tta", "early_stopping_patience")
    values = {k: getattr(args, k) for k in keys}
    values = {k: v.value if hasattr(v, "value") else v for k, v in values.items()}  # enums -> str
    values["total_train_batch_size"] = (
        args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    )
    values["augmentation"] = dataclasses.asdict(data_args.augmentation())
    return values


def _evaluate_test(
    trainer: TissueTrainer,
    split: Any,
    test_ds: TileDataset,
    label_names: list[str],
    args: TissueTrainingArguments,
    metrics_mod: Any,
) -> dict[str, Any]:
    """Evaluate the test split once (plain, then dihedral TTA if asked); predictions gathered across processes."""
    out: dict[str, Any] = {}
    runs = [("", False)] + ([("_tta", True)] if args.tta else [])
    for suffix, tta in runs:
        trainer.tta = tta
        try:
            prediction = trainer.predict(test_ds, metric_key_prefix=f"test{suffix}")
        finally:
            trainer.tta = False
        logits = np.asarray(prediction.predictions, dtype=np.float64)
        if len(logits) != len(test_ds):
            raise RuntimeError(f"test predictions {len(logits)} != test samples {len(test_ds)}")
        y_true = np.asarray(prediction.label_ids)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        y_pred = probs.argmax(axis=1)
        report = metrics_mod.classification_report(y_true, y_pred, label_names)
        out[f"test_accuracy{suffix}"] = float(report["accuracy"])
        out[f"test_macro_f1{suffix}"] = float(report["macro_f1"])
        if suffix:
            continue
        out["test_loss"] = prediction.metrics.get("test_loss")
        out["test_samples"] = int(len(y_true))
        if args.n_bootstrap:
            for metric in ("accuracy", "macro_f1"):
                low, high = metrics_mod.bootstrap_ci(
                    y_true, y_pred, metric=metric, n_boot=args.n_bootstrap, seed=args.seed
                )
                out[f"test_{metric}_ci95"] = [float(low), float(high)]
        out["test_per_class"] = report["per_class"]
        out["test_confusion_matrix"] = np.asarray(report["confusion_matrix"]).tolist()
        filenames = list(split["filename"]) if "filename" in split.column_names else [str(i) for i in range(len(split))]
        out["_predictions"] = (filenames, y_true, probs)
    return out


def _write_outputs(trainer: TissueTrainer, results: dict[str, Any], predictions: tuple | None, push: bool) -> None:
    """Predictions CSV, figures, all_results.json (last: it marks a finished run), card, push."""
    from . import cards
    from . import metrics as tissue_metrics

    out = Path(trainer.args.output_dir)
    label_names = results["label_names"]
    if predictions is not None:
        write_predictions_csv(out / "test_predictions.csv", *predictions, label_names)
        _figure(
            out / "confusion_matrix.png",
            tissue_metrics.plot_confusion_matrix,
            results["test_confusion_matrix"],
            label_names,
        )
    metric = trainer.args.metric_for_best_model or "macro_f1"
    _figure(
        out / "training_curves.png",
        tissue_metrics.plot_training_curves,
        trainer.state.log_history,
        metric=metric if metric.startswith("eval_") else f"eval_{metric}",
    )
    write_json_atomic(out / "all_results.json", results)
    cards.write_model_card(out)
    if push:
        from . import hub

        hub.push_output_dir(
            str(out),
            trainer.args.hub_model_id,  # checked to be USER/NAME when the arguments were parsed
            private=bool(trainer.args.hub_private_repo),
            revision=trainer.args.hub_revision,
        )
