"""Apply a trained tile classifier: streaming batch prediction to CSV and tissue maps of large images.

:class:`TilePredictor` reads image files lazily (paths are pulled from the iterable only as the
prefetch window needs them), decodes them in a thread pool (PIL releases the GIL), preprocesses
whole batches with the eval path of :class:`~hf_tissue_vit.transforms.TileTransform` (the same
resize/rescale/normalise as the saved image processor, without a per-image processor call), and runs
the model under ``torch.inference_mode`` (by default with bf16 autocast where the hardware has native
bf16, and the attention kernel that is fastest for that precision: see :mod:`hf_tissue_vit.hardware`).
Unreadable files become rows with ``error`` set. Memory is bounded by ``batch_size`` + the prefetch
window, whatever the number of files.

:func:`tissue_map` classifies a large image window by window: row strips of windows are cut with
``Tensor.unfold`` (a view), mostly-background windows (near-white or black glass, see
:func:`background_fraction`) are marked ``-1`` and not classified, the rest go through the predictor
in batches. The result is a *per-window* grid: cell ``(r, c)`` is the window whose top-left corner is
``(r * stride, c * stride)``. With ``stride < tile`` windows overlap and each cell is drawn as the
``stride × stride`` square at the centre of its window; the right/bottom margin that no full window
covers is left out.

Example::

    model, processor = load_for_inference("outputs/vit-tiny")
    predictor = TilePredictor(model, processor, batch_size=64, tta=False)
    predictor.predict_to_csv(iter_input_files(["tiles/"]), "predictions.csv")
    result = tissue_map(predictor, "slide_5000px.tif", tile=150, stride=150)
    save_tissue_map(result, "slide_5000px.tif", "tissue_map_out/")
"""

from __future__ import annotations

import contextlib
import copy
import csv
import glob
import logging
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import hardware
from .constants import IMAGE_EXTENSIONS
from .fileio import atomic_write, atomic_write_json, save_figure_atomic
from .transforms import TileTransform, dihedral_views, image_to_rgb8, image_to_uint8

if TYPE_CHECKING:  # annotations only; transformers is imported where a model is built
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

BACKGROUND = -1
CSV_FIXED_COLUMNS = ("file", "label", "score", "error")
_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in _GLOB_CHARS)


def _is_image_name(name: str, extensions: Sequence[str]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in extensions))


def check_inputs(inputs: Sequence[str | os.PathLike]) -> None:
    """Raise ``FileNotFoundError`` for an input that is neither an existing file/folder nor a matching glob."""
    if not inputs:
        raise ValueError("--inputs: give at least one image file, folder or glob pattern")
    for item in inputs:
        text = os.fspath(item)
        if os.path.exists(text):
            continue
        if _is_glob(text) and next(glob.iglob(text, recursive=True), None) is not None:
            continue
        raise FileNotFoundError(f"--inputs {text!r}: no such file or folder, and no file matches it as a glob")


def iter_input_files(
    inputs: Iterable[str | os.PathLike], extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> Iterator[str]:
    """Yield image paths lazily: files as given, folders recursively (sorted, extensions of any
    case), glob patterns (``**`` allowed) sorted, keeping only image extensions for folders and globs."""
    for item in inputs:
        text = os.fspath(item)
        if os.path.isdir(text):
            for root, dirs, files in os.walk(text):
                dirs.sort()
                for name in sorted(files):
                    if _is_image_name(name, extensions):
                        yield os.path.join(root, name)
        elif os.path.exists(text) or not _is_glob(text):
            yield text  # an explicit file is tried even with another extension; errors become rows
        else:
            for match in sorted(glob.iglob(text, recursive=True)):
                if os.path.isfile(match) and _is_image_name(match, extensions):
                    yield match


def _load_image(path: str, size: int | None = None) -> np.ndarray:
    """Decode ``path`` to uint8 HxWx3; with ``size``, resize it to size x size with PIL's bilinear filter,
    which is exactly what the saved ViT image processor (PIL backend) does, here in the decode thread."""
    with Image.open(path) as image:
        # kept a PIL image until the end: one array copy instead of three
        rgb = image_to_rgb8(image)
        if size is not None and rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BILINEAR)
        return np.asarray(rgb)


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ")


