"""The model card: a card-data object filled from what the run wrote, rendered with ``model_card.md``.

:class:`ModelCardInfo` holds every fact the card can state; a field the run did not record stays
``None`` and the template leaves it out. Nothing on the card is invented: a folder that was not
trained by this package (e.g. by plain ``Trainer``) gets no claim of it, no class descriptions and
no metric it does not report. Data facts (release, citation, tile size) come from the dataset the run
recorded; a dataset that is no known release is cited with its own citation, if it has one.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..card_templates import render_card, render_text
from ..constants import ALL_CLASS_NAMES, CLASS_DESCRIPTIONS, KATHER_BIBTEX, NCT_BIBTEX, VIT_BIBTEX
from ..modelfacts import ModelFacts, read_model_facts
from ..modelfolder import CONFIG_FILE, RUN_FILE  # RUN_FILE: in every finetune.py run

MODEL_CARD_TEMPLATE = "model_card.md"
EVALUATION_SECTION_TEMPLATE = "evaluation_section.md"  # one "Evaluation on NAME" section
MODEL_TAGS = ["histology", "pathology", "vision-transformer", "image-classification", "colorectal-cancer",
              "h-and-e", "hf_tissue_vit"]
PACKAGE_TAG = "hf_tissue_vit"  # marks a card this package wrote (and may therefore rewrite)
# Weights trained on the Kather 2016 tiles (CC BY 4.0) keep that licence by default.
DEFAULT_MODEL_LICENSE = "cc-by-4.0"
EVALUATIONS_FILE = "hf_tissue_vit_evaluations.json"  # external evaluations added to the card
KATHER_DATASET = "Kather 2016 colorectal cancer histology tiles"
# The known releases (data.classes.PRESETS): what the card calls them and how it cites them.
_DATASETS = {"kather2016": (KATHER_DATASET, KATHER_BIBTEX),
             "nct-crc-he": ("NCT-CRC-HE colorectal cancer tissue tiles", NCT_BIBTEX)}
_SPLIT_DESCRIPTIONS = {
    "stratified": "stratified per class (68% / 16% / 16%), fixed seed.",
    "slide": "slide-disjoint (no slide in two splits), fixed seed.",
}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when it is absent."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def fmt(value: Any, digits: int = 4) -> str:
    """A metric value as the card prints it."""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def wall_time(seconds: float) -> str:
    """``1 h 02 min 05 s`` / ``3 min 07 s``."""
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


@dataclass
class ModelCardInfo:
    """Everything the model card states; ``None`` means unknown (left out of the card)."""

    model_id: str
    label_names: list[str]
    trained_with_package: bool = False
    architecture: str | None = None
    family: str | None = None  # backbone family (hf_tissue_vit.backbones), e.g. "DINOv2 with registers"
    needs: str | None = None  # a package loading the model needs besides transformers (timm)
    license: str | None = None
    base_model: str | None = None
    from_scratch: bool | None = None
    preset: str | None = None
    dataset_id: str | None = None
    split_by: str | None = None
    made_splits: dict[str, Any] | None = None  # validation/test made from the dataset's train split
    split_sizes: list[tuple[str, int]] | None = None
    mpp: float | None = None
    data_preset: str | None = None  # the known release the training data came from (kather2016, nct-crc-he)
    data_citation: str | None = None  # the training data's own citation, when it is no known release
    tile_size: list[int] | None = None  # px of the training tiles
    image_size: int | None = None
    patch_size: int | None = None
    num_parameters: int | None = None
    hyperparameters: list[tuple[str, str]] | None = None
    pretraining: list[tuple[str, str]] | None = None
    hardware: str | None = None
    train_runtime: float | None = None
    samples_per_second: float | None = None
    seed: int | None = None
    test: dict[str, Any] = field(default_factory=dict)  # metric -> value, _ci95, _tta
    validation: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[str, Any]] | None = None
    resample: str | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    space_id: str | None = None
    figures: list[str] = field(default_factory=list)

    @classmethod
    def from_output_dir(cls, output_dir: str | Path, repo_id: str | None = None) -> ModelCardInfo:
        """Fill from a model folder: config.json, preprocessor_config.json and the run's result files."""
        out = Path(output_dir)
        if not (out / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{out / CONFIG_FILE} is missing: pass a model folder")
        facts = read_model_facts(out)
        results = facts.results
        ours = (out / RUN_FILE).is_file() or "hf_tissue_vit" in (results.get("versions") or {})
        info = cls(model_id=repo_id or out.resolve().name, label_names=facts.label_names,
                   trained_with_package=ours, architecture=(facts.config.get("architectures") or [None])[0])
        info._fill_model(facts)
        info._fill_results(results)
        info.evaluations = list(read_json(out / EVALUATIONS_FILE).get("evaluations", []))
        info.figures = [n for n in ("confusion_matrix.png", "training_curves.png") if (out / n).is_file()]
        return info

    def _fill_model(self, facts: ModelFacts) -> None:
        model = facts.results.get("model") or {}
        self.from_scratch = model.get("from_scratch")
        self.base_model = None if self.from_scratch else model.get("base_model")
        self.preset = model.get("preset") if self.from_scratch else None
        self.image_size = facts.input_size
        self.patch_size = model.get("patch_size") or facts.config.get("patch_size")
        self.num_parameters = model.get("num_parameters")
        self.family = model.get("family")
        self.needs = "timm" if facts.config.get("model_type") == "timm_wrapper" else None
        self.mpp = facts.mpp
        pretraining = model.get("pretraining")
        self.pretraining = hyperparameter_rows(pretraining) if isinstance(pretraining, dict) else None
        self.resample = facts.resample
        self.image_mean, self.image_std = facts.processor.get("image_mean"), facts.processor.get("image_std")

    def _fill_results(self, results: dict[str, Any]) -> None:
        dataset = results.get("dataset") or {}
        self.dataset_id = dataset.get("hub_dataset_id") or dataset.get("dataset_name")
        self.split_by = dataset.get("split_by")
        self.made_splits = dataset.get("made_splits")
        splits = dataset.get("splits")
        if isinstance(splits, dict):
            self.split_sizes = [(k, int(v)) for k, v in splits.items() if isinstance(v, (int, float))] or None
        # Runs from before presets were recorded trained on Kather 2016 tiles only.
        legacy = "preset" not in dataset and set(self.label_names) <= set(ALL_CLASS_NAMES)
        self.data_preset = dataset.get("preset") or ("kather2016" if legacy and self.trained_with_package else None)
        self.data_citation = None if self.data_preset in _DATASETS else dataset.get("citation")
        tile = dataset.get("tile_size") or ([150, 150] if self.data_preset == "kather2016" else None)
        self.tile_size = list(tile) if tile else None
        self.hyperparameters = hyperparameter_rows(results.get("hyperparameters") or {}) or None
        hardware = results.get("hardware")
        if isinstance(hardware, dict):
            hardware = ", ".join(f"{k}: {v}" for k, v in hardware.items() if v not in (None, ""))
        self.hardware = hardware or None
        self.train_runtime = results.get("train_runtime")
        self.samples_per_second = results.get("train_samples_per_second")
        self.seed = results.get("seed")
        for key in ("accuracy", "macro_f1"):
            for suffix in ("", "_ci95", "_tta"):
                if results.get(f"test_{key}{suffix}") is not None:
                    self.test[key + suffix] = results[f"test_{key}{suffix}"]
            if results.get(f"eval_{key}") is not None:
                self.validation[key] = results[f"eval_{key}"]
        self.per_class = results.get("test_per_class") or None

    # ------------------------------------------------------------------ rendering
    def eval_results(self) -> list[EvalResult]:
        """model-index entries: the test split's metrics, then every external evaluation; one entry per
        dataset and split, each metric once (a later evaluation of the same data replaces the earlier's)."""
        groups: dict[tuple[str, str], list[EvalResult]] = {}
        if self.test:
            known = _DATASETS.get(self.data_preset or "", (None, None))[0]
            name = self.dataset_id or (known if self.trained_with_package else None)
            if name:
                dataset_type = self.dataset_id or (
                    "kather2016-colorectal-histology" if self.data_preset == "kather2016" else self.data_preset)
                groups[dataset_type, "test"] = _metric_entries(self.test, name, dataset_type, "test")
        for ev in self.evaluations:
            # the Hub groups entries by dataset: two evaluations of one dataset would list each metric twice
            key = (ev.get("dataset_type") or ev["dataset_name"], ev.get("split") or "test")
            groups.pop(key, None)
            groups[key] = _metric_entries(ev["metrics"], ev["dataset_name"], *key)
        return [entry for entries in groups.values() for entry in entries]

    def card_data(self, existing: dict[str, Any] | None = None) -> ModelCardData:
        """Card metadata; keys this run does not know are taken from ``existing`` (a user's card)."""
        results = self.eval_results()
        metrics = sorted({"f1" if r.metric_type == "f1" else r.metric_type for r in results}) or None
        ours = dict(model_name=self.model_id, library_name="transformers", pipeline_tag="image-classification",
                    license=self.license, base_model=self.base_model,
                    datasets=[self.dataset_id] if self.dataset_id else None, metrics=metrics,
                    tags=list(MODEL_TAGS) if self.trained_with_package else None)
        return merged_card_data(ours, results, existing or {})

    def template_variables(self) -> dict[str, Any]:
        """Every name the template uses, unknown ones as None."""
        variables = asdict(self)
        variables.update(
            classes=[{"id": i, "name": n, "description": CLASS_DESCRIPTIONS.get(n, "")
                      if self.trained_with_package else ""} for i, n in enumerate(self.label_names)],
            split_description=self._split_description(),
            num_parameters=f"{self.num_parameters:,}" if self.num_parameters else None,
            wall_time=wall_time(self.train_runtime) if self.train_runtime is not None else None,
            samples_per_second=fmt(self.samples_per_second, 1) if self.samples_per_second is not None else None,
            test_rows=_test_rows(self.test) or None, has_tta=any(k.endswith("_tta") for k in self.test),
            validation_rows=[{"name": _NAMES[k], "value": fmt(v)} for k, v in self.validation.items()] or None,
            per_class=_per_class_rows(self.per_class) or None,
            evaluation_sections=[evaluation_section(ev) for ev in self.evaluations] or None,
            vit_bibtex=VIT_BIBTEX,
            data_bibtex=_DATASETS.get(self.data_preset or "", (None, None))[1] if self.trained_with_package else None,
            data_name=_DATASETS.get(self.data_preset or "", (None, None))[0],
        )
        return variables

    def _split_description(self) -> str | None:
        if self.made_splits:
            return (f"the dataset has only a train split; validation and test were made from it, stratified "
                    f"per class (68% / 16% / 16%), seed {self.made_splits.get('seed')}.")
        return _SPLIT_DESCRIPTIONS.get(self.split_by, f"{self.split_by}." if self.split_by else None)

    def render(self, existing: dict[str, Any] | None = None, parameter_table: str | None = None) -> ModelCard:
        """The card (metadata merged with ``existing``), tidy Markdown."""
        card = render_card(MODEL_CARD_TEMPLATE, self.card_data(existing), kind="model",
                           parameter_table=parameter_table, **self.template_variables())
        # Sections left out leave runs of blank lines behind.
        return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))


