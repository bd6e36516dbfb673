"""GPU benchmark (issue 25): training, data pipeline, prediction and tissue-map speed in one run of at most
8 minutes, everything in one JSON (and, through benchmarks/gpu.sh, one log).

    python benchmarks/gpu_prepare.py      # here: .gpu/ (a real dataset from ../shared + wheels)
    bash benchmarks/gpu.sh                # on the GPU machine: installs .gpu/wheels, runs this into $OUT
    bash benchmarks/gpu.sh --toy          # the same at toy sizes on a CPU (tests/test_gpu_bench.py)

What it runs, most important first (items that would not fit the --budget_s left are recorded as skipped):

1. the ceiling: a large bf16 matrix product (TFLOP/s), beside the GPU's datasheet peak;
2. ``finetune.py`` itself (in this process, ``main(argv)``) on the carried dataset (its train split repeated,
   so epochs are long enough) with a ViT-B/16-shaped model, random init, bf16, no evaluation or checkpoint
   during training: at 224 and 160 px, SDPA and eager attention, two batch sizes, the augmentation on the
   GPU (the default there) and in the DataLoader workers, with and without torch.compile. Each run's
   ``train_speed`` (all_results.json): images/s over the steady steps, GPU-busy fraction, peak GPU memory;
   plus FLOPs per image (3 x the forward's matrix products) and MFU against the datasheet peak and the
   measured ceiling;
3. one cached batch: the first run's Trainer fed one batch already on the GPU, the rate with no data pipeline,
   and the pipelines' share of it (goal: at least 0.9);
4. ``accelerate launch --config_file accelerate_config.yaml --num_processes 1 scripts/finetune.py``;
5. ``predict.py`` tiles/s over PNG files, ``tissue_map.py`` windows/s on a synthetic pyramidal slide.

Writes ``<out>/gpu.json`` (atomically, after every item: a killed run keeps what it measured). No number in
it is a claim until someone ran it on a GPU and recorded machine, date and command in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import logging
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 - after the repo root is on sys.path

from benchmarks import gpu_items as items  # noqa: E402
from benchmarks.gpu_prepare import DATASET, DEFAULT_WORKDIR  # noqa: E402

logger = logging.getLogger("gpu_bench")
GOAL_PIPELINE_SHARE = 0.9  # data pipeline images/s over the cached batch's
GOAL_MFU = 0.5


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (its ``main(argv)`` runs the script in this process), registered in
    ``sys.modules`` before it runs: its argument dataclasses look their module up."""
    path = ROOT / "scripts" / f"{name}.py"
    module = sys.modules[f"gpu_bench_{name}"] = ModuleType(f"gpu_bench_{name}")
    module.__file__ = str(path)
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), module.__dict__)  # our own script
    return module


class Bench:
    """The results being gathered: runs items in order within the time budget and writes the JSON after each."""

    def __init__(self, out: Path, budget_s: float, results: dict[str, Any]) -> None:
        self.out, self.budget_s, self.results, self.start = out, budget_s, results, time.perf_counter()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def item(self, name: str, run: Callable[[], dict[str, Any]], need_s: float) -> dict[str, Any] | None:
        """``run()`` stored under ``items[name]`` with its seconds, or why it was not (time, error)."""
        if self.left() < need_s:
            entry: dict[str, Any] = {"skipped": f"time budget: {self.left():.0f} s left, about {need_s:.0f} s needed"}
            logger.warning("%s skipped: %s", name, entry["skipped"])
        else:
            logger.info("%s (%.0f s left)", name, self.left())
            mark = time.perf_counter()
            try:
                entry = run()
            except Exception as err:  # one failing item must not cost the others
                logger.exception("%s failed", name)
                entry = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            entry["item_seconds"] = round(time.perf_counter() - mark, 2)
            _free_memory()
        self.results["items"][name] = entry
        self.results["elapsed_seconds"] = round(time.perf_counter() - self.start, 1)
        from hf_tissue_vit.fileio import atomic_write_json

        atomic_write_json(self.out / "gpu.json", self.results, default=str)
        return None if "error" in entry or "skipped" in entry else entry


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()  # each compiled run starts fresh (and under the recompile limit)


