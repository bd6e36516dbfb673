"""Dataset and model cards: card data + a Jinja template from ``model_card/``."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from huggingface_hub import CardData, DatasetCard, ModelCard

from .fileio import atomic_write_text

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model_card"


def template_path(name: str) -> Path:
    """Path of a card template shipped in ``model_card/`` (e.g. ``"dataset_card.md"``)."""
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"card template {path} is missing; reinstall hf_tissue_vit from its repository")
    return path


def render_card(template: str, card_data: CardData, kind: str = "model", **variables: Any) -> ModelCard | DatasetCard:
    """Render ``model_card/<template>`` with ``card_data`` as YAML metadata and ``variables`` for Jinja.

    Variables that are ``None`` are dropped, so templates can leave unknown values out
    with ``{% if x %}`` instead of printing a made-up value.
    """
    cls = DatasetCard if kind == "dataset" else ModelCard
    known = {k: v for k, v in variables.items() if v is not None}
    return cls.from_template(card_data, template_path=str(template_path(template)), **known)


# --------------------------------------------------------------------------- model card
MODEL_CARD_TEMPLATE = "model_card.md"
MODEL_TAGS = ["histology", "pathology", "vision-transformer", "image-classification", "colorectal-cancer",
              "h-and-e", "hf_tissue_vit"]
# The weights are derived from the Kather 2016 tiles, released under CC BY 4.0, so the card keeps
# that licence (attribution) by default; pass ``license`` to choose another one.
DEFAULT_MODEL_LICENSE = "cc-by-4.0"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _wall_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def _split_sizes(dataset: dict[str, Any]) -> list[tuple[str, int]]:
    """Split sizes from the ``dataset`` block of all_results.json, whatever key style TRAINING used."""
    sizes = dataset.get("split_sizes") or dataset.get("sizes") or {}
    out = [(k, int(v)) for k, v in sizes.items() if isinstance(v, (int, float))] if isinstance(sizes, dict) else []
    if not out:
        for split in ("train", "validation", "test"):
            for key in (split, f"{split}_size", f"num_{split}", f"{split}_samples"):
                if isinstance(dataset.get(key), (int, float)):
                    out.append((split, int(dataset[key])))
                    break
    return out


def _parameter_table(output_dir: Path) -> str:
    """Markdown table of the ViT's parameters per component: closed form next to the counted number."""
    from transformers import AutoConfig

    from .interpret import format_parameter_table, parameter_report_from_config

    return format_parameter_table(parameter_report_from_config(AutoConfig.from_pretrained(output_dir)))


