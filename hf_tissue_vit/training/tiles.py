"""Tiles for training: every split decoded once into a memory-mapped uint8 file (the decode cache, one
per machine, shared by the processes of a launch), a torch dataset over it, and a collator that
augments whole batches in the DataLoader workers.

Seeding rules (what makes a SIGKILLed and resumed run end bit-identical to an uninterrupted one, with
DataLoader workers, persistent or not; finetune.py and pretrain.py alike):

- a training batch's augmentation draws from its own generator, seeded by :func:`augmentation_seed`
  (run seed, epoch, the batch's sample indices), on the CPU or on the device;
- the epoch reaches the workers through shared memory (:class:`TileDataset`): a persistent worker keeps
  the dataset copy it was started with, and still augments with the epoch the main process is in;
- in a worker, the global RNGs (python, numpy, torch) are reseeded from that seed before each batch
  (:func:`seed_worker_for_batch`), so nothing depends on which worker got the batch or since when it runs;
- every DataLoader of the Trainer draws its workers' base seed from its own generator
  (:func:`loader_generator`), not from the global torch RNG: a resumed run creates its iterators at other
  times than an uninterrupted one, and must not shift the global stream (dropout, PatchDropout) by it.
"""

from __future__ import annotations

import io
import logging
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from ..fileio import atomic_write
from ..imaging import centre_box, decode_dataset_image
from ..transforms.augmentation import TileGeometry
from ..transforms.tile_transform import TileTransform
from .schedule import EpochSchedule, epoch_index

logger = logging.getLogger(__name__)

# Part of every cache file name: bump it when decoding changes pixels (2: imaging's rule per image mode).
DECODE_CACHE_VERSION = 2


def default_decode_cache_dir() -> Path:
    """``<HF datasets cache>/hf_tissue_vit_decoded``: decoded tiles keyed by dataset fingerprint."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "hf_tissue_vit_decoded"


def split_fingerprint(split: Any) -> str | None:
    """The fingerprint of a ``datasets`` split saved on disk, or None (in-memory datasets have no stable identity)."""
    fingerprint = getattr(split, "_fingerprint", None)
    return fingerprint if fingerprint and getattr(split, "cache_files", None) else None


def decode_cache_file(key: str, length: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file of ``length`` decoded tiles identified by ``key`` (a dataset fingerprint or a digest)."""
    folder = Path(cache_dir) if cache_dir else default_decode_cache_dir()
    return folder / f"v{DECODE_CACHE_VERSION}_{key}_{length}.npy"


def _decode_cache_path(split: Any, cache_dir: str | os.PathLike | None) -> Path | None:
    fingerprint = split_fingerprint(split)
    return decode_cache_file(fingerprint, len(split), cache_dir) if fingerprint else None


