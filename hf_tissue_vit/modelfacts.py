"""What a model says about itself, read once for a local folder or a Hub repo: class names, µm/px,
training tile size, processor, results (:func:`read_model_facts`, :class:`ModelFacts` for the fallback
order). Predict, the app, evaluation and the model card all use it; :mod:`hf_tissue_vit.modelfolder`
checks that a model argument is a model at all before this reads it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .modelfolder import CARD_FILE, CONFIG_FILE, DATASET_METADATA_FILE, PROCESSOR_FILE, RESULTS_FILE, head_size

logger = logging.getLogger(__name__)

FAR_FACTOR = 2.0  # an image side more than 2x smaller or larger than the training tile's is "far" from it
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# Where the training tile size comes from when none is recorded: a guess, not a fact (no crop is made on it).
INPUT_SIZE_FALLBACK = "its input size; no training tile size is recorded"


def model_file(model: str | os.PathLike, name: str) -> Path | None:
    """``name`` of a local model folder, or of a Hub model repo (downloaded to the HF cache); None when absent."""
    text = os.fspath(model)
    if os.path.isdir(text):
        path = Path(text) / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(text, name))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def read_json_object(path: Path | None) -> dict[str, Any]:
    """A JSON object file; ``{}`` when ``path`` is None, absent, unreadable or not an object."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def side_pair(value: Any, width_first: bool) -> tuple[int, int] | None:
    """(height, width) from an int or a pair (``width_first``: [w, h], PIL's order, as datasets record
    ``tile_size``; else (h, w), as configs hold ``image_size``); None for anything else."""
    def positive(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

    if positive(value):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(positive(v) for v in value):
        first, second = int(value[0]), int(value[1])
        return (second, first) if width_first else (first, second)
    return None


def is_far(size: tuple[int, int], reference: tuple[int, int], factor: float = FAR_FACTOR) -> bool:
    """The package's one "far from the training tile size" rule: True when an image of ``size``
    (width, height) has a side more than ``factor`` times smaller or larger than the same side of
    ``reference`` (height, width)."""
    (width, height), (ref_h, ref_w) = size, reference
    return any(side * factor < ref or side > ref * factor for side, ref in ((height, ref_h), (width, ref_w)))


@dataclass
class ModelFacts:
    """What a model folder or Hub repo says about itself (see :func:`read_model_facts`).

    One fallback rule per fact:

    - ``label_names``: ``config.id2label`` in id order (what the model outputs), else the run's
      ``label_names``;
    - ``mpp`` (µm/px the model was trained at): ``config.mpp``, else the run's ``dataset.mpp``; None
      when unknown;
    - ``tile_size`` (height, width of the training tiles): the run's ``dataset.tile_size``, else the
      ``tile_size`` of its training dataset (when that folder is still there), else the model's input
      size ``config.image_size``; None when nothing tells;
    - ``input_size``: the processor's resize (height), else ``config.image_size``.
    """

    source: str
    config: dict[str, Any]
    processor: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)  # RESULTS_FILE of a finetune.py run
    card_path: Path | None = None

    @property
    def label_names(self) -> list[str]:
        """Class names in label-id order."""
        id2label = {int(k): str(v) for k, v in (self.config.get("id2label") or {}).items()}
        timm_names = self.config.get("label_names")  # TimmWrapperConfig's form of id2label
        names = ([id2label[i] for i in sorted(id2label)] or [str(n) for n in (timm_names or [])]
                 or list(self.results.get("label_names") or []))  # fmt: skip
        if names or not self.source or self.config.get("id2label"):
            return names
        classes = head_size(self.source) if Path(self.source).is_dir() else None  # unnamed: the head's size
        return [f"LABEL_{i}" for i in range(classes)] if classes else []

    @property
    def dataset(self) -> dict[str, Any]:
        """The ``dataset`` section of the run's results ({} when none)."""
        return self.results.get("dataset") or {}

    @property
    def mpp(self) -> float | None:
        """µm per pixel of the training tiles; None when neither config nor results record it."""
        value = self.config.get("mpp") or self.dataset.get("mpp")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    @property
    def input_size(self) -> int | None:
        """Side in px the processor resizes an image to (the model's input)."""
        size = self.processor.get("size")
        value = (size.get("height") or size.get("shortest_edge")) if isinstance(size, dict) else size
        pair = side_pair(value, width_first=False) or side_pair(self.config.get("image_size"), width_first=False)
        return pair[0] if pair else None

    @property
    def resample(self) -> str | None:
        """Name of the processor's resize filter (None when it does not say)."""
        return RESAMPLE_NAMES.get(self.processor.get("resample"))

    def training_tile_size(self) -> tuple[tuple[int, int] | None, str]:
        """(height, width) of the training tiles and where that comes from (see the class docstring)."""
        size = side_pair(self.dataset.get("tile_size"), width_first=True)
        if size is not None:
            return size, "the tile size its training run recorded"
        dataset_dir = self.dataset.get("dataset_dir")
        if isinstance(dataset_dir, str) and os.path.isdir(dataset_dir):
            meta = read_json_object(Path(dataset_dir) / DATASET_METADATA_FILE)
            size = side_pair(meta.get("tile_size") or (meta.get("checks") or {}).get("tile_size"), width_first=True)
            if size is not None:
                return size, "the tile size of its training dataset"
        size = side_pair(self.config.get("image_size"), width_first=False)
        if size is not None:
            return size, INPUT_SIZE_FALLBACK
        return None, "unknown"

    @property
    def tile_size(self) -> tuple[int, int] | None:
        """(height, width) of the training tiles (:meth:`training_tile_size`)."""
        return self.training_tile_size()[0]


