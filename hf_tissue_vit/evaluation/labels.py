"""Class folders and class names of labelled data, matched to a model's classes.

A folder name or dataset class name is matched to the model's ``id2label`` in this order:

1. ``--label_map`` (``{"FOLDER": "ModelClass"}``; ``null`` leaves the folder out);
2. the same name, case-insensitively, a leading ``01_``-style number ignored (``tumor``, ``TUMOR``), an
   NCT-CRC-HE folder code read as the readable name a dataset built from it keeps (``TUM`` -> ``Tumor
   epithelium``);
3. the same tissue through the alias table below (``01_TUMOR`` -> Tumor, ``TUM`` -> Tumor), on both
   sides, so a model with NCT-style labels (``TUM`` ...) also reads Kather folders.

A folder of a known tissue that the model has no class for (``07_ADIPOSE``, ``ADI``, ``BACK`` for the
six-class Kather model) is left out and counted. A folder that matches nothing, or whose tissue could be
one of several model classes, is an error until ``--label_map`` maps or drops it: scoring it under a
guessed class would change the score without anyone noticing.

Alias table. Kather et al. 2016 (Sci Rep 6:27988, the release's folders ``01_TUMOR`` ... ``08_EMPTY``):
Tumor = tumour epithelium; Stroma = simple stroma (homogeneous: tumour stroma, extra-tumoural stroma and
smooth muscle); Complex = complex stroma (stroma with single tumour cells and/or a few immune cells);
Lympho = immune cells (incl. immune-cell conglomerates and sub-mucosal lymphoid follicles); Debris =
debris, incl. necrosis, haemorrhage and mucus; Mucosa = normal mucosal glands; Adipose; Empty =
background. Kather et al. 2019 (PLoS Med 16:e1002730; NCT-CRC-HE-100K and CRC-VAL-HE-7K): ADI adipose
tissue, BACK background, DEB debris, LYM lymphocytes, MUC mucus, MUS smooth muscle, NORM normal colon
mucosa, STR cancer-associated stroma, TUM colorectal adenocarcinoma epithelium.

Mapped by default, the same tissue under both definitions: TUM -> Tumor, LYM -> Lympho, NORM -> Mucosa,
DEB -> Debris, ADI -> Adipose, BACK -> Empty.

Not mapped by default (:data:`AMBIGUOUS`; the error names the choices):

- STR: cancer-associated stroma. Kather 2016 divides stroma into simple (Stroma) and complex (Complex)
  stroma; an STR tile can be either, so no single class is right for the folder.
- MUS: smooth muscle. Kather 2016 counts it in simple stroma, Kather 2019 keeps it apart from stroma;
  ``{"MUS": "Stroma"}`` follows the 2016 definition, ``{"MUS": null}`` leaves it out.
- MUC: mucus. Kather 2016 puts mucus in Debris, but MUC is not what DEB holds and its name is easily
  read as mucosa (normal mucosa is NORM); ``{"MUC": "Debris"}`` follows the 2016 definition.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..constants import IMAGE_EXTENSIONS, NCT_CLASSES
from ..data.schema import class_name_for

# NCT-CRC-HE-100K / CRC-VAL-HE-7K folder -> Kather 2016 class (see the module docstring).
NCT_ALIASES: dict[str, str] = {"TUM": "Tumor", "LYM": "Lympho", "NORM": "Mucosa", "DEB": "Debris",
                               "ADI": "Adipose", "BACK": "Empty"}
# Folder -> (Kather 2016 classes it could belong to, why it is not mapped by default).
AMBIGUOUS: dict[str, tuple[tuple[str, ...], str]] = {
    "STR": (("Stroma", "Complex"), "cancer-associated stroma can be Kather's simple (Stroma) or complex "
                                   "(Complex) stroma"),
    "MUS": (("Stroma",), "smooth muscle is in Kather 2016's simple stroma but apart from stroma in NCT-CRC-HE"),
    "MUC": (("Debris",), "mucus is in Kather 2016's Debris class, and is not mucosa (NORM)"),
}
# A dataset built from NCT-CRC-HE folders keeps readable names ("Tumor epithelium"): name -> folder code.
_NCT_CODE_OF = {name.lower(): code for code, name in NCT_CLASSES.items()}
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "dev", "test", "testing"}
_JUNK_DIRS = {"__MACOSX", "$RECYCLE.BIN", "System Volume Information"}
_NUMBER_PREFIX = re.compile(r"^\d+[_\- ]*")


def _bare(name: str) -> str:
    """Folder or class name without a leading ``01_`` number, upper case."""
    return _NUMBER_PREFIX.sub("", str(name).strip()).upper()


def tissue_of(name: str) -> str | None:
    """The Kather 2016 class a folder or class name stands for (``01_TUMOR``, ``TUM``, ``tumour`` ->
    ``Tumor``); None when the name is unknown or ambiguous (:data:`AMBIGUOUS`)."""
    bare = _NCT_CODE_OF.get(str(name).strip().lower(), _bare(name))
    if bare in NCT_ALIASES:
        return NCT_ALIASES[bare]
    if bare in AMBIGUOUS:
        return None
    return class_name_for(name)


# --------------------------------------------------------------------------------------------
# Class folders
# --------------------------------------------------------------------------------------------
@dataclass
class ClassFolders:
    """The folder that holds one sub-folder per class, and what lies beside the class folders."""

    root: Path
    folders: dict[str, Path]  # class folder name -> path, sorted by name
    loose_files: int = 0  # images directly in ``root``, in no class folder (not scored)


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name not in _JUNK_DIRS)


def _images_in(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))


def find_class_folders(folder: str | os.PathLike, flag: str = "--inputs") -> ClassFolders:
    """Find the class folders under ``folder``: its sub-folders, or those of the first folder below it
    with more than one sub-folder when it only wraps one (``FOLDER/NCT-CRC-HE-100K/TUM/...``)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {str(root)!r}: no such folder")
    while True:
        subdirs = _visible_subdirs(root)
        if not subdirs:
            raise ValueError(f"{flag} {str(root)!r} has no class sub-folders; give the folder that holds one "
                             "sub-folder per class (e.g. 01_TUMOR/ ... or TUM/ STR/ ...)")
        wrapper = (len(subdirs) == 1 and _images_in(root) == 0 and tissue_of(subdirs[0].name) is None
                   and _bare(subdirs[0].name) not in AMBIGUOUS and _visible_subdirs(subdirs[0]))
        if not wrapper:
            break
        root = subdirs[0]
    splits = [p.name for p in subdirs if p.name.lower() in SPLIT_NAMES]
    if splits:
        pick = next((s for s in splits if s.lower().startswith("test")), splits[0])
        raise ValueError(f"{flag} {str(root)!r} holds split folders {splits}, not class folders; "
                         f"pass one split, e.g. {str(root / pick)!r}")
    return ClassFolders(root, {p.name: p for p in subdirs}, _images_in(root))