def read_decode_cache(path: Path, length: int) -> np.ndarray | None:
    """The [length,H,W,3] uint8 array cached in ``path``, or None when it is unreadable or of another shape."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable decode cache %s: %s", path, err)
        return None
    if array.ndim == 4 and array.shape[0] == length and array.dtype == np.uint8:
        logger.info("decoded tiles from cache %s", path)
        return array
    return None


def write_decode_cache(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to the cache file ``path`` atomically (a failure is logged, not raised)."""
    try:  # atomic: concurrent processes either see the whole file or none
        with atomic_write(path, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    except OSError as err:
        logger.info("decode cache not written (%s)", err)


def stack_at_common_size(tiles: list[np.ndarray]) -> np.ndarray:
    """One [N,H,W,3] array; tiles of another size than the most common one are resized to it (bilinear)."""
    from PIL import Image

    if not tiles:
        raise ValueError("dataset split has no tiles")
    shapes = Counter(t.shape for t in tiles)
    (height, width, _), _ = shapes.most_common(1)[0]
    if len(shapes) > 1:
        logger.warning(
            "tiles have %d different sizes; resizing them to the most common %dx%d", len(shapes), width, height
        )
        tiles = [
            t
            if t.shape[:2] == (height, width)
            else np.asarray(Image.fromarray(t).resize((width, height), Image.BILINEAR))
            for t in tiles
        ]
    return np.stack(tiles)


def _encoded_images(split: Any, batch_size: int = 64) -> Iterator[list[dict[str, Any]]]:
    """The split's encoded images (``{"bytes", "path"}``), a batch at a time (nothing decoded, nothing kept)."""
    from datasets import Image as ImageFeature

    raw = split.select_columns(["image"]).cast_column("image", ImageFeature(decode=False))
    for batch in raw.iter(batch_size=batch_size):
        yield batch["image"]


def _image_size(value: dict[str, Any]) -> tuple[int, int]:
    """(width, height) from an image's header, without decoding its pixels."""
    from PIL import Image

    source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    if source is None:
        raise ValueError("dataset row has an empty image (no bytes, no path)")
    with Image.open(source) as image:
        return image.size


def common_tile_size(split: Any) -> tuple[int, int]:
    """(height, width) of most tiles of the split, read from the image headers."""
    sizes = Counter(_image_size(value) for batch in _encoded_images(split) for value in batch)
    if not sizes:
        raise ValueError("dataset split has no tiles")
    (width, height), _ = sizes.most_common(1)[0]
    if len(sizes) > 1:
        logger.warning("tiles have %d different sizes; resizing them to the most common %dx%d", len(sizes), width,
                       height)
    return height, width


def _decode_at(value: dict[str, Any], height: int, width: int) -> np.ndarray:
    from PIL import Image

    tile = decode_dataset_image(value)
    if tile.shape[:2] != (height, width):
        tile = np.asarray(Image.fromarray(tile).resize((width, height), Image.BILINEAR))
    return tile


def decode_workers() -> int:
    """Threads that decode tiles (PIL releases the GIL while decoding): the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_decoded(split: Any, path: Path) -> None:
    """Decode every tile of ``split`` into the .npy file ``path`` [N,H,W,3] uint8, a batch at a time:
    written atomically, never held in memory (the written pages are the page cache's, not the process's)."""
    height, width = common_tile_size(split)
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(split), height, width, 3)}
    start = time.perf_counter()
    with atomic_write(path, "wb") as fh, ThreadPoolExecutor(decode_workers()) as pool:
        np.lib.format.write_array_header_1_0(fh, header)
        for batch in _encoded_images(split):
            for tile in pool.map(lambda value: _decode_at(value, height, width), batch):
                fh.write(np.ascontiguousarray(tile, dtype=np.uint8).tobytes())
    logger.info("decoded %d tiles into %s (%.1f s)", len(split), path, time.perf_counter() - start)


def map_decoded(path: Path, length: int) -> np.ndarray | None:
    """The [length,H,W,3] uint8 tiles of the .npy file ``path``, memory-mapped copy-on-write (pages are
    shared through the page cache, nothing is read until used); None when unreadable or of another shape."""
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable decode cache %s: %s", path, err)
        return None
    return array if array.ndim == 4 and array.shape[0] == length and array.dtype == np.uint8 else None


def decode_tiles(split: Any, cache: bool = True, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """All tiles of a ``datasets.Dataset`` split as one uint8 tensor [N,H,W,3] backed by a memory-mapped
    file, decoded once (:func:`hf_tissue_vit.imaging.decode_dataset_image`) and written batch by batch.

    Tiles of another size than the most common one are resized to it (bilinear) with a warning. With
    ``cache`` the file is kept in ``cache_dir`` (default :func:`default_decode_cache_dir`), keyed by the
    split's fingerprint, and reused: under a multi-process launch the first process to take the file's lock
    decodes it, the others wait and map the same file, so the machine holds one copy (in the page cache). Without a
    cache (or a split without a fingerprint) each process decodes into its own unlinked temporary file.
    """
    cache_path = _decode_cache_path(split, cache_dir) if cache else None
    if cache_path is None:
        folder = Path(cache_dir) if cache_dir else default_decode_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".decoding-") as tmp:
            path = Path(tmp) / "tiles.npy"
            write_decoded(split, path)
            array = map_decoded(path, len(split))  # the mapping outlives the file's name
        return torch.from_numpy(array)
    with _decoding_lock(cache_path):
        array = map_decoded(cache_path, len(split)) if cache_path.is_file() else None
        if array is None:
            write_decoded(split, cache_path)
            array = map_decoded(cache_path, len(split))
        else:
            logger.info("decoded tiles from cache %s", cache_path)
    if array is None:
        raise ValueError(f"decode cache {cache_path} could not be read back after writing it")
    return torch.from_numpy(array)


@contextmanager
def _decoding_lock(path: Path) -> Iterator[None]:
    """One process at a time on this machine for ``path``: the first decodes, the others (the other processes
    of a launch, another run on the same data) wait for it and then map the file it wrote."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class TileDataset(torch.utils.data.Dataset):
    """Decoded tiles + labels; items are ``{"pixels": uint8 [H,W,3], "labels": int, ...}``.

    ``train=True`` items ask the collator to augment, seeded by (seed, epoch, sample indices) so
    that a resumed run draws the same augmentations as an uninterrupted one.
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, train: bool = False) -> None:
        if len(pixels) != len(labels):
            raise ValueError(f"{len(pixels)} tiles but {len(labels)} labels")
        self.pixels, self.labels, self.train = pixels, labels, train
        # shared memory: DataLoader workers (persistent ones too) read the epoch the main process sets
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """Epoch that seeds the next augmentations."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next augmentations (by :class:`EpochCallback`), in every worker."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "pixels": self.pixels[index],
            "labels": int(self.labels[index]),
            "index": int(index),
            "epoch": self.epoch,
            "train": self.train,
        }


