"""Speed benchmark: the package's pipeline side by side with the transformers example pipeline.

Three sections, each measured on the same tiles, model config, batch size, resolution and thread
count, in one process (ratios matter more than absolute numbers on a noisy, shared machine):

``data``
    decode + augment + collate into a batch of ``pixel_values`` (images/s): the package's
    decoded-once uint8 tiles + :class:`~hf_tissue_vit.training.TileCollator` (batched
    :class:`~hf_tissue_vit.transforms.TileTransform`) vs :func:`example_train_transforms`, a
    faithful copy of ``examples/pytorch/image-classification/run_image_classification.py``
    (``load_dataset("imagefolder")`` + ``set_transform`` with per-sample PIL RandomResizedCrop /
    flip / ToTensor / Normalize and the example's ``collate_fn``).
``train``
    ``Trainer`` steps (forward + backward + AdamW, images/s) for the scratch CPU recipe's ViT and a
    ViT-B/16-shaped model: the package (decoded tiles, batched augmentation, measured speed
    settings such as bf16 autocast and the attention implementation) vs the example pipeline with
    default (fp32) ``TrainingArguments``.
``infer``
    tiles/s over PNG files for a model saved with ``save_pretrained``:
    :class:`~hf_tissue_vit.predict.TilePredictor` vs ``pipeline("image-classification")`` one image
    at a time and with ``batch_size``.

Each figure is the median (with min and max) of ``repeats`` timed repeats after a warm-up. A
``variants`` table records what was measured to pick the package's speed settings (eager vs SDPA
attention, bf16 autocast and whether its predictions agree with fp32, ``inference_mode`` vs
``no_grad``, ``torch.compile``, DataLoader workers).

Example::

    config = BenchmarkConfig(quick=True, synthetic=True)
    results = run_benchmark(config, command="python scripts/benchmark.py --quick")
    write_results(results, "outputs/benchmark")
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import functools
import json
import logging
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from .constants import CLASS_NAMES, IMAGE_EXTENSIONS, KATHER_FOLDERS
from .fileio import atomic_write_json, atomic_write_text, fix_permissions
from .hardware import auto_num_workers, cpu_supports_bf16, default_attn_implementation, machine_info
from .modeling import OVERRIDABLE_FIELDS

logger = logging.getLogger(__name__)

SECTIONS = ("data", "train", "infer")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "kather2016_6class"
SCRATCH_RECIPE = REPO_ROOT / "scripts" / "recipes" / "scratch_cpu.yaml"
_MODEL_KEYS = tuple(k for k in OVERRIDABLE_FIELDS if not k.endswith("_prob"))  # architecture, not dropout
# Quick mode: a tiny ViT at 32 px so the whole benchmark runs in seconds (tests).
_QUICK_MODEL = {
    "model_preset": "tiny",
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
_QUICK_BASE_MODEL = {
    "model_preset": "tiny",
    "image_size": 32,
    "patch_size": 16,
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 96,
}
GOALS = {"data": 5.0, "train_small": 1.5, "infer_single": 5.0, "infer_batched": 1.5}


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass
class BenchmarkConfig:
    """What to measure and at which sizes; ``None`` fields take the quick or full default."""

    sections: str = field(default="data,train,infer", metadata={"help": f"Comma-separated subset of {SECTIONS}."})
    quick: bool = field(default=False, metadata={"help": "Tiny sizes (a tiny ViT, few tiles): seconds, for tests."})
    repeats: int = field(
        default=5, metadata={"help": "Timed repeats per figure (after a warm-up); at least 5 for reports."}
    )
    threads: int | None = field(
        default=None, metadata={"help": "torch intra-op threads for every run (default: torch's)."}
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Resolution of the small model (default: the scratch_cpu recipe's, 32 with --quick)."},
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the data and small-model train runs (default 64, 8 with --quick)."},
    )
    base_image_size: int | None = field(
        default=None, metadata={"help": "Resolution of the ViT-B/16-shaped model (default 224)."}
    )
    base_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the ViT-B/16 train runs (default 8)."}
    )
    infer_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of TilePredictor and pipeline(batch_size=) (default 128)."}
    )
    num_tiles: int | None = field(
        default=None, metadata={"help": "Tiles taken from the source (default 768, 48 with --quick)."}
    )
    infer_tiles: int | None = field(
        default=None, metadata={"help": "PNG files classified per inference repeat (default 256)."}
    )
    data_batches: int | None = field(
        default=None, metadata={"help": "Batches per data-pipeline repeat (default 24, long enough to outlast noise)."}
    )
    train_steps: int | None = field(
        default=None, metadata={"help": "Small model: Trainer steps per timed repeat (default 4)."}
    )
    base_train_steps: int | None = field(
        default=None, metadata={"help": "ViT-B/16: Trainer steps per timed repeat (default 1)."}
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Trainer steps run before timing starts (default 3)."}
    )
    skip_base: bool = field(
        default=False, metadata={"help": "Leave out the ViT-B/16-shaped train runs (the slowest part)."}
    )
    variants: bool = field(default=True, metadata={"help": "Measure the speed-setting variants table."})
    measure_compile: bool = field(
        default=True, metadata={"help": "Include torch.compile in the variants (full mode only; slow to compile)."}
    )
    dataset_dir: str | None = field(default=None, metadata={"help": "A dataset saved by scripts/prepare_dataset.py."})
    data_dir: str | None = field(
        default=None, metadata={"help": "A folder of class subfolders of tiles (e.g. the Kather release)."}
    )
    synthetic: bool = field(default=False, metadata={"help": "Use synthetic tiles even when real ones are available."})
    seed: int = field(default=0, metadata={"help": "Seed of the tile subset, model init and augmentation."})

    def __post_init__(self) -> None:
        names = self.section_list()
        unknown = sorted(set(names) - set(SECTIONS))
        if unknown or not names:
            raise ValueError(
                f"--sections {self.sections!r}: unknown {unknown or 'empty'}; use a comma list of {SECTIONS}"
            )
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        for name in (
            "threads",
            "image_size",
            "batch_size",
            "base_image_size",
            "base_batch_size",
            "infer_batch_size",
            "num_tiles",
            "infer_tiles",
            "data_batches",
            "train_steps",
            "base_train_steps",
        ):
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
        if self.quick:
            quick = {
                "batch_size": 8,
                "base_batch_size": 4,
                "infer_batch_size": 8,
                "num_tiles": 48,
                "infer_tiles": 16,
                "data_batches": 3,
                "train_steps": 1,
                "base_train_steps": 1,
                "warmup_steps": 1,
            }
            for key, value in quick.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
            self.measure_compile = False
            if self.threads is None:  # tiny ops: one thread avoids OpenMP stalls on a busy machine
                self.threads = 1
        full = {
            "batch_size": 64,
            "base_batch_size": 8,
            "infer_batch_size": 128,
            "num_tiles": 768,
            "infer_tiles": 256,
            "data_batches": 24,
            "train_steps": 4,
            "base_train_steps": 1,
            "warmup_steps": 3,
        }
        for key, value in full.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.threads is None:
            self.threads = torch.get_num_threads()
        self.small_model = self._small_model()
        if self.image_size is not None:
            self.small_model["image_size"] = self.image_size
        self.base_model = (
            dict(_QUICK_BASE_MODEL) if self.quick else {"model_preset": "base", "image_size": 224, "patch_size": 16}
        )
        if self.base_image_size is not None:
            self.base_model["image_size"] = self.base_image_size
        from .modeling import check_geometry

        for model in (self.small_model, self.base_model):
            check_geometry(model["image_size"], model["patch_size"])

    def section_list(self) -> list[str]:
        """The sections to run, in the order given."""
        return [s.strip() for s in self.sections.split(",") if s.strip()]

    def _small_model(self) -> dict[str, Any]:
        if self.quick:
            return dict(_QUICK_MODEL)
        if not SCRATCH_RECIPE.is_file():
            raise FileNotFoundError(f"{SCRATCH_RECIPE} is missing: run the benchmark from a clone of the repository")
        import yaml

        recipe = yaml.safe_load(SCRATCH_RECIPE.read_text(encoding="utf-8")) or {}
        model = {k: recipe[k] for k in _MODEL_KEYS if recipe.get(k) is not None}
        model["model_preset"] = recipe.get("model_preset", "tiny")
        return model

    def augmentation(self) -> Any:
        """The package's training augmentation: the scratch recipe's block (defaults when absent)."""
        from .transforms import AugmentationConfig

        values: dict[str, Any] = {}
        if SCRATCH_RECIPE.is_file():
            import yaml

            recipe = yaml.safe_load(SCRATCH_RECIPE.read_text(encoding="utf-8")) or {}
            values = dict(recipe.get("augmentation") or {})
            for key in ("crop_scale", "crop_ratio"):
                if key in values:
                    values[key] = tuple(float(v) for v in values[key])
        return AugmentationConfig(**values)


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median / min / max of per-repeat throughputs (plus the raw values)."""
    values = [float(v) for v in values]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "repeats": len(values),
        "values": [round(v, 3) for v in values],
    }


