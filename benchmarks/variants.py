"""The ``variants`` table: what was measured to pick the package's speed settings for the other
sections (eager vs SDPA attention, bf16 autocast vs fp32, bf16 weights, ``inference_mode`` vs
``no_grad``, ``torch.compile``, DataLoader workers), on the small model, and whether bf16
predictions agree with fp32 (through :class:`~hf_tissue_vit.predict.TilePredictor`, as
``predict.py`` runs them)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Any

import torch

from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.hardware import (
    auto_num_workers,
    cpu_supports_bf16,
    default_attn_implementation,
)
from hf_tissue_vit.predict import TilePredictor

from .config import BenchmarkConfig
from .data_bench import PackagePipeline, iterate_batches, make_loader
from .models import make_model
from .timing import row, time_repeats

logger = logging.getLogger(__name__)
_ATTNS = ("eager", "sdpa")


def _autocast(bf16: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def forward_rates(
    model: Any, pixel_values: torch.Tensor, repeats: int, *, bf16: bool = False, grad_mode: str = "inference_mode"
) -> list[float]:
    """images/s of the inference forward (bf16 autocast optional; ``inference_mode`` or ``no_grad``)."""
    ctx = torch.inference_mode if grad_mode == "inference_mode" else torch.no_grad

    def run() -> int:
        with ctx(), _autocast(bf16):
            model(pixel_values=pixel_values)
        return pixel_values.shape[0]

    return time_repeats(run, repeats)


def train_step_rates(
    model: Any, pixel_values: torch.Tensor, labels: torch.Tensor, repeats: int, bf16: bool
) -> list[float]:
    """images/s of forward + backward + AdamW steps on one fixed batch."""
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


def agreement(model: Any, processor: Any, tiles: torch.Tensor, batch: int) -> dict[str, float]:
    """Top-1 agreement and largest probability difference of TilePredictor in bf16 (a bf16 copy of
    the weights) vs in fp32, on uint8 ``tiles``."""
    probs = [
        TilePredictor(model, processor, device="cpu", batch_size=batch, bf16=bf16, num_workers=0).predict_tiles(tiles)
        for bf16 in (False, True)
    ]
    fp32, bf16 = probs
    return {
        "top1_agreement": float((fp32.argmax(-1) == bf16.argmax(-1)).float().mean()),
        "max_abs_prob_diff": float((fp32 - bf16).abs().max()),
    }


def _train_variants(config: BenchmarkConfig) -> dict[str, dict[str, Any]]:
    """Training step of the small model: attention x precision."""
    spec, batch = config.small_model, config.batch_size
    g = torch.Generator().manual_seed(config.seed)
    pixels = torch.randn(batch, 3, spec["image_size"], spec["image_size"], generator=g)
    labels = torch.randint(0, len(CLASS_NAMES), (batch,), generator=g)
    rows = {}
    for attn in _ATTNS:
        for bf16 in (False, True):
            precision = "bf16" if bf16 else "fp32"
            rates = train_step_rates(make_model(spec, config.seed, attn), pixels, labels, config.repeats, bf16)
            label = f"train step, {attn} attention, {'bf16 autocast' if bf16 else 'fp32'}"
            rows[f"train_{attn}_{precision}"] = row(label, rates, unit="images/s")
    return rows


def _infer_variants(config: BenchmarkConfig, pixels: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Inference forward at the inference batch size: kernel, precision, grad mode, compile."""
    spec, seed, repeats = config.small_model, config.seed, config.repeats
    models = {attn: make_model(spec, seed, attn).eval() for attn in _ATTNS}
    rows = {}
    for attn, model in models.items():
        rows[f"infer_{attn}_fp32"] = row(f"inference forward, {attn}, fp32, inference_mode",
                                         forward_rates(model, pixels, repeats), unit="images/s")
    rows["infer_sdpa_fp32_no_grad"] = row("inference forward, sdpa, fp32, no_grad",
                                          forward_rates(models["sdpa"], pixels, repeats, grad_mode="no_grad"),
                                          unit="images/s")
    for attn in ("sdpa", "eager"):
        rows[f"infer_{attn}_bf16"] = row(f"inference forward, {attn}, bf16 autocast, inference_mode",
                                         forward_rates(models[attn], pixels, repeats, bf16=True), unit="images/s")
    for attn in _ATTNS:
        weights = make_model(spec, seed, attn).eval().to(torch.bfloat16)
        rows[f"infer_{attn}_bf16_weights"] = row(
            f"inference forward, {attn}, bf16 weights (TilePredictor's bf16), inference_mode",
            forward_rates(weights, pixels.bfloat16(), repeats), unit="images/s",
        )
    if config.measure_compile:
        rows.update(compile_variant(models["sdpa"], pixels, repeats))
    return rows