def tile_dataset(split: Any, train: bool = False, cache: bool = True,
                 cache_dir: str | os.PathLike | None = None) -> TileDataset:
    """A :class:`TileDataset` of a ``datasets.Dataset`` split with ``image`` and ``label`` columns."""
    labels = torch.as_tensor(np.asarray(split["label"]), dtype=torch.long)
    return TileDataset(decode_tiles(split, cache, cache_dir), labels, train=train)


def augmentation_seed(seed: int, epoch: int, indices: Sequence[int]) -> int:
    """The seed of one training batch's augmentation, from (run seed, epoch, the batch's sample indices): a
    resumed run draws what an uninterrupted one drew, on the CPU or on the device."""
    return int(np.random.SeedSequence([int(seed), int(epoch), *(int(i) for i in indices)]).generate_state(1)[0])


def seed_worker_for_batch(batch_seed: int) -> None:
    """In a DataLoader worker, reseed the global RNGs (python, numpy, torch) from the batch's seed: whatever
    a transform draws from them then depends on the batch, not on the worker or its history. Nothing is
    done in the main process, whose torch RNG (dropout, PatchDropout) the Trainer checkpoints."""
    if torch.utils.data.get_worker_info() is None:
        return
    random.seed(batch_seed)
    np.random.seed(batch_seed % 2**32)
    torch.manual_seed(batch_seed)


