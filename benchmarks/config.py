"""What the benchmark measures and at which sizes: :class:`BenchmarkConfig` (the flags of
``scripts/benchmark.py``), the model shapes it times and the speed goals its ratios are judged by."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_tissue_vit.modeling import check_geometry
from hf_tissue_vit.transforms import AugmentationConfig

SECTIONS = ("data", "train", "infer")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "kather2016_6class"
SCRATCH_RECIPE = REPO_ROOT / "scripts" / "recipes" / "scratch_cpu.yaml"
# Architecture keys of a model spec (dropout is left out: both sides train the same network).
MODEL_KEYS = (
    "image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"
)
# Quick mode: tiny ViTs at 32 px so the whole benchmark runs in seconds (tests).
QUICK_MODEL = {"model_preset": "tiny", "image_size": 32, "patch_size": 8, "hidden_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
QUICK_BASE_MODEL = {"model_preset": "tiny", "image_size": 32, "patch_size": 16, "hidden_size": 48,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96}
BASE_MODEL = {"model_preset": "base", "image_size": 224, "patch_size": 16}  # ViT-B/16 shape, random init
FULL_DEFAULTS = {"batch_size": 64, "base_batch_size": 8, "infer_batch_size": 128, "num_tiles": 768,
                 "infer_tiles": 256, "data_batches": 24, "train_steps": 4, "base_train_steps": 1, "warmup_steps": 3}
QUICK_DEFAULTS = {"batch_size": 8, "base_batch_size": 4, "infer_batch_size": 8, "num_tiles": 48,
                  "infer_tiles": 16, "data_batches": 3, "train_steps": 1, "base_train_steps": 1, "warmup_steps": 1}
# The speed goals of the project's benchmark issue: package / baseline ratio of medians.
GOALS = {"data": 5.0, "train_small": 1.5, "infer_single": 5.0, "infer_batched": 1.5}
_POSITIVE = ("threads", "image_size", "batch_size", "base_image_size", "base_batch_size", "infer_batch_size",
             "num_tiles", "infer_tiles", "data_batches", "train_steps", "base_train_steps")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class BenchmarkConfig:
    """What to measure and at which sizes; ``None`` fields take the quick or full default."""

    sections: str = field(default="data,train,infer", metadata=_help(f"Comma-separated subset of {SECTIONS}."))
    quick: bool = field(default=False, metadata=_help("Tiny sizes (a tiny ViT, few tiles): seconds, for tests."))
    repeats: int = field(
        default=5, metadata=_help("Timed repeats per figure (after a warm-up); at least 5 for reports.")
    )
    threads: int | None = field(
        default=None, metadata=_help("torch intra-op threads for every run (default: torch's).")
    )
    image_size: int | None = field(
        default=None,
        metadata=_help("Resolution of the small model (default: the scratch_cpu recipe's, 32 with --quick)."),
    )
    batch_size: int | None = field(
        default=None, metadata=_help("Batch size of the data and small-model train runs (default 64, 8 with --quick).")
    )
    base_image_size: int | None = field(
        default=None, metadata=_help("Resolution of the ViT-B/16-shaped model (default 224).")
    )
    base_batch_size: int | None = field(
        default=None, metadata=_help("Batch size of the ViT-B/16 train runs (default 8).")
    )
    infer_batch_size: int | None = field(
        default=None, metadata=_help("Batch size of TilePredictor and pipeline(batch_size=) (default 128).")
    )
    num_tiles: int | None = field(
        default=None, metadata=_help("Tiles taken from the source (default 768, 48 with --quick).")
    )
    infer_tiles: int | None = field(
        default=None, metadata=_help("PNG files classified per inference repeat (default 256).")
    )
    data_batches: int | None = field(
        default=None,
        metadata=_help("Batches per data-pipeline repeat (default 24, long enough to outlast timer noise)."),
    )
    train_steps: int | None = field(
        default=None, metadata=_help("Small model: Trainer steps per timed repeat (default 4).")
    )
    base_train_steps: int | None = field(
        default=None, metadata=_help("ViT-B/16: Trainer steps per timed repeat (default 1).")
    )
    warmup_steps: int | None = field(
        default=None, metadata=_help("Trainer steps run before timing starts (default 3).")
    )
    skip_base: bool = field(
        default=False, metadata=_help("Leave out the ViT-B/16-shaped train runs (the slowest part).")
    )
    variants: bool = field(default=True, metadata=_help("Measure the speed-setting variants table."))
    measure_compile: bool = field(
        default=True, metadata=_help("Include torch.compile in the variants (full mode only; slow to compile).")
    )
    dataset_dir: str | None = field(default=None, metadata=_help("A dataset saved by scripts/prepare_dataset.py."))
    data_dir: str | None = field(
        default=None, metadata=_help("A folder of class subfolders of tiles (e.g. the Kather release).")
    )
    synthetic: bool = field(default=False, metadata=_help("Use synthetic tiles even when real ones are available."))
    seed: int = field(default=0, metadata=_help("Seed of the tile subset, model init and augmentation."))

    def __post_init__(self) -> None:
        self._check()
        self._fill_defaults()
        self.small_model, self.augmentation = self._recipe_model_and_augmentation()
        if self.image_size is not None:
            self.small_model["image_size"] = self.image_size
        self.base_model = dict(QUICK_BASE_MODEL if self.quick else BASE_MODEL)
        if self.base_image_size is not None:
            self.base_model["image_size"] = self.base_image_size
        for model in (self.small_model, self.base_model):
            check_geometry(model["image_size"], model["patch_size"])

    def _check(self) -> None:
        names = self.section_list()
        unknown = sorted(set(names) - set(SECTIONS))
        if unknown or not names:
            raise ValueError(
                f"--sections {self.sections!r}: unknown {unknown or 'empty'}; use a comma list of {SECTIONS}"
            )
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        for name in _POSITIVE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if self.warmup_steps is not None and self.warmup_steps < 1:
            raise ValueError(f"--warmup_steps must be >= 1 (the first step is never timed), got {self.warmup_steps}")
        if self.dataset_dir and self.data_dir:
            raise ValueError("give either --dataset_dir or --data_dir, not both")
        for name in ("dataset_dir", "data_dir"):
            value = getattr(self, name)
            if value and not Path(value).is_dir():
                raise FileNotFoundError(f"--{name} {value}: no such folder")

    def _fill_defaults(self) -> None:
        if self.quick:
            self.measure_compile = False
            if self.threads is None:  # tiny ops: one thread avoids OpenMP stalls on a busy machine
                self.threads = 1
        for key, value in (QUICK_DEFAULTS if self.quick else FULL_DEFAULTS).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.threads is None:
            self.threads = torch.get_num_threads()

    def _recipe_model_and_augmentation(self) -> tuple[dict[str, Any], AugmentationConfig]:
        """The scratch recipe's model (architecture only) and augmentation, read by finetune.py's own
        parser; quick mode keeps the tiny model, and without the recipe the augmentation defaults."""
        if not SCRATCH_RECIPE.is_file():
            if not self.quick:
                raise FileNotFoundError(
                    f"{SCRATCH_RECIPE} is missing: run the benchmark from a clone of the repository"
                )
            return dict(QUICK_MODEL), AugmentationConfig()
        from hf_tissue_vit.training import parse_args

        model_args, data_args, _ = parse_args(["--config", str(SCRATCH_RECIPE)])
        if self.quick:
            return dict(QUICK_MODEL), data_args.augmentation()
        model = {k: getattr(model_args, k) for k in MODEL_KEYS if getattr(model_args, k) is not None}
        return {"model_preset": model_args.model_preset, **model}, data_args.augmentation()

    def section_list(self) -> list[str]:
        """The sections to run, in the order given."""
        return [s.strip() for s in self.sections.split(",") if s.strip()]

    def to_dict(self) -> dict[str, Any]:
        """The flags plus the resolved models, augmentation and recipe (for benchmark.json)."""
        values = asdict(self)
        values.update(small_model=self.small_model, base_model=self.base_model, augmentation=asdict(self.augmentation))
        values["recipe"] = str(SCRATCH_RECIPE) if SCRATCH_RECIPE.is_file() and not self.quick else None
        return values
