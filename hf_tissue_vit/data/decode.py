"""Decoding every source file once, streamed to Arrow shards, and the checks its pixels give (modes,
sizes, duplicates).

The decoded pixels give the checks (mode, size, SHA-256 of the pixels for duplicates) and the PNG
bytes that are stored, so nothing is decoded twice and the stored tiles are lossless. Rows go to disk
in small batches as they are decoded (:func:`write_tiles`): memory stays flat in the number of tiles. The mode
conversion is :func:`hf_tissue_vit.imaging.to_rgb8`'s, the same as in training and prediction.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, Features, Value

from ..constants import TILE_SIZE
from ..imaging import open_image, to_rgb8
from .report import BuildReport
from .schema import dataset_features, parse_slide
from .sources import Entry

logger = logging.getLogger(__name__)

_EXAMPLES = 20  # file names kept in the report per finding


@dataclass
class Tile:
    """One decoded source file: what the split and the checks need (its pixels stay in the Arrow shards)."""

    name: str
    class_name: str
    split: str | None
    slide: str
    sha256: str
    size: tuple[int, int]


# Tiles are written to Arrow in batches of this many rows (a few MB of PNG), so a build never holds more.
WRITER_BATCH_SIZE = 64
# Plausible micrometres per pixel of a TIFF's resolution tag (72 dpi defaults are not a scan's).
_MPP_RANGE = (0.05, 20.0)


def _tiff_mpp(image) -> float | None:
    """µm/px from a TIFF's XResolution and ResolutionUnit (2: inch, 3: cm), when plausible."""
    tags = getattr(image, "tag_v2", None)
    if image.format != "TIFF" or tags is None or 282 not in tags:
        return None
    try:
        per_unit = float(tags[282])
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    microns = {2: 25400.0, 3: 10000.0}.get(int(tags.get(296, 2)))
    if not microns or per_unit <= 0:
        return None
    mpp = microns / per_unit
    return round(mpp, 6) if _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1] else None


def _decode(data: bytes) -> tuple[bytes, str, tuple[int, int], str | None, float | None]:
    """PNG bytes, pixel SHA-256, (width, height), the original mode if it was not RGB, a TIFF's µm/px."""
    with open_image(data) as image:
        image.load()
        source_mode = image.mode
        source_format = image.format
        mpp = _tiff_mpp(image)
        rgb = to_rgb8(image)
        pixels = np.asarray(rgb)
    digest = hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()
    if source_format == "PNG" and source_mode == "RGB":
        png = data  # already lossless PNG of exactly these pixels: no re-encode
    else:
        buffer = io.BytesIO()
        # compress_level=1: lossless either way, and faster than the default for a slightly larger file.
        rgb.save(buffer, format="PNG", compress_level=1)
        png = buffer.getvalue()
    return png, digest, rgb.size, (None if source_mode == "RGB" else source_mode), mpp


def work_features(class_names: Sequence[str]) -> Features:
    """The stored columns plus what the checks and the split need (dropped before saving)."""
    return Features({**dataset_features(class_names), "split": Value("string"), "sha256": Value("string"),
                     "width": Value("int32"), "height": Value("int32"), "mode": Value("string"),
                     "tiff_mpp": Value("float64"), "error": Value("string")})


def _tile_rows(entries: Sequence[Entry], label_of: dict[str, int]) -> Iterator[dict[str, Any]]:
    """One row per entry (decoded, hashed); an unreadable file gives a row with its ``error``."""
    for entry in entries:
        slide = entry.slide if entry.slide is not None else parse_slide(entry.name)
        row = {"label": label_of[entry.class_name], "slide": slide, "filename": entry.name, "split": entry.split}
        try:
            png, digest, size, mode, mpp = _decode(entry.read())
        except Exception as exc:
            yield {**row, "image": None, "sha256": None, "width": None, "height": None, "mode": None,
                   "tiff_mpp": None, "error": f"{entry.name}: {type(exc).__name__}: {exc}"}
            continue
        yield {**row, "image": {"bytes": png, "path": None}, "sha256": digest, "width": size[0], "height": size[1],
               "mode": mode, "tiff_mpp": mpp, "error": None}


