"""What a built dataset looks like: split names, class names and their aliases, slide ids, features."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
from datasets import ClassLabel, DatasetDict, Features, Value
from datasets import Image as ImageFeature

from ..constants import ALL_CLASS_NAMES, CLASS_NAMES, KATHER_FOLDERS

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SLIDE_PATTERN = re.compile(r"CRC-Prim-HE-\d+")

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
                 "validation": "validation", "dev": "validation", "test": "test", "testing": "test"}
_CLASS_ALIASES = {name.lower(): name for name in ALL_CLASS_NAMES} | {
    "tumour": "Tumor", "lymphocytes": "Lympho", "lymphocyte": "Lympho", "background": "Empty",
    "adipose_tissue": "Adipose", "fat": "Adipose", "necrosis": "Debris",
}
FOLDER_OF_CLASS = {name: folder for folder, name in KATHER_FOLDERS.items()}


def class_name_for(name: str) -> str | None:
    """Our class name for a folder or label name (``01_TUMOR``, ``tumor``, ``TUMOR`` -> ``Tumor``)."""
    key = re.sub(r"^\d+[_\- ]*", "", str(name).strip()).lower().replace(" ", "_")
    return _CLASS_ALIASES.get(key)


def split_name_for(name: str) -> str | None:
    """Our split name for a folder or split name (``val``, ``valid``, ``dev`` -> ``validation``)."""
    return SPLIT_ALIASES.get(str(name).lower())


def parse_slide(filename: str) -> str:
    """Slide id (``CRC-Prim-HE-07``) parsed from a Kather file name; ``""`` when absent."""
    match = SLIDE_PATTERN.search(os.path.basename(filename))
    return match.group(0) if match else ""


def dataset_features(class_names: Sequence[str] = CLASS_NAMES) -> Features:
    """Features of every split: image (PNG bytes), label, slide, filename."""
    return Features({
        "image": ImageFeature(),
        "label": ClassLabel(names=list(class_names)),
        "slide": Value("string"),
        "filename": Value("string"),
    })


def split_class_counts(dataset_dict: DatasetDict) -> dict[str, dict[str, int]]:
    """``{split: {class: tiles}}`` of a built dataset."""
    out = {}
    for split, ds in dataset_dict.items():
        names = ds.features["label"].names
        counts = np.bincount(np.asarray(ds["label"], dtype=np.int64), minlength=len(names))
        out[split] = {name: int(n) for name, n in zip(names, counts)}
    return out


def describe_columns(features: Features) -> str:
    """``name (Type), ...`` of a split's columns, for error messages."""
    return ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items())
