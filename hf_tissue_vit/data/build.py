"""Building train / validation / test from a source, with a :class:`BuildReport` of what was seen.

Sources (auto-detected by :func:`build_dataset`):

1. a folder or ``.zip`` of class folders of any names (``imagefolder``); the Kather 2016 release
   (``01_TUMOR`` ... ``08_EMPTY``) and NCT-CRC-HE-100K / CRC-VAL-HE-7K (``ADI`` ... ``TUM``) are presets;
2. a folder already split as ``train/ val|validation/ test/``, each holding class folders;
3. a CSV or Parquet manifest of ``path,label[,slide][,split]`` rows (:mod:`.manifest`);
4. a Hub dataset id, loaded with ``datasets.load_dataset`` and mapped onto our features;
5. nothing: the Kather 2016 Zenodo zip is downloaded into the HF cache and its MD5 checked.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from ..constants import KATHER_MPP, TILE_SIZE, ZENODO_URL
from ..fileio import scratch_dir
from ..units import check_mpp
from .classes import ClassChoice, ClassPlan, Preset
from .decode import Tile, duplicate_groups, tiff_resolution, tile_records, write_tiles
from .download import check_md5, download_kather_zip, md5_of_file, release_location
from .hub_source import check_hub_id, hub_entries, is_hub_id
from .manifest import is_manifest, manifest_entries
from .report import BuildReport
from .schema import SLIDE_PATTERN, SPLITS, dataset_features, split_class_counts
from .sources import Entry, folder_entries, zip_entries
from .splits import SPLIT_MODES, given_assign, slide_assign, stratified_assign

logger = logging.getLogger(__name__)

SOURCE_TYPES: tuple[str, ...] = ("auto", "release", "split", "manifest", "hub", "download")


def resolve_source(source: str | os.PathLike | None, source_type: str) -> tuple[str, str]:
    """(kind, source) with kind in ``folder``, ``zip``, ``manifest``, ``hub``, ``download``."""
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
    if path.is_file() and (source_type == "manifest" or is_manifest(path)):
        return "manifest", str(path)
    if source_type == "manifest":
        raise FileNotFoundError(f"manifest {text!r} does not exist; pass a .csv or .parquet file of path,label rows")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"source {text!r} is a file but not a zip archive or a .csv/.parquet manifest; "
                             "pass a folder of class folders, a .zip of one, or a manifest")
        return "zip", str(path)
    looks_like_id = is_hub_id(text) and not text.lower().endswith(".zip")
    if source_type == "auto" and looks_like_id and not path.is_absolute() and not text.startswith("."):
        return "hub", text
    raise FileNotFoundError(
        f"source {text!r} does not exist; pass an existing folder (class folders or train/ val/ test/), "
        "a .zip of one, a .csv/.parquet manifest, or a Hub dataset id such as user/name"
    )


def is_kather_tiles(tiles: Sequence[Tile]) -> bool:
    """Whether the tiles are Kather 2016 release tiles: all 150 x 150 px, all named by a Kather slide."""
    return all(t.size == (TILE_SIZE, TILE_SIZE) and SLIDE_PATTERN.fullmatch(t.slide) for t in tiles)


def tile_resolution(tiles: Sequence[Tile], mpp: float | None, preset: Preset | None = None,
                    tiff_mpp: float | None = None) -> float | None:
    """Micrometres per pixel of the tiles: ``mpp`` when given, else the preset's (Kather's only for Kather
    release tiles), else what all the TIFF files' resolution tags say, else None."""
    if mpp is not None:
        return check_mpp(mpp)
    if preset is not None and preset.mpp is not None and (preset.name != "kather2016" or is_kather_tiles(tiles)):
        return preset.mpp
    if preset is None and is_kather_tiles(tiles):
        return KATHER_MPP
    if tiff_mpp is not None:
        logger.info("the tiles' resolution is %s µm/px (from their TIFF resolution tags)", tiff_mpp)
        return tiff_mpp
    logger.info("the tiles' resolution is unknown (no preset, no TIFF resolution); pass --mpp to record it")
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


def find_entries(kind: str, where: str, choice: ClassChoice, report: BuildReport,
                 layout: str) -> tuple[list[Entry], ClassPlan]:
    """The entries of the source and its classes; every listing check runs here, before any decoding."""
    if kind == "zip":
        return zip_entries(where, choice, report, layout)
    if kind == "folder":
        return folder_entries(Path(where), choice, report, layout)
    if kind == "manifest":
        return manifest_entries(where, choice, report)
    return hub_entries(where, choice, report)


