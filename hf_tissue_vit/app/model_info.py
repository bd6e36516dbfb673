"""What the app tells its user about the model: classes, input size and preprocessing, training
resolution and test results, read from the model's own files (a local output dir or a Hub repo).

The files are read by the package's one model-facts reader (:func:`hf_tissue_vit.modelfacts.read_model_facts`:
class names, µm/px, training tile size, processor, the run's results), with its fallbacks; the model
card's ``model-index`` gives the test metrics when the run's results are absent. Only config.json is
required.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import backbones
from ..constants import CLASS_DESCRIPTIONS, KATHER_CITATION
from ..modelfacts import ModelFacts, is_far, read_model_facts

logger = logging.getLogger(__name__)

DISCLAIMER = ("For research and teaching only. Not a medical device: do not use it for diagnosis "
              "or any clinical decision.")


@dataclass
class MetricRow:
    """One test metric: value, 95% CI bounds (None when unknown) and the 8-view TTA value."""

    name: str
    value: float
    ci95: tuple[float, float] | None = None
    tta: float | None = None


@dataclass
class ModelInfo:
    """Everything the app shows about a model; see :func:`load_model_info`."""

    source: str
    label_names: list[str]
    image_size: int
    patch_size: int | None = None
    resample: str = "bilinear"
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    train_tile_px: int | None = None  # side of the training tiles (ModelFacts.tile_size); None: unknown
    train_mpp: float | None = None  # µm/px of the training tiles (ModelFacts.mpp); None: unknown
    test_metrics: list[MetricRow] = field(default_factory=list)
    split_by: str | None = None
    dataset_dir: str | None = None
    num_parameters: int | None = None
    base_model: str | None = None
    license: str | None = None
    architecture: str | None = None  # config.json's architectures[0]
    family: str | None = None  # hf_tissue_vit.backbones family name; None: not one the package trains
    versions: dict[str, str] = field(default_factory=dict)  # of the packages it was trained with
    data_preset: str | None = None  # the known release the model was trained on (kather2016, nct-crc-he)
    data_citation: str | None = None  # the training data's own citation

    @property
    def display_name(self) -> str:
        """The Hub id, or a local folder's name (a path on the server says nothing to a visitor)."""
        return Path(self.source).name if os.path.isdir(self.source) else self.source

    @property
    def train_tile_um(self) -> float | None:
        """Side of a training tile in µm (None when its size or resolution is unknown)."""
        return self.train_tile_px * self.train_mpp if self.train_tile_px and self.train_mpp else None

    def training_text(self) -> str:
        """The training tiles in words: ``150 × 150 px tiles at 0.495 µm/px (74 × 74 µm, about 20× objective)``."""
        if not self.train_tile_px:
            return "tiles of an unrecorded size"
        text = f"{self.train_tile_px} × {self.train_tile_px} px tiles"
        if self.train_mpp and self.train_tile_um:
            text += (f" at {self.train_mpp:g} µm/px ({self.train_tile_um:.0f} × {self.train_tile_um:.0f} µm, about "
                     f"{objective(self.train_mpp)} objective)")
        return text

    def preprocessing_text(self) -> str:
        """One sentence: what happens to a tile before the model sees it (from the saved processor)."""
        norm = ""
        if self.image_mean and self.image_std:
            mean = ", ".join(f"{v:.3g}" for v in self.image_mean)
            std = ", ".join(f"{v:.3g}" for v in self.image_std)
            norm = f", normalised with mean ({mean}) and std ({std})"
        return (f"The tile is read as 8-bit RGB, resized to {self.image_size} × {self.image_size} px "
                f"({self.resample}), rescaled to [0, 1]{norm}. The model was trained on {self.training_text()}.")


def objective(mpp: float) -> str:
    """The microscope objective a resolution is typical of (0.5 µm/px: ``20×``)."""
    return f"{10 / mpp:.0f}×"


