"""Memory and speed at the field's scale: an NCT-CRC-HE-100K-shaped set (see :mod:`benchmarks.nct_tiles`)
through prepare_dataset.py, finetune.py start-up (1 and 2 processes), predict.py and evaluate_model.py.

    nice -n 10 python -m benchmarks.nct_tiles --out /tmp/nct_bench/NCT-100K --num_tiles 100000
    nice -n 10 python -m benchmarks.scale_bench --tiles /tmp/nct_bench/NCT-100K --num_tiles 100000 \\
        --work /tmp/nct_bench/work --out benchmarks/scale_results.json

``--num_tiles`` below the set's size takes the first tiles of each class in the release's proportions
(symlinks in ``--work``). Every command runs as a user runs it, in a subprocess; a sampler reads
``/proc/<pid>/status`` of the command's process tree every 0.2 s and keeps, per process, the peak
anonymous RSS (``RssAnon``: the process's private memory; memory-mapped Arrow and decode-cache pages are
page cache, shared between processes) and the peak total RSS (``VmHWM``). Times are wall-clock seconds;
``cores_busy`` is the command's CPU seconds (user + system, all its processes) over its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .nct_tiles import class_counts

REPO_ROOT = Path(__file__).resolve().parents[1]
# A tiny scratch ViT: the benchmark measures data handling, not the network.
TINY = ["--from_scratch", "--model_preset", "tiny", "--image_size", "32", "--patch_size", "8", "--hidden_size", "32",
        "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "64",
        "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "256", "--n_bootstrap", "0",
        "--dataloader_num_workers", "0", "--report_to", "none", "--use_cpu", "true", "--eval_strategy", "no",
        "--save_strategy", "no"]


def subset(tiles: Path, work: Path, num_tiles: int) -> Path:
    """A folder of class folders with the first ``class_counts(num_tiles)`` tiles of each class (symlinks)."""
    root = work / f"tiles_{num_tiles}"
    for name, count in class_counts(num_tiles).items():
        files = sorted((tiles / name).glob("*.png"))[:count]
        if len(files) < count:
            raise SystemExit(f"{tiles / name} holds {len(files)} tiles, {count} needed; write more with "
                             "benchmarks.nct_tiles")
        (root / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            link = root / name / f.name
            if not link.exists():
                link.symlink_to(f)
    return root


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _status_kb(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "VmHWM", "VmRSS"):
                    values[key] = int(rest.split()[0])
                elif key == "Name":
                    values["name"] = rest.strip()
    except OSError:
        pass
    return values


class TreeSampler:
    """Peak RssAnon / VmHWM (MB) of every process in a process tree, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peaks = pid, interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            tree, frontier = [self.pid], [self.pid]
            while frontier:
                frontier = [c for p in frontier for c in _children(p)]
                tree += frontier
            for pid in tree:
                status = _status_kb(pid)
                if "RssAnon" not in status:
                    continue
                peak = self.peaks.setdefault(pid, {"name": status.get("name"), "anon_mb": 0.0, "hwm_mb": 0.0})
                peak["anon_mb"] = max(peak["anon_mb"], status["RssAnon"] / 1024)
                peak["hwm_mb"] = max(peak["hwm_mb"], status.get("VmHWM", 0) / 1024)
            time.sleep(self.interval)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        return sorted(self.peaks.values(), key=lambda p: -p["anon_mb"])


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children and their descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(name: str, command: list[str], log: Path, record: dict[str, Any] | None = None,
        out: Path | None = None) -> dict[str, Any]:
    """Run ``command``; its wall time, exit code and the peak memory of its python processes."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    with open(log, "w") as fh:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        code = proc.wait()
    wall, cpu = time.perf_counter() - start, _children_cpu_s() - cpu_start
    peaks = [p for p in sampler.stop() if (p["name"] or "").startswith(("python", "pt_"))] or sampler.stop()
    result = {"name": name, "command": " ".join(command), "rc": code, "wall_s": round(wall, 1),
              "cpu_s": round(cpu, 1), "cores_busy": round(cpu / wall, 2), "processes": peaks, "log": str(log)}
    print(json.dumps({k: v for k, v in result.items() if k != "command"}), flush=True)
    if record is not None and out is not None:  # what is measured so far, if a later step cannot finish
        out.write_text(json.dumps({**record, "runs": [*record["runs"], result]}, indent=2) + "\n")
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log}")
    return result


def decode_seconds(log: Path) -> float:
    """Seconds the decode cache took, from finetune.py's log lines ``decoded N tiles into ... (S s)``."""
    return round(sum(float(s) for s in re.findall(r"decoded \d+ tiles into \S+ \(([\d.]+) s\)", log.read_text())), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=Path, required=True, help="folder written by benchmarks.nct_tiles")
    parser.add_argument("--num_tiles", type=int, default=100_000)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (local disk, outside the repo)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "scale_results.json")
    parser.add_argument("--max_steps", type=int, default=5)
    parser.add_argument("--steps", default="build,train1,train2,predict,evaluate")
    parser.add_argument("--keep_caches", action="store_true", help="keep the decode caches (deleted by default)")
    args = parser.parse_args(argv)
    steps = args.steps.split(",")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tiles = subset(args.tiles.resolve(), work, args.num_tiles)
    n, py = args.num_tiles, sys.executable
    dataset, results = work / f"ds_{n}", {"num_tiles": n, "cpus": os.cpu_count(), "runs": []}
    if "build" in steps:
        results["runs"].append(run("build", [py, "scripts/prepare_dataset.py", "--source", str(tiles),
                                             "--output_dir", str(dataset)], work / "build.log", results, args.out))
    for procs in (1, 2):
        if f"train{procs}" not in steps:
            continue
        cache, out = work / f"cache_{n}_{procs}", work / f"run_{n}_{procs}"
        launch = [py, "scripts/finetune.py"] if procs == 1 else [
            py, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml", "--num_processes", "2",
            "scripts/finetune.py"]
        log = work / f"train{procs}.log"
        result = run(f"finetune_{procs}proc", [*launch, "--dataset_dir", str(dataset), "--output_dir", str(out),
                                               "--overwrite_output_dir", "true", *TINY, "--max_steps",
                                               str(args.max_steps), "--decode_cache_dir", str(cache)], log, results,
                     args.out)
        result["decode_s"] = decode_seconds(log)
        result["cache_mb"] = round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20, 1)
        results["runs"].append(result)
        if not args.keep_caches:  # 15 GB at 100,000 tiles: not kept for the next step's disk
            shutil.rmtree(cache, ignore_errors=True)
    model = work / f"run_{n}_1"
    if "predict" in steps:
        results["runs"].append(run("predict", [py, "scripts/predict.py", "--model", str(model), "--inputs", str(tiles),
                                               "--output", str(work / "pred.csv"), "--no_progress", "--bf16", "false",
                                               "--mpp", "0.5", "--batch_size", "256"], work / "predict.log", results,
                                   args.out))
    if "evaluate" in steps:
        results["runs"].append(run("evaluate", [py, "scripts/evaluate_model.py", "--model", str(model), "--inputs",
                                                str(tiles), "--output_dir", str(work / "eval"), "--no_progress",
                                                "--n_bootstrap", "0", "--mpp", "0.5"], work / "evaluate.log", results,
                                   args.out))
    for r in results["runs"]:
        if r["name"] in ("predict", "evaluate"):
            r["tiles_per_s"] = round(n / r["wall_s"], 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
