"""Building train / validation / test from a source, with a :class:`BuildReport` of what was seen.

Sources (auto-detected by :func:`build_dataset`):

1. the Kather release, as a folder or ``.zip``, with class folders ``01_TUMOR`` ... ``08_EMPTY``;
2. a folder already split as ``train/ val|validation/ test/``, each holding class folders;
3. a Hub dataset id, loaded with ``datasets.load_dataset`` and mapped onto our features;
4. nothing: the Zenodo zip is downloaded into the HF cache and its MD5 checked.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from ..constants import ALL_CLASS_NAMES, CLASS_NAMES, KATHER_MPP, TILE_SIZE, ZENODO_URL
from .decode import Tile, decode_entries, duplicate_groups
from .download import check_md5, download_kather_zip, md5_of_file, release_location
from .hub_source import check_hub_id, hub_entries, is_hub_id
from .report import BuildReport
from .schema import SLIDE_PATTERN, SPLITS, dataset_features, split_class_counts
from .sources import Entry, folder_entries, zip_entries
from .splits import SPLIT_MODES, given_assign, slide_assign, stratified_assign

logger = logging.getLogger(__name__)

SOURCE_TYPES: tuple[str, ...] = ("auto", "release", "split", "hub", "download")


def resolve_source(source: str | os.PathLike | None, source_type: str) -> tuple[str, str]:
    """(kind, source) with kind in ``folder``, ``zip``, ``hub``, ``download``."""
    if source_type not in SOURCE_TYPES:
        raise ValueError(f"source_type must be one of {SOURCE_TYPES}, got {source_type!r}")
    if source is None or str(source) == "" or source_type == "download":
        return "download", ""
    text = str(source)
    path = Path(text).expanduser()
    if source_type == "hub":
        return "hub", check_hub_id(text, "source")
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"source {text!r} is a file but not a zip archive; pass the release .zip or a folder")
        return "zip", str(path)
    looks_like_id = is_hub_id(text) and not text.lower().endswith(".zip")
    if source_type == "auto" and looks_like_id and not path.is_absolute() and not text.startswith("."):
        return "hub", text
    raise FileNotFoundError(
        f"source {text!r} does not exist; pass an existing folder (01_TUMOR ... or train/ val/ test/), "
        "a .zip of the release, or a Hub dataset id such as user/name"
    )


def is_kather_tiles(tiles: Sequence[Tile]) -> bool:
    """Whether the tiles are Kather 2016 release tiles: all 150 x 150 px, all named by a Kather slide."""
    return all(t.size == (TILE_SIZE, TILE_SIZE) and SLIDE_PATTERN.fullmatch(t.slide) for t in tiles)


def check_mpp(mpp: float | None, argument: str = "mpp") -> float | None:
    """``mpp`` as a float if it is a positive, finite number of micrometres per pixel (None passes)."""
    if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(
            f"{argument} must be a positive number of micrometres per pixel (e.g. 0.5 at 20x), got {mpp!r}"
        )
    return None if mpp is None else float(mpp)


def tile_resolution(tiles: Sequence[Tile], mpp: float | None) -> float | None:
    """Micrometres per pixel of the tiles: ``mpp`` when given, the Kather scan's for Kather tiles, else None."""
    if mpp is not None:
        return check_mpp(mpp)
    if is_kather_tiles(tiles):
        return KATHER_MPP
    logger.info("the tiles' resolution is unknown (not Kather release tiles); pass --mpp to record it")
    return None


def _local_source(
    kind: str, where: str, md5: str | None, url: str, cache_dir: str | os.PathLike | None
) -> tuple[str, str, str]:
    """(kind, path, what the report names) after downloading the release if needed, or checking a zip's ``md5``."""
    if kind == "download":
        url, md5 = release_location(url, md5)
        return "zip", str(download_kather_zip(url=url, md5=md5, cache_dir=cache_dir)), url
    if kind == "zip" and md5 is not None:
        actual = md5_of_file(where)
        if actual != md5:
            raise ValueError(f"zip {where!r} has MD5 {actual}, expected {md5}; the file is damaged or not the release")
    return kind, where, where


def _read_tiles(kind: str, where: str, report: BuildReport, layout: str, skip_bad_files: bool) -> list[Tile]:
    """Find the entries of the source and decode each once."""
    class_names = report.class_names
    if kind == "zip":
        try:
            zf = zipfile.ZipFile(where)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"source {where!r} is not a readable zip: {exc}") from exc
        with zf:  # the entries read from the open zip: decode before closing it
            return decode_entries(zip_entries(zf, where, class_names, report, layout), report, skip_bad_files)
    entries: list[Entry] = (folder_entries(Path(where), class_names, report, layout) if kind == "folder"
                            else hub_entries(where, class_names, report))
    return decode_entries(entries, report, skip_bad_files)


