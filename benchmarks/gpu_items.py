"""The measurements of the GPU benchmark (:mod:`benchmarks.gpu`), each a function of the run's settings that
returns a JSON-ready dict: the matrix-product ceiling, ``finetune.py`` runs, one cached batch through the same
Trainer, ``predict.py``, ``tissue_map.py`` and ``accelerate launch``."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's datasheets, by a substring of the device name. MFU is
# also given against the matrix-product rate the run measures itself.
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0,
                         "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.05, "L4": 121.0}  # fmt: skip


def datasheet_peak(device_name: str | None) -> float | None:
    """The datasheet's dense bf16 TFLOP/s of the GPU called ``device_name`` (None when unknown)."""
    for key, value in DATASHEET_BF16_TFLOPS.items():
        if device_name and key in device_name:
            return value
    return None


def vit_forward_flops(image_size: int, patch_size: int, hidden: int, layers: int, intermediate: int,
                      num_labels: int) -> int:
    """Floating-point operations (2 per multiply-add) of one image through a ViT classifier: the matrix
    products of patch embedding, attention (q, k, v, scores, weighted sum, output) and MLP per layer, and the
    head. Norms, softmax and activations are left out, as MFU conventionally does."""
    patches = (image_size // patch_size) ** 2
    tokens = patches + 1
    embed = 2 * patches * 3 * patch_size**2 * hidden
    attention = 2 * tokens * hidden * 3 * hidden + 2 * 2 * tokens**2 * hidden + 2 * tokens * hidden * hidden
    mlp = 2 * 2 * tokens * hidden * intermediate
    return embed + layers * (attention + mlp) + 2 * hidden * num_labels


def train_flops_per_image(config: Any) -> int:
    """3 x the forward FLOPs (the backward pass costs two forwards) of a ``ViTConfig`` with labels."""
    return 3 * vit_forward_flops(config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers,
                                 config.intermediate_size, config.num_labels)  # fmt: skip


def matmul_ceiling(device: torch.device, size: int, dtype: torch.dtype, repeats: int = 10) -> dict[str, Any]:
    """TFLOP/s of a ``size``-cubed matrix product on random data (the method notes' ceiling), median of repeats."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * size**3 / seconds / 1e12,
            "repeats": repeats}


@dataclass
class Shapes:
    """Model shape, sizes and lengths of a GPU run (:data:`FULL`) or a CPU toy run (:data:`TOY`)."""

    model: list[str]  # finetune.py flags of the model (random init)
    sizes: tuple[int, int]  # resolutions: the main one and the second
    batches: tuple[int, int]  # batch sizes: the main one and the second
    steps: int  # optimizer steps per finetune.py run
    repeat_train: int  # the train split repeated this many times (longer epochs than the carried tiles give)
    predict_tiles: int
    slide_px: int
    extra: tuple[str, ...] = ()  # flags added to every run (toy: the CPU)
    compile_backend: str = "inductor"


FULL = Shapes(model=["--model_preset", "base", "--patch_size", "16"], sizes=(224, 160), batches=(256, 128),
              steps=40, repeat_train=8, predict_tiles=4096, slide_px=8192)  # fmt: skip
TOY = Shapes(model=["--model_preset", "tiny", "--patch_size", "8", "--hidden_size", "32", "--num_hidden_layers", "2",
                    "--num_attention_heads", "2", "--intermediate_size", "64"],
             sizes=(32, 24), batches=(8, 4), steps=6, repeat_train=2, predict_tiles=24, slide_px=640,
             extra=("--use_cpu", "true"), compile_backend="eager")  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One finetune.py run of the grid."""

    name: str
    size: int
    batch: int
    attn: str = "sdpa"
    compile: bool = False
    device_augmentation: bool | None = None  # None: finetune.py's default for the device

    def flags(self, shapes: Shapes) -> list[str]:
        flags = ["--image_size", str(self.size), "--per_device_train_batch_size", str(self.batch),
                 "--attn_implementation", self.attn]  # fmt: skip
        if self.compile:
            flags += ["--torch_compile", "true", "--torch_compile_backend", shapes.compile_backend]
        if self.device_augmentation is not None:
            flags += ["--device_augmentation", str(self.device_augmentation).lower()]
        return flags


def grid(shapes: Shapes) -> list[Case]:
    """The runs, most important first (a run short of time drops the last): both resolutions with SDPA, eager
    attention, the second batch size, the collator's augmentation instead of the device's, torch.compile."""
    (s0, s1), (b0, b1) = shapes.sizes, shapes.batches
    return [
        Case(f"{s0}px_b{b0}_sdpa", s0, b0),
        Case(f"{s1}px_b{b0}_sdpa", s1, b0),
        Case(f"{s0}px_b{b0}_eager", s0, b0, attn="eager"),
        Case(f"{s0}px_b{b1}_sdpa", s0, b1),
        Case(f"{s0}px_b{b0}_sdpa_collator_augmentation", s0, b0, device_augmentation=False),
        Case(f"{s0}px_b{b0}_sdpa_compile", s0, b0, compile=True),
        Case(f"{s1}px_b{b0}_eager", s1, b0, attn="eager"),
        Case(f"{s1}px_b{b1}_sdpa", s1, b1),
        Case(f"{s1}px_b{b0}_sdpa_compile", s1, b0, compile=True),
    ]


def finetune_flags(shapes: Shapes, dataset: Path, output: Path, cache: Path) -> list[str]:
    """The flags every finetune.py run of the benchmark shares: a random-init model of ``shapes``, bf16 where the
    hardware has it, no evaluation or checkpoints during the timed steps."""
    return ["--from_scratch", *shapes.model, "--dataset_dir", str(dataset), "--output_dir", str(output),
            "--overwrite_output_dir", "true", "--max_steps", str(shapes.steps), "--eval_strategy", "no",
            "--save_strategy", "no", "--load_best_model_at_end", "false", "--logging_strategy", "no",
            "--report_to", "none", "--n_bootstrap", "0", "--disable_tqdm", "true",
            "--decode_cache_dir", str(cache), "--per_device_eval_batch_size", "256", "--seed", "0",
            *shapes.extra]  # fmt: skip


def enlarge_dataset(source: Path, target: Path, times: int, batches: tuple[int, ...]) -> dict[str, Any]:
    """``source`` with its train split repeated about ``times`` times, to a whole number of every batch size (full
    batches only: one shape for torch.compile), saved to ``target``: the real tiles again, so epochs are long
    enough for a steady window at GPU batch sizes. Its metadata file is copied."""
    import datasets

    from hf_tissue_vit.data import METADATA_FILE

    if not (target / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(source))
        n, whole = len(loaded["train"]), math.lcm(*batches)
        loaded["train"] = loaded["train"].select([i % n for i in range(math.ceil(n * times / whole) * whole)])
        shutil.rmtree(target, ignore_errors=True)
        loaded.save_to_disk(str(target))
        if (source / METADATA_FILE).is_file():
            shutil.copyfile(source / METADATA_FILE, target / METADATA_FILE)
    loaded = datasets.load_from_disk(str(target))
    return {"folder": str(target), "source": str(source), "train_repeated": times,
            "splits": {name: len(split) for name, split in loaded.items()}}


def speed_row(results: dict[str, Any], peaks: dict[str, float | None]) -> dict[str, Any]:
    """A run's ``train_speed`` with its FLOPs per image and MFU against each peak in ``peaks`` (TFLOP/s)."""
    from transformers import ViTConfig

    model = results["model"]
    config = ViTConfig(**{k: model[k] for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                                "num_attention_heads", "intermediate_size")},
                       num_labels=len(results["label_names"]))  # fmt: skip
    speed = dict(results.get("train_speed") or {})
    flops = train_flops_per_image(config)
    hardware = results["hardware"]
    row = {**speed, "train_flops_per_image": flops, "attn_implementation": model["attn_implementation"],
           "device_augmentation": results["hyperparameters"].get("device_augmentation"),
           "mixed_precision": hardware["mixed_precision"], "device": hardware["device"]}  # fmt: skip
    rate = speed.get("samples_per_second")
    row["achieved_tflops"] = rate * flops / 1e12 if rate else None
    for name, peak in peaks.items():
        row[f"mfu_vs_{name}"] = row["achieved_tflops"] / peak if rate and peak else None
    return row