def loader_generator(seed: int) -> torch.Generator:
    """The generator a Trainer DataLoader draws its workers' base seed from (instead of the global RNG)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), 0x10AD]).generate_state(1)[0]))


class TileCollator:
    """Stack items and turn them into ``pixel_values``: the augmenting :class:`TileTransform` for training
    batches, the saved processor's exact preprocessing (``ProcessorTransform``) for the others.

    With ``device_augmentation`` a training batch stays uint8 (``pixels``, with its ``augment_seed``): the
    Trainer moves it to the GPU and :meth:`augment_on_device` makes its ``pixel_values`` there, with the
    same draws and pixels as the CPU path.
    """

    def __init__(self, train_transform: TileTransform, eval_transform: Callable[[torch.Tensor], torch.Tensor],
                 seed: int = 0, device_augmentation: bool = False, field: int | None = None,
                 targets: Callable[[torch.Tensor, TileGeometry], dict[str, torch.Tensor]] | None = None,
                 schedule: EpochSchedule | None = None) -> None:
        """``field``: take the centre ``field`` x ``field`` px of every tile first (the linear probe's tiles at its
        backbone's scale, :func:`~hf_tissue_vit.training.probe.probe_field`); None = the whole tile. ``targets``:
        training-only targets of a training batch from its tile indices and geometry (a teacher's,
        :class:`~hf_tissue_vit.training.guidance.GuidanceTargets`), added to the batch. ``schedule``: the
        augmentation's strength and the images' size in each epoch (a clean ending, progressive resolution); None =
        full strength at the transform's size throughout."""
        self.train_transform, self.eval_transform, self.seed = train_transform, eval_transform, int(seed)
        self.device_augmentation = bool(device_augmentation)
        self.field = field
        self.targets = targets
        self.schedule = schedule
        self._variants: dict[tuple[int | None, float], TileTransform] = {}

    def transform_at(self, epoch: int) -> TileTransform:
        """The training transform of ``epoch``: ``train_transform`` at the epoch's strength and size."""
        base = self.train_transform
        if self.schedule is None or base.augmentation is None:
            return base
        key = (self.schedule.size(epoch), self.schedule.strength(epoch))
        if key == (None, 1.0):
            return base
        if key not in self._variants:
            self._variants[key] = base.variant(
                key[0], base.augmentation.scaled(key[1], colour=not self.schedule.keep_colour))
        return self._variants[key]

    def _sized(self, batch: dict[str, Any], transform: TileTransform) -> dict[str, Any]:
        """``batch``, telling the model to interpolate its position embeddings when its images are not at the
        model's size (progressive resolution)."""
        if transform.image_size != self.train_transform.image_size:
            batch["interpolate_pos_encoding"] = True
        return batch

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        pixels = torch.stack([item["pixels"] for item in items])
        if self.field is not None:  # [B,H,W,3]: a view, the transforms copy
            top, left, height, width = centre_box(pixels.shape[1], pixels.shape[2], self.field, self.field)
            pixels = pixels[:, top : top + height, left : left + width]
        labels = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        if not items[0].get("train"):
            return {"pixel_values": self.eval_transform(pixels), "labels": labels}
        indices = torch.tensor([item["index"] for item in items], dtype=torch.long)
        seed = augmentation_seed(self.seed, items[0]["epoch"], indices.tolist())
        seed_worker_for_batch(seed)
        if self.device_augmentation:
            return {"pixels": pixels, "augment_seed": seed, "augment_epoch": items[0]["epoch"], "labels": labels,
                    **({"tile_index": indices} if self.targets is not None else {})}
        transform = self.transform_at(items[0]["epoch"])
        pixel_values, geometry = transform(pixels, generator=torch.Generator().manual_seed(seed), return_geometry=True)
        batch = {"pixel_values": pixel_values, "labels": labels}
        if self.targets is not None:
            batch.update(self.targets(indices, geometry))
        return self._sized(batch, transform)

    def augment_on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch of :meth:`__call__`'s uint8 ``pixels`` (on any device) with ``pixel_values`` in their place,
        made on the pixels' device (the transform's device path, in float32 outside any autocast)."""
        batch = dict(batch)
        pixels, seed, indices = batch.pop("pixels"), batch.pop("augment_seed"), batch.pop("tile_index", None)
        transform = self.transform_at(int(batch.pop("augment_epoch", 0)))
        with torch.autocast(pixels.device.type, enabled=False):
            batch["pixel_values"], geometry = transform(
                pixels, generator=torch.Generator().manual_seed(int(seed)), device_path=True, return_geometry=True
            )
        if self.targets is not None and indices is not None:
            batch.update({k: v.to(pixels.device) for k, v in self.targets(indices.cpu(), geometry).items()})
        return self._sized(batch, transform)


class EpochCallback(TrainerCallback):
    """Tell the training dataset the epoch before its DataLoader iterator (and workers) start."""

    def __init__(self, dataset: TileDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(epoch_index(state.epoch))