def _worker_variants(config: BenchmarkConfig, package: PackagePipeline) -> dict[str, dict[str, Any]]:
    """The package's data pipeline with 0, 1 (and 2 where there are the cores) DataLoader workers."""
    rows = {}
    for workers in sorted({0, 1, min(2, max(0, (os.cpu_count() or 1) - 1))}):
        loader = make_loader(package.dataset, package.collator, config.batch_size, workers, config.seed)
        rates = time_repeats(functools.partial(iterate_batches, loader, config.data_batches), config.repeats)
        rows[f"data_workers_{workers}"] = row(f"package data pipeline, dataloader_num_workers={workers}", rates,
                                              unit="images/s")
        del loader  # stops its worker processes before the next measurement
    return rows


def compile_variant(model: Any, pixel_values: torch.Tensor, repeats: int) -> dict[str, dict[str, Any]]:
    """torch.compile of the inference forward: compile time and steady speed (measured once)."""
    key = "infer_sdpa_fp32_compiled"
    try:
        compiled = torch.compile(model)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(pixel_values=pixel_values)
        compile_s = time.perf_counter() - start
        return {key: row("inference forward, sdpa, fp32, torch.compile (after compiling)",
                         forward_rates(compiled, pixel_values, repeats), unit="images/s",
                         compile_seconds=round(compile_s, 1))}
    except Exception as err:
        logger.warning("torch.compile variant failed: %s", err)
        failed = f"torch.compile failed: {type(err).__name__}: {err}"[:300]
        return {key: {"label": failed, "median": None, "min": None, "max": None, "repeats": 0}}


def choose_settings(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The package's speed settings picked from the variants: bf16 where it is native and faster, the
    faster attention at that precision, the faster worker count for the data section."""

    medians = {key: r["median"] for key, r in rows.items()}

    def fastest(keys: list[str]) -> str:
        return max(keys, key=medians.__getitem__)

    best_attn = fastest([k for k in rows if k.startswith("train_")]).split("_")[1]
    train_bf16 = cpu_supports_bf16() and medians[f"train_{best_attn}_bf16"] > medians[f"train_{best_attn}_fp32"]
    precision = "bf16" if train_bf16 else "fp32"
    attn = fastest([f"train_{a}_{precision}" for a in _ATTNS]).split("_")[1]
    workers = int(fastest([k for k in rows if k.startswith("data_workers_")]).rsplit("_", 1)[1])
    return {
        "attn_implementation": attn,
        "train_bf16": bool(train_bf16),
        "dataloader_num_workers": workers,
        "train_dataloader_num_workers": auto_num_workers(),
        "cpu_supports_bf16": cpu_supports_bf16(),
    }


def default_settings() -> dict[str, Any]:
    """Package speed settings when the variants are not measured: the library's hardware defaults."""
    bf16 = cpu_supports_bf16()
    return {
        "attn_implementation": default_attn_implementation("cpu", bf16),
        "train_bf16": bf16,
        "dataloader_num_workers": 0,
        "train_dataloader_num_workers": auto_num_workers(),
        "cpu_supports_bf16": bf16,
        "bf16_vs_fp32": None,
    }


def bench_variants(
    config: BenchmarkConfig, package: PackagePipeline, processor: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure the candidate speed settings; returns the table and the settings chosen from it."""
    pixels = package.collator.eval_transform(package.dataset.pixels[: config.infer_batch_size])
    rows = {**_train_variants(config), **_infer_variants(config, pixels), **_worker_variants(config, package)}
    settings = choose_settings(rows)
    # Only a check here (a random-init model has near-tied logits); the trained model's agreement is
    # added by run_benchmark after the train section.
    tiles = package.dataset.pixels[: config.infer_tiles]
    settings["bf16_vs_fp32"] = agreement(make_model(config.small_model, config.seed), processor, tiles,
                                         config.infer_batch_size)
    table = {
        "title": "Speed-setting variants (small model; picked by measurement for the package runs)",
        "unit": "images/s",
        "batch_size": config.batch_size,
        "infer_batch_size": config.infer_batch_size,
        "rows": rows,
        "chosen": settings,
    }
    return table, settings
