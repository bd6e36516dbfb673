"""Inputs a model was not trained for: images far from its training tile size, and greyscale files.

The model resizes every image to its input size, so a 10x10 px crop or a 12000x12000 px scan is
classified, but its tissue is seen at a scale the model never saw; a greyscale file is read as grey
RGB (R = G = B), unlike the H&E colour tiles the model learnt from. Neither is an error: a run goes on
and logs one warning per kind, with counts and examples (:class:`InputNotes`).

The rule for "far": an image is far from the training tile size (H x W) when either side is more
than :data:`FAR_FACTOR` times smaller or larger than the tile's side (with 150 px Kather tiles:
under 75 px or over 300 px). The training tile size is, in this order, the ``tile_size`` the model
folder's ``all_results.json`` records (``dataset.tile_size``), the one in the metadata of the
dataset it was trained on (``dataset.dataset_dir``, when that folder is still there), else the
model's input size (``config.image_size``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import ImageMode

logger = logging.getLogger(__name__)

FAR_FACTOR = 2.0
# PIL's name of the one colour band of greyscale modes (L, LA, La, I, I;16*, F, 1), read from PIL's
# own mode table (PIL.ImageMode) rather than a list of mode names.
_GREY_BANDS = ("L", "I", "F", "1")
_EXAMPLES = 3


def _side_pair(value: Any, width_first: bool) -> tuple[int, int] | None:
    """(height, width) from an int or a pair (``width_first``: [w, h], PIL's order, as datasets record
    ``tile_size``; else (h, w), as configs hold ``image_size``); None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
        first, second = int(value[0]), int(value[1])
        return (second, first) if width_first else (first, second)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _training_results(model: str) -> dict[str, Any]:
    """all_results.json of a local model folder or a Hub model (already cached or downloaded); {} when none."""
    if os.path.isdir(model):
        return _read_json(Path(model) / "all_results.json")
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(Path(hf_hub_download(model, "all_results.json")))
    except Exception:  # no such file, offline, not a repo id: the model input size is used
        return {}


def training_tile_size(model: str | os.PathLike | None, config: Any = None) -> tuple[tuple[int, int] | None, str]:
    """(height, width) of the tiles ``model`` (a folder or Hub id; None: only ``config`` is read) was
    trained on, and where that comes from (see the module docstring for the order); (None, "unknown")
    when nothing tells."""
    dataset = (_training_results(os.fspath(model)).get("dataset") or {}) if model is not None else {}
    size = _side_pair(dataset.get("tile_size"), width_first=True)
    if size is not None:
        return size, "the tile size its training run recorded"
    dataset_dir = dataset.get("dataset_dir")
    if isinstance(dataset_dir, str) and os.path.isdir(dataset_dir):
        from ..data import read_dataset_metadata

        try:
            meta = read_dataset_metadata(dataset_dir)
        except (OSError, ValueError):
            meta = {}
        size = _side_pair(meta.get("tile_size") or (meta.get("checks") or {}).get("tile_size"), width_first=True)
        if size is not None:
            return size, "the tile size of its training dataset"
    size = _side_pair(getattr(config, "image_size", None), width_first=False)
    if size is not None:
        return size, "its input size; no training tile size is recorded"
    return None, "unknown"


def is_far(size: tuple[int, int], reference: tuple[int, int], factor: float = FAR_FACTOR) -> bool:
    """True when an image of ``size`` (width, height) has a side more than ``factor`` times smaller or
    larger than the same side of ``reference`` (height, width)."""
    (width, height), (ref_h, ref_w) = size, reference
    return any(side * factor < ref or side > ref * factor for side, ref in ((height, ref_h), (width, ref_w)))


def is_greyscale(mode: str) -> bool:
    """True for a greyscale PIL mode (L, LA, I;16, I, F, 1; a palette image counts as colour)."""
    bands = ImageMode.getmode(mode).bands
    return bands[0] in _GREY_BANDS and bands[1:] in ((), ("A",), ("a",))  # LAB starts with L too


@dataclass
class InputNotes:
    """Counts of unusual inputs in one run, logged once per kind by :meth:`log`."""

    reference: tuple[int, int] | None  # training tile (height, width); None: no size check
    source: str = "the tile size given"
    factor: float = FAR_FACTOR
    seen: int = 0
    far: int = 0
    far_examples: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    grey: Counter = field(default_factory=Counter)
    grey_examples: list[str] = field(default_factory=list)

    def add(self, path: str, size: tuple[int, int], mode: str) -> None:
        """Note one image file by its size (width, height) and PIL mode (known before its pixels are decoded)."""
        self.seen += 1
        if self.reference is not None and is_far(size, self.reference, self.factor):
            self.far += 1
            if len(self.far_examples) < _EXAMPLES:
                self.far_examples.append((os.path.basename(path), size))
        if is_greyscale(mode):
            self.grey[mode] += 1
            if len(self.grey_examples) < _EXAMPLES:
                self.grey_examples.append(os.path.basename(path))

    def log(self) -> None:
        """One warning per kind of unusual input seen (nothing when all inputs were ordinary)."""
        if self.far:
            ref_h, ref_w = self.reference
            examples = ", ".join(f"{name} ({w}x{h})" for name, (w, h) in self.far_examples)
            logger.warning(
                "%d of %d images are far from the %dx%d px tiles the model expects (%s): a side more "
                "than %gx smaller or larger, e.g. %s. The model resizes each image to its input size, so "
                "it sees their tissue at another scale and their predictions are unreliable; classify "
                "tiles of about %dx%d px (scripts/tissue_map.py cuts a large image into such windows).",
                self.far, self.seen, ref_w, ref_h, self.source, self.factor, examples, ref_w, ref_h)
        if self.grey:
            modes = ", ".join(f"{mode}: {n}" for mode, n in sorted(self.grey.items()))
            logger.warning(
                "%d of %d images are greyscale in the source file (%s), e.g. %s: they are read as grey RGB, "
                "while the model learnt from colour H&E tiles, so their predictions are unreliable.",
                sum(self.grey.values()), self.seen, modes, ", ".join(self.grey_examples))
