"""Inputs a model was not trained for: images far from its training tile size, and greyscale files.

The model resizes every image to its input size, so a 10x10 px crop or a 12000x12000 px scan is
classified, but its tissue is seen at a scale the model never saw; a greyscale file is read as grey
RGB (R = G = B), unlike the H&E colour tiles the model learnt from. Neither is an error: a run goes on
and logs one warning per kind, with counts and examples (:class:`InputNotes`).

The rule for "far" and the training tile size are the model folder's
(:func:`hf_tissue_vit.modelfacts.is_far`: a side more than :data:`~hf_tissue_vit.modelfacts.FAR_FACTOR`
times smaller or larger than the tile's; :meth:`hf_tissue_vit.modelfacts.ModelFacts.training_tile_size`),
the same the app warns with.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

from PIL import ImageMode

from ..modelfacts import FAR_FACTOR, is_far

logger = logging.getLogger(__name__)

# PIL's name of the one colour band of greyscale modes (L, LA, La, I, I;16*, F, 1), read from PIL's
# own mode table (PIL.ImageMode) rather than a list of mode names.
_GREY_BANDS = ("L", "I", "F", "1")
_EXAMPLES = 3


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
