"""Decoding every source file once, and the checks its pixels give (modes, sizes, duplicates).

The decoded pixels give the checks (mode, size, SHA-256 of the pixels for duplicates) and the PNG
bytes that are stored, so nothing is decoded twice and the stored tiles are lossless. The mode
conversion is :func:`hf_tissue_vit.imaging.to_rgb8`'s, the same as in training and prediction.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..constants import TILE_SIZE
from ..imaging import open_image, to_rgb8
from .report import BuildReport
from .schema import parse_slide
from .sources import Entry

logger = logging.getLogger(__name__)

_EXAMPLES = 20  # file names kept in the report per finding


@dataclass
class Tile:
    """One decoded source file: what is stored, and what the split and the checks need."""

    name: str
    class_name: str
    split: str | None
    slide: str
    png: bytes
    sha256: str
    size: tuple[int, int]


def _decode(data: bytes) -> tuple[bytes, str, tuple[int, int], str | None]:
    """PNG bytes, pixel SHA-256, (width, height) and the original mode if it was not RGB."""
    with open_image(data) as image:
        image.load()
        source_mode = image.mode
        source_format = image.format
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
    return png, digest, rgb.size, (None if source_mode == "RGB" else source_mode)


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


def decode_entries(entries: Sequence[Entry], report: BuildReport, skip_bad_files: bool) -> list[Tile]:
    """Decode every entry once; unreadable files stop the build unless ``skip_bad_files``."""
    tiles: list[Tile] = []
    bad: list[str] = []
    converted: Counter[str] = Counter()
    for entry in entries:
        try:
            png, digest, size, mode = _decode(entry.read())
        except Exception as exc:
            bad.append(f"{entry.name}: {type(exc).__name__}: {exc}")
            continue
        if mode is not None:
            converted[mode] += 1
        slide = entry.slide if entry.slide is not None else parse_slide(entry.name)
        tiles.append(Tile(entry.name, entry.class_name, entry.split, slide, png, digest, size))
    _report_bad(bad, report, skip_bad_files)
    if converted:
        report.converted_modes = dict(sorted(converted.items()))
        logger.warning("converted %d non-RGB image(s) to RGB: %s", sum(converted.values()), report.converted_modes)
    if not tiles:
        raise ValueError(f"no readable image in source {report.source!r}")
    _report_sizes(tiles, report)
    return tiles


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
