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
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from ..imaging import load_rgb8
from ..interpret import explain_tiles, overlay_heatmap
from ..predict import TilePredictor, label_names_of, open_large_image, save_tissue_map, tissue_map
from .exports import area_table, write_geojson
from .model_info import ModelInfo, load_model_info, resolution_warning, tile_warnings

logger = logging.getLogger(__name__)

ALPHA = 0.45  # heatmap opacity: the tissue stays readable under the colours
# Whole-slide formats that need OpenSlide (the [wsi] extra); plain TIFF/PNG/JPEG are read by PIL.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
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
    """A tissue map: the picture (with legend), the class-area rows and the downloadable files."""

    overlay_png: str
    table: list[list[Any]]
    csv: str
    geojson: str
    fractions: dict[str, Any]
    warnings: list[str]


# --------------------------------------------------------------------------------------------
# Whole-slide HOOK (the lead wires hf_tissue_vit.slides here once it lands)
# --------------------------------------------------------------------------------------------
def slide_support() -> ModuleType | None:
    """HOOK: ``hf_tissue_vit.slides`` when it and the ``[wsi]`` extra are importable, else None."""
    try:
        from .. import slides  # type: ignore[attr-defined]
    except ImportError:
        return None
    return slides


def map_slide(model: AppModel, path: str, window: int, stride: int, threshold: float, out_dir: Path) -> MapResult:
    """HOOK: tissue map of a whole-slide file. Not wired yet: says what to install, or that it is coming."""
    if slide_support() is None:
        raise ValueError(f"{Path(path).name} is a whole-slide file: install the [wsi] extra "
                         "(pip install 'hf_tissue_vit[wsi]') to map slides, or upload a PNG/TIFF export")
    raise ValueError(f"{Path(path).name}: whole-slide maps are not wired into the app yet; use "
                     "scripts/tissue_map.py for slides")


# --------------------------------------------------------------------------------------------
# Resolution stated in a file
# --------------------------------------------------------------------------------------------
def stated_mpp(path: str | os.PathLike) -> float | None:
    """µm per pixel written in the file (TIFF resolution tags or DPI), when it looks like a microscope's.

    Software writes 72/96/300 dpi when it knows nothing: values above 20 µm/px are taken as "unknown".
    """
    try:
        with Image.open(path) as image:
            tags = getattr(image, "tag_v2", None)
            if tags is not None and 282 in tags:
                unit = {2: 25400.0, 3: 10000.0}.get(int(tags.get(296, 2)))  # µm per inch / per cm
                value = float(tags[282])
                mpp = unit / value if unit and value > 0 else None
            else:
                dpi = image.info.get("dpi")
                mpp = 25400.0 / float(dpi[0]) if dpi and float(dpi[0]) > 0 else None
    except (OSError, ValueError, TypeError, ZeroDivisionError):
        return None
    return mpp if mpp is not None and 0.05 <= mpp <= 20 else None


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
        self._runs = Path(tempfile.mkdtemp(prefix="hf_tissue_vit_app_"))
        self._n_runs = 0

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
        with self._lock:
            (item,) = explain_tiles(self._explainer, self._processor, [tile])
        label = max(probs, key=probs.get)
        height, width = tile.shape[:2]
        warnings = tile_warnings(self.info, width, height, mpp if mpp else stated_mpp(path))
        return TileResult(probs, label, probs[label], tile, overlay_heatmap(tile, item.rollout, ALPHA), warnings)

    def head_overlays(self, path: str | os.PathLike) -> list[tuple[np.ndarray, str]]:
        """(overlay, caption) per head of the last layer: where each head's CLS token looks."""
        tile = load_rgb8(path)
        with self._lock:
            (item,) = explain_tiles(self._explainer, self._processor, [tile])
        return [(overlay_heatmap(tile, heat, ALPHA), f"last layer, head {h + 1}") for h, heat in enumerate(item.heads)]

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
        """Tissue map of a larger image: every ``window`` px square (default the training tile size),
        step ``window`` (or half of it with ``overlap``), background windows left out."""
        path = os.fspath(path)
        window = int(window or self.info.train_tile_px)
        stride = max(1, window // 2) if overlap else window
        with self._lock:
            out = self._run_dir()
        if path.lower().endswith(SLIDE_SUFFIXES):
            return map_slide(self, path, window, stride, background_threshold, out)
        with open_large_image(path) as image:
            if min(image.size) < window:
                raise ValueError(f"{Path(path).name} ({image.width} × {image.height} px) is smaller than one "
                                 f"{window} px window: use the Tile tab, or a smaller window")
            with self._lock:
                result = tissue_map(self.predictor, image, tile=window, stride=stride,
                                    background_threshold=background_threshold)
            files = save_tissue_map(result, image, out)
        geojson = write_geojson(result, out / "tissue_map.geojson")
        mpp = mpp or stated_mpp(path)
        warning = resolution_warning(self.info, mpp)
        return MapResult(files["tissue_map.png"], area_table(result, mpp or self.info.train_mpp),
                         files["class_fractions.csv"], str(geojson), result.area_fractions(),
                         [warning] if warning else [])
