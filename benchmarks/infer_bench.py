"""The ``infer`` section: tiles/s over PNG files (decode + preprocess + forward) for a model saved
with ``save_pretrained``: the library's :class:`~hf_tissue_vit.predict.TilePredictor` (what
``predict.py`` and ``tissue_map.py`` run) vs ``pipeline("image-classification")`` one image at a time
and with ``batch_size``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_tissue_vit.fileio import fix_permissions
from hf_tissue_vit.predict import TilePredictor

from .config import GOALS, BenchmarkConfig
from .models import model_label
from .sources import BenchData
from .timing import ratio, row, time_interleaved


def input_files(bench: BenchData, n: int) -> list[str]:
    """``n`` file paths, cycling through the source's files when it has fewer."""
    files: list[str] = []
    while len(files) < n:
        files += [str(p) for p in bench.files[: n - len(files)]]
    return files


def save_model(model: Any, processor: Any, folder: Path) -> str:
    """``save_pretrained`` of model (safetensors) and processor, as a training output holds them."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    fix_permissions(folder)
    return str(folder)


def _predictors(model_dir: str, batch: int, use_bf16: bool) -> dict[str, TilePredictor]:
    # Explicit precisions: TilePredictor's default (bf16=None) follows the hardware. Attention stays
    # "auto", as predict.py runs it.
    predictors = {"package": TilePredictor.from_pretrained(model_dir, device="cpu", batch_size=batch, bf16=False)}
    if use_bf16:
        predictors["package_bf16"] = TilePredictor.from_pretrained(model_dir, device="cpu", batch_size=batch, bf16=True)
    return predictors


def _rows(rates: dict[str, list[float]], predictors: dict[str, TilePredictor], batch: int) -> dict[str, dict]:
    rows = {}
    for key, predictor in predictors.items():
        threads = f", {predictor.num_workers} decode threads" if key == "package" else ""
        rows[key] = row(
            f"TilePredictor(bf16={predictor.bf16}) / predict.py --bf16 {str(predictor.bf16).lower()}, "
            f"{predictor.attn_implementation} (batch {batch}{threads})",
            rates[key],
        )
    rows["pipeline_single"] = row("pipeline('image-classification') one image at a time", rates["pipeline_single"])
    rows["pipeline_batched"] = row(
        f"pipeline('image-classification', batch_size={batch}) over the list", rates["pipeline_batched"]
    )
    return rows


def _ratios(rows: dict[str, dict], chosen: str, batch: int) -> list[dict[str, Any]]:
    """Each predictor against both pipeline runs; the goals are judged on ``chosen`` only."""
    out = []
    for key in (k for k in rows if k.startswith("package")):
        judged = key == chosen
        out.append(ratio(f"{key} / pipeline one at a time", rows, key, "pipeline_single",
                         GOALS["infer_single"] if judged else None))
        out.append(ratio(f"{key} / pipeline batch_size={batch}", rows, key, "pipeline_batched",
                         GOALS["infer_batched"] if judged else None))
    return out


def bench_infer(
    config: BenchmarkConfig, bench: BenchData, model: Any, processor: Any, workdir: Path, model_state: str,
    use_bf16: bool,
) -> dict[str, Any]:
    """tiles/s over PNG files: TilePredictor (fp32, and bf16 when ``use_bf16``) vs pipeline() per image
    and pipeline(batch_size=); interleaved repeats. Goals are judged on the bf16 predictor when it is
    used (its predictions were checked against fp32 in the variants)."""
    from transformers import pipeline

    model_dir = save_model(model, processor, workdir / "model")
    files = input_files(bench, config.infer_tiles)
    batch = config.infer_batch_size
    predictors = _predictors(model_dir, batch, use_bf16)
    pipe = pipeline("image-classification", model=model_dir, device="cpu")

    def run_single() -> int:
        for path in files:
            pipe(path)
        return len(files)

    runs = {key: (lambda p=p: sum(1 for _ in p.predict_files(files))) for key, p in predictors.items()}
    runs.update(pipeline_single=run_single, pipeline_batched=lambda: len(pipe(files, batch_size=batch)))
    rows = _rows(time_interleaved(runs, config.repeats), predictors, batch)
    chosen = "package_bf16" if use_bf16 else "package"
    judged = predictors[chosen]
    ours = [judged.label_names[int(r.probs.argmax())] for r in judged.predict_files(files)]
    theirs = [out[0]["label"] for out in pipe(files, batch_size=batch)]
    return {
        "title": "Inference over PNG files (decode + preprocess + forward)",
        "unit": "tiles/s",
        "tiles_per_repeat": len(files),
        "batch_size": batch,
        "model": model_label(config.small_model, model),
        "model_state": model_state,
        "top1_agreement_package_vs_pipeline": sum(a == b for a, b in zip(ours, theirs)) / len(files),
        "package_setting_for_goals": chosen,
        "rows": rows,
        "ratios": _ratios(rows, chosen, batch),
    }