# --------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------
@dataclass
class PredictionRow:
    """Prediction for one file: class probabilities, or ``error`` when it could not be read."""

    file: str
    probs: np.ndarray | None = None
    error: str = ""


def preprocess_tiles(transform: TileTransform, tiles: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
    """uint8 HxWx3 tiles → pixel_values [B,3,S,S]; tiles of different sizes are transformed per size
    (one batched call each) and put back in input order."""
    if isinstance(tiles, torch.Tensor):
        return transform(tiles)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, tile in enumerate(tiles):
        groups.setdefault(tuple(tile.shape), []).append(i)
    if len(groups) == 1:
        return transform(torch.from_numpy(np.stack(tiles)))
    out = torch.empty(len(tiles), 3, transform.image_size, transform.image_size)
    for index in groups.values():
        out[index] = transform(torch.from_numpy(np.stack([tiles[i] for i in index])))
    return out


def probability_columns(label_names: Sequence[str], fixed_columns: Sequence[str]) -> list[str]:
    """CSV header of the per-class probabilities: the plain class names, in label-id order.

    Shared by predict.py's CSV and training's test_predictions.csv. A class named like one of the
    CSV's ``fixed_columns`` (or two classes with one name) would make a column ambiguous: refused.
    """
    names = [str(name) for name in label_names]
    clashes = sorted({n for n in names if n in fixed_columns or names.count(n) > 1})
    if clashes:
        raise ValueError(f"class names {clashes} clash with the CSV columns {list(fixed_columns)} or repeat; "
                         "rename the classes (config.json id2label)")
    return names


def label_names_of(model: PreTrainedModel) -> list[str]:
    """Class names in label-id order from ``model.config.id2label``."""
    id2label = model.config.id2label
    return [id2label[i] if i in id2label else id2label[str(i)] for i in range(len(id2label))]


class TilePredictor:
    """Batched, streaming tile classifier around a ``ViTForImageClassification`` and its processor.

    Args:
        model: classifier returning ``.logits``; switched to eval mode and, when it is a transformers
            model, to ``attn_implementation`` (the model is changed in place).
        processor: the saved image processor; only its size/mean/std are used (through TileTransform).
        device: default the model's device.
        batch_size: tiles per forward pass.
        tta: average softmax over the 8 dihedral views (8x the compute).
        num_workers: decoding threads (0 = decode in the calling thread). Files are decoded and resized
            to the model's input size in these threads (PIL releases the GIL).
        overlap: decode the next batch while the model runs on the current one. Off by default: on a
            CPU the decode threads and torch's threads then compete for the same cores (measured slower
            on 2 cores, see README), so each batch is decoded by all threads and then run.
        bf16: run a bfloat16 copy of the model (the model passed in keeps its weights). None (default) =
            where the device supports bf16 natively (:func:`hardware.bf16_supported`: a bf16 GPU, or a CPU
            with AMX-BF16/AVX512-BF16). Measured on the 2-core EPYC: forward 898 tiles/s with bf16 weights,
            799 under bf16 autocast, about 400 in fp32; top-1 as in fp32 on 511 of 512 real tiles either
            way. Pass False for fp32-exact numbers.
        attn_implementation: "eager", "sdpa" or "auto" (default: :func:`hardware.default_attn_implementation`
            with ``training=False``: SDPA, the faster kernel measured for inference in fp32 and bf16).
    """

    def __init__(
        self,
        model,
        processor,
        device: str | torch.device | None = None,
        batch_size: int = 128,
        tta: bool = False,
        num_workers: int | None = None,
        bf16: bool | None = None,
        attn_implementation: str = "auto",
        overlap: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.bf16 = hardware.bf16_supported(self.device) if bf16 is None else bool(bf16)
        if self.bf16 and next(model.parameters()).dtype != torch.bfloat16:
            model = copy.deepcopy(model).to(dtype=torch.bfloat16)
        self.model = model.to(self.device).eval()
        self._dtype = next(self.model.parameters()).dtype
        self.attn_implementation = hardware.resolve_attn_implementation(
            attn_implementation, self.device, self.bf16, training=False
        )
        current = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if hasattr(model, "set_attn_implementation") and current != self.attn_implementation:
            try:
                model.set_attn_implementation(self.attn_implementation)
            except (ValueError, ImportError) as err:  # e.g. SDPA unavailable: keep what the model has
                logger.warning("keeping %s attention (%s)", current, err)
                self.attn_implementation = current
        self.transform = TileTransform.from_processor(processor)
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else int(num_workers)
        # On a GPU the forward does not use the CPU cores that decode, so overlapping is free there.
        self.overlap = self.device.type != "cpu" if overlap is None else bool(overlap)
        self.label_names = label_names_of(model)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, device: str | None = None, **kwargs: Any) -> TilePredictor:
        """Load a trained model (local folder or Hub id) with :func:`modeling.load_for_inference`."""
        from .modeling import load_for_inference

        model, processor = load_for_inference(model_name_or_path, device=device)
        return cls(model, processor, **kwargs)

    # --- tensors ----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [B,K] (float32, CPU) for preprocessed pixel_values [B,3,S,S]."""
        pixel_values = pixel_values.to(self.device, self._dtype, non_blocking=True)
        views = dihedral_views(pixel_values) if self.tta else [pixel_values]
        batch = torch.cat(views) if len(views) > 1 else views[0]
        logits = self.model(pixel_values=batch).logits
        probs = logits.float().softmax(dim=-1)
        if len(views) > 1:
            probs = probs.view(len(views), pixel_values.shape[0], -1).mean(dim=0)
        return probs.cpu()

    def predict_tiles(self, tiles: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """Probabilities [N,K] for uint8 tiles (HxWx3 arrays, or a [N,H,W,3] tensor), in batches."""
        chunks = [
            self.predict_pixel_values(preprocess_tiles(self.transform, tiles[i : i + self.batch_size]))
            for i in range(0, len(tiles), self.batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0, len(self.label_names))

    # --- files ------------------------------------------------------------------------------
    def _decoded(self, paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str, np.ndarray | None, str]]:
        """(path, tile or None, error) in input order, pulling paths only as the prefetch window needs."""
        size = self.transform.image_size

        def load(path: str) -> tuple[str, np.ndarray | None, str]:
            try:
                return path, _load_image(path, size), ""
            except Exception as err:  # any decode failure becomes an error row; the run goes on
                return path, None, _error_text(err)

        texts = (os.fspath(path) for path in paths)
        if self.num_workers == 0:
            yield from map(load, texts)
            return
        # overlap: two batches in flight, the next decodes while the model runs on the current one;
        # otherwise one batch at a time, decoded by every thread before the model runs.
        window: deque[Future] = deque()
        prefetch = 2 * self.batch_size if self.overlap else self.batch_size
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="decode") as pool:
            for text in texts:
                window.append(pool.submit(load, text))
                if len(window) >= prefetch:
                    if self.overlap:
                        yield window.popleft().result()
                    else:
                        while window:
                            yield window.popleft().result()
            while window:
                yield window.popleft().result()

    def predict_files(self, paths: Iterable[str | os.PathLike]) -> Iterator[PredictionRow]:
        """Stream :class:`PredictionRow` objects in input order (lazy: consume as you go)."""
        pending: list[tuple[str, np.ndarray | None, str]] = []
        for item in self._decoded(paths):
            pending.append(item)
            if len(pending) == self.batch_size:
                yield from self._predict_decoded(pending)
                pending = []
        if pending:
            yield from self._predict_decoded(pending)

    def _predict_decoded(self, items: list[tuple[str, np.ndarray | None, str]]) -> list[PredictionRow]:
        ok = [i for i, (_, tile, _) in enumerate(items) if tile is not None]
        probs = self.predict_tiles([items[i][1] for i in ok]).numpy() if ok else None
        rows = [PredictionRow(path, None, error) for path, _, error in items]
        for j, i in enumerate(ok):
            rows[i].probs = probs[j]
        return rows

    def csv_columns(self, top_k: int = 1) -> list[str]:
        """``file, label, score, error``, one probability column per class, then top-2..k label/score."""
        extra = [f"top{k}_{kind}" for k in range(2, top_k + 1) for kind in ("label", "score")]
        return [*CSV_FIXED_COLUMNS, *probability_columns(self.label_names, (*CSV_FIXED_COLUMNS, *extra)), *extra]

    def predict_to_csv(
        self,
        paths: Iterable[str | os.PathLike],
        output: str | os.PathLike,
        top_k: int = 1,
        progress: bool = True,
        total: int | None = None,
    ) -> dict[str, Any]:
        """Write predictions for ``paths`` to ``output`` (CSV written incrementally to a temp file in
        the same folder, then moved into place). Returns ``{"files", "errors", "output"}``."""
        if not 1 <= top_k <= len(self.label_names):
            raise ValueError(f"top_k must be in 1..{len(self.label_names)}, got {top_k}")
        output = Path(output)
        n_files = n_errors = 0
        with atomic_write(output, newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.csv_columns(top_k))
            bar = tqdm(total=total, unit="tile", desc="predict", disable=not progress)
            for row in self.predict_files(paths):
                writer.writerow(self._csv_row(row, top_k))
                n_files += 1
                n_errors += bool(row.error)
                bar.update(1)
            bar.close()
        logger.info("wrote %d predictions (%d unreadable) to %s", n_files, n_errors, output)
        return {"files": n_files, "errors": n_errors, "output": str(output)}

    def _csv_row(self, row: PredictionRow, top_k: int) -> list[str]:
        n = len(self.label_names)
        if row.probs is None:
            return [row.file, "", "", row.error or "unreadable", *[""] * (n + 2 * (top_k - 1))]
        order = np.argsort(-row.probs, kind="stable")[:top_k]
        extra = [v for k in order[1:] for v in (self.label_names[k], f"{row.probs[k]:.6f}")]
        best = order[0]
        return [
            row.file,
            self.label_names[best],
            f"{row.probs[best]:.6f}",
            "",
            *[f"{p:.6f}" for p in row.probs],
            *extra,
        ]


# --------------------------------------------------------------------------------------------
# Tissue map
# --------------------------------------------------------------------------------------------
def background_fraction(windows: torch.Tensor, saturation: int = 20, white: int = 200, black: int = 30) -> torch.Tensor:
    """Fraction of background pixels per window, uint8 [N,H,W,3] → float [N].

    A pixel is background when it is grey (max-min over RGB < ``saturation``) and either bright
    (min ≥ ``white``: glass) or dark (max ≤ ``black``: scanner padding). H&E tissue is pink/purple,
    i.e. saturated, and even pale debris is darker than glass.
    """
    hi = windows.amax(dim=-1)
    lo = windows.amin(dim=-1)
    grey = (hi.int() - lo.int()) < saturation
    background = grey & ((lo >= white) | (hi <= black))
    return background.flatten(1).float().mean(dim=1)


@dataclass
class TissueMap:
    """Per-window classification of a large image (see the module docstring for the geometry)."""

    labels: np.ndarray  # int16 [rows, cols], BACKGROUND (-1) where not classified
    probs: np.ndarray  # float32 [rows, cols, K], NaN on background
    background: np.ndarray  # float32 [rows, cols], background pixel fraction per window
    label_names: list[str]
    tile: int
    stride: int
    image_size: tuple[int, int]  # (height, width) of the analysed image
    background_threshold: float = 0.8
    extra: dict[str, Any] = field(default_factory=dict)

    def area_fractions(self) -> dict[str, Any]:
        """Cells per class, their fraction of the tissue cells and of all cells (JSON-ready)."""
        total = int(self.labels.size)
        tissue = int((self.labels != BACKGROUND).sum())
        classes = {}
        for k, name in enumerate(self.label_names):
            n = int((self.labels == k).sum())
            classes[name] = {
                "cells": n,
                "fraction_of_tissue": n / tissue if tissue else 0.0,
                "fraction_of_grid": n / total if total else 0.0,
            }
        return {
            "tile": self.tile,
            "stride": self.stride,
            "image_height": self.image_size[0],
            "image_width": self.image_size[1],
            "grid_rows": int(self.labels.shape[0]),
            "grid_cols": int(self.labels.shape[1]),
            "cells": total,
            "tissue_cells": tissue,
            "background_cells": total - tissue,
            "background_fraction": (total - tissue) / total if total else 0.0,
            "background_threshold": self.background_threshold,
            "classes": classes,
        }

    def cell_origin(self) -> tuple[float, float]:
        """Top-left pixel (y, x) of cell (0, 0): the centred stride×stride square of window (0, 0)."""
        offset = (self.tile - self.stride) / 2 if self.stride < self.tile else 0.0
        return offset, offset


@contextlib.contextmanager
def _pixel_limit(max_image_pixels: int | None) -> Iterator[None]:
    """Raise PIL's decompression-bomb limit for one read (restored after; None = PIL's default)."""
    previous = Image.MAX_IMAGE_PIXELS
    if max_image_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@contextlib.contextmanager
def open_large_image(path: str | os.PathLike, max_image_pixels: int | None = None) -> Iterator[Image.Image]:
    """Open and decode an image file once (PIL keeps it in memory; callers crop strips from it).

    PIL refuses images above ``Image.MAX_IMAGE_PIXELS`` (≈89 Mpx; 5000×5000 is fine); pass
    ``max_image_pixels`` to allow bigger ones. Unreadable files raise ValueError naming the file.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"--image {name!r}: no such file")
    try:
        with _pixel_limit(max_image_pixels):
            image = Image.open(name)
            image.load()
    except Image.DecompressionBombError as err:
        raise ValueError(f"--image {name!r} is larger than the pixel limit ({err}); "
                         "raise it with --max_image_pixels") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"--image {name!r} cannot be read as an image: {err}") from err
    try:
        yield image
    finally:
        image.close()


def read_large_image(path: str | os.PathLike, max_image_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 (see :func:`open_large_image` for limits and errors)."""
    with open_large_image(path, max_image_pixels) as image:
        return image_to_uint8(image)


def tissue_map(
    predictor: TilePredictor,
    image: str | os.PathLike | Image.Image | np.ndarray,
    tile: int = 150,
    stride: int = 150,
    background_threshold: float = 0.8,
    max_image_pixels: int | None = None,
    progress: bool = False,
) -> TissueMap:
    """Classify every ``tile``×``tile`` window at step ``stride``; windows whose background pixel
    fraction is ≥ ``background_threshold`` are marked BACKGROUND and not classified.

    Windows are cut strip by strip (a few window rows at a time, ``Tensor.unfold`` views) so memory
    beyond the decoded image stays at a few batches.
    """
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be positive, got tile={tile}, stride={stride}")
    if not 0.0 < background_threshold <= 1.0:
        raise ValueError(f"background_threshold must be in (0, 1], got {background_threshold}")
    if isinstance(image, (str, os.PathLike)):
        with open_large_image(image, max_image_pixels) as pil_image:
            return tissue_map(predictor, pil_image, tile, stride, background_threshold, progress=progress)
    if isinstance(image, Image.Image):
        # Strips are converted one at a time: no full-size uint8 copy next to PIL's own buffer.
        width, height = image.size

        def read_strip(y0: int, y1: int) -> torch.Tensor:
            return torch.from_numpy(image_to_uint8(image.crop((0, y0, width, y1))))
    else:
        array = np.ascontiguousarray(image, dtype=np.uint8)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"image must be HxWx3 RGB, got shape {array.shape}")
        height, width = array.shape[:2]
        pixels = torch.from_numpy(array)

        def read_strip(y0: int, y1: int) -> torch.Tensor:
            return pixels[y0:y1]
    if height < tile or width < tile:
        raise ValueError(f"image {width}x{height} px is smaller than one {tile}x{tile} window; use a smaller --tile")
    rows, cols = (height - tile) // stride + 1, (width - tile) // stride + 1
    n_classes = len(predictor.label_names)
    labels = np.full((rows, cols), BACKGROUND, dtype=np.int16)
    probs = np.full((rows, cols, n_classes), np.nan, dtype=np.float32)
    background = np.zeros((rows, cols), dtype=np.float32)
    rows_per_strip = max(1, math.ceil(4 * predictor.batch_size / cols))
    for r0 in tqdm(range(0, rows, rows_per_strip), desc="tissue map", unit="strip", disable=not progress):
        r1 = min(rows, r0 + rows_per_strip)
        strip = read_strip(r0 * stride, (r1 - 1) * stride + tile)  # [h, W, 3] uint8
        # unfold → [nr, nc, 3, tile(y), tile(x)]; channels-last copy for the transform
        windows = strip.unfold(0, tile, stride).unfold(1, tile, stride)[:, :cols]
        windows = windows.permute(0, 1, 3, 4, 2).reshape(-1, tile, tile, 3)
        bg = background_fraction(windows)
        background[r0:r1] = bg.view(r1 - r0, cols).numpy()
        tissue = (bg < background_threshold).nonzero().flatten()
        if len(tissue):
            p = predictor.predict_tiles(windows[tissue]).numpy()
            rr, cc = np.divmod(tissue.numpy(), cols)
            probs[r0 + rr, cc] = p
            labels[r0 + rr, cc] = p.argmax(axis=1)
    logger.info("tissue map %dx%d windows, %d background", rows, cols, int((labels == BACKGROUND).sum()))
    return TissueMap(labels, probs, background, list(predictor.label_names), tile, stride, (height, width),
                     background_threshold)


