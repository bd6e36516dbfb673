"""Cohort benchmark: ``scripts/tissue_map.py`` and ``scripts/predict.py`` with 1 process and under
``accelerate launch --num_processes N`` (CPU processes), whole commands timed.

    PYTHONPATH=. python benchmarks/cohort_bench.py [--slides 4] [--size 3072] [--processes 1 2] [--repeats 1] \
        [--one_thread]

Builds ``--slides`` synthetic 20x slides (0.5 µm/px, all tissue, tiles from slide_bench.tissue_image)
and a model of the scratch_cpu recipe's shape (random weights, config.mpp 0.495, saved like a
training run), and the slides' windows as 150 px PNG tiles for predict.py. Each configuration runs
the real command line (``python scripts/...`` for 1 process, ``accelerate launch --num_processes N
... --device cpu`` for N), runs taking turns ``--repeats`` times; the best wall time of each is kept.
Reported: tissue windows/s and slides/hour over the whole command (start-up and model loading
included, as a user waits for them), and predict.py's tiles/s. Under a launch, Accelerate gives each
CPU process cores / processes torch threads; ``--one_thread`` adds a one-process run with
``--num_threads 1`` to tell the threads' effect from the processes'. Prints one JSON object with the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from slide_bench import scratch_model, tissue_image  # noqa: E402  (after the path set-up above)
from slide_helpers import save_model, write_pyramid  # noqa: E402

from hf_tissue_vit.hardware import machine_info  # noqa: E402


def command(script: str, processes: int, args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, f"scripts/{script}.py", *args, "--device", "cpu"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
            "--num_processes", str(processes), "--main_process_port", str(port), f"scripts/{script}.py", *args,
            "--device", "cpu"]


def timed_run(cmd: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall


def write_tiles(image: np.ndarray, folder: Path, count: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for y in range(0, image.shape[0] - 150, 150):
        for x in range(0, image.shape[1] - 150, 150):
            if n == count:
                return n
            Image.fromarray(image[y:y + 150, x:x + 150]).save(folder / f"tile_{n:05d}.png")
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size", type=int, default=3072, help="Slide side in level-0 px (0.5 µm/px).")
    parser.add_argument("--tiles", type=int, default=1024, help="PNG tiles for predict.py.")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--one_thread", action="store_true", help="Also 1 process with --num_threads 1.")
    args = parser.parse_args()
    configs = [(n, None) for n in args.processes] + ([(1, 1)] if args.one_thread else [])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, processor = scratch_model()
        model_dir = save_model(model, processor, tmp / "model")
        (tmp / "slides").mkdir()
        for i in range(args.slides):
            write_pyramid(tmp / "slides" / f"slide_{i}.tif", tissue_image(args.size, seed=i), 0.5)
        side = 150 * (int(np.ceil(np.sqrt(args.tiles))) + 1)
        n_tiles = write_tiles(tissue_image(side, seed=99), tmp / "tiles", args.tiles)
        best: dict[str, float] = {}
        windows = 0
        for _ in range(args.repeats):
            for n, threads in configs:
                key = f"{n}_process" + (f"_{threads}_thread" if threads else "")
                extra = ["--num_threads", str(threads)] if threads else []
                out = tmp / f"maps_{key}"
                map_args = ["--model", str(model_dir), "--image", str(tmp / "slides"), "--output_dir", str(out),
                            "--batch_size", str(args.batch_size), "--overwrite", *extra]
                wall = timed_run(command("tissue_map", n, map_args))
                best[f"tissue_map_{key}"] = min(wall, best.get(f"tissue_map_{key}", float("inf")))
                with open(out / "summary.csv", newline="") as handle:
                    windows = sum(int(row["tissue_windows"]) for row in csv.DictReader(handle))
                pred_args = ["--model", str(model_dir), "--inputs", str(tmp / "tiles"), "--output",
                             str(tmp / f"pred_{key}.csv"), "--batch_size", str(args.batch_size), "--no_progress",
                             *extra]
                wall = timed_run(command("predict", n, pred_args))
                best[f"predict_{key}"] = min(wall, best.get(f"predict_{key}", float("inf")))
    result: dict[str, object] = {"slides": args.slides, "slide_px": args.size, "tissue_windows": windows,
                                 "tiles": n_tiles, "batch_size": args.batch_size, "repeats": args.repeats}
    for n, threads in configs:
        key = f"{n}_process" + (f"_{threads}_thread" if threads else "")
        wall = best[f"tissue_map_{key}"]
        result[key] = {
            "tissue_map_s": round(wall, 1), "tissue_map_windows_per_s": round(windows / wall, 1),
            "slides_per_hour": round(3600 * args.slides / wall, 1),
            "predict_s": round(best[f"predict_{key}"], 1),
            "predict_tiles_per_s": round(n_tiles / best[f"predict_{key}"], 1)}
    result["machine"] = machine_info()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
