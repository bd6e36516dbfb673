"""Which classes a build has, in which order: from the source's folder or label names, a known release
(preset), ``--classes`` and ``--label_map``.

- Folder or label names are the classes (the ``imagefolder`` convention), sorted, unless a manifest
  or ``classes`` gives the order.
- Known releases are recognised by their folder names (:data:`PRESETS`): the Kather 2016 release
  (``01_TUMOR`` ... ; its six classes unless all are kept) and NCT-CRC-HE-100K / CRC-VAL-HE-7K
  (``ADI`` ... ``TUM``, kept with readable names). A preset also knows the tiles' µm/px and citation.
- ``label_map`` merges or renames names (``{"tumour": "Tumor"}``), ``classes`` picks and orders a subset.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..constants import (
    ALL_CLASS_NAMES,
    CLASS_NAMES,
    KATHER_BIBTEX,
    KATHER_CITATION,
    KATHER_FOLDERS,
    KATHER_MPP,
    NCT_BIBTEX,
    NCT_CITATION,
    NCT_CLASSES,
    NCT_MPP,
)
from .schema import class_name_for

logger = logging.getLogger(__name__)

PRESET_NAMES: tuple[str, ...] = ("auto", "kather2016", "nct-crc-he", "none")


@dataclass(frozen=True)
class Preset:
    """A known tile release: its class names, µm/px and citation."""

    name: str
    pretty_name: str
    mpp: float | None
    citation: str
    bibtex: str


PRESETS: dict[str, Preset] = {
    "kather2016": Preset("kather2016", "Kather 2016 colorectal cancer histology tiles", KATHER_MPP,
                         KATHER_CITATION, KATHER_BIBTEX),
    "nct-crc-he": Preset("nct-crc-he", "NCT-CRC-HE colorectal cancer tissue tiles", NCT_MPP, NCT_CITATION,
                         NCT_BIBTEX),
}


@dataclass
class ClassChoice:
    """What the user asked for: a preset (or ``auto``), a subset/order, a name map."""

    preset: str = "auto"
    classes: list[str] | None = None
    label_map: dict[str, str] = field(default_factory=dict)
    keep_all_classes: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESET_NAMES:
            raise ValueError(f"--preset must be one of {PRESET_NAMES}, got {self.preset!r}")
        if self.classes is not None:
            self.classes = parse_class_list(self.classes)
        self.label_map = parse_label_map(self.label_map)


@dataclass
class ClassPlan:
    """The outcome: class names in label order, raw name -> class (None: left out), the preset used."""

    class_names: list[str]
    mapping: dict[str, str | None]
    preset: Preset | None = None


def parse_class_list(value: str | Sequence[str]) -> list[str]:
    """``"Tumor,Stroma"`` or a list -> names; an empty or repeated name is an error."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    if not names or any(not n for n in names):
        raise ValueError(f"--classes must be comma-separated class names (e.g. tumor,normal), got {value!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--classes names {', '.join(twice)} more than once")
    return names


def parse_label_map(value: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"tumour=Tumor,TUM=Tumor"`` or a dict -> {source name: class name}."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = []
        for item in value.split(","):
            old, sep, new = item.partition("=")
            if not sep:
                raise ValueError(f"--label_map entries must be source=class (e.g. tumour=Tumor), got {item!r}")
            pairs.append((old, new))
    mapping = {str(old).strip(): str(new).strip() for old, new in pairs}
    if any(not old or not new for old, new in mapping.items()):
        raise ValueError(f"--label_map entries must be source=class with both names given, got {value!r}")
    return mapping


def _nct_name(raw: str) -> str | None:
    return NCT_CLASSES.get(str(raw).strip().upper())


def detect_preset(raw_names: Sequence[str]) -> str:
    """``kather2016`` when a name is a Kather release folder (or all are Kather class names),
    ``nct-crc-he`` when all are NCT-CRC-HE class codes, else ``none``."""
    names = [str(n) for n in raw_names]
    if names and all(_nct_name(n) for n in names):
        return "nct-crc-he"
    if any(n in KATHER_FOLDERS for n in names) or (names and all(class_name_for(n) for n in names)):
        return "kather2016"
    return "none"


def _preset_mapping(preset: str, raw_names: Sequence[str]) -> tuple[dict[str, str | None], list[str]]:
    """raw -> preset class name (None: not a class of the preset) and the preset's label order."""
    if preset == "kather2016":
        return {r: class_name_for(r) for r in raw_names}, list(ALL_CLASS_NAMES)
    if preset == "nct-crc-he":
        return {r: _nct_name(r) for r in raw_names}, list(NCT_CLASSES.values())
    return {r: r for r in raw_names}, []


def _check_case(names: Sequence[str], where: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            raise ValueError(f"{where}: class names {other!r} and {name!r} differ only in case; rename one, or merge "
                             f"them with --label_map {name}={other}")


def plan_classes(raw_names: Sequence[str], choice: ClassChoice, where: str, given_order: bool = False) -> ClassPlan:
    """Resolve the classes of a source whose folders/labels are ``raw_names`` (in the source's order when
    ``given_order``, e.g. a manifest's first appearances; otherwise sorted)."""
    raw_names = list(dict.fromkeys(str(r) for r in raw_names))
    preset = detect_preset(raw_names) if choice.preset == "auto" else choice.preset
    mapping, preset_order = _preset_mapping(preset, raw_names)
    unknown = [r for r, m in mapping.items() if m is None and r not in choice.label_map]
    if unknown:
        logger.warning("%s: ignoring folder(s)/label(s) that are no %s class: %s", where, preset, ", ".join(unknown))
    mapping = {r: choice.label_map.get(r, choice.label_map.get(m, m) if m else None) for r, m in mapping.items()}
    present = list(dict.fromkeys(m for m in mapping.values() if m is not None))
    _check_case(present, where)
    if choice.classes is not None:
        _check_case(choice.classes, "--classes")
        class_names = list(choice.classes)
    elif preset == "kather2016" and not choice.label_map:
        class_names = list(ALL_CLASS_NAMES if choice.keep_all_classes else CLASS_NAMES)
    elif preset_order:
        class_names = [c for c in preset_order if c in present] + [c for c in present if c not in preset_order]
    else:
        class_names = present if given_order else sorted(present)
    if not class_names:
        raise ValueError(f"{where}: no classes found")
    return ClassPlan(class_names, mapping, PRESETS.get(preset))


def folder_hint(class_name: str) -> str:
    """The Kather release folder of a Kather class (``01_TUMOR``), else the class name itself."""
    return {name: folder for folder, name in KATHER_FOLDERS.items()}.get(class_name, class_name)