def class_colours(n: int) -> np.ndarray:
    """n distinct RGB colours in [0, 1] (tab10, then tab20)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return np.array([cmap(i)[:3] for i in range(n)])


def _thumbnail(image: str | os.PathLike | Image.Image | np.ndarray, max_side: int,
               max_image_pixels: int | None = None) -> Image.Image:
    """RGB copy at most ``max_side`` px: integer ``reduce`` first, so no full-size copy is made."""
    if isinstance(image, (str, os.PathLike)):
        with open_large_image(image, max_image_pixels) as pil_image:
            return _thumbnail(pil_image, max_side)
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    factor = max(1, max(image.size) // max_side)
    small = image.reduce(factor) if factor > 1 else image.copy()
    small = small.convert("RGB")
    small.thumbnail((max_side, max_side))
    return small


def save_tissue_map(
    result: TissueMap,
    image: str | os.PathLike | Image.Image | np.ndarray,
    output_dir: str | os.PathLike,
    max_side: int = 1024,
    alpha: float = 0.45,
    max_image_pixels: int | None = None,
) -> dict[str, str]:
    """Write ``label_grid.npy`` (int16, -1 = background), ``probabilities.npy`` (float16),
    ``class_fractions.csv``/``.json`` and ``tissue_map.png`` (class colours over the image downscaled
    to ``max_side`` px, with a legend). Each file is written atomically. Returns name → path."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in
             ("label_grid.npy", "probabilities.npy", "class_fractions.csv", "class_fractions.json", "tissue_map.png")}
    with atomic_write(paths["label_grid.npy"], "wb") as handle:
        np.save(handle, result.labels)
    with atomic_write(paths["probabilities.npy"], "wb") as handle:
        np.save(handle, result.probs.astype(np.float16))
    fractions = result.area_fractions()
    atomic_write_json(paths["class_fractions.json"], fractions)
    with atomic_write(paths["class_fractions.csv"], newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "cells", "fraction_of_tissue", "fraction_of_grid"])
        for name, v in fractions["classes"].items():
            writer.writerow([name, v["cells"], f"{v['fraction_of_tissue']:.6f}", f"{v['fraction_of_grid']:.6f}"])
        background = f"{fractions['background_fraction']:.6f}"
        writer.writerow(["Background", fractions["background_cells"], "", background])

    thumb = _thumbnail(image, max_side, max_image_pixels)
    height, width = result.image_size
    colours = class_colours(len(result.label_names))
    y0, x0 = result.cell_origin()
    rows, cols = result.labels.shape
    masked = np.ma.masked_equal(result.labels.astype(np.int32), BACKGROUND)

    aspect = height / width
    fig = Figure(figsize=(10, max(3.0, 10 * aspect)))  # no pyplot: no global figure state
    ax = fig.add_subplot()
    ax.imshow(np.asarray(thumb), extent=(0, width, height, 0))
    ax.imshow(masked, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(colours) - 0.5, alpha=alpha,
              interpolation="nearest",
              extent=(x0, x0 + cols * result.stride, y0 + rows * result.stride, y0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    handles = [Patch(color=colours[k], label=f"{name} ({fractions['classes'][name]['fraction_of_tissue']:.1%})")
               for k, name in enumerate(result.label_names)]
    handles.append(Patch(facecolor="none", edgecolor="grey",
                         label=f"background ({fractions['background_fraction']:.1%} of windows)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    ax.set_title(f"tissue map: {result.tile} px windows, stride {result.stride} px")
    save_figure_atomic(fig, paths["tissue_map.png"], format="png")
    return {name: str(path) for name, path in paths.items()}