def time_repeats(run: Callable[[], int], repeats: int, warmup: int = 1) -> list[float]:
    """Call ``run`` (returns items processed) ``warmup`` times untimed, then ``repeats`` times timed; items/s."""
    for _ in range(warmup):
        run()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = run()
        rates.append(n / max(time.perf_counter() - start, 1e-9))
    return rates


def time_interleaved(runs: dict[str, Callable[[], int]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Like :func:`time_repeats` for several contenders, alternating them within each repeat so
    that load changes on a shared machine hit all of them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            n = run()
            rates[name].append(n / max(time.perf_counter() - start, 1e-9))
    return rates


def _row(label: str, rates: Sequence[float], **extra: Any) -> dict[str, Any]:
    return {"label": label, **extra, **summarize(rates)}


def _ratio(
    name: str, rows: dict[str, dict[str, Any]], numerator: str, denominator: str, goal: float | None = None
) -> dict[str, Any]:
    value = rows[numerator]["median"] / rows[denominator]["median"]
    out = {"name": name, "numerator": numerator, "denominator": denominator, "ratio": value}
    if goal is not None:
        out.update(goal=goal, met=bool(value >= goal))
    return out


# --------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Data: one set of tiles as an image folder (baseline) and a package dataset
# --------------------------------------------------------------------------------------------
@dataclass
class BenchData:
    """The same tiles two ways: ``folder`` (class subfolders of PNG/TIFF files) and ``dataset``."""

    folder: Path  # imagefolder root used by the baseline
    dataset: Any  # datasets.Dataset with image/label columns (package pipeline)
    files: list[Path]  # image files under ``folder`` (inference inputs)
    source: dict[str, Any]


def write_synthetic_tiles(root: str | os.PathLike, n_per_class: int, size: int = 150, seed: int = 0) -> list[Path]:
    """Write Kather-style PNG tiles (one colour + texture per class, random noise) into ``root/<folder>/``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for k, folder in enumerate(list(KATHER_FOLDERS)[: len(CLASS_NAMES)]):
        (root / folder).mkdir(parents=True, exist_ok=True)
        base = np.array([80 + 30 * k, 200 - 25 * k, 120 + 20 * (k % 3)], np.float32)
        for i in range(n_per_class):
            pattern = np.sin((xx * (k + 1) + yy * (6 - k)) / 4.0 + rng.uniform(0, 6.28))
            pixels = base + 30 * pattern[..., None] + rng.normal(0, 8, (size, size, 3))
            path = root / folder / f"synthetic_{k}_{i:04d}.png"
            from PIL import Image

            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path)
            paths.append(path)
    return paths


def _list_images(root: Path) -> list[Path]:
    from .predict import iter_input_files

    return [Path(p) for p in iter_input_files([root])]  # the same file selection as predict.py


def _subset_folder(source: Path, target: Path, num_tiles: int, seed: int) -> list[Path]:
    """Copy ``num_tiles`` files (an equal share per class folder, seeded) into ``target`` (same layout)."""
    folders = sorted(p for p in source.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"--data_dir {source}: expected class subfolders (e.g. 01_TUMOR/), found none")
    per_class = max(1, math.ceil(num_tiles / len(folders)))
    rng = random.Random(seed)
    copied = []
    for folder in folders:
        files = _list_images(folder)
        for path in sorted(rng.sample(files, min(per_class, len(files)))):
            dest = target / folder.name / path.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            copied.append(dest)
    if not copied:
        raise ValueError(f"--data_dir {source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its subfolders")
    return copied


def _flatten_splits(dataset_dict: Any) -> Any:
    from datasets import concatenate_datasets

    return concatenate_datasets([dataset_dict[name] for name in dataset_dict])


def _export_dataset(dataset: Any, target: Path) -> list[Path]:
    """Write a package dataset's tiles as ``target/<label name>/<n>.png`` (the baseline reads files)."""
    from datasets import Image as ImageFeature

    names = dataset.features["label"].names
    raw = dataset.cast_column("image", ImageFeature(decode=False))
    paths = []
    for i, row in enumerate(raw):
        folder = target / names[row["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.png"
        image = row["image"]
        if image.get("bytes") and image["bytes"][:8] == b"\x89PNG\r\n\x1a\n":
            path.write_bytes(image["bytes"])
        else:
            from PIL import Image

            from .training import _decode_image

            Image.fromarray(_decode_image(image)).save(path)
        paths.append(path)
    return paths


def prepare_data(config: BenchmarkConfig, workdir: Path) -> BenchData:
    """Resolve the tile source (``--dataset_dir``, ``--data_dir``, the real Kather tiles in ../shared,
    else synthetic tiles) into the same ``num_tiles`` tiles as an image folder and a package dataset."""
    from . import data

    folder = workdir / "imagefolder"
    if config.dataset_dir:
        full = _flatten_splits(data.load_tissue_dataset(dataset_dir=config.dataset_dir))
        n = min(config.num_tiles, len(full))
        dataset = full.shuffle(seed=config.seed).select(range(n))
        files = _export_dataset(dataset, folder)
        return BenchData(folder, dataset, files, {"kind": "dataset_dir", "path": str(config.dataset_dir), "tiles": n})
    if config.data_dir:
        source, kind = Path(config.data_dir), "data_dir"
    elif DEFAULT_REAL_DATA.is_dir() and not config.synthetic:
        source, kind = DEFAULT_REAL_DATA, "real (default ../shared)"
    else:
        source, kind = None, "synthetic"
    if source is None:
        per_class = max(2, math.ceil(config.num_tiles / len(CLASS_NAMES)))
        files = write_synthetic_tiles(folder, per_class, size=48 if config.quick else 150, seed=config.seed)
    else:
        files = _subset_folder(source, folder, config.num_tiles, config.seed)
    logger.info("building the package dataset from %d tiles in %s", len(files), folder)
    dataset = _flatten_splits(data.build_dataset(folder, seed=config.seed))
    return BenchData(
        folder, dataset, files, {"kind": kind, "path": str(source) if source else None, "tiles": len(files)}
    )


# --------------------------------------------------------------------------------------------
# The baseline: transformers' examples/pytorch/image-classification/run_image_classification.py
# --------------------------------------------------------------------------------------------
class _ExampleRandomResizedCrop:
    """torchvision ``RandomResizedCrop(size)`` on PIL images (torchvision is not importable here):
    same defaults (scale (0.08, 1), ratio (3/4, 4/3), bilinear with antialias), same ``get_params``."""

    def __init__(self, size: tuple[int, int], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = round(math.sqrt(target_area * aspect_ratio))
            h = round(math.sqrt(target_area / aspect_ratio))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = float(width) / float(height)  # fallback: whole image, ratio clamped
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        i, j, h, w = self.get_params(*img.size)
        # torchvision F.resized_crop on PIL: crop, then resize((w, h), BILINEAR) (PIL antialiases)
        return img.crop((j, i, j + w, i + h)).resize((self.size[1], self.size[0]), Image.BILINEAR)


def example_train_transforms(image_processor: Any) -> Callable[[dict[str, list]], dict[str, list]]:
    """The example's ``train_transforms`` for ``Dataset.set_transform``, written with PIL + torch.

    Mirrors run_image_classification.py::

        if "shortest_edge" in image_processor.size: size = image_processor.size["shortest_edge"]
        else: size = (image_processor.size["height"], image_processor.size["width"])
        normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
        _train_transforms = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
        def train_transforms(example_batch):
            example_batch["pixel_values"] = [_train_transforms(pil_img.convert("RGB"))
                                             for pil_img in example_batch["image"]]
            return example_batch
    """
    from PIL import Image

    if "shortest_edge" in image_processor.size:
        edge = image_processor.size["shortest_edge"]
        size = (edge, edge)
    else:
        size = (image_processor.size["height"], image_processor.size["width"])
    crop = _ExampleRandomResizedCrop(size)
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(-1, 1, 1)

    def _train_transforms(img: Any) -> torch.Tensor:
        img = crop(img)  # RandomResizedCrop(size)
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip()
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        # ToTensor(): HWC uint8 -> CHW float in [0, 1]
        tensor = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
        tensor = tensor.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        return tensor.sub_(mean).div_(std)  # Normalize(mean, std) (on a copy, as F.normalize)

    def train_transforms(example_batch: dict[str, list]) -> dict[str, list]:
        example_batch["pixel_values"] = [
            _train_transforms(pil_img.convert("RGB")) for pil_img in example_batch["image"]
        ]
        return example_batch

    return train_transforms


def example_collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The example's ``collate_fn`` (label column ``label``, its default ``--label_column_name``)."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([example["label"] for example in examples])
    return {"pixel_values": pixel_values, "labels": labels}


def load_example_dataset(folder: Path, image_processor: Any, cache_dir: Path) -> Any:
    """``load_dataset("imagefolder", ...)["train"]`` with the example's train transforms set."""
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(cache_dir))["train"]
    dataset.set_transform(example_train_transforms(image_processor))
    return dataset


# --------------------------------------------------------------------------------------------
# The package side
# --------------------------------------------------------------------------------------------
@dataclass
class PackagePipeline:
    """Decoded tiles + collator of the package (see :mod:`hf_tissue_vit.training`)."""

    dataset: Any  # TileDataset(train=True)
    collator: Any  # TileCollator
    decode_seconds: float


def package_pipeline(bench: BenchData, processor: Any, augmentation: Any, seed: int) -> PackagePipeline:
    """Decode the tiles once (as training does, without the on-disk cache) and build dataset + collator."""
    from .training import TileCollator, TileDataset, decode_tiles
    from .transforms import TileTransform

    start = time.perf_counter()
    pixels = decode_tiles(bench.dataset, cache=False)
    decode_seconds = time.perf_counter() - start
    labels = torch.as_tensor(np.asarray(bench.dataset["label"]), dtype=torch.long)
    dataset = TileDataset(pixels, labels, train=True)
    collator = TileCollator(
        TileTransform.from_processor(processor, augmentation), TileTransform.from_processor(processor), seed=seed
    )
    return PackagePipeline(dataset, collator, decode_seconds)


def _make_model(spec: dict[str, Any], seed: int, attn: str | None = None) -> Any:
    from transformers import ViTForImageClassification, set_seed

    from .modeling import scratch_config

    set_seed(seed)
    config = scratch_config(
        spec["model_preset"], list(CLASS_NAMES), **{k: spec[k] for k in spec if k != "model_preset"}
    )
    model = ViTForImageClassification(config)
    if attn:
        model.set_attn_implementation(attn)
    return model


def _model_label(spec: dict[str, Any], model: Any | None = None) -> str:
    c = spec
    n = f", {model.num_parameters() / 1e6:.1f}M params" if model is not None else ""
    width = c.get("hidden_size", "preset")
    return f"{c['model_preset']} {c['image_size']}px/p{c['patch_size']} w{width} L{c.get('num_hidden_layers', 12)}{n}"


def _iterate_batches(loader: Any, n_batches: int) -> int:
    """Pull ``n_batches`` batches (starting new epochs as needed); returns the images seen."""
    seen, done = 0, 0
    while done < n_batches:
        for batch in loader:
            seen += batch["pixel_values"].shape[0]
            done += 1
            if done == n_batches:
                break
    return seen


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
def bench_data(
    config: BenchmarkConfig, bench: BenchData, processor: Any, package: PackagePipeline, baseline_ds: Any, workers: int
) -> dict[str, Any]:
    """Data pipeline images/s: example (imagefolder + set_transform + collate_fn) vs the package."""
    from torch.utils.data import DataLoader

    def loader(dataset: Any, collate: Callable, num_workers: int) -> DataLoader:
        g = torch.Generator().manual_seed(config.seed)
        return DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            collate_fn=collate,
            num_workers=num_workers,
            generator=g,
            persistent_workers=num_workers > 0,
        )

    base_loader = loader(baseline_ds, example_collate_fn, 0)  # Trainer's default: no workers
    pkg_loader = loader(package.dataset, package.collator, workers)
    rates = time_interleaved(
        {
            "baseline": lambda: _iterate_batches(base_loader, config.data_batches),
            "package": lambda: _iterate_batches(pkg_loader, config.data_batches),
        },
        config.repeats,
    )
    rows = {
        "baseline": _row(
            "transformers example (imagefolder + per-sample PIL transforms)",
            rates["baseline"],
            dataloader_num_workers=0,
        ),
        "package": _row(
            "package (decoded-once uint8 tiles + batched TileTransform collator)",
            rates["package"],
            dataloader_num_workers=workers,
        ),
    }
    # One-time decode (the package decodes each tile once, then reuses the uint8 array every epoch).
    n = len(package.dataset)
    decode_rate = n / max(package.decode_seconds, 1e-9)
    rows["package_first_epoch"] = _row(
        "package first epoch incl. the one-time decode (derived per repeat: 1/(1/decode + 1/steady))",
        [1 / (1 / decode_rate + 1 / v) for v in rows["package"]["values"]],
        decode_tiles_per_s=decode_rate,
    )
    return {
        "title": "Data pipeline: decode + augment + collate into pixel_values",
        "unit": "images/s",
        "batch_size": config.batch_size,
        "batches_per_repeat": config.data_batches,
        "image_size": config.small_model["image_size"],
        "rows": rows,
        "ratios": [
            _ratio("package / example", rows, "package", "baseline", GOALS["data"]),
            _ratio("package first epoch / example", rows, "package_first_epoch", "baseline"),
        ],
    }


class StepTimer(TrainerCallback):
    """Records the wall time at the start of training and at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.times = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def _window_rates(times: list[float], warmup: int, steps: int, repeats: int, batch: int) -> list[float]:
    """images/s over ``repeats`` windows of ``steps`` steps after ``warmup`` untimed steps."""
    rates = []
    for r in range(repeats):
        t0, t1 = times[warmup + r * steps], times[warmup + (r + 1) * steps]
        rates.append(steps * batch / max(t1 - t0, 1e-9))
    return rates


def _training_args(output_dir: Path, batch: int, max_steps: int, seed: int, **extra: Any) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=batch,
        max_steps=max_steps,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=seed,
        remove_unused_columns=False,
        **extra,
    )


def train_run(
    kind: str,
    spec: dict[str, Any],
    dataset: Any,
    collator: Any,
    batch: int,
    warmup: int,
    steps: int,
    repeats: int,
    seed: int,
    workdir: Path,
    *,
    bf16: bool = False,
    workers: int = 0,
    attn: str | None = None,
) -> tuple[list[float], Any]:
    """One ``trainer.train()`` of ``warmup + repeats * steps`` steps; returns per-window images/s and the model."""
    from transformers import Trainer

    from .training import TissueTrainer

    model = _make_model(spec, seed, attn)
    timer = StepTimer()
    trainer_cls = TissueTrainer if kind == "package" else Trainer
    # The example needs remove_unused_columns=False (its README passes --remove_unused_columns False:
    # set_transform reads the `image` column the Trainer would otherwise drop); the package sets it too.
    args = _training_args(
        workdir / f"trainer_{kind}", batch, warmup + repeats * steps, seed, bf16=bf16, dataloader_num_workers=workers
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[timer])
    trainer.train()
    return _window_rates(timer.times, warmup, steps, repeats, batch), trainer.model


def bench_train(
    config: BenchmarkConfig,
    bench: BenchData,
    processors: dict[str, Any],
    packages: dict[str, PackagePipeline],
    baselines: dict[str, Any],
    settings: dict[str, Any],
    workdir: Path,
) -> tuple[dict[str, Any], Any]:
    """Trainer images/s per model: example pipeline (fp32 defaults) vs the package (its speed settings)."""
    rows: dict[str, dict[str, Any]] = {}
    ratios = []
    trained = None
    models = [("small", config.small_model, config.batch_size, config.train_steps)]
    if not config.skip_base:
        models.append(("base", config.base_model, config.base_batch_size, config.base_train_steps))
    for name, spec, batch, steps in models:
        logger.info("train benchmark: %s model (%s), batch %d", name, _model_label(spec), batch)
        base_rates, _ = train_run(
            "baseline",
            spec,
            baselines[name],
            example_collate_fn,
            batch,
            config.warmup_steps,
            steps,
            config.repeats,
            config.seed,
            workdir,
        )
        pkg_rates, model = train_run(
            "package",
            spec,
            packages[name].dataset,
            packages[name].collator,
            batch,
            config.warmup_steps,
            steps,
            config.repeats,
            config.seed,
            workdir,
            bf16=settings["train_bf16"],
            workers=settings["train_dataloader_num_workers"],
            attn=settings["attn_implementation"],
        )
        label = _model_label(spec, model)
        rows[f"{name}_baseline"] = _row(
            "transformers example + Trainer defaults (fp32)", base_rates, model=label, batch_size=batch
        )
        rows[f"{name}_package"] = _row(
            f"package (bf16 autocast={settings['train_bf16']}, attn={settings['attn_implementation']}, "
            f"workers={settings['train_dataloader_num_workers']})",
            pkg_rates,
            model=label,
            batch_size=batch,
        )
        ratios.append(
            _ratio(
                f"{name}: package / example",
                rows,
                f"{name}_package",
                f"{name}_baseline",
                GOALS["train_small"] if name == "small" else None,
            )
        )
        if name == "small":
            trained = model
    return {
        "title": "Training steps through Trainer (forward + backward + AdamW)",
        "unit": "images/s",
        "warmup_steps": config.warmup_steps,
        "steps_per_repeat": {"small": config.train_steps, "base": config.base_train_steps},
        "rows": rows,
        "ratios": ratios,
    }, trained


def bench_infer(
    config: BenchmarkConfig,
    bench: BenchData,
    model: Any,
    processor: Any,
    workdir: Path,
    model_state: str,
    use_bf16: bool,
) -> dict[str, Any]:
    """tiles/s over PNG files: TilePredictor (fp32, and bf16 autocast when ``use_bf16``) vs pipeline()
    per image and pipeline(batch_size=); interleaved repeats. Goals are judged on the bf16 predictor
    when it is used (its predictions were checked against fp32 in the variants)."""
    from transformers import pipeline

    from .predict import TilePredictor

    model_dir = workdir / "model"
    model.save_pretrained(model_dir)  # safetensors
    processor.save_pretrained(model_dir)
    files = [str(p) for p in bench.files[: config.infer_tiles]]
    while len(files) < config.infer_tiles:  # small sources: cycle through the files
        files += [str(p) for p in bench.files[: config.infer_tiles - len(files)]]
    fix_permissions(model_dir)
    # Explicit precisions: TilePredictor's default (bf16=None) follows the hardware. Attention stays
    # "auto" (SDPA for fp32, eager for bf16 on CPU), as predict.py runs it.
    predictor = TilePredictor.from_pretrained(
        str(model_dir), device="cpu", batch_size=config.infer_batch_size, bf16=False
    )
    predictor_bf16 = (
        TilePredictor.from_pretrained(str(model_dir), device="cpu", batch_size=config.infer_batch_size, bf16=True)
        if use_bf16
        else None
    )
    pipe = pipeline("image-classification", model=str(model_dir), device="cpu")
    bs = config.infer_batch_size
    runs = {"package": lambda: sum(1 for _ in predictor.predict_files(files))}
    if predictor_bf16 is not None:
        runs["package_bf16"] = lambda: sum(1 for _ in predictor_bf16.predict_files(files))

    def run_single() -> int:
        for path in files:
            pipe(path)
        return len(files)

    runs["pipeline_single"] = run_single
    runs["pipeline_batched"] = lambda: len(pipe(files, batch_size=bs))
    rates = time_interleaved(runs, config.repeats)
    rows = {
        "package": _row(
            f"TilePredictor(bf16=False) / predict.py --bf16 false, {predictor.attn_implementation} "
            f"(batch {bs}, {predictor.num_workers} decode threads)",
            rates["package"],
        )
    }
    if predictor_bf16 is not None:
        rows["package_bf16"] = _row(
            f"TilePredictor(bf16=True) / predict.py --bf16 true, {predictor_bf16.attn_implementation} (batch {bs})",
            rates["package_bf16"],
        )
    rows["pipeline_single"] = _row("pipeline('image-classification') one image at a time", rates["pipeline_single"])
    rows["pipeline_batched"] = _row(
        f"pipeline('image-classification', batch_size={bs}) over the list", rates["pipeline_batched"]
    )
    chosen = "package_bf16" if predictor_bf16 is not None else "package"
    ratios = []
    for key in rows:
        if key.startswith("package"):
            goal = key == chosen
            ratios += [
                _ratio(
                    f"{key} / pipeline one at a time",
                    rows,
                    key,
                    "pipeline_single",
                    GOALS["infer_single"] if goal else None,
                ),
                _ratio(
                    f"{key} / pipeline batch_size={bs}",
                    rows,
                    key,
                    "pipeline_batched",
                    GOALS["infer_batched"] if goal else None,
                ),
            ]
    judged = predictor_bf16 if predictor_bf16 is not None else predictor
    ours = [judged.label_names[int(r.probs.argmax())] for r in judged.predict_files(files)]
    theirs = [out[0]["label"] for out in pipe(files, batch_size=bs)]
    agreement = sum(a == b for a, b in zip(ours, theirs)) / len(files)
    return {
        "title": "Inference over PNG files (decode + preprocess + forward)",
        "unit": "tiles/s",
        "tiles_per_repeat": len(files),
        "batch_size": bs,
        "model": _model_label(config.small_model, model),
        "model_state": model_state,
        "top1_agreement_package_vs_pipeline": agreement,
        "package_setting_for_goals": chosen,
        "rows": rows,
        "ratios": ratios,
    }


# --------------------------------------------------------------------------------------------
# Variants: what makes the package faster, measured here
# --------------------------------------------------------------------------------------------
def _autocast(bf16: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _forward_rates(
    model: Any, pixel_values: torch.Tensor, repeats: int, *, bf16: bool = False, grad_mode: str = "inference_mode"
) -> list[float]:
    ctx = torch.inference_mode if grad_mode == "inference_mode" else torch.no_grad

    def run() -> int:
        with ctx(), _autocast(bf16):
            model(pixel_values=pixel_values)
        return pixel_values.shape[0]

    return time_repeats(run, repeats)


def _train_step_rates(
    model: Any, pixel_values: torch.Tensor, labels: torch.Tensor, repeats: int, bf16: bool
) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def run() -> int:
        with _autocast(bf16):
            loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return pixel_values.shape[0]

    return time_repeats(run, repeats)


def _agreement(model: Any, pixel_values: torch.Tensor, batch: int) -> dict[str, float]:
    """Top-1 agreement and largest probability difference of a bf16 copy of the model (as
    TilePredictor runs it) vs the fp32 model."""
    model.eval()
    weights = copy.deepcopy(model).to(torch.bfloat16)
    fp32, bf16 = [], []
    with torch.inference_mode():
        for i in range(0, len(pixel_values), batch):
            chunk = pixel_values[i : i + batch]
            fp32.append(model(pixel_values=chunk).logits.float().softmax(-1))
            bf16.append(weights(pixel_values=chunk.bfloat16()).logits.float().softmax(-1))
    a, b = torch.cat(fp32), torch.cat(bf16)
    return {
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "max_abs_prob_diff": float((a - b).abs().max()),
    }


def bench_variants(
    config: BenchmarkConfig, package: PackagePipeline, eval_pixels: torch.Tensor
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure the candidate speed settings; returns the table and the settings chosen from it."""
    from torch.utils.data import DataLoader

    rows: dict[str, dict[str, Any]] = {}
    spec, batch = config.small_model, config.batch_size
    repeats = config.repeats
    g = torch.Generator().manual_seed(config.seed)
    train_px = torch.randn(batch, 3, spec["image_size"], spec["image_size"], generator=g)
    train_labels = torch.randint(0, len(CLASS_NAMES), (batch,), generator=g)
    # Training step (forward + backward + AdamW), small model: attention x precision.
    for attn in ("eager", "sdpa"):
        for bf16 in (False, True):
            model = _make_model(spec, config.seed, attn)
            rows[f"train_{attn}_{'bf16' if bf16 else 'fp32'}"] = _row(
                f"train step, {attn} attention, {'bf16 autocast' if bf16 else 'fp32'}",
                _train_step_rates(model, train_px, train_labels, repeats, bf16),
                unit="images/s",
            )
    # Inference forward at the inference batch size.
    infer_px = eval_pixels[: config.infer_batch_size]
    for attn in ("eager", "sdpa"):
        model = _make_model(spec, config.seed, attn).eval()
        rows[f"infer_{attn}_fp32"] = _row(
            f"inference forward, {attn}, fp32, inference_mode",
            _forward_rates(model, infer_px, repeats),
            unit="images/s",
        )
    model = _make_model(spec, config.seed, "sdpa").eval()
    rows["infer_sdpa_fp32_no_grad"] = _row(
        "inference forward, sdpa, fp32, no_grad",
        _forward_rates(model, infer_px, repeats, grad_mode="no_grad"),
        unit="images/s",
    )
    rows["infer_sdpa_bf16"] = _row(
        "inference forward, sdpa, bf16 autocast, inference_mode",
        _forward_rates(model, infer_px, repeats, bf16=True),
        unit="images/s",
    )
    eager = _make_model(spec, config.seed, "eager").eval()
    rows["infer_eager_bf16"] = _row(
        "inference forward, eager, bf16 autocast, inference_mode",
        _forward_rates(eager, infer_px, repeats, bf16=True),
        unit="images/s",
    )
    del eager
    for attn in ("eager", "sdpa"):
        weights = _make_model(spec, config.seed, attn).eval().to(torch.bfloat16)
        rows[f"infer_{attn}_bf16_weights"] = _row(
            f"inference forward, {attn}, bf16 weights (TilePredictor's bf16), inference_mode",
            _forward_rates(weights, infer_px.bfloat16(), repeats),
            unit="images/s",
        )
    del weights
    if config.measure_compile:
        rows.update(_compile_variant(model, infer_px, repeats))
    # DataLoader workers for the package collator (2 cores: 0 or 1 worker is the real choice).
    for workers in sorted({0, 1, min(2, max(0, (os.cpu_count() or 1) - 1))}):
        loader = DataLoader(
            package.dataset,
            batch_size=batch,
            shuffle=True,
            collate_fn=package.collator,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        rates = time_repeats(functools.partial(_iterate_batches, loader, config.data_batches), repeats)
        rows[f"data_workers_{workers}"] = _row(
            f"package data pipeline, dataloader_num_workers={workers}", rates, unit="images/s"
        )
        del loader  # stops its worker processes before the next measurement
    # Only a check here (a random-init model has near-tied logits); the trained model's agreement is
    # added by run_benchmark after the train section.
    agreement = _agreement(model, eval_pixels, config.infer_batch_size)

    def fastest(keys: list[str]) -> str:
        return max(keys, key=lambda k: rows[k]["median"])

    best_train = fastest([k for k in rows if k.startswith("train_")])
    train_bf16 = (
        cpu_supports_bf16()
        and rows[f"train_{best_train.split('_')[1]}_bf16"]["median"]
        > rows[f"train_{best_train.split('_')[1]}_fp32"]["median"]
    )
    attn = fastest(
        [f"train_eager_{'bf16' if train_bf16 else 'fp32'}", f"train_sdpa_{'bf16' if train_bf16 else 'fp32'}"]
    ).split("_")[1]
    workers = int(fastest([k for k in rows if k.startswith("data_workers_")]).rsplit("_", 1)[1])
    settings = {
        "attn_implementation": attn,
        "train_bf16": bool(train_bf16),
        "dataloader_num_workers": workers,
        "train_dataloader_num_workers": auto_num_workers(),
        "cpu_supports_bf16": cpu_supports_bf16(),
        "bf16_vs_fp32": agreement,
    }
    table = {
        "title": "Speed-setting variants (small model; picked by measurement for the package runs)",
        "unit": "images/s",
        "batch_size": batch,
        "infer_batch_size": config.infer_batch_size,
        "rows": rows,
        "chosen": settings,
    }
    return table, settings


def _compile_variant(model: Any, pixel_values: torch.Tensor, repeats: int) -> dict[str, dict[str, Any]]:
    """torch.compile of the inference forward: compile time and steady speed (measured once)."""
    try:
        compiled = torch.compile(model)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(pixel_values=pixel_values)
        compile_s = time.perf_counter() - start
        return {
            "infer_sdpa_fp32_compiled": _row(
                "inference forward, sdpa, fp32, torch.compile (after compiling)",
                _forward_rates(compiled, pixel_values, repeats),
                unit="images/s",
                compile_seconds=round(compile_s, 1),
            )
        }
    except Exception as err:  # noqa: BLE001 - inductor needs a compiler toolchain; record why it failed
        logger.warning("torch.compile variant failed: %s", err)
        return {
            "infer_sdpa_fp32_compiled": {
                "label": f"torch.compile failed: {type(err).__name__}: {err}"[:300],
                "median": None,
                "min": None,
                "max": None,
                "repeats": 0,
            }
        }


def _default_settings() -> dict[str, Any]:
    """Package speed settings when the variants are not measured."""
    bf16 = cpu_supports_bf16()
    return {
        "attn_implementation": default_attn_implementation("cpu", bf16),
        "train_bf16": bf16,
        "dataloader_num_workers": 0,
        "train_dataloader_num_workers": auto_num_workers(),
        "cpu_supports_bf16": cpu_supports_bf16(),
        "bf16_vs_fp32": None,
    }


# --------------------------------------------------------------------------------------------
# Driver and output
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_benchmark(
    config: BenchmarkConfig, command: str = "", workdir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Run the configured sections and return the results (JSON-ready dict)."""
    from .transforms import make_image_processor

    started = time.perf_counter()
    sections = config.section_list()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_threads(config.threads))
        tmp = (
            Path(workdir)
            if workdir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hf_tissue_vit_bench_")))
        )
        results: dict[str, Any] = {
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "command": command,
            "machine": machine_info(),
            "settings": _settings_dict(config),
            "sections": {},
        }
        bench = prepare_data(config, tmp)
        results["data_source"] = bench.source
        specs = {"small": config.small_model, "base": config.base_model}
        processors = {k: make_image_processor(v["image_size"]) for k, v in specs.items()}
        augmentation = config.augmentation()
        packages = {"small": package_pipeline(bench, processors["small"], augmentation, config.seed)}
        eval_pixels = packages["small"].collator.eval_transform(packages["small"].dataset.pixels[: config.infer_tiles])

        timings = results["section_seconds"] = {"prepare": round(time.perf_counter() - started, 1)}
        settings = _default_settings()
        if config.variants:
            logger.info("measuring speed-setting variants")
            mark = time.perf_counter()
            results["variants"], settings = bench_variants(config, packages["small"], eval_pixels)
            timings["variants"] = round(time.perf_counter() - mark, 1)
        results["package_settings"] = settings

        if "data" in sections:
            logger.info("data pipeline benchmark")
            mark = time.perf_counter()
            baseline = load_example_dataset(bench.folder, processors["small"], tmp / "hf_cache")
            results["sections"]["data"] = bench_data(
                config, bench, processors["small"], packages["small"], baseline, settings["dataloader_num_workers"]
            )
            timings["data"] = round(time.perf_counter() - mark, 1)
        trained = None
        if "train" in sections:
            mark = time.perf_counter()
            names = ["small"] + ([] if config.skip_base else ["base"])
            for name in names:
                packages.setdefault(name, package_pipeline(bench, processors[name], augmentation, config.seed))
            baselines = {name: load_example_dataset(bench.folder, processors[name], tmp / "hf_cache") for name in names}
            results["sections"]["train"], trained = bench_train(
                config, bench, processors, packages, baselines, settings, tmp
            )
            if trained is not None:
                # A clean copy: accelerate wraps the trained model's forward in its mixed-precision autocast.
                clean = _make_model(config.small_model, config.seed)
                clean.load_state_dict(trained.state_dict())
                trained = clean
                if config.variants:  # bf16 agreement on a (briefly) trained model
                    settings["bf16_vs_fp32_trained"] = _agreement(trained, eval_pixels, config.infer_batch_size)
            timings["train"] = round(time.perf_counter() - mark, 1)
        if "infer" in sections:
            logger.info("inference benchmark")
            mark = time.perf_counter()
            model = trained if trained is not None else _make_model(config.small_model, config.seed)
            state = (
                f"trained {config.warmup_steps + config.repeats * config.train_steps} steps by the package train run"
                if trained is not None
                else "random init"
            )
            check = settings.get("bf16_vs_fp32_trained") or settings.get("bf16_vs_fp32")
            vrows = results.get("variants", {}).get("rows", {})
            # TilePredictor's auto attention: SDPA in fp32, eager under bf16 on CPU (hardware.py); the bf16 row
            # is shown only where that pair is faster here and bf16 agrees with fp32.
            bf16_key = f"infer_{default_attn_implementation('cpu', True, training=False)}_bf16_weights"
            fp32_key = f"infer_{default_attn_implementation('cpu', False, training=False)}_fp32"
            faster = bool(vrows) and vrows[bf16_key]["median"] > vrows[fp32_key]["median"]
            use_bf16 = bool(settings["cpu_supports_bf16"] and faster and check and check["top1_agreement"] >= 0.99)
            settings["infer_bf16"] = use_bf16
            results["sections"]["infer"] = bench_infer(config, bench, model, processors["small"], tmp, state, use_bf16)
            timings["infer"] = round(time.perf_counter() - mark, 1)
        results["machine"]["load_average_end"] = (
            [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
        )
        results["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    return results


def _settings_dict(config: BenchmarkConfig) -> dict[str, Any]:
    values = asdict(config)
    values["small_model"] = config.small_model
    values["base_model"] = config.base_model
    values["augmentation"] = asdict(config.augmentation())
    values["recipe"] = str(SCRATCH_RECIPE) if SCRATCH_RECIPE.is_file() and not config.quick else None
    return values


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"
    return str(value)


def _rows_table(rows: dict[str, dict[str, Any]], unit: str, extra: Sequence[str] = ()) -> list[str]:
    head = ["what", *extra, f"median {unit}", "min", "max", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows.values():
        cells = [
            row["label"],
            *(_fmt(row.get(e, "")) for e in extra),
            _fmt(row["median"]),
            _fmt(row["min"]),
            _fmt(row["max"]),
            str(row.get("repeats", "")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: machine, one table per section with its ratios, the variants."""
    m = results["machine"]
    shown_settings = {k: v for k, v in results["package_settings"].items() if not k.startswith("bf16_vs")}
    out = [
        "# hf_tissue_vit speed benchmark",
        "",
        f"- date: {results['date']}",
        f"- command: `{results['command']}`",
        (
            f"- machine: {m['cpu_model']}, {m['cpu_count']} cores, torch threads {results['settings']['threads']}, "
            f"flags {', '.join(m['cpu_flags']) or 'none'}; load average at start {m['load_average_1_5_15']}, "
            f"end {m.get('load_average_end')}"
        ),
        f"- versions: torch {m['torch']}, transformers {m['transformers']}, datasets {m['datasets']}, "
        f"python {m['python']}",
        f"- tiles: {results['data_source']}",
        f"- package settings (measured): {json.dumps(shown_settings)}",
        "",
    ]
    for name, section in results["sections"].items():
        out += [f"## {name}: {section['title']}", ""]
        extra = ("model", "batch_size") if name == "train" else ()
        out += _rows_table(section["rows"], section["unit"], extra)
        out += ["", "| ratio (medians) | value | goal | met |", "|---|---|---|---|"]
        for r in section["ratios"]:
            goal = f"≥ {r['goal']}x" if "goal" in r else ""
            met = ("yes" if r["met"] else "no") if "met" in r else ""
            out.append(f"| {r['name']} | {r['ratio']:.2f}x | {goal} | {met} |")
        if name == "infer":
            out += [
                "",
                (
                    f"Model: {section['model']} ({section['model_state']}); top-1 agreement TilePredictor vs "
                    f"pipeline: {section['top1_agreement_package_vs_pipeline']:.3f}; goals judged on "
                    f"`{section['package_setting_for_goals']}`."
                ),
            ]
        out.append("")
    if "variants" in results:
        v = results["variants"]
        out += ["## variants: " + v["title"], ""]
        out += _rows_table(v["rows"], v["unit"])
        settings = results["package_settings"]
        for key in ("bf16_vs_fp32", "bf16_vs_fp32_trained"):
            if settings.get(key):
                a = settings[key]
                out.append(
                    f"\nbf16 weights vs fp32 ({key.replace('bf16_vs_fp32', '').strip('_') or 'random-init model'}): "
                    f"top-1 agreement {a['top1_agreement']:.3f}, max |Δprob| {a['max_abs_prob_diff']:.4f}"
                )
        out.append("")
    out.append(f"Total benchmark time: {results.get('elapsed_seconds')} s ({results.get('section_seconds')}).")
    return "\n".join(out) + "\n"


def write_results(results: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``benchmark.json`` and ``benchmark.md`` into ``output_dir`` (each atomically)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "benchmark.json", "markdown": out / "benchmark.md"}
    atomic_write_json(paths["json"], results, default=str)
    atomic_write_text(paths["markdown"], to_markdown(results))
    return paths