def read_model_facts(model: str | os.PathLike, config: Any = None) -> ModelFacts:
    """:class:`ModelFacts` of a local model folder or Hub model id (config, processor, results; the card's
    path). ``config``: a loaded config (object or dict) to use instead of reading ``config.json``.

    Raises FileNotFoundError naming ``model`` when it has no config.json. Missing optional files are
    empty ({}); an optional file the Hub cannot deliver (offline) is logged and left empty.
    """
    source = os.fspath(model)
    if config is None:
        try:
            config_dict = read_json_object(model_file(source, CONFIG_FILE))
        except (OSError, ValueError) as err:  # not a folder nor a reachable Hub repo
            raise FileNotFoundError(f"--model {source!r}: no {CONFIG_FILE} ({err}); give a model folder or a Hub "
                                    "model id") from err
        if not config_dict:
            raise FileNotFoundError(f"--model {source!r}: no {CONFIG_FILE} (give a model folder or a Hub model id)")
    else:
        config_dict = config if isinstance(config, dict) else config.to_dict()
    optional: dict[str, Path | None] = {}
    for name in (PROCESSOR_FILE, RESULTS_FILE, CARD_FILE):
        try:
            optional[name] = model_file(source, name)
        except (OSError, ValueError) as err:  # Hub unreachable, not a repo id: the fact stays unknown
            logger.warning("%s: cannot read %s (%s)", source, name, err)
            optional[name] = None
    return ModelFacts(source, config_dict, read_json_object(optional[PROCESSOR_FILE]),
                      read_json_object(optional[RESULTS_FILE]), optional[CARD_FILE])


def training_tile_size(model: str | os.PathLike | None, config: Any = None) -> tuple[tuple[int, int] | None, str]:
    """(height, width) of the tiles ``model`` (a folder or Hub id; None: only ``config`` is read) was
    trained on, and where that comes from (:meth:`ModelFacts.training_tile_size`)."""
    if model is None:
        config_dict = {} if config is None else config if isinstance(config, dict) else config.to_dict()
        return ModelFacts("", config_dict).training_tile_size()
    return read_model_facts(model, config).training_tile_size()