def _assign(tiles: Sequence[Tile], report: BuildReport) -> list[str | None]:
    """Split of every tile (None: left out) by the source's split or ``report.split_by``."""
    groups = duplicate_groups(tiles, report)
    if tiles[0].split is not None:
        report.split_by = "given"
        return given_assign(tiles, groups, report)
    if report.split_by == "slide":
        return slide_assign(tiles, groups, report.class_names, report.seed)
    return stratified_assign(tiles, groups, report.class_names, report.seed)


def _assemble(work: Dataset, rows_of: Sequence[int], tiles: Sequence[Tile], assignment: Sequence[str | None],
              class_names: Sequence[str]) -> DatasetDict:
    """The splits as selections of the Arrow shards, rows sorted by label then file name."""
    label_of = {name: k for k, name in enumerate(class_names)}
    stored = list(dataset_features(class_names))
    splits = {}
    for split in SPLITS:
        chosen = sorted((i for i, s in enumerate(assignment) if s == split),
                        key=lambda i: (label_of[tiles[i].class_name], tiles[i].name))
        splits[split] = work.select([rows_of[i] for i in chosen]).select_columns(stored)
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


def default_num_proc() -> int:
    """Decoding processes of a build: the machine's cores (at most 8)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _work_dir(work_dir: str | os.PathLike | None) -> str:
    """Where the Arrow shards of a build go: ``work_dir``, or a temporary folder removed at exit."""
    if work_dir is not None:
        return str(work_dir)
    return str(scratch_dir("hf_tissue_vit-build-"))


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
    classes: str | Sequence[str] | None = None,
    label_map: str | dict[str, str] | None = None,
    preset: str = "auto",
    citation: str | None = None,
    num_proc: int | None = None,
    work_dir: str | os.PathLike | None = None,
) -> tuple[DatasetDict, BuildReport]:
    """Build train/validation/test from ``source`` (see the module docstring) and say what was seen.

    Classes come from the source's folder or label names (:mod:`.classes`): ``classes`` picks and orders
    a subset, ``label_map`` merges names, ``preset`` names a known release (``auto``: recognised by its
    folder names). ``md5`` checks a local zip before any work; with no source, ``url``/``md5`` (default:
    Zenodo) are downloaded into ``cache_dir``. Sources that come split keep their split; ``split_by``
    (``stratified`` or ``slide``) and ``seed`` apply to the others. ``mpp`` (micrometres per pixel) is
    recorded for the tiles (else the preset's, else the TIFF files'). Tiles are decoded by ``num_proc``
    processes (default: the machine's cores) and streamed to Arrow shards in ``work_dir`` (default: a
    temporary folder), which the returned splits read from: keep it until they are saved.
    """
    start = time.perf_counter()
    if split_by not in SPLIT_MODES:
        raise ValueError(f"split_by must be one of {SPLIT_MODES}, got {split_by!r}")
    check_mpp(mpp)  # bad values fail before any work
    md5 = check_md5(md5)
    choice = ClassChoice(preset, classes, label_map, keep_all_classes)
    kind, where = resolve_source(source, source_type)
    kind, where, shown = _local_source(kind, where, md5, url, cache_dir)
    report = BuildReport(source=shown, source_kind=kind, split_by=split_by, seed=seed, class_names=[])
    layout = source_type if source_type in ("release", "split") else "auto"
    entries, plan = find_entries(kind, where, choice, report, layout)
    report.class_names = list(plan.class_names)
    report.preset = plan.preset.name if plan.preset else None
    report.citation = citation or (plan.preset.citation if plan.preset else None)
    # Hub rows are read through picklable readers of the memory-mapped split: they decode in parallel too.
    parallel = num_proc if num_proc is not None else default_num_proc()
    work = write_tiles(entries, plan.class_names, _work_dir(work_dir), parallel)
    del entries
    records = tile_records(work, plan.class_names, report, skip_bad_files)
    rows_of = [i for i, t in enumerate(records) if t is not None]
    tiles = [records[i] for i in rows_of]
    report.mpp = tile_resolution(tiles, mpp, plan.preset, tiff_resolution(work))
    assignment = _assign(tiles, report)
    dataset_dict = _assemble(work, rows_of, tiles, assignment, plan.class_names)
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