def build_model_card(output_dir: str | Path, repo_id: str | None = None, *, license: str = DEFAULT_MODEL_LICENSE,
                     dataset_id: str | None = None, base_model: str | None = None) -> ModelCard:
    """Model card for a training output dir (config.json, preprocessor_config.json, all_results.json).

    Metadata: library, pipeline tag, licence, base model (fine-tuned runs), Hub dataset id, metrics,
    tags and a ``model-index`` with the **test** split accuracy and macro-F1 from all_results.json.
    Values the output dir does not hold are left out.
    """
    from huggingface_hub import EvalResult, ModelCardData

    from .constants import CLASS_DESCRIPTIONS, KATHER_BIBTEX, VIT_BIBTEX

    output_dir = Path(output_dir)
    config = _read_json(output_dir / "config.json")
    if not config:
        raise FileNotFoundError(f"{output_dir / 'config.json'} is missing: pass a finished training output dir")
    results = _read_json(output_dir / "all_results.json")
    processor = _read_json(output_dir / "preprocessor_config.json")
    model_info = results.get("model") or {}
    dataset = results.get("dataset") or {}

    id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    label_names = results.get("label_names") or [id2label[i] for i in sorted(id2label)]
    model_id = repo_id or output_dir.resolve().name
    base_model = base_model or (None if model_info.get("from_scratch") else model_info.get("base_model"))
    dataset_id = dataset_id or dataset.get("hub_dataset_id")

    eval_results = []
    task = dict(task_type="image-classification", task_name="Image Classification",
                dataset_type=dataset_id or "kather2016-colorectal-histology",
                dataset_name=dataset_id or "Kather 2016 colorectal cancer histology tiles", dataset_split="test")
    if results.get("test_accuracy") is not None:
        eval_results.append(EvalResult(**task, metric_type="accuracy", metric_name="Accuracy",
                                       metric_value=float(results["test_accuracy"])))
    if results.get("test_macro_f1") is not None:
        eval_results.append(EvalResult(**task, metric_type="f1", metric_name="Macro F1",
                                       metric_args={"average": "macro"},
                                       metric_value=float(results["test_macro_f1"])))
    card_data = ModelCardData(
        model_name=model_id, library_name="transformers", pipeline_tag="image-classification",
        license=license, base_model=base_model, datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy", "f1"], tags=list(MODEL_TAGS), eval_results=eval_results or None,
    )

    test_rows = []
    for key, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        if results.get(f"test_{key}") is None:
            continue
        ci = results.get(f"test_{key}_ci95")
        tta = results.get(f"test_{key}_tta")
        test_rows.append({"name": name, "value": _fmt(results[f"test_{key}"]),
                          "ci": f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "",
                          "tta": _fmt(tta) if tta is not None else ""})
    validation_rows = [{"name": n, "value": _fmt(results[k])}
                       for k, n in (("eval_accuracy", "accuracy"), ("eval_macro_f1", "macro-F1"))
                       if results.get(k) is not None]
    per_class = [{"name": name, **{k: _fmt(v.get(k, ""), 3) for k in ("precision", "recall", "f1")},
                  "support": v.get("support", "")}
                 for name, v in (results.get("test_per_class") or {}).items()]
    split_by = dataset.get("split_by")
    split_description = {
        "stratified": "stratified per class (68% / 16% / 16%), fixed seed.",
        "slide": "slide-disjoint (no slide in two splits), fixed seed.",
    }.get(split_by, f"{split_by}." if split_by else None)
    hardware = results.get("hardware")
    if isinstance(hardware, dict):
        hardware = ", ".join(f"{k}: {v}" for k, v in hardware.items() if v not in (None, ""))
    size = processor.get("size") or {}
    image_size = model_info.get("image_size") or config.get("image_size") or size.get("height")
    hyper = results.get("hyperparameters") or {}

    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(processor.get("resample"))
    card = render_card(
        MODEL_CARD_TEMPLATE, card_data, kind="model", resample=resample,
        num_parameters=f"{model_info['num_parameters']:,}" if model_info.get("num_parameters") else None,
        model_id=model_id, base_model=base_model, from_scratch=model_info.get("from_scratch"),
        preset=model_info.get("preset"), dataset_id=dataset_id,
        classes=[{"id": i, "name": n, "description": CLASS_DESCRIPTIONS.get(n, "")} for i, n in
                 enumerate(label_names)],
        split_by=split_by, split_description=split_description, split_sizes=_split_sizes(dataset) or None,
        image_size=image_size, patch_size=model_info.get("patch_size") or config.get("patch_size"),
        hyperparameters=_hyperparameter_rows(hyper) or None,
        hardware=hardware or None,
        wall_time=_wall_time(results["train_runtime"]) if results.get("train_runtime") is not None else None,
        samples_per_second=_fmt(results["train_samples_per_second"], 1)
        if results.get("train_samples_per_second") is not None else None,
        seed=results.get("seed"), parameter_table=_parameter_table(output_dir),
        test_rows=test_rows or None, has_tta=any(r["tta"] for r in test_rows),
        validation_rows=validation_rows or None, per_class=per_class or None,
        has_confusion_matrix=(output_dir / "confusion_matrix.png").is_file(),
        has_training_curves=(output_dir / "training_curves.png").is_file(),
        image_mean=processor.get("image_mean"), image_std=processor.get("image_std"),
        vit_bibtex=VIT_BIBTEX, kather_bibtex=KATHER_BIBTEX,
    )
    # Sections left out leave runs of blank lines behind: keep the Markdown tidy.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))


def write_model_card(output_dir: str | Path, repo_id: str | None = None, **kwargs: Any) -> Path:
    """Render the model card (see ``build_model_card``) into ``output_dir/README.md`` atomically."""
    output_dir = Path(output_dir)
    card = build_model_card(output_dir, repo_id, **kwargs)
    path = atomic_write_text(output_dir / "README.md", str(card))
    logger.info("wrote model card %s", path)
    return path


def _hyperparameter_rows(hyper: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(name, value) rows for the card; unset values (None) are left out, nested groups flattened."""
    rows: list[tuple[str, str]] = []
    for key, value in hyper.items():
        if value is None:
            continue
        if isinstance(value, dict):
            rows += _hyperparameter_rows(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, f"{value:.6g}" if isinstance(value, float) else str(value)))
    return rows