def gpu_facts() -> dict[str, Any]:
    """torch's view of the GPU and nvidia-smi's line (name, driver, memory, clocks), when there is one."""
    if not torch.cuda.is_available():
        return {"cuda": False}
    props = torch.cuda.get_device_properties(0)
    facts = {"cuda": True, "name": props.name, "capability": f"{props.major}.{props.minor}",
             "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
             "cuda_version": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit"
    try:
        facts["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=20).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        facts["nvidia_smi"] = f"not available: {err}"
    return facts


def pipeline_shares(rows: dict[str, Any], cached: dict[str, Any]) -> dict[str, Any]:
    """Each pipeline run's images/s over the cached batch's (same model, size, batch and attention)."""
    base = cached.get("samples_per_second")
    out = {}
    for name, row in rows.items():
        rate = row.get("samples_per_second")
        if rate and base:
            out[name] = {"share_of_cached": rate / base, "goal": GOAL_PIPELINE_SHARE,
                         "met": rate / base >= GOAL_PIPELINE_SHARE, "gpu_busy_fraction": row.get("gpu_busy_fraction"),
                         "device_augmentation": row.get("device_augmentation")}  # fmt: skip
    return out


def measure(args: GpuBenchArguments, bench: Bench) -> None:
    shapes = items.TOY if args.toy else items.FULL
    if args.steps:
        shapes = dataclasses.replace(shapes, steps=args.steps)
    results = bench.results
    results["shapes"] = dataclasses.asdict(shapes)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    runs = args.workdir / "runs"
    ceiling = bench.item("ceiling", lambda: items.matmul_ceiling(
        device, 8192 if device.type == "cuda" else 256, torch.bfloat16 if device.type == "cuda" else torch.float32),
        need_s=10)  # fmt: skip
    gpu_name = results["gpu"].get("name")
    peaks = {"datasheet_bf16": items.datasheet_peak(gpu_name), "measured_matmul": (ceiling or {}).get("tflops")}
    results["peaks_tflops"] = {**peaks, "datasheet_device": gpu_name}
    dataset = bench.item("dataset", lambda: items.enlarge_dataset(args.workdir / DATASET, runs / "dataset",
                                                                  shapes.repeat_train, shapes.batches), need_s=30)
    if dataset is None:
        return

    def flags(name: str) -> list[str]:
        return items.finetune_flags(shapes, runs / "dataset", runs / name, runs / "decoded")

    rows: dict[str, Any] = {}

    def finetune(case: items.Case) -> dict[str, Any]:
        row = items.speed_row(items.run_finetune_script(flags(case.name) + case.flags(shapes)), peaks)
        rows[case.name] = row
        return {**dataclasses.asdict(case), **row}

    cases = items.grid(shapes)
    main_case, compiled = cases[0], [c for c in cases if c.compile]
    for case in cases[:2]:
        bench.item(f"finetune/{case.name}", lambda c=case: finetune(c), need_s=40)
    cached = bench.item("cached_batch", lambda: items.cached_batch_run(flags("cached") + main_case.flags(shapes)),
                        need_s=40)  # fmt: skip
    for case in [c for c in cases[2:] if not c.compile]:
        bench.item(f"finetune/{case.name}", lambda c=case: finetune(c), need_s=40)
    if cached:
        same = {n: r for n, r in rows.items() if n.startswith(f"{main_case.size}px_b{main_case.batch}_sdpa")}
        results["data_pipeline_vs_cached_batch"] = pipeline_shares(same, cached)
    launch = flags("accelerate") + main_case.flags(shapes)
    bench.item("accelerate_launch", lambda: items.accelerate_launch(launch, timeout=max(bench.left(), 30)), need_s=60)
    model = runs / main_case.name
    bench.item("predict", lambda: predict(args.workdir, runs, model, shapes.predict_tiles), need_s=30)
    bench.item("tissue_map", lambda: tissue_map(args.workdir, runs, model, shapes.slide_px), need_s=40)
    for case in compiled:
        bench.item(f"finetune/{case.name}", lambda c=case: finetune(c), need_s=90)


def predict(workdir: Path, runs: Path, model: Path, count: int) -> dict[str, Any]:
    """predict.py over ``count`` PNG tiles, twice (the second run is the figure: caches warm)."""
    folder = runs / "predict_tiles"
    items.write_tile_files(workdir / DATASET, folder, count)
    argv = ["--model", str(model), "--inputs", str(folder), "--output", str(runs / "predictions.csv"),
            "--batch_size", "256"]  # fmt: skip
    seconds = [items.timed_script("predict", argv) for _ in range(2)]
    return {"tiles": count, "seconds": seconds, "tiles_per_second": count / seconds[-1],
            "note": "end to end: model load, file decoding, processor, forward, CSV"}


def tissue_map(workdir: Path, runs: Path, model: Path, size: int) -> dict[str, Any]:
    """tissue_map.py on a synthetic pyramidal slide of the dataset's tiles (``size`` px square, 0.495 µm/px)."""
    import json

    slide = items.write_slide(workdir / DATASET, runs / "slide.tiff", size, mpp=0.495)
    out = runs / "tissue_map"
    seconds = items.timed_script("tissue_map", ["--model", str(model), "--image", str(slide), "--output_dir",
                                                str(out), "--overwrite", "true", "--mpp", "0.495"])  # fmt: skip
    fractions = json.loads((out / "class_fractions.json").read_text(encoding="utf-8"))
    keys = ("windows", "tissue_windows", "seconds", "windows_per_s")
    return {"slide_px": size, "script_seconds": seconds, **{k: fractions.get(k) for k in keys}}


def print_table(results: dict[str, Any]) -> None:
    """The short table the device tool's reply shows (the end of the output)."""
    print("\nrun | images/s | GPU busy | peak GiB | MFU (datasheet) | MFU (measured)")
    for name, entry in results["items"].items():
        if name.startswith("finetune/") or name == "cached_batch":
            values = [entry.get(k) for k in ("samples_per_second", "gpu_busy_fraction", "peak_gpu_memory_gib",
                                             "mfu_vs_datasheet_bf16", "mfu_vs_measured_matmul")]  # fmt: skip
            shown = " | ".join("-" if v is None else f"{v:.3g}" for v in values)
            print(f"{name} | {entry.get('error') or entry.get('skipped') or shown}")
    for name in ("accelerate_launch", "predict", "tissue_map"):
        entry = results["items"].get(name, {})
        print(name, {k: entry.get(k) for k in ("returncode", "tiles_per_second", "windows_per_s", "error", "skipped")
                     if k in entry})  # fmt: skip


@dataclasses.dataclass
class GpuBenchArguments:
    workdir: str = dataclasses.field(default=str(DEFAULT_WORKDIR), metadata={"help": "Folder of gpu_prepare.py."})
    out: str | None = dataclasses.field(default=None, metadata={"help": "gpu.json's folder (default $OUT)."})
    budget_s: float = dataclasses.field(default=420.0, metadata={"help": "Seconds for the measurements."})
    toy: bool = dataclasses.field(default=False, metadata={"help": "Tiny model and sizes on the CPU (tests)."})
    steps: int | None = dataclasses.field(default=None, metadata={"help": "Optimizer steps per finetune.py run."})


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(GpuBenchArguments).parse_args_into_dataclasses(args=argv)
    args.workdir = Path(args.workdir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out = Path(args.out or os.environ.get("OUT") or "outputs/gpu")
    out.mkdir(parents=True, exist_ok=True)
    if not (args.workdir / DATASET / "dataset_dict.json").is_file():
        print(f"error: --workdir {args.workdir}: no dataset in {DATASET}; run python benchmarks/gpu_prepare.py first",
              file=sys.stderr)
        return 2
    from hf_tissue_vit.hardware import machine_info

    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "gpu": gpu_facts(), "toy": args.toy, "budget_s": args.budget_s,
        "goals": {"mfu": GOAL_MFU, "pipeline_share_of_cached": GOAL_PIPELINE_SHARE}, "items": {},
    }  # fmt: skip
    bench = Bench(out, args.budget_s, results)
    measure(args, bench)
    print_table(results)
    failed = [name for name, entry in results["items"].items() if "error" in entry]
    print(f"\n{out / 'gpu.json'}: {len(results['items'])} items, failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