# --------------------------------------------------------------------------------------------
# --label_map
# --------------------------------------------------------------------------------------------
def parse_label_map(value: str | Mapping[str, str | None] | None) -> dict[str, str | None]:
    """``--label_map``: a JSON object (inline, or the path of a .json file) of data class -> model class
    or null; returns ``{}`` for None."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        data = dict(value)
    else:
        text = str(value).strip()
        if not text.startswith("{"):
            path = Path(text).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"--label_map {text!r} is neither a JSON object nor a JSON file")
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--label_map is not valid JSON ({err}); write it like "
                             '\'{"STR": "Stroma", "MUS": null}\'') from None
    if not isinstance(data, dict):
        raise ValueError(f"--label_map must be a JSON object of data class -> model class, got {type(data).__name__}")
    bad = {k: v for k, v in data.items() if not (v is None or isinstance(v, str))}
    if bad:
        raise ValueError(f"--label_map values must be model class names or null, got {bad}")
    return {str(k): (v if v else None) for k, v in data.items()}


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------
@dataclass
class LabelMapping:
    """Which model class each class of the data is scored as (None: left out), and why."""

    model_labels: list[str]
    targets: dict[str, int | None]
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def scored(self) -> list[str]:
        """Data classes that are scored."""
        return [name for name, target in self.targets.items() if target is not None]

    @property
    def left_out(self) -> list[str]:
        """Data classes that are not scored."""
        return [name for name, target in self.targets.items() if target is None]

    def as_json(self) -> dict[str, str | None]:
        """Data class -> model class name (None when left out)."""
        return {name: None if t is None else self.model_labels[t] for name, t in self.targets.items()}

    def describe(self, counts: Mapping[str, int] | None = None) -> str:
        """One line for the card and the summary: the renamed classes and the classes left out."""
        renamed = [f"{s} → {self.model_labels[t]}" for s, t in self.targets.items()
                   if t is not None and s != self.model_labels[t]]
        dropped = [f"{s} ({counts[s]} images)" if counts and s in counts else s for s in self.left_out]
        parts = []
        if renamed:
            parts.append("data classes scored as model classes: " + ", ".join(renamed))
        if dropped:
            parts.append("left out: " + ", ".join(dropped))
        return "; ".join(parts) + ("." if parts else "")


def _model_tissues(model_labels: Sequence[str]) -> dict[str, int]:
    """Kather class -> model label id, for the labels that name one tissue unambiguously."""
    tissues: dict[str, list[int]] = {}
    for i, label in enumerate(model_labels):
        tissue = tissue_of(label)
        if tissue is not None:
            tissues.setdefault(tissue, []).append(i)
    return {tissue: ids[0] for tissue, ids in tissues.items() if len(ids) == 1}


def _check_label_map(label_map: Mapping[str, str | None], source: Sequence[str], by_lower: Mapping[str, int],
                     model_labels: Sequence[str]) -> dict[str, int | None]:
    """--label_map keyed by data class; refuses names that are not classes of the data or the model."""
    source_by_lower = {s.lower(): s for s in source}
    unknown = [k for k in label_map if k.lower() not in source_by_lower]
    if unknown:
        raise ValueError(f"--label_map names {unknown}, which are not classes of the data {list(source)}")
    bad = [v for v in label_map.values() if v is not None and v.lower() not in by_lower]
    if bad:
        raise ValueError(f"--label_map maps to {bad}, which are not classes of the model {list(model_labels)}; "
                         "use null to leave a class out")
    return {source_by_lower[k.lower()]: None if v is None else by_lower[v.lower()] for k, v in label_map.items()}


def _match_one(name: str, by_lower: Mapping[str, int], by_tissue: Mapping[str, int],
               model_candidates: set[str], model_known: bool) -> tuple[int | None, str]:
    """(model label id or None, reason); raises KeyError(problem) when the class needs --label_map.

    A tissue is left out on its own only when every model class is a known tissue: a model with other
    class names (``tumour_epithelium``) may well have a class for it.
    """
    for key in (name.lower(), _bare(name).lower(), NCT_CLASSES.get(_bare(name), "").lower()):
        if key and key in by_lower:
            return by_lower[key], "same name"
    tissue = tissue_of(name)
    if tissue is not None and tissue in by_tissue:
        return by_tissue[tissue], "same tissue"
    if _bare(name) in AMBIGUOUS:
        candidates, why = AMBIGUOUS[_bare(name)]
        if set(candidates) & (set(by_tissue) | model_candidates) or not model_known:
            raise KeyError(f"{name} ({why})", candidates[0] if set(candidates) & set(by_tissue) else None)
        return None, "no model class"
    if tissue is None:
        raise KeyError(f"{name} (matches no class of the model)", None)
    if tissue in model_candidates:  # e.g. Kather Stroma tiles for a model with an NCT "STR" class
        raise KeyError(f"{name} (a model class may hold {tissue}, but none is named for it)", None)
    if not model_known:
        raise KeyError(f"{name} ({tissue}: the model's class names are not known tissues)", None)
    return None, "no model class"


def resolve_labels(source_classes: Sequence[str], model_labels: Sequence[str],
                   label_map: Mapping[str, str | None] | None = None, where: str = "the data") -> LabelMapping:
    """Match every class of the data to a model class or leave it out; ValueError lists every class that
    needs ``--label_map`` (unknown or ambiguous), so a user fixes them all at once."""
    model_labels = [str(m) for m in model_labels]
    by_lower = {m.lower(): i for i, m in enumerate(model_labels)}
    by_tissue = _model_tissues(model_labels)
    model_candidates = {c for m in model_labels if _bare(m) in AMBIGUOUS for c in AMBIGUOUS[_bare(m)][0]}
    model_known = all(tissue_of(m) is not None or _bare(m) in AMBIGUOUS for m in model_labels)
    explicit = _check_label_map(label_map or {}, source_classes, by_lower, model_labels)
    targets: dict[str, int | None] = {}
    reasons: dict[str, str] = {}
    problems: list[str] = []
    suggestions: dict[str, str | None] = {}
    for name in source_classes:
        if name in explicit:
            targets[name], reasons[name] = explicit[name], "--label_map"
            continue
        try:
            targets[name], reasons[name] = _match_one(name, by_lower, by_tissue, model_candidates, model_known)
        except KeyError as err:
            problems.append(err.args[0])
            suggestions[name] = err.args[1]
    if problems:
        example = json.dumps({k: None if v is None else model_labels[by_tissue[v]] for k, v in suggestions.items()})
        raise ValueError(f"classes of {where} that need --label_map: {'; '.join(problems)}. Map each to one of "
                         f"the model's classes {model_labels} or to null to leave it out, e.g. "
                         f"--label_map '{example}'")
    mapping = LabelMapping(model_labels, targets, reasons)
    if not mapping.scored:
        raise ValueError(f"no class of {where} {list(source_classes)} maps to a class of the model {model_labels}")
    return mapping