def _metrics_from_results(results: dict[str, Any]) -> list[MetricRow]:
    rows = []
    for key, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        value = results.get(f"test_{key}")
        if value is None:
            continue
        ci = results.get(f"test_{key}_ci95")
        tta = results.get(f"test_{key}_tta")
        rows.append(MetricRow(name, float(value), (float(ci[0]), float(ci[1])) if ci else None,
                              float(tta) if tta is not None else None))
    return rows


def _metrics_from_card(card: Any) -> list[MetricRow]:
    """Test metrics from the card's ``model-index`` (no CIs there)."""
    if card is None:
        return []
    return [MetricRow(r.metric_name or r.metric_type, float(r.metric_value))
            for r in (card.data.eval_results or []) if r.dataset_split in (None, "test")]


def model_info_from_facts(facts: ModelFacts) -> ModelInfo:
    """:class:`ModelInfo` of what :func:`~hf_tissue_vit.modelfacts.read_model_facts` read."""
    card = None
    if facts.card_path is not None:
        from huggingface_hub import ModelCard

        card = ModelCard.load(facts.card_path)
    results, model_block = facts.results, facts.results.get("model") or {}
    tile = facts.tile_size
    return ModelInfo(
        source=facts.source,
        label_names=facts.label_names,
        image_size=facts.input_size or 224,
        patch_size=facts.config.get("patch_size"),
        resample=facts.resample or "bilinear",
        image_mean=facts.processor.get("image_mean"),
        image_std=facts.processor.get("image_std"),
        train_tile_px=tile[0] if tile else None,
        train_mpp=facts.mpp,
        test_metrics=_metrics_from_results(results) or _metrics_from_card(card),
        split_by=facts.dataset.get("split_by"),
        dataset_dir=facts.dataset.get("dataset_dir"),
        num_parameters=model_block.get("num_parameters"),
        base_model=None if model_block.get("from_scratch") else model_block.get("base_model"),
        license=card.data.license if card is not None else None,
        architecture=(facts.config.get("architectures") or [None])[0],
        family=family.name if (family := backbones.family_of(facts.config)) else None,
        versions={str(k): str(v) for k, v in (results.get("versions") or {}).items()},
        # runs from before presets were recorded trained on Kather 2016 tiles
        data_preset=facts.dataset.get("preset") or (None if "preset" in facts.dataset else "kather2016"),
        data_citation=facts.dataset.get("citation"),
    )


def load_model_info(model: str) -> ModelInfo:
    """Read :class:`ModelInfo` from a local output dir or a Hub model id.

    Raises FileNotFoundError naming ``model`` when it has no config.json.
    """
    return model_info_from_facts(read_model_facts(model))


# --------------------------------------------------------------------------------------------
# Warnings for a tile that does not look like the training tiles
# --------------------------------------------------------------------------------------------
MPP_TOLERANCE = 0.3  # a stated resolution more than 30% away from the training one
ASPECT_TOLERANCE = 1.2


def resolution_warning(info: ModelInfo, mpp: float | None) -> str | None:
    """A warning when a stated resolution (µm/px) is far from the training one; None when close or either unknown."""
    if mpp is None or info.train_mpp is None or abs(mpp / info.train_mpp - 1) <= MPP_TOLERANCE:
        return None
    return (f"The image's resolution is {mpp:.3g} µm/px (about {objective(mpp)} objective); the model was trained "
            f"at {info.train_mpp:g} µm/px ({objective(info.train_mpp)}). Predictions at other magnifications are "
            "unreliable.")


def tile_warnings(info: ModelInfo, width: int, height: int, mpp: float | None = None) -> list[str]:
    """Plain-language warnings when a tile's size, shape or stated resolution (µm/px) differs from training.

    "Far from the training size" is the package's one rule (:func:`hf_tissue_vit.modelfacts.is_far`),
    the one predict.py warns with."""
    warnings = []
    tile = info.train_tile_px
    if tile and is_far((width, height), (tile, tile)):
        warnings.append(
            f"This image is {width} × {height} px, but the model was trained on {info.training_text()}. "
            f"It is resized to {info.image_size} px as a whole, so cells appear at a scale the model has not seen. "
            "For a larger field of view use the Larger image tab.")
    if max(width, height) > ASPECT_TOLERANCE * min(width, height):
        warnings.append(f"This image is not square ({width} × {height} px): it is stretched to a square.")
    resolution = resolution_warning(info, mpp)
    if resolution:
        warnings.append(resolution)
    return warnings


