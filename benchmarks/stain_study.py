"""Recipes compared beyond their own slides (issue 26): each arm trained with ``finetune.py`` per split and
seed, scored on the test split and on its re-stained copies (:mod:`benchmarks.restain`).

    python -m benchmarks.stain_study --work /tmp/stain_study --seeds 0,1,2 --splits stratified,slides \\
        --arms baseline,stain_stats --num_train_epochs 40 --out /tmp/stain_study/results.json

The datasets are built from ``--source`` (the real Kather 2016 tiles by default) with
``prepare_dataset.py`` (``--split_by slide`` for ``slides``), the re-stained copies of each test split
once. Runs go seed by seed (every split and arm of a seed before the next seed) with the arms interleaved,
so a slower hour of a shared machine falls on every arm alike; a finished run (its ``all_results.json`` and
scores present) is not run again. Every arm is ``--recipe`` plus its flags (:data:`ARMS`) at the same
``--num_train_epochs``; the wall time of each run is recorded, so "equal wall time" is checked, not
assumed. Writes ``--out`` (JSON, every run) and prints a Markdown table: mean, s.d. and range over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hf_tissue_vit.data import read_dataset_metadata

from .config import DEFAULT_REAL_DATA, REPO_ROOT, SCRATCH_RECIPE
from .restain import TARGETS, write_restained

ARMS: dict[str, list[str]] = {
    "baseline": [],
    "stain_stats": ["--stain_stats", "0.7"],  # every tile re-stained
    "stain_half": ["--stain_stats", "0.7", "--stain_stats_p", "0.5"],  # half the tiles keep their colour
    "stain_mild": ["--stain_stats", "0.35"],
    # the other levers, on top of stain_mild
    "mild_impulse": ["--stain_stats", "0.35", "--attention_init", "impulse"],
    "mild_sincos": ["--stain_stats", "0.35", "--position_init", "sincos"],
    # a CNN teacher (20 epochs, in the run's wall time) guiding the ViT: soft labels and patch features
    "mild_guided": ["--stain_stats", "0.35", "--teacher_epochs", "20"],
    # stain_mild given mild_guided's wall time (teacher included): 80 epochs instead of the study's 40
    "mild_long": ["--stain_stats", "0.35", "--num_train_epochs", "80"],
    # a fifth of the tiles in grey: no colour to learn from them, only shape and texture
    "mild_grey": ["--stain_stats", "0.35", "--grey_p", "0.2"],
    # a clean ending: augmentation and PatchDropout ramped down to none over the last 15% of the epochs
    "mild_clean": ["--stain_stats", "0.35", "--clean_end", "0.15"],
    # the clean ending that keeps the colour augmentation to the end: only the crop and PatchDropout ramp down
    "mild_clean_colour": ["--stain_stats", "0.35", "--clean_end", "0.15", "--clean_end_keep_colour", "true"],
    # the whole schedule of lever 3: 64 -> 112 px over the first half of the epochs, then the clean ending
    "mild_schedule": ["--stain_stats", "0.35", "--progressive_resolution", "64", "--clean_end", "0.15"],
}
RECIPE_ARM = "mild_clean_colour"  # the arm scripts/recipes/scratch_cpu_stain.yaml is (tests/test_stain.py checks it)
SPLITS = {"stratified": [], "slides": ["--split_by", "slide"]}
DEFAULT_EPOCHS = 40  # each arm's budget: about 4 minutes of training on the project's 2-core CPU


def _run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(command, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... failed (exit {code}); see {log}")
    return round(time.perf_counter() - start, 1)


def prepare(work: Path, source: Path, split: str) -> tuple[Path, Path]:
    """The dataset of ``split`` and the folder of its re-stained test copies (made once)."""
    dataset = work / "data" / split
    if not (dataset / "dataset_dict.json").exists():
        dataset.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "scripts/prepare_dataset.py", "--source", str(source), "--output_dir", str(dataset),
              *SPLITS[split]], work / f"prepare_{split}.log")
    restained = work / "restain" / split
    write_restained(dataset, restained)
    return dataset, restained


def train_and_score(dataset: Path, restained: Path, run: Path, arm: str, seed: int, recipe: Path,
                    epochs: float, extra: list[str]) -> dict[str, Any]:
    """One run: finetune.py (unless finished), then evaluate_model.py on every re-stained copy."""
    record_path = run / "study_record.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    run.mkdir(parents=True, exist_ok=True)
    wall = _run([sys.executable, "scripts/finetune.py", "--config", str(recipe), "--dataset_dir", str(dataset),
                 "--output_dir", str(run / "model"), "--seed", str(seed), "--num_train_epochs", str(epochs),
                 "--report_to", "none", "--disable_tqdm", "true", *ARMS[arm], *extra], run / "train.log")
    results = json.loads((run / "model" / "all_results.json").read_text())
    record = {"arm": arm, "seed": seed, "wall_s": wall, "train_runtime_s": results.get("train_runtime"),
              "test_accuracy": results.get("test_accuracy"), "test_macro_f1": results.get("test_macro_f1"),
              "scores": {}}
    mpp = read_dataset_metadata(dataset).get("mpp")
    for target in TARGETS:
        out = run / f"eval_{target}"
        _run([sys.executable, "scripts/evaluate_model.py", "--model", str(run / "model"), "--inputs",
              str(restained / target), "--output_dir", str(out), "--no_progress",
              *(["--mpp", str(mpp)] if mpp else [])], run / f"eval_{target}.log")
        scores = json.loads((out / "eval_results.json").read_text())
        record["scores"][target] = {k: scores.get(k) for k in ("accuracy", "accuracy_ci95", "macro_f1")}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per split and arm, mean ± s.d. (min-max) over seeds."""
    lines = ["| split | arm | seeds | train wall time (s) | test accuracy | " + " | ".join(TARGETS) + " |",
             "|---|---|---:|---:|---|" + "---|" * len(TARGETS)]
    keys = sorted({(r["split"], r["arm"]) for r in records}, key=lambda k: (k[0], list(ARMS).index(k[1])))
    for split, arm in keys:
        rows = [r for r in records if (r["split"], r["arm"]) == (split, arm)]
        cells = [_cell([r["scores"][t]["accuracy"] for r in rows]) for t in TARGETS]
        lines.append(f"| {split} | {arm} | {len(rows)} | {_cell([r['wall_s'] for r in rows], 0)} | "
                     f"{_cell([r['test_accuracy'] for r in rows])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (outside the repository)")
    parser.add_argument("--source", type=Path, default=DEFAULT_REAL_DATA, help="tile folder to build from")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--splits", default="stratified,slides", help=f"of {', '.join(SPLITS)}")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    parser.add_argument("--recipe", type=Path, default=SCRATCH_RECIPE)
    parser.add_argument("--num_train_epochs", type=float, default=DEFAULT_EPOCHS)
    parser.add_argument("--out", type=Path, help="JSON of every run (default WORK/results.json)")
    args, extra = parser.parse_known_args(argv)  # anything else goes to finetune.py (tests: a tiny model)
    seeds = [int(s) for s in args.seeds.split(",")]
    splits, arms = args.splits.split(","), args.arms.split(",")
    bad = [s for s in splits if s not in SPLITS] + [a for a in arms if a not in ARMS]
    if bad:
        parser.error(f"unknown split or arm {bad}; splits: {', '.join(SPLITS)}; arms: {', '.join(ARMS)}")
    if not args.source.is_dir():
        parser.error(f"--source {args.source} is not a folder of tiles")
    out = args.out or args.work / "results.json"
    records = []
    prepared = {split: prepare(args.work, args.source, split) for split in splits}
    for seed in seeds:  # seed by seed: a study cut short has every split and arm for the seeds it finished
        for split in splits:
            dataset, restained = prepared[split]
            for arm in arms:
                run = args.work / "runs" / split / arm / f"seed{seed}"
                record = train_and_score(dataset, restained, run, arm, seed, args.recipe, args.num_train_epochs, extra)
                records.append({**record, "split": split})
                print(json.dumps(records[-1]), flush=True)
                out.write_text(json.dumps({"epochs": args.num_train_epochs, "runs": records}, indent=2) + "\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
