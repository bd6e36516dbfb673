"""Test-time resolution above the training one (FixRes, Touvron et al. 2019; issue 26, lever 3), on the runs of
:mod:`benchmarks.stain_study`: each finished run's model converted to every ``--sizes`` px (its patch-grid position
embeddings resampled bicubically, its processor's size set), then scored like the study's runs.

    python -m benchmarks.fixres --work /tmp/stain_study --sizes 128,144 --out /tmp/stain_study/fixres.json

A random resized crop shows the model tissue larger than the whole tile at the training size does (the crop covers
60-100 % of the tile's area, resized to the same pixels); a slightly larger test size shows it at the scale it
trained on. Nothing is retrained: the converted models are plain ViTs at the new size (``pipeline()`` reads the
size from their processor). Writes ``<run>/fixres_<size>/`` beside each run and ``--out`` (JSON), prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from .restain import TARGETS
from .stain_study import _run


def convert(model_dir: Path, out: Path, size: int) -> Path:
    """A copy of the model folder ``model_dir`` at ``size`` px in ``out`` (made once)."""
    from transformers import AutoImageProcessor, ViTForImageClassification

    from hf_tissue_vit.modeling import resize_position_embeddings

    if (out / "model.safetensors").is_file():
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns("checkpoint-*", "teacher", "*.safetensors"))
    model = ViTForImageClassification.from_pretrained(model_dir, use_safetensors=True)
    resize_position_embeddings(model, size)
    model.save_pretrained(staging)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    processor.size = {"height": size, "width": size}
    processor.save_pretrained(staging)
    staging.rename(out)
    return out


def score(model: Path, restained: Path, out: Path, mpp: float | None) -> dict[str, Any]:
    """evaluate_model.py on every re-stained copy (made once): accuracy per target."""
    scores = {}
    for target in TARGETS:
        folder = out / f"eval_{target}"
        if not (folder / "eval_results.json").is_file():
            _run([sys.executable, "scripts/evaluate_model.py", "--model", str(model), "--inputs",
                  str(restained / target), "--output_dir", str(folder), "--no_progress",
                  *(["--mpp", str(mpp)] if mpp else [])], out / f"eval_{target}.log")
        scores[target] = json.loads((folder / "eval_results.json").read_text())["accuracy"]
    return scores


def main(argv: list[str] | None = None) -> int:
    from hf_tissue_vit.data import read_dataset_metadata

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the study's --work folder")
    parser.add_argument("--sizes", default="128,144", help="test sizes in px (multiples of the patch size)")
    parser.add_argument("--arms", default=None, help="comma-separated arms (default: every arm found)")
    parser.add_argument("--out", type=Path, help="JSON of every score (default WORK/fixres.json)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    records = []
    for record_path in sorted(args.work.glob("runs/*/*/seed*/study_record.json")):
        run = record_path.parent
        split, arm = run.parent.parent.name, run.parent.name
        if args.arms and arm not in args.arms.split(","):
            continue
        study = json.loads(record_path.read_text())
        mpp = read_dataset_metadata(args.work / "data" / split).get("mpp")
        row = {"split": split, "arm": arm, "seed": study["seed"],
               "scores": {"trained size": {t: study["scores"][t]["accuracy"] for t in TARGETS}}}
        for size in sizes:
            model = convert(run / "model", run / f"fixres_{size}" / "model", size)
            row["scores"][f"{size} px"] = score(model, args.work / "restain" / split, run / f"fixres_{size}", mpp)
        records.append(row)
        print(json.dumps(row), flush=True)
    (args.out or args.work / "fixres.json").write_text(json.dumps(records, indent=2) + "\n")
    print(table(records))
    return 0


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: per split, arm and test size, the mean accuracy over seeds on every target."""
    lines = ["| split | arm | seeds | test size | " + " | ".join(TARGETS) + " |",
             "|---|---|---:|---|" + "---|" * len(TARGETS)]
    for split, arm in sorted({(r["split"], r["arm"]) for r in records}):
        rows = [r for r in records if (r["split"], r["arm"]) == (split, arm)]
        for size in rows[0]["scores"]:
            means = [statistics.mean(r["scores"][size][t] for r in rows) for t in TARGETS]
            cells = " | ".join(f"{m:.3f}" for m in means)
            lines.append(f"| {split} | {arm} | {len(rows)} | {size} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
