"""TilePredictor: batched, streaming classification of tiles and image files with a trained model.

Files are read lazily (paths are pulled from the iterable only as the prefetch window needs them) and
decoded in a thread pool (PIL releases the GIL); each tile is prepared for the model exactly as the
saved image processor prepares it (:class:`~hf_tissue_vit.transforms.ProcessorTransform`: resize and
crop per tile in the decode threads, rescale and normalize per batch), and the model runs under
``torch.inference_mode``, by default as a bfloat16 copy where the hardware has native bf16, with the
attention kernel chosen for that precision (see :mod:`hf_tissue_vit.hardware`). Unreadable files
become rows with ``error`` set. Memory is bounded by ``batch_size`` + the prefetch window. Files far
from the model's training tile size, and greyscale files, are classified too, with one warning per
kind at the end of the run (:mod:`.input_checks`).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from .. import hardware
from ..imaging import open_image, to_rgb8
from ..modelfacts import INPUT_SIZE_FALLBACK, read_model_facts, training_tile_size
from ..transforms.augmentation import dihedral_views
from ..transforms.processor import ProcessorTransform
from ..units import check_mpp
from .input_checks import InputNotes
from .scale import TileScale
from .table import PredictionRow, csv_columns, write_predictions_csv

if TYPE_CHECKING:  # annotations only; transformers is imported where a model is built
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

Tiles = Sequence[np.ndarray | Image.Image] | torch.Tensor
# PIL names an in-memory file by its repr in errors ("cannot identify image file <_io.BytesIO object at
# 0x7f...>"): meaningless to a user, so messages show the file's name in its place.
_OBJECT_REPR = re.compile(r"<_?[\w.]+ object at 0x[0-9a-fA-F]+>")


class Decoded(NamedTuple):
    """One input file after the decode threads: the tile prepared for the model, or the error."""

    path: str
    tile: np.ndarray | None
    error: str
    size: tuple[int, int] | None = None  # (width, height) in the file
    mode: str | None = None  # PIL mode in the file


def label_names_of(model: PreTrainedModel | Any) -> list[str]:
    """Class names in label-id order from ``model.config.id2label`` (or a config's own ``id2label``)."""
    id2label = getattr(model, "config", model).id2label
    return [id2label[i] if i in id2label else id2label[str(i)] for i in range(len(id2label))]


def error_text(err: BaseException, name: str | None = None) -> str:
    """``Type: message`` on one line, with any ``<... object at 0x...>`` repr replaced by ``name``."""
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return _OBJECT_REPR.sub(repr(name) if name else "the image data", text)


def use_attention(model: torch.nn.Module, requested: str, device: torch.device, bf16: bool) -> str | None:
    """Switch a transformers model to the attention kernel ``requested`` resolves to; returns the one in use.

    A model without attention (e.g. ConvNeXT) or without the kernel keeps what it has: logged as a
    warning when the kernel was asked for by name, at info level for ``"auto"``.
    """
    resolved = hardware.resolve_attn_implementation(requested, device, bf16, training=False)
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not hasattr(model, "set_attn_implementation") or current == resolved:
        return resolved
    try:
        model.set_attn_implementation(resolved)
    except (ValueError, ImportError) as err:  # e.g. no SDPA for this architecture
        log = logger.info if requested == "auto" else logger.warning
        log("keeping %s attention (%s)", current, str(err).split(". ")[0])
        return current
    return resolved


class TilePredictor:
    """Batched, streaming tile classifier around an image classification model and its processor.

    Args:
        model: classifier taking ``pixel_values`` and returning ``.logits`` (ViT, ConvNeXT, ...);
            switched to eval mode and, when it is a transformers model, to ``attn_implementation``
            (the model is changed in place).
        processor: the saved image processor; the model gets exactly its ``pixel_values``.
        device: default the model's device.
        batch_size: tiles per forward pass.
        tta: average softmax over the 8 dihedral views (8x the compute).
        num_workers: decoding threads (0 = decode in the calling thread); files are decoded, resized
            and cropped in these threads.
        overlap: decode the next batch while the model runs on the current one. Off by default on a
            CPU, where the decode threads and torch's threads compete for the same cores; on by default
            on a GPU.
        bf16: run a bfloat16 copy of the model (the model passed in keeps its weights). None (default) =
            where the device supports bf16 natively (:func:`hardware.bf16_supported`). Pass False for
            fp32-exact numbers.
        attn_implementation: "eager", "sdpa" or "auto" (default: :func:`hardware.default_attn_implementation`
            with ``training=False``).
        tile_size: (height, width) or side of the tiles the model was trained on, for the warning on
            files far from it (:mod:`.input_checks`); None = the model's input size
            (:meth:`from_pretrained` looks up the training tile size first).
        mpp: micrometres per pixel of the tiles to classify; with the model's (``model_mpp``, default
            ``config.mpp``; :meth:`from_pretrained` reads it with :func:`modelfacts.read_model_facts`) each tile
            is first resized to the model's scale and a larger tile centre-cropped to the recorded training
            tile size (:mod:`.scale`); when either is unknown, tiles go in as they are, with one warning.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        device: str | torch.device | None = None,
        batch_size: int = 128,
        tta: bool = False,
        num_workers: int | None = None,
        bf16: bool | None = None,
        attn_implementation: str = "auto",
        overlap: bool | None = None,
        tile_size: int | tuple[int, int] | None = None,
        tile_size_source: str = "the tile size given",
        mpp: float | None = None,
        model_mpp: float | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.bf16 = hardware.bf16_supported(self.device) if bf16 is None else bool(bf16)
        if self.bf16 and next(model.parameters()).dtype != torch.bfloat16:
            model = copy.deepcopy(model).to(dtype=torch.bfloat16)
        self.model = model.to(self.device).eval()
        self._dtype = next(self.model.parameters()).dtype
        self.attn_implementation = use_attention(self.model, attn_implementation, self.device, self.bf16)
        self.processor_transform = ProcessorTransform(processor)
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else int(num_workers)
        # On a GPU the forward does not use the CPU cores that decode, so overlapping is free there.
        self.overlap = self.device.type != "cpu" if overlap is None else bool(overlap)
        self.label_names = label_names_of(self.model)
        if tile_size is None:
            self.tile_size, self.tile_size_source = training_tile_size(None, getattr(self.model, "config", None))
        else:
            self.tile_size = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
            self.tile_size_source = tile_size_source
        if model_mpp is None:
            model_mpp = getattr(getattr(self.model, "config", None), "mpp", None)
        field = None if self.tile_size_source == INPUT_SIZE_FALLBACK else self.tile_size  # a recorded size only
        self.scale = TileScale(check_mpp(mpp, "mpp"), check_mpp(model_mpp, "the model's config.mpp"), field=field)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, device: str | None = None, **kwargs: Any) -> TilePredictor:
        """Load a trained model (local folder or Hub id) with :func:`modeling.load_for_inference`."""
        from ..modeling import load_for_inference

        model, processor = load_for_inference(model_name_or_path, device=device)
        facts = read_model_facts(model_name_or_path, model.config)
        if "tile_size" not in kwargs:
            kwargs["tile_size"], kwargs["tile_size_source"] = facts.training_tile_size()
        kwargs.setdefault("model_mpp", facts.mpp)
        return cls(model, processor, **kwargs)

    # --- tensors ----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [B,K] (float32, CPU) for preprocessed pixel_values [B,3,H,W]."""
        if self.device.type == "cuda":  # page-locked: the copy to the GPU runs without a staging copy
            pixel_values = pixel_values.pin_memory()
        pixel_values = pixel_values.to(self.device, self._dtype, non_blocking=True)
        views = dihedral_views(pixel_values) if self.tta else [pixel_values]
        batch = torch.cat(views) if len(views) > 1 else views[0]
        logits = self.model(pixel_values=batch).logits
        probs = logits.float().softmax(dim=-1)
        if len(views) > 1:
            probs = probs.view(len(views), pixel_values.shape[0], -1).mean(dim=0)
        return probs.cpu()

    def pixel_values(self, tiles: Tiles) -> torch.Tensor:
        """The ``pixel_values`` [N,3,H,W] the model gets for RGB tiles of one processed size."""
        return self.processor_transform.pixel_values(self._prepare(tiles))

    def predict_tiles(self, tiles: Tiles) -> torch.Tensor:
        """Probabilities [N,K] for RGB tiles (HxWx3 uint8 arrays, PIL images, or a [N,H,W,3] uint8
        tensor), in batches of ``batch_size``."""
        chunks = [self._predict_prepared(self._prepare(tiles[i : i + self.batch_size]))
                  for i in range(0, len(tiles), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, len(self.label_names))

    def _prepare(self, tiles: Tiles) -> list[np.ndarray]:
        """Resize and crop each tile as the processor does (in threads when there are workers)."""
        def prepare(tile: np.ndarray | Image.Image) -> np.ndarray:
            return self.processor_transform.prepare(self.scale(tile))

        if self.num_workers > 1 and len(tiles) > 1 and (
                self.scale.factor is not None or self.processor_transform.changes(tiles[0])):
            with ThreadPoolExecutor(self.num_workers, thread_name_prefix="prepare") as pool:
                return list(pool.map(prepare, tiles))
        return [prepare(tile) for tile in tiles]

    def _predict_prepared(self, prepared: Sequence[np.ndarray]) -> torch.Tensor:
        """Probabilities [N,K] of prepared tiles; tiles of different prepared sizes go in separate batches."""
        probs = torch.empty(len(prepared), len(self.label_names))
        for index, pixel_values in self.processor_transform.batches(prepared):
            probs[index] = self.predict_pixel_values(pixel_values)
        return probs

    # --- files ------------------------------------------------------------------------------
    def _load(self, path: str) -> Decoded:
        size = mode = None
        try:
            with open_image(path) as image:
                size, mode = image.size, image.mode
                return Decoded(path, self.processor_transform.prepare(self.scale(to_rgb8(image))), "", size, mode)
        except Exception as err:  # any decode failure becomes an error row; the run goes on
            return Decoded(path, None, error_text(err, os.path.basename(path)), size, mode)

    def _decoded(self, paths: Iterable[str | os.PathLike]) -> Iterator[Decoded]:
        """Decoded tiles in input order, pulling paths only as the prefetch window needs them."""
        texts = (os.fspath(path) for path in paths)
        if self.num_workers == 0:
            yield from map(self._load, texts)
            return
        # overlap: two batches in flight, the next decodes while the model runs on the current one;
        # otherwise one batch at a time, decoded by every thread before the model runs.
        prefetch = 2 * self.batch_size if self.overlap else self.batch_size
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="decode") as pool:
            yield from _windowed(pool, self._load, texts, prefetch, self.overlap)

    def predict_files(self, paths: Iterable[str | os.PathLike]) -> Iterator[PredictionRow]:
        """Stream :class:`PredictionRow` objects in input order (lazy: consume as you go). When all are
        consumed, files far from the training tile size and greyscale files get one warning per kind."""
        notes = InputNotes(self.tile_size, self.tile_size_source)
        pending: list[Decoded] = []
        for item in self._decoded(paths):
            if item.tile is not None:
                notes.add(item.path, item.size, item.mode)
            pending.append(item)
            if len(pending) == self.batch_size:
                yield from self._predict_decoded(pending)
                pending = []
        if pending:
            yield from self._predict_decoded(pending)
        notes.log()

    def _predict_decoded(self, items: list[Decoded]) -> list[PredictionRow]:
        ok = [i for i, item in enumerate(items) if item.tile is not None]
        probs = self._predict_prepared([items[i].tile for i in ok]).numpy() if ok else None
        rows = [PredictionRow(item.path, None, item.error) for item in items]
        for j, i in enumerate(ok):
            rows[i].probs = probs[j]
        return rows

    # --- CSV --------------------------------------------------------------------------------
    def csv_columns(self, top_k: int = 1) -> list[str]:
        """``file, label, score, error``, one probability column per class, then top-2..k label/score."""
        return csv_columns(self.label_names, top_k)

    def predict_to_csv(
        self,
        paths: Iterable[str | os.PathLike],
        output: str | os.PathLike,
        top_k: int = 1,
        progress: bool = True,
        total: int | None = None,
    ) -> dict[str, Any]:
        """Write predictions for ``paths`` to ``output`` (incrementally, moved into place at the end).
        Returns ``{"files", "errors", "output"}``."""
        return write_predictions_csv(self.predict_files(paths), output, self.label_names, top_k, progress, total)


def _windowed(
    pool: ThreadPoolExecutor, load: Callable[[str], Decoded], texts: Iterator[str], prefetch: int, overlap: bool
) -> Iterator[Decoded]:
    """``load`` over ``texts`` in ``pool``, in order, with at most ``prefetch`` submitted ahead."""
    window: deque[Future] = deque()
    for text in texts:
        window.append(pool.submit(load, text))
        if len(window) >= prefetch:
            if overlap:
                yield window.popleft().result()
            else:
                while window:
                    yield window.popleft().result()
    while window:
        yield window.popleft().result()