def _assign(tiles: Sequence[Tile], report: BuildReport) -> list[str | None]:
    """Split of every tile (None: left out) by the source's split or ``report.split_by``."""
    groups = duplicate_groups(tiles, report)
    if tiles[0].split is not None:
        report.split_by = "given"
        return given_assign(tiles, groups, report)
    if report.split_by == "slide":
        return slide_assign(tiles, groups, report.class_names, report.seed)
    return stratified_assign(tiles, groups, report.class_names, report.seed)


def _assemble(tiles: Sequence[Tile], assignment: Sequence[str | None], class_names: Sequence[str]) -> DatasetDict:
    """The splits, rows sorted by label then file name."""
    features = dataset_features(class_names)
    label_of = {name: k for k, name in enumerate(class_names)}
    splits = {}
    for split in SPLITS:
        rows = sorted(
            (i for i, s in enumerate(assignment) if s == split),
            key=lambda i: (label_of[tiles[i].class_name], tiles[i].name),
        )
        splits[split] = Dataset.from_dict(
            {
                "image": [{"bytes": tiles[i].png, "path": None} for i in rows],
                "label": [label_of[tiles[i].class_name] for i in rows],
                "slide": [tiles[i].slide for i in rows],
                "filename": [tiles[i].name for i in rows],
            },
            features=features,
        )
    return DatasetDict(splits)


def _summarise(dataset_dict: DatasetDict, tiles: Sequence[Tile], assignment: Sequence[str | None],
               report: BuildReport) -> None:
    """Class counts and slides per split into ``report``, and into the log."""
    report.split_class_counts = split_class_counts(dataset_dict)
    report.split_slides = {
        s: sorted({tiles[i].slide for i, a in enumerate(assignment) if a == s} - {""}) for s in SPLITS
    }
    for split, counts in report.split_class_counts.items():
        logger.info("%s: %d tiles %s%s", split, sum(counts.values()), counts,
                    f" slides {report.split_slides[split]}" if report.split_by == "slide" else "")
    empty = [f"{s}/{c}" for s, cc in report.split_class_counts.items() for c, n in cc.items() if n == 0]
    if empty:
        logger.warning("no tiles for: %s (too few tiles or slides for these classes)", ", ".join(empty))


def build_dataset_with_report(
    source: str | os.PathLike | None,
    *,
    split_by: str = "stratified",
    seed: int = 42,
    keep_all_classes: bool = False,
    skip_bad_files: bool = False,
    source_type: str = "auto",
    md5: str | None = None,
    url: str = ZENODO_URL,
    cache_dir: str | os.PathLike | None = None,
    mpp: float | None = None,
) -> tuple[DatasetDict, BuildReport]:
    """Build train/validation/test from ``source`` (see the module docstring) and say what was seen.

    ``md5`` checks a local zip before any work; with no source, ``url``/``md5`` (default: Zenodo)
    are downloaded into ``cache_dir``. Sources that come split keep their split; ``split_by``
    (``stratified`` or ``slide``) and ``seed`` apply to the others. ``mpp`` (micrometres per pixel)
    is recorded for the tiles; without it, only Kather release tiles get one (``KATHER_MPP``).
    """
    start = time.perf_counter()
    if split_by not in SPLIT_MODES:
        raise ValueError(f"split_by must be one of {SPLIT_MODES}, got {split_by!r}")
    check_mpp(mpp)  # bad values fail before any work
    md5 = check_md5(md5)
    class_names = list(ALL_CLASS_NAMES if keep_all_classes else CLASS_NAMES)
    kind, where = resolve_source(source, source_type)
    kind, where, shown = _local_source(kind, where, md5, url, cache_dir)
    report = BuildReport(source=shown, source_kind=kind, split_by=split_by, seed=seed, class_names=class_names)
    layout = source_type if source_type in ("release", "split") else "auto"
    tiles = _read_tiles(kind, where, report, layout, skip_bad_files)
    report.mpp = tile_resolution(tiles, mpp)
    assignment = _assign(tiles, report)
    dataset_dict = _assemble(tiles, assignment, class_names)
    _summarise(dataset_dict, tiles, assignment, report)
    report.build_seconds = round(time.perf_counter() - start, 2)
    return dataset_dict, report


def build_dataset(
    source: str | os.PathLike | None,
    *,
    split_by: str = "stratified",
    seed: int = 42,
    keep_all_classes: bool = False,
    skip_bad_files: bool = False,
    **kwargs: Any,
) -> DatasetDict:
    """:func:`build_dataset_with_report` without the report."""
    return build_dataset_with_report(source, split_by=split_by, seed=seed, keep_all_classes=keep_all_classes,
                                     skip_bad_files=skip_bad_files, **kwargs)[0]