# --------------------------------------------------------------------------------------------
# The About tab
# --------------------------------------------------------------------------------------------
def _metric_table(metrics: list[MetricRow]) -> str:
    has_tta = any(m.tta is not None for m in metrics)
    lines = ["| metric | test | 95% CI |" + (" with 8-view TTA |" if has_tta else ""),
             "|---|---:|---|" + ("---:|" if has_tta else "")]
    for m in metrics:
        ci = f"[{m.ci95[0]:.3f}, {m.ci95[1]:.3f}]" if m.ci95 else "not in the card"
        tta = (f" {m.tta:.3f} |" if m.tta is not None else " |") if has_tta else ""
        lines.append(f"| {m.name} | {m.value:.3f} | {ci} |{tta}")
    return "\n".join(lines)


def _kind_of_model(info: ModelInfo) -> str:
    """"a Vision Transformer (ViT)" or, for the other backbone families, "a DINOv2 image model,
    `Dinov2ForImageClassification`"."""
    if info.family in (None, "ViT"):
        return "a Vision Transformer (ViT)"
    return f"a {info.family} image model" + (f", `{info.architecture}`" if info.architecture else "")


def about_markdown(info: ModelInfo) -> str:
    """Markdown of the About tab: the model, its test results, the classes, the training data and the limits."""
    origin = f"fine-tuned from `{info.base_model}`" if info.base_model else "trained with `hf_tissue_vit`"
    size = f"{info.num_parameters:,} parameters, " if info.num_parameters else ""
    parts = [
        "## The model",
        (f"`{info.display_name}`: {_kind_of_model(info)} ({size}{info.image_size} px input"
        f"{f', {info.patch_size} px patches' if info.patch_size else ''}) {origin}. It sorts a tile of "
        f"H&E-stained colorectal tissue into one of {len(info.label_names)} classes."),
        info.preprocessing_text(),
        "## Test results",
    ]
    if info.test_metrics:
        split = {"stratified": " (tiles split stratified by class: tiles of one slide can be in train and "
                               "test, so these numbers can be optimistic for new slides)",
                 "slide": " (slide-disjoint split: no slide in two splits)"}.get(info.split_by or "", "")
        parts += [(f"Measured once on the held-out test split{split}; the intervals are 95% bootstrap "
                  "confidence intervals."), _metric_table(info.test_metrics)]
    else:
        parts.append("The model's files hold no test results.")
    parts += ["## The classes",
              "H&E colours nuclei blue/purple (hematoxylin) and cytoplasm and collagen pink (eosin).",
              "\n".join(["| class | what it looks like in H&E |", "|---|---|",
                         *[f"| **{name}** | {CLASS_DESCRIPTIONS.get(name, '')} |" for name in info.label_names]])]
    if info.data_preset == "kather2016":
        data = (f"Kather et al. (2016) colorectal cancer histology tiles ({info.training_text()}), one centre and one "
                f"scanner; released under CC-BY 4.0. {KATHER_CITATION}.")
    else:
        data = f"{len(info.label_names)}-class {info.training_text()}. {info.data_citation or ''}".strip()
    parts += [
        "## Data",
        data,
        "## Intended use",
        (f"**{DISCLAIMER}** Expect lower accuracy on other labs' staining, scanners or magnifications, "
        "and on tissue that is none of the classes above."),
    ]
    if not os.path.isdir(info.source):
        from huggingface_hub import constants

        parts.append(f"Model page and card: {constants.ENDPOINT}/{info.source}")
    return "\n\n".join(parts)
