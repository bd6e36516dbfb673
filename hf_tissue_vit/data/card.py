"""The dataset card: the known facts of a build as :class:`DatasetCardInfo`, rendered through
``model_card/dataset_card.md``.

As in setfit's card data + template pattern, the facts are collected as the build goes (the
:class:`~hf_tissue_vit.data.report.BuildReport`, saved as the metadata file) and the template
only lays them out. A fact that is unknown (None or empty) is not passed to the template, which
leaves its sentence out instead of printing an empty or made-up value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from ..card_templates import render_card
from ..constants import CLASS_DESCRIPTIONS, KATHER_FOLDERS, NCT_CLASSES
from .classes import PRESETS
from .schema import SPLITS

DATASET_CARD_TEMPLATE = "dataset_card.md"
PRETTY_NAME = "Tissue tiles"  # a dataset that is no known release
TAGS = ["histology", "pathology", "H&E", "medical", "hf_tissue_vit"]
# What the card says about a known release: its description and license.
_PRESET_TEXT = {
    "kather2016": ("Hematoxylin and eosin (H&E) stained tiles of colorectal cancer tissue from Kather et al. (2016)",
                   "CC-BY 4.0, as published on Zenodo. Use requires attribution to the authors below."),
    "nct-crc-he": ("H&E stained, Macenko-normalised tiles of colorectal cancer and normal tissue from Kather et al. "
                   "(2019), NCT-CRC-HE-100K / CRC-VAL-HE-7K",
                   "CC-BY 4.0, as published on Zenodo. Use requires attribution to the authors below."),
}
_RELEASE_FOLDERS = {name: folder for folder, name in KATHER_FOLDERS.items()} | {
    name: code for code, name in NCT_CLASSES.items()}

SPLIT_METHODS = {
    "stratified": "Stratified per class at random: validation and test get round(16%) of each class's tiles "
    "(100 of 625), train the rest (425 of 625; 357/84/84 of 525). Files are sorted by name and shuffled "
    "with a seeded NumPy generator, so the same files and seed give the same split file by file. "
    "Tiles with identical pixels are kept in one split.",
    "slide": "Slide-disjoint: every tile of a slide (CRC-Prim-HE-NN, parsed from the file name) is in the same "
    "split, so validation and test measure generalisation to unseen slides. Whole slides are assigned greedily "
    "(then improved by moves and swaps) to approach 68/16/16% per class; the achieved counts are in the class "
    "table above and can differ from the targets because slides are few and unevenly sized.",
    "given": "The source came already split (train/val/test folders or Hub splits); that split is kept. "
    "Tiles whose pixels also appear in an earlier split were removed.",
}


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


def public_source(source: str | None, source_kind: str | None) -> str | None:
    """What the card may say about the source: a Hub id or URL as is, of a local path only its name
    (the card is public, the build machine's paths are not)."""
    if not source or str(source_kind or "").startswith("hub") or "://" in source:
        return source
    return os.path.basename(str(source).rstrip("/\\"))


def _known(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


@dataclass
class DatasetCardInfo:
    """The facts a dataset card states. None or empty means unknown: the card leaves it out."""

    class_names: list[str]
    split_class_counts: dict[str, dict[str, int]]
    split_by: str | None = None
    seed: int | None = None
    split_slides: dict[str, list[str]] = field(default_factory=dict)
    source: str | None = None  # already public (see public_source)
    source_kind: str | None = None
    tile_size: list[int] | None = None
    mpp: float | None = None  # micrometres per pixel
    checks: dict[str, Any] = field(default_factory=dict)
    hub_dataset_id: str | None = None
    version: str | None = None
    preset: str | None = None  # a known release (data.classes.PRESETS)
    citation: str | None = None  # the dataset's own citation (--citation or the preset's)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> DatasetCardInfo:
        """The facts of a metadata file (``hf_tissue_vit_dataset.json``, see ``storage.dataset_metadata``)."""
        checks = dict(metadata.get("checks") or {})
        split_by = metadata.get("split_by")
        return cls(
            class_names=list(metadata["class_names"]),
            split_class_counts=metadata["split_class_counts"],
            split_by=None if split_by in (None, "unknown") else split_by,
            seed=metadata.get("seed"),
            split_slides=metadata.get("split_slides") or {},
            source=public_source(metadata.get("source"), metadata.get("source_kind")),
            source_kind=metadata.get("source_kind"),
            tile_size=checks.get("tile_size"),
            mpp=metadata.get("mpp"),
            checks=checks,
            hub_dataset_id=metadata.get("hub_dataset_id"),
            version=metadata.get("version"),
            preset=metadata.get("preset"),
            citation=metadata.get("citation"),
        )

    @property
    def pretty_name(self) -> str:
        return PRESETS[self.preset].pretty_name if self.preset in PRESETS else PRETTY_NAME

    @property
    def split_sizes(self) -> dict[str, int]:
        return {s: sum(self.split_class_counts.get(s, {}).values()) for s in SPLITS}

    def card_data(self) -> DatasetCardData:
        """The card's YAML header."""
        return DatasetCardData(
            license="cc-by-4.0" if self.preset in PRESETS else None,
            task_categories=["image-classification"],
            pretty_name=self.pretty_name,
            size_categories=[_size_category(sum(self.split_sizes.values()))],
            tags=list(TAGS) + (["colorectal-cancer"] if self.preset in PRESETS else []),
            source_datasets=["original"],
        )

    def _classes(self) -> list[dict[str, Any]]:
        counts = self.split_class_counts
        return [
            {"id": k, "name": name, "folder": _RELEASE_FOLDERS.get(name) if self.preset else None,
             "description": CLASS_DESCRIPTIONS.get(name),
             "counts": [counts.get(s, {}).get(name, 0) for s in SPLITS]}
            for k, name in enumerate(self.class_names)
        ]

    def template_variables(self) -> dict[str, Any]:
        """The Jinja variables of the template; unknown facts are left out."""
        microns = [round(n * self.mpp, 1) for n in self.tile_size] if self.tile_size and self.mpp else None
        variables = {
            "pretty_name": self.pretty_name,
            "description": _PRESET_TEXT.get(self.preset or "", (None,))[0],
            "license_text": _PRESET_TEXT.get(self.preset or "", (None, None))[1],
            "classes": self._classes(),
            "splits": list(SPLITS),
            "split_sizes": self.split_sizes,
            "total": sum(self.split_sizes.values()),
            "split_by": self.split_by,
            "split_method": SPLIT_METHODS.get(self.split_by or ""),
            "seed": self.seed,
            "split_slides": self.split_slides if self.split_by == "slide" else None,
            "source": self.source,
            "source_kind": self.source_kind,
            "tile_size": self.tile_size,
            "tile_microns": microns,
            "mpp": self.mpp,
            "checks": {k: v for k, v in self.checks.items() if v is not None},
            "hub_dataset_id": self.hub_dataset_id,
            "version": self.version,
            "citation": self.citation,
            "bibtex": PRESETS[self.preset].bibtex if self.preset in PRESETS and self.citation == PRESETS[
                self.preset].citation else None,
        }
        return {k: v for k, v in variables.items() if _known(v)}

    def render(self) -> DatasetCard:
        """The dataset card (YAML header + body from the template)."""
        return render_card(DATASET_CARD_TEMPLATE, self.card_data(), kind="dataset", **self.template_variables())


def dataset_card(metadata: dict[str, Any]) -> DatasetCard:
    """Dataset card (``model_card/dataset_card.md``) rendered from the build metadata."""
    return DatasetCardInfo.from_metadata(metadata).render()