_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy"}
_METRIC_NAMES = {"accuracy": "Accuracy", "macro_f1": "Macro F1", "balanced_accuracy": "Balanced accuracy"}


def _metric_entries(metrics: dict[str, Any], dataset_name: str, dataset_type: str, split: str) -> list[EvalResult]:
    task = dict(task_type="image-classification", task_name="Image Classification", dataset_type=dataset_type,
                dataset_name=dataset_name, dataset_split=split)
    entries = []
    for key, metric_type, extra in (("accuracy", "accuracy", {}), ("balanced_accuracy", "balanced_accuracy", {}),
                                    ("macro_f1", "f1", {"metric_args": {"average": "macro"}})):
        if metrics.get(key) is not None:
            entries.append(EvalResult(**task, metric_type=metric_type, metric_name=_METRIC_NAMES[key],
                                      metric_value=float(metrics[key]), **extra))
    return entries


def _test_rows(test: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        if test.get(key) is None:
            continue
        ci, tta = test.get(f"{key}_ci95"), test.get(f"{key}_tta")
        rows.append({"name": _NAMES[key], "value": fmt(test[key]),
                     "ci": f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "", "tta": fmt(tta) if tta is not None else ""})
    return rows


def _per_class_rows(per_class: dict[str, dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{"name": name, **{k: fmt(v.get(k, ""), 3) for k in ("precision", "recall", "f1")},
             "support": v.get("support", "")} for name, v in (per_class or {}).items()]


def evaluation_section(ev: dict[str, Any]) -> str:
    """The "## Evaluation on NAME" section of one entry of EVALUATIONS_FILE, as Markdown: the package's
    card renders every entry with it, and a card the user wrote gets it added (see
    :mod:`hf_tissue_vit.evaluation.card`)."""
    return render_text(EVALUATION_SECTION_TEMPLATE, ev=_evaluation_variables(ev))


def _evaluation_variables(ev: dict[str, Any]) -> dict[str, Any]:
    return {"name": ev["name"], "dataset_name": ev["dataset_name"], "split": ev.get("split"),
            "n_scored": ev.get("n_scored"), "rows": _test_rows(ev["metrics"]),
            "has_tta": any(k.endswith("_tta") for k in ev["metrics"]),
            "per_class": _per_class_rows(ev.get("per_class")),
            "confusion_matrix": ev.get("confusion_matrix_file"), "label_map": ev.get("label_map_text")}


def merged_card_data(ours: dict[str, Any], eval_results: list[EvalResult], existing: dict[str, Any]) -> ModelCardData:
    """Our metadata where known, else the existing card's; tags united; model-index entries of the
    existing card kept unless ours replace them (same dataset, split and metric)."""
    data = {k: v for k, v in existing.items() if k not in ("model-index", "eval_results")}
    data.update({k: v for k, v in ours.items() if v is not None})
    old_tags = list(existing.get("tags") or [])
    tags = old_tags + [t for t in ours.get("tags") or [] if t not in old_tags]
    if tags:
        data["tags"] = tags
    old = []
    if existing.get("model-index"):
        from huggingface_hub.repocard_data import model_index_to_eval_results

        _name, old = model_index_to_eval_results(existing["model-index"])
    keys = {(r.dataset_type, r.dataset_split, r.metric_type) for r in eval_results}
    kept = [r for r in old if (r.dataset_type, r.dataset_split, r.metric_type) not in keys]
    if kept or eval_results:
        data["eval_results"] = kept + eval_results
    if data.get("eval_results") and not data.get("model_name"):
        data["model_name"] = ours.get("model_name")
    return ModelCardData(**data)


def hyperparameter_rows(hyper: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(name, value) rows; unset values (None) are left out, nested groups flattened."""
    rows: list[tuple[str, str]] = []
    for key, value in hyper.items():
        if value is None:
            continue
        if isinstance(value, dict):
            rows += hyperparameter_rows(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, f"{value:.6g}" if isinstance(value, float) else str(value)))
    return rows