def run_finetune_script(argv: list[str]) -> dict[str, Any]:
    """``scripts/finetune.py``'s ``main(argv)`` in this process; its all_results.json."""
    from benchmarks.gpu import load_script  # the one script loader of the benchmark

    code = load_script("finetune").main(argv)
    output = Path(argv[argv.index("--output_dir") + 1])
    if code:
        raise RuntimeError(f"finetune.py exited with status {code}")
    return json.loads((output / "all_results.json").read_text(encoding="utf-8"))


def cached_batch_run(argv: list[str]) -> dict[str, Any]:
    """The Trainer of ``finetune.py argv`` (same model, arguments and callbacks) fed one batch of
    ``pixel_values`` already on the device, every step: the rate without any data pipeline."""
    from hf_tissue_vit.training import parse_args
    from hf_tissue_vit.training.run import build_model_and_processor, build_trainer, load_training_data, validate_run
    from hf_tissue_vit.training.speed import SpeedCallback

    model_args, data_args, training_args = parse_args([*argv, "--dataloader_num_workers", "0",
                                                       "--dataloader_pin_memory", "false"])  # fmt: skip
    plan = validate_run(model_args, data_args, training_args)
    data = load_training_data(plan, data_args, training_args)
    model, processor = build_model_and_processor(plan, data, model_args, training_args.seed)
    trainer = build_trainer(model, processor, data, data_args, training_args)
    first = [data.tiles["train"][i] for i in range(training_args.per_device_train_batch_size)]  # uint8 by index
    pixels = torch.stack([torch.as_tensor(item["pixels"]) for item in first])
    batch = {"pixel_values": trainer.data_collator.train_transform(pixels, generator=torch.Generator().manual_seed(0)),
             "labels": torch.tensor([item["labels"] for item in first])}  # fmt: skip
    batch = {key: value.to(training_args.device) for key, value in batch.items()}
    trainer.data_collator = lambda items: batch
    trainer.train()
    speed = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SpeedCallback))
    return speed.summary()


