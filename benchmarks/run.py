"""The driver: prepare the tiles once, measure the variants (which pick the package's speed
settings), then the ``data``, ``train`` and ``infer`` sections, and return one JSON-ready dict."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_tissue_vit.hardware import default_attn_implementation, machine_info
from hf_tissue_vit.transforms import make_image_processor

from .config import BenchmarkConfig
from .data_bench import PackagePipeline, bench_data, package_pipeline
from .example_pipeline import load_example_dataset
from .infer_bench import bench_infer
from .models import make_model
from .sources import BenchData, prepare_data
from .timing import Stopwatch, torch_threads
from .train_bench import bench_train, train_cases
from .variants import agreement, bench_variants, default_settings

logger = logging.getLogger(__name__)


@dataclass
class _Run:
    """What the sections share: the tiles, a processor per model, the package pipelines, the settings."""

    config: BenchmarkConfig
    workdir: Path
    bench: BenchData
    processors: dict[str, Any]
    packages: dict[str, PackagePipeline]
    settings: dict[str, Any] = field(default_factory=default_settings)

    def package(self, name: str) -> PackagePipeline:
        """The package pipeline at model ``name``'s resolution (built on first use)."""
        if name not in self.packages:
            config = self.config
            self.packages[name] = package_pipeline(self.bench, self.processors[name], config.augmentation, config.seed)
        return self.packages[name]

    def baseline(self, name: str) -> Any:
        """The example pipeline's dataset at model ``name``'s resolution."""
        return load_example_dataset(self.bench.folder, self.processors[name], self.workdir / "hf_cache")

    def tiles(self) -> Any:
        """The uint8 tiles the bf16-vs-fp32 agreement is checked on."""
        return self.package("small").dataset.pixels[: self.config.infer_tiles]


def _prepare(config: BenchmarkConfig, workdir: Path) -> _Run:
    bench = prepare_data(config, workdir)
    specs = {"small": config.small_model, "base": config.base_model}
    processors = {name: make_image_processor(spec["image_size"]) for name, spec in specs.items()}
    run = _Run(config, workdir, bench, processors, {})
    run.package("small")
    return run


def _train(run: _Run) -> tuple[dict[str, Any], Any]:
    """The train section; returns it and a clean copy of the package-trained small model (or None)."""
    names = [case.name for case in train_cases(run.config)]
    packages = {name: run.package(name) for name in names}
    baselines = {name: run.baseline(name) for name in names}
    section, trained = bench_train(run.config, packages, baselines, run.settings, run.workdir)
    if trained is None:
        return section, None
    # A clean copy: accelerate wraps the trained model's forward in its mixed-precision autocast.
    clean = make_model(run.config.small_model, run.config.seed)
    clean.load_state_dict(trained.state_dict())
    if run.config.variants:  # bf16 agreement on a (briefly) trained model
        run.settings["bf16_vs_fp32_trained"] = agreement(
            clean, run.processors["small"], run.tiles(), run.config.infer_batch_size
        )
    return section, clean


def _infer_uses_bf16(settings: dict[str, Any], variant_rows: dict[str, Any]) -> bool:
    """Time the bf16 predictor too where the CPU has native bf16, TilePredictor's bf16 pair of kernel and
    weights was faster than its fp32 pair in the variants, and bf16 agrees with fp32."""
    if not variant_rows or not settings["cpu_supports_bf16"]:
        return False
    # TilePredictor's auto attention: SDPA in fp32, eager under bf16 on CPUs without AMX (hardware.py).
    bf16_key = f"infer_{default_attn_implementation('cpu', True, training=False)}_bf16_weights"
    fp32_key = f"infer_{default_attn_implementation('cpu', False, training=False)}_fp32"
    check = settings.get("bf16_vs_fp32_trained") or settings.get("bf16_vs_fp32")
    faster = variant_rows[bf16_key]["median"] > variant_rows[fp32_key]["median"]
    return bool(faster and check and check["top1_agreement"] >= 0.99)


def _infer(run: _Run, trained: Any, variant_rows: dict[str, Any]) -> dict[str, Any]:
    config = run.config
    model = trained if trained is not None else make_model(config.small_model, config.seed)
    steps = config.warmup_steps + config.repeats * config.train_steps
    state = f"trained {steps} steps by the package train run" if trained is not None else "random init"
    use_bf16 = run.settings["infer_bf16"] = _infer_uses_bf16(run.settings, variant_rows)
    return bench_infer(config, run.bench, model, run.processors["small"], run.workdir, state, use_bf16)


def _measure(config: BenchmarkConfig, command: str, workdir: Path) -> dict[str, Any]:
    watch = Stopwatch()
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(),
        "settings": config.to_dict(),
        "sections": {},
    }
    run = _prepare(config, workdir)
    results["data_source"] = run.bench.source
    watch.seconds["prepare"] = watch.elapsed()
    if config.variants:
        logger.info("measuring speed-setting variants")
        with watch.step("variants"):
            results["variants"], run.settings = bench_variants(config, run.package("small"), run.processors["small"])
    results["package_settings"] = run.settings
    sections, trained = config.section_list(), None
    if "data" in sections:
        logger.info("data pipeline benchmark")
        with watch.step("data"):
            workers = run.settings["dataloader_num_workers"]
            results["sections"]["data"] = bench_data(config, run.package("small"), run.baseline("small"), workers)
    if "train" in sections:
        with watch.step("train"):
            results["sections"]["train"], trained = _train(run)
    if "infer" in sections:
        logger.info("inference benchmark")
        with watch.step("infer"):
            results["sections"]["infer"] = _infer(run, trained, results.get("variants", {}).get("rows", {}))
    results["section_seconds"] = watch.seconds
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["machine"]["load_average_end"] = [round(v, 2) for v in load] if load else None
    results["elapsed_seconds"] = watch.elapsed()
    return results


def run_benchmark(
    config: BenchmarkConfig, command: str = "", workdir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Run the configured sections at ``config.threads`` torch threads and return the results
    (JSON-ready dict); tiles, caches and the saved model go to ``workdir`` (default: a temp dir, removed)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_threads(config.threads))
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="hf_tissue_vit_bench_"))
        return _measure(config, command, Path(workdir))
