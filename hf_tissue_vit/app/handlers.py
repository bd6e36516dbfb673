"""What the app computes, as plain functions of files (no Gradio here, so tests and scripts can call them).

:class:`AppModel` holds one model loaded twice from the same files: a
:class:`~hf_tissue_vit.predict.TilePredictor` for the probabilities (the exact path ``predict.py``
takes for a file, so the app's numbers equal the CSV's) and an fp32 copy for attention maps
(:func:`~hf_tissue_vit.interpret.explain_tiles` switches it to eager attention while it runs).
A lock serialises the model calls: Gradio runs events in threads.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import scratch_dir
from ..imaging import load_rgb8
from ..interpret.attention import explain_tiles, require_vit
from ..interpret.figures import overlay_heatmap
from ..predict.predictor import TilePredictor, label_names_of
from ..slides.outputs import save_slide_map
from ..slides.reader import image_mpp, open_slide
from ..slides.run import SlideMapOptions, map_slide, model_mpp
from .model_info import ModelInfo, load_model_info, resolution_warning, tile_warnings

logger = logging.getLogger(__name__)

ALPHA = 0.45  # heatmap opacity: the tissue stays readable under the colours
KEEP_RUNS = 20  # tissue-map output folders kept on disk per app


@dataclass
class TileResult:
    """A classified tile: probabilities per class (label-id order), the top class, the tile as read,
    its attention-rollout overlay and warnings about size or resolution."""

    probabilities: dict[str, float]
    label: str
    score: float
    tile: np.ndarray
    rollout_overlay: np.ndarray
    warnings: list[str]


@dataclass
class MapResult:
    """A tissue map: the picture (with legend), the class-area rows, the files :func:`save_slide_map`
    wrote (the same as scripts/tissue_map.py's) and the map's summary (``SlideMap.fractions``)."""

    overlay_png: str
    table: list[list[Any]]
    csv: str
    geojson: str
    fractions: dict[str, Any]
    warnings: list[str]
    files: dict[str, str]


AREA_COLUMNS = ["class", "windows", "% of tissue", "area (mm²)"]
# The mapping's flags, as the app's fields call them (its errors are the one-line errors of slides).
_FIELD_NAMES = {"--slide_mpp": "the scan resolution", "--tile": "window", "--image": "the image",
                "--mpp": "a model µm/px"}


def area_table(fractions: dict[str, Any]) -> list[list[Any]]:
    """Rows ``[class, windows, % of tissue, area mm²]`` and a background row, from ``SlideMap.fractions()``
    (areas None when the image records no µm/px)."""
    def area(value: float | None) -> float | None:
        return None if value is None else float(f"{value:.4g}")  # 4 significant digits: a window is small

    rows = [[name, v["cells"], round(100 * v["fraction_of_tissue"], 1), area(v["area_mm2"])]
            for name, v in fractions["classes"].items()]
    cell = fractions.get("cell_area_mm2")
    n_bg = fractions["background_windows"]
    rows.append(["Background (not classified)", n_bg, None, area(None if cell is None else n_bg * cell)])
    return rows


def _app_error(err: ValueError) -> ValueError:
    """A mapping error in the app's words (the slides' errors name the script's flags)."""
    text = str(err)
    for flag, field in _FIELD_NAMES.items():
        text = text.replace(flag, field)
    return ValueError(text)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class AppModel:
    """A trained classifier (local output dir or Hub id) with what the app needs around it.

    ``bf16`` and ``device`` as in ``predict.py`` (None = its ``--bf16 auto`` and default device), so
    the app's probabilities equal ``predict.py``'s on the same machine.
    """

    def __init__(self, model: str, device: str | None = None, bf16: bool | None = None) -> None:
        from ..modelfolder import check_model_folder
        from ..modeling import load_for_inference

        check_model_folder(model, "--model")  # a missing folder or damaged weights: said before any Hub try
        self.source = model
        self.info: ModelInfo = load_model_info(model)
        self.predictor = TilePredictor.from_pretrained(model, device=device, bf16=bf16)
        self._explainer, self._processor = load_for_inference(model, device=device)
        self._lock = threading.Lock()
        self._runs = scratch_dir("hf_tissue_vit_app_")
        self._n_runs = 0

    @property
    def default_window(self) -> int:
        """Window side of a tissue map: the training tile's, else the model's input size."""
        return self.info.train_tile_px or self.info.image_size

    @property
    def label_names(self) -> list[str]:
        """Class names in label-id order (the order of the probabilities)."""
        return label_names_of(self._explainer)

    # --- tiles --------------------------------------------------------------------------------
    def probabilities(self, path: str | os.PathLike) -> dict[str, float]:
        """Class → probability for the image file ``path``, exactly as ``predict.py`` computes it."""
        with self._lock:
            (row,) = list(self.predictor.predict_files([os.fspath(path)]))
        if row.error:
            raise ValueError(f"{Path(path).name} cannot be read as an image ({row.error})")
        return {name: float(p) for name, p in zip(self.label_names, row.probs)}

    def classify_tile(self, path: str | os.PathLike, mpp: float | None = None) -> TileResult:
        """Probabilities, top class, rollout overlay and warnings for one tile file.

        ``mpp``: the scan's µm/px when the user knows it; else what the file states, if anything.
        """
        probs = self.probabilities(path)
        tile = load_rgb8(path)
        label = max(probs, key=probs.get)
        height, width = tile.shape[:2]
        warnings = tile_warnings(self.info, width, height, mpp if mpp else image_mpp(path))
        try:
            require_vit(self._explainer.config)
        except ValueError as err:  # a timm model returns no attention weights: the tile is shown without a map
            return TileResult(probs, label, probs[label], tile, tile, [*warnings, f"no attention map: {err}"])
        with self._lock:
            (item,) = explain_tiles(self._explainer, self._processor, [tile])
        # item.tile: the image as drawn (a side over explain_tiles' max_side is downscaled), the maps' size
        return TileResult(probs, label, probs[label], item.tile, overlay_heatmap(item.tile, item.rollout, ALPHA),
                          warnings)

    def head_overlays(self, path: str | os.PathLike) -> list[tuple[np.ndarray, str]]:
        """(overlay, caption) per head of the last layer: where each head's CLS token looks."""
        tile = load_rgb8(path)
        with self._lock:
            (item,) = explain_tiles(self._explainer, self._processor, [tile])
        return [(overlay_heatmap(item.tile, heat, ALPHA), f"last layer, head {h + 1}")
                for h, heat in enumerate(item.heads)]

    # --- larger images ------------------------------------------------------------------------
    def _run_dir(self) -> Path:
        """A new output folder; only the last KEEP_RUNS are kept."""
        self._n_runs += 1
        folder = self._runs / f"run_{self._n_runs:05d}"
        old = self._runs / f"run_{self._n_runs - KEEP_RUNS:05d}"
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def map_image(self, path: str | os.PathLike, window: int | None = None, overlap: bool = False,
                  background_threshold: float = 0.8, mpp: float | None = None) -> MapResult:
        """Tissue map of a larger image or a whole slide, through the package's one map path
        (:func:`hf_tissue_vit.slides.map_slide` and :func:`~hf_tissue_vit.slides.save_slide_map`, the
        files scripts/tissue_map.py writes): ``window`` px windows (default :attr:`default_window`) at
        the model's µm/px (its ``config.mpp``), step ``window`` (or half of it with ``overlap``), only
        windows with tissue classified. ``mpp``: the scan's µm/px when the file does not record it."""
        window = int(window or self.default_window)
        options = SlideMapOptions(tile=window, stride=max(1, window // 2) if overlap else window, slide_mpp=mpp,
                                  background_threshold=background_threshold, progress=False)
        target = model_mpp(self.predictor)
        with self._lock:
            out = self._run_dir()
        try:
            with open_slide(os.fspath(path), options.slide_mpp, options.max_image_pixels) as reader, self._lock:
                if target is None and reader.kind != "image":
                    raise ValueError(f"{Path(path).name}: the model records no µm/px (config.mpp), so a whole slide "
                                     "cannot be read at its scale; map it with scripts/tissue_map.py --mpp")
                result = map_slide(self.predictor, reader, options, target)
        except ValueError as err:
            raise _app_error(err) from err
        files = save_slide_map(result, out, options.max_side)
        fractions = result.fractions()
        return MapResult(files["tissue_map.png"], area_table(fractions), files["class_fractions.csv"],
                         files["tissue_map.geojson"], fractions, self._map_warnings(result.geometry), files)

    def _map_warnings(self, geometry: Any) -> list[str]:
        """Why the map may not be at the model's scale (windows of image pixels) or carries no areas."""
        if geometry.target_mpp is not None:
            return []
        if geometry.slide_mpp is None:
            known = f"; the model was trained at {self.info.train_mpp:g} µm/px" if self.info.train_mpp else ""
            return [f"The image records no µm/px: windows are {geometry.tile} image pixels and areas are not "
                    f"known{known}. Give the scan resolution for maps at the model's scale."]
        warning = resolution_warning(self.info, geometry.slide_mpp)
        return [warning] if warning else []