def write_tiles(entries: Sequence[Entry], class_names: Sequence[str], work_dir: str | os.PathLike,
                num_proc: int | None = None) -> Dataset:
    """Decode, check and hash every entry once, streaming the rows to Arrow shards in ``work_dir``
    (``datasets`` writes them; ``num_proc`` processes decode in parallel). Row i is entry i."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    label_of = {name: k for k, name in enumerate(class_names)}
    num_proc = num_proc if num_proc and num_proc > 1 and len(entries) >= 2 * num_proc else None
    shown = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        return Dataset.from_generator(
            _tile_rows, features=work_features(class_names), cache_dir=str(work_dir),
            gen_kwargs={"entries": list(entries), "label_of": label_of}, num_proc=num_proc,
            fingerprint=secrets.token_hex(8), writer_batch_size=WRITER_BATCH_SIZE,
        )
    finally:
        if shown:
            enable_progress_bar()


def tile_records(work: Dataset, class_names: Sequence[str], report: BuildReport,
                 skip_bad_files: bool) -> list[Tile | None]:
    """What the split and checks need of every row, read column by column (no pixels); None for a bad file."""
    columns = work.select_columns(["label", "slide", "filename", "split", "sha256", "width", "height", "mode",
                                   "error"]).to_dict()
    bad = [e for e in columns["error"] if e is not None]
    _report_bad(bad, report, skip_bad_files)
    converted = Counter(m for m in columns["mode"] if m is not None)
    if converted:
        report.converted_modes = dict(sorted(converted.items()))
        logger.warning("converted %d non-RGB image(s) to RGB: %s", sum(converted.values()), report.converted_modes)
    records: list[Tile | None] = [
        None if error is not None else Tile(name, class_names[label], split, slide, sha, (w, h))
        for label, slide, name, split, sha, w, h, error in zip(
            columns["label"], columns["slide"], columns["filename"], columns["split"], columns["sha256"],
            columns["width"], columns["height"], columns["error"])
    ]
    tiles = [t for t in records if t is not None]
    if not tiles:
        raise ValueError(f"no readable image in source {report.source!r}")
    _report_sizes(tiles, report)
    return records


def tiff_resolution(work: Dataset) -> float | None:
    """The µm/px all the source's TIFF tiles agree on (from their resolution tags), else None."""
    values = {v for v in work.select_columns(["tiff_mpp"])["tiff_mpp"]}
    return values.pop() if len(values) == 1 and None not in values else None


def _report_bad(bad: Sequence[str], report: BuildReport, skip_bad_files: bool) -> None:
    if not bad:
        return
    listing = "\n  ".join(bad)
    if not skip_bad_files:
        raise ValueError(
            f"{len(bad)} image file(s) could not be read (unreadable, truncated or empty):\n  {listing}\n"
            "Replace them, or pass --skip_bad_files to build without them."
        )
    logger.warning("skipped %d unreadable image file(s):\n  %s", len(bad), listing)
    report.skipped_bad_files = list(bad)


def _report_sizes(tiles: Sequence[Tile], report: BuildReport) -> None:
    """The most common tile size, and the tiles of other sizes (kept: the image processor resizes)."""
    sizes = Counter(t.size for t in tiles)
    common, _ = sizes.most_common(1)[0]
    report.tile_size = list(common)
    if common != (TILE_SIZE, TILE_SIZE):
        logger.info("tiles are %dx%d px (the Kather release has %d px tiles)", *common, TILE_SIZE)
    others = [t for t in tiles if t.size != common]
    if others:
        report.other_size_counts = {f"{w}x{h}": n for (w, h), n in sorted(sizes.items()) if (w, h) != common}
        report.other_size_examples = [f"{t.name} ({t.size[0]}x{t.size[1]})" for t in others[:_EXAMPLES]]
        logger.warning(
            "%d tile(s) are not %dx%d px (kept; the image processor resizes them): %s; e.g. %s",
            len(others), *common, report.other_size_counts, ", ".join(report.other_size_examples[:5]),
        )


def duplicate_groups(tiles: Sequence[Tile], report: BuildReport) -> list[list[int]]:
    """Groups of tile indices with identical pixels (singletons included), in file order."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, tile in enumerate(tiles):
        by_hash[tile.sha256].append(i)
    groups = sorted(by_hash.values(), key=lambda g: tiles[g[0]].name)
    dups = [g for g in groups if len(g) > 1]
    if dups:
        report.duplicate_groups = [[tiles[i].name for i in g] for g in dups]
        mixed = [g for g in dups if len({tiles[i].class_name for i in g}) > 1]
        logger.warning(
            "%d group(s) of tiles with identical pixels (%d files); each group is kept in one split: %s",
            len(dups), sum(len(g) for g in dups), "; ".join(" = ".join(g) for g in report.duplicate_groups[:5]),
        )
        if mixed:
            logger.warning("%d duplicate group(s) carry different labels: %s", len(mixed),
                           "; ".join(" = ".join(tiles[i].name for i in g) for g in mixed[:5]))
    return groups