def timed_script(name: str, argv: list[str]) -> float:
    """Seconds of ``scripts/<name>.py``'s ``main(argv)`` in this process (RuntimeError when it fails)."""
    from benchmarks.gpu import load_script

    start = time.perf_counter()
    code = load_script(name).main(argv)
    if code:
        raise RuntimeError(f"{name}.py exited with status {code}")
    return time.perf_counter() - start


def write_tile_files(dataset: Path, folder: Path, count: int) -> int:
    """``count`` PNG files (the dataset's test tiles, repeated) in ``folder``: what predict.py reads."""
    import datasets

    split = datasets.load_from_disk(str(dataset))["test"].cast_column("image", datasets.Image(decode=False))
    folder.mkdir(parents=True, exist_ok=True)
    raw = [row["image"]["bytes"] for row in split]
    for i in range(count):
        (folder / f"tile_{i:05d}.png").write_bytes(raw[i % len(raw)])
    return count


def write_slide(dataset: Path, path: Path, size: int, mpp: float) -> Path:
    """A square pyramidal TIFF (deflate, so no image codec package is needed) of the dataset's tiles in a grid."""
    import datasets
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))  # the pyramid writer shared with the tests and slide_bench.py
    from slide_helpers import write_pyramid

    split = datasets.load_from_disk(str(dataset))["test"]
    tiles = [np.asarray(Image.open(io_bytes(row)).convert("RGB")) for row in
             split.cast_column("image", datasets.Image(decode=False))]  # fmt: skip
    step = tiles[0].shape[0]
    image = np.zeros((size, size, 3), np.uint8)
    for k, (y, x) in enumerate((y, x) for y in range(0, size, step) for x in range(0, size, step)):
        part = image[y:y + step, x:x + step]
        part[...] = tiles[k % len(tiles)][:part.shape[0], :part.shape[1]]
    return write_pyramid(path, image, mpp, codec="zlib")


def io_bytes(row: dict[str, Any]) -> Any:
    import io

    return io.BytesIO(row["image"]["bytes"])


def accelerate_launch(flags: list[str], timeout: float) -> dict[str, Any]:
    """``accelerate launch --config_file accelerate_config.yaml --num_processes 1 scripts/finetune.py FLAGS`` as
    a user runs it (a subprocess); its exit status, seconds and all_results.json's speed and process count."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_config.yaml"), "--num_processes", "1", str(ROOT / "scripts" / "finetune.py"),
               *flags]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    out: dict[str, Any] = {"command": "accelerate launch --config_file accelerate_config.yaml --num_processes 1 "
                                      "scripts/finetune.py ...", "returncode": done.returncode,
                           "seconds": time.perf_counter() - start}  # fmt: skip
    results = Path(flags[flags.index("--output_dir") + 1]) / "all_results.json"
    if done.returncode == 0 and results.is_file():
        data = json.loads(results.read_text(encoding="utf-8"))
        out.update(train_speed=data.get("train_speed"), num_processes=data["hardware"]["num_processes"],
                   device=data["hardware"]["device"], gpu=data["hardware"].get("gpu"))
    else:
        out["output_tail"] = (done.stdout + done.stderr)[-3000:]
    return out
