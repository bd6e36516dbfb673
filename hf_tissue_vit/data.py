"""Kather 2016 tissue tiles as a Hugging Face ``DatasetDict`` (train / validation / test).

Sources (auto-detected by :func:`build_dataset`):

1. the Kather release, as a folder or ``.zip``, with class folders ``01_TUMOR`` ... ``08_EMPTY``;
2. a folder already split as ``train/ val|validation/ test/``, each holding class folders;
3. a Hub dataset id, loaded with ``datasets.load_dataset`` and mapped onto our features;
4. nothing: the Zenodo zip is downloaded into the HF cache and its MD5 checked.

Every image is decoded exactly once: the decoded pixels give the checks (mode, size, SHA-256 of
the pixels for duplicates) and the PNG bytes that are stored, so nothing is decoded twice and
the stored tiles are lossless.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from huggingface_hub import DatasetCard, DatasetCardData
from huggingface_hub import constants as hf_constants
from PIL import Image

from . import __version__
from .cards import render_card
from .constants import (
    ALL_CLASS_NAMES,
    CLASS_DESCRIPTIONS,
    CLASS_NAMES,
    IMAGE_EXTENSIONS,
    KATHER_BIBTEX,
    KATHER_CITATION,
    KATHER_FOLDERS,
    TILE_SIZE,
    ZENODO_MD5,
    ZENODO_URL,
)
from .fileio import atomic_write_json, atomic_write_text, default_mode
from .imaging import to_rgb8

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# 425 / 100 / 100 of 625 tiles per class in the lab protocol.
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.68, "validation": 0.16, "test": 0.16}
SPLIT_MODES: tuple[str, ...] = ("stratified", "slide")
SOURCE_TYPES: tuple[str, ...] = ("auto", "release", "split", "hub", "download")
METADATA_FILE = "hf_tissue_vit_dataset.json"
SLIDE_PATTERN = re.compile(r"CRC-Prim-HE-\d+")
DEFAULT_DOWNLOAD_TIMEOUT = 20.0

_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
                  "validation": "validation", "dev": "validation", "test": "test", "testing": "test"}
_CLASS_ALIASES = {name.lower(): name for name in ALL_CLASS_NAMES} | {
    "tumour": "Tumor", "lymphocytes": "Lympho", "lymphocyte": "Lympho", "background": "Empty",
    "adipose_tissue": "Adipose", "fat": "Adipose", "necrosis": "Debris",
}
_FOLDER_OF_CLASS = {name: folder for folder, name in KATHER_FOLDERS.items()}
_OS_JUNK_DIRS = {"__MACOSX", "$RECYCLE.BIN", "System Volume Information"}
_OFFLINE_HINT = (
    "To build without a download, pass a local copy of the Kather 2016 release with "
    "--source /path/to/Kather_texture_2016_image_tiles_5000 (the folder with 01_TUMOR ... 08_EMPTY) "
    "or --source /path/to/Kather_texture_2016_image_tiles_5000.zip"
)


class DownloadError(ConnectionError):
    """The Kather zip could not be fetched (offline, server error, connection cut).

    The message is the reason followed by ``hint``, how to avoid the download; the default hint
    names prepare_dataset.py's ``--source``, callers with other flags swap it with :meth:`with_hint`.
    """

    def __init__(self, reason: str, hint: str = _OFFLINE_HINT) -> None:
        super().__init__(f"{reason}. {hint}")
        self.reason, self.hint = reason, hint

    def with_hint(self, hint: str) -> DownloadError:
        """The same failure with another hint (e.g. the flags of the script that hit it)."""
        return DownloadError(self.reason, hint)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
@dataclass
class BuildReport:
    """What a build saw and decided; saved as ``hf_tissue_vit_dataset.json`` next to the data."""

    source: str
    source_kind: str
    split_by: str
    seed: int
    class_names: list[str]
    n_image_files: int = 0
    n_ignored_files: int = 0
    ignored_examples: list[str] = field(default_factory=list)
    skipped_bad_files: list[str] = field(default_factory=list)
    converted_modes: dict[str, int] = field(default_factory=dict)
    tile_size: list[int] | None = None
    other_size_counts: dict[str, int] = field(default_factory=dict)
    other_size_examples: list[str] = field(default_factory=list)
    dropped_classes: dict[str, int] = field(default_factory=dict)
    duplicate_groups: list[list[str]] = field(default_factory=list)
    removed_cross_split_duplicates: list[str] = field(default_factory=list)
    split_slides: dict[str, list[str]] = field(default_factory=dict)
    split_class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    build_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-ready values."""
        return asdict(self)


@dataclass
class _Entry:
    """One image file of the source, not decoded yet."""

    name: str  # path relative to the source root (POSIX), stored as ``filename``
    class_name: str
    read: Callable[[], bytes]
    split: str | None = None  # set when the source comes split already
    slide: str | None = None  # set when the source has a slide column


@dataclass
class _Tile:
    name: str
    class_name: str
    split: str | None
    slide: str
    png: bytes
    sha256: str
    size: tuple[int, int]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def class_name_for(name: str) -> str | None:
    """Our class name for a folder or label name (``01_TUMOR``, ``tumor``, ``TUMOR`` -> ``Tumor``)."""
    key = re.sub(r"^\d+[_\- ]*", "", str(name).strip()).lower().replace(" ", "_")
    return _CLASS_ALIASES.get(key)


def parse_slide(filename: str) -> str:
    """Slide id (``CRC-Prim-HE-07``) parsed from a Kather file name; ``""`` when absent."""
    match = SLIDE_PATTERN.search(os.path.basename(filename))
    return match.group(0) if match else ""


def target_split_sizes(n: int) -> dict[str, int]:
    """Tiles per split for a class of ``n`` tiles: 68/16/16 %, 425/100/100 for 625.

    Validation and test get ``round(0.16 * n)`` each (halves rounded up, so 525 -> 357/84/84),
    at least one each when ``n >= 3``; train gets the rest.
    """
    held_out = math.floor(SPLIT_FRACTIONS["test"] * n + 0.5)
    if n >= 3:
        held_out = max(held_out, 1)
    held_out = min(held_out, n // 2)
    return {"train": n - 2 * held_out, "validation": held_out, "test": held_out}


def _is_os_junk(relpath: str) -> bool:
    parts = relpath.split("/")
    return any(p in _OS_JUNK_DIRS or p.startswith(".") for p in parts) or parts[-1] in {"Thumbs.db", "desktop.ini"}


def _is_image_name(relpath: str) -> bool:
    return relpath.lower().endswith(IMAGE_EXTENSIONS) and not _is_os_junk(relpath)


def md5_of_file(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _rel_listing(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if n and not n.endswith("/"))


# --------------------------------------------------------------------------------------------
# Decoding: once per file
# --------------------------------------------------------------------------------------------
def _decode(data: bytes) -> tuple[bytes, str, tuple[int, int], str | None]:
    """PNG bytes, pixel SHA-256, (width, height) and the original mode if it was not RGB."""
    if not data:
        raise ValueError("file is empty (0 bytes)")
    with Image.open(io.BytesIO(data)) as image:
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
        # compress_level=1: lossless either way, and ~2x faster than the default for a few % size.
        rgb.save(buffer, format="PNG", compress_level=1)
        png = buffer.getvalue()
    return png, digest, rgb.size, (None if source_mode == "RGB" else source_mode)


def _decode_entries(entries: Sequence[_Entry], report: BuildReport, skip_bad_files: bool) -> list[_Tile]:
    tiles: list[_Tile] = []
    bad: list[str] = []
    converted: Counter[str] = Counter()
    for entry in entries:
        try:
            png, digest, size, mode = _decode(entry.read())
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            bad.append(f"{entry.name}: {type(exc).__name__}: {exc}")
            continue
        if mode is not None:
            converted[mode] += 1
        slide = entry.slide if entry.slide is not None else parse_slide(entry.name)
        tiles.append(_Tile(entry.name, entry.class_name, entry.split, slide, png, digest, size))
    if bad:
        listing = "\n  ".join(bad)
        if not skip_bad_files:
            raise ValueError(
                f"{len(bad)} image file(s) could not be read (unreadable, truncated or empty):\n  {listing}\n"
                "Replace them, or pass --skip_bad_files to build without them."
            )
        logger.warning("skipped %d unreadable image file(s):\n  %s", len(bad), listing)
        report.skipped_bad_files = bad
    if converted:
        report.converted_modes = dict(sorted(converted.items()))
        logger.warning("converted %d non-RGB image(s) to RGB: %s", sum(converted.values()), report.converted_modes)
    if not tiles:
        raise ValueError(f"no readable image in source {report.source!r}")
    _report_sizes(tiles, report)
    return tiles


def _report_sizes(tiles: Sequence[_Tile], report: BuildReport) -> None:
    sizes = Counter(t.size for t in tiles)
    common, _ = sizes.most_common(1)[0]
    report.tile_size = list(common)
    if common != (TILE_SIZE, TILE_SIZE):
        logger.info("tiles are %dx%d px (the Kather release has %d px tiles)", *common, TILE_SIZE)
    others = [t for t in tiles if t.size != common]
    if others:
        report.other_size_counts = {f"{w}x{h}": n for (w, h), n in sorted(sizes.items()) if (w, h) != common}
        report.other_size_examples = [f"{t.name} ({t.size[0]}x{t.size[1]})" for t in others[:20]]
        logger.warning(
            "%d tile(s) are not %dx%d px (kept; the image processor resizes them): %s; e.g. %s",
            len(others), *common, report.other_size_counts, ", ".join(report.other_size_examples[:5]),
        )


def _duplicate_groups(tiles: Sequence[_Tile], report: BuildReport) -> list[list[int]]:
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
                           "; ".join(" = ".join(f"{tiles[i].name}" for i in g) for g in mixed[:5]))
    return groups


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def _find_layout(files: Sequence[str]) -> tuple[str, str]:
    """(kind, root) with kind ``"split"`` or ``"release"``: the shallowest folder that looks like one."""
    children: dict[str, set[str]] = defaultdict(set)
    for name in files:
        if _is_os_junk(name):
            continue
        parts = name.split("/")[:-1]
        for depth in range(len(parts)):
            children["/".join(parts[:depth])].add(parts[depth])
    for root in sorted(children, key=lambda d: (d.count("/") + bool(d), d)):
        subdirs = children[root]
        if any(s.lower() in _SPLIT_ALIASES for s in subdirs):
            return "split", root
        if any(class_name_for(s) for s in subdirs):
            return "release", root
    return "", ""


def _class_folders(
    root: str, subdirs: Iterable[str], class_names: Sequence[str], where: str
) -> tuple[dict[str, str], list[str]]:
    """Map folder -> class for the folders under ``root``; error if a wanted class is missing."""
    mapping: dict[str, str] = {}
    seen: dict[str, str] = {}
    unknown: list[str] = []
    for sub in sorted(subdirs):
        name = class_name_for(sub)
        if name is None:
            unknown.append(sub)
            continue
        if name in seen:
            raise ValueError(f"{where}: folders {seen[name]!r} and {sub!r} both hold class {name}; keep one")
        seen[name] = sub
        mapping[sub] = name
    missing = [c for c in class_names if c not in seen]
    if missing:
        expected = ", ".join(_FOLDER_OF_CLASS[c] for c in missing)
        raise ValueError(
            f"{where}: class folder(s) missing for {', '.join(missing)} (expected {expected}); "
            f"found folders: {', '.join(sorted(subdirs)) or 'none'}"
        )
    return mapping, unknown


def _tree_entries(
    files: Sequence[str], reader: Callable[[str], Callable[[], bytes]], source: str,
    class_names: Sequence[str], report: BuildReport, container: str, expected_kind: str = "auto",
) -> list[_Entry]:
    """Entries of a release or split layout given the file list of a folder or a zip."""
    images = [f for f in files if _is_image_name(f)]
    if not images:
        raise ValueError(
            f"source {source!r} holds no image files ({', '.join(e.upper() for e in IMAGE_EXTENSIONS)}); "
            "pass the folder with the class folders 01_TUMOR ... or train/ val/ test/"
        )
    kind, root = _find_layout(images)
    if not kind:
        raise ValueError(
            f"source {source!r}: no class folders (01_TUMOR ... 06_MUCOSA) and no train/ val/ test/ folders found"
        )
    prefix = f"{root}/" if root else ""
    if kind == "split":
        top = {p[len(prefix):].split("/")[0] for p in images if p.startswith(prefix) and "/" in p[len(prefix):]}
        splits = {}
        for folder in sorted(top):
            split = _SPLIT_ALIASES.get(folder.lower())
            if split is None:
                continue
            if split in splits:
                raise ValueError(
                    f"source {source!r}: folders {splits[split]!r} and {folder!r} are both the {split} split"
                )
            splits[split] = folder
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ValueError(
                f"source {source!r}: split folder(s) missing for {', '.join(missing)}; "
                "a split layout needs train/, val/ (or validation/) and test/"
            )
        groups = [(split, f"{prefix}{folder}/") for split, folder in splits.items()]
    else:
        groups = [(None, prefix)]

    entries: list[_Entry] = []
    used: set[str] = set()
    for split, base in groups:
        below = [p[len(base):] for p in images if p.startswith(base)]
        subdirs = {p.split("/")[0] for p in below if "/" in p}
        mapping, unknown = _class_folders(
            base, subdirs, class_names, f"source {source!r}" + (f" split {split!r}" if split else "")
        )
        if unknown:
            logger.warning("ignoring folder(s) that are no Kather class: %s", ", ".join(base + u for u in unknown))
        for rel in below:
            folder = rel.split("/")[0]
            name = mapping.get(folder) if "/" in rel else None
            if name is None:
                continue
            path = base + rel
            used.add(path)
            if name not in class_names:
                report.dropped_classes[name] = report.dropped_classes.get(name, 0) + 1
                continue
            entries.append(_Entry(name=path[len(prefix):], class_name=name, read=reader(path), split=split))
        for name in class_names:
            if not any(e.class_name == name and e.split == split for e in entries):
                raise ValueError(f"source {source!r}: class folder {base}{_FOLDER_OF_CLASS[name]} has no image files")
    ignored = [f for f in files if f not in used]
    report.n_image_files = len(used)
    report.n_ignored_files = len(ignored)
    report.ignored_examples = ignored[:20]
    if ignored:
        logger.info(
            "ignored %d file(s) that are not tiles of a class folder (e.g. %s)", len(ignored), ", ".join(ignored[:5])
        )
    if report.dropped_classes:
        logger.info("dropped classes not asked for (use --keep_all_classes to keep them): %s", report.dropped_classes)
    report.source_kind = f"{kind}_{container}"
    if expected_kind not in ("auto", kind):
        raise ValueError(f"--source_type {expected_kind} was given, but {source!r} looks like a {kind} layout")
    return entries


def _folder_entries(root: Path, class_names: Sequence[str], report: BuildReport, expected_kind: str) -> list[_Entry]:
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).as_posix()
        for f in filenames:
            files.append(f if rel == "." else f"{rel}/{f}")
    files.sort()
    return _tree_entries(
        files, lambda p: lambda: (root / p).read_bytes(), str(root), class_names, report, "folder", expected_kind
    )


def _zip_entries(zf: zipfile.ZipFile, source: str, class_names: Sequence[str], report: BuildReport,
                 expected_kind: str) -> list[_Entry]:
    files = _rel_listing(zf.namelist())
    # Zip readers are not thread-safe, but decoding here is sequential.
    return _tree_entries(files, lambda p: (lambda: zf.read(p)), source, class_names, report, "zip", expected_kind)


def _pick_column(features: Features, names: Sequence[str], kind: type | None) -> str | None:
    for name in names:
        if name in features:
            return name
    if kind is not None:
        typed = [c for c, f in features.items() if isinstance(f, kind)]
        if len(typed) == 1:
            return typed[0]
    return None


def _hub_entries(source: str, class_names: Sequence[str], report: BuildReport) -> list[_Entry]:
    """Entries of a Hub dataset mapped onto image/label/slide/filename."""
    try:
        loaded = load_dataset(source)
    except Exception as exc:
        raise ValueError(
            f"source {source!r} is not an existing local path, and loading it as a Hub dataset failed "
            f"({type(exc).__name__}: {exc}). Pass an existing folder or .zip, or check the dataset id and network."
        ) from exc
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    splits: dict[str, Dataset] = {}
    for split_name, ds in loaded.items():
        split = _SPLIT_ALIASES.get(str(split_name).lower())
        if split is None or split in splits:
            raise ValueError(f"Hub dataset {source!r}: split {split_name!r} is not train/validation/test (or twice)")
        splits[split] = ds
    given = set(splits) == set(SPLITS)
    entries: list[_Entry] = []
    for split, ds in splits.items():
        features = ds.features
        columns = ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items())
        image_col = _pick_column(features, ["image", "img", "tile", "picture"], ImageFeature)
        if image_col is None or not isinstance(features[image_col], ImageFeature):
            raise ValueError(f"Hub dataset {source!r} split {split}: no image column of type Image; columns: {columns}")
        label_col = _pick_column(
            features, ["label", "labels", "class", "tissue", "tissue_type", "category", "target"], ClassLabel
        )
        if label_col is None:
            raise ValueError(
                f"Hub dataset {source!r} split {split}: no label column (label/labels/class...); columns: {columns}"
            )
        label_feature = features[label_col]
        values = list(ds[label_col])
        if isinstance(label_feature, ClassLabel):
            raw_names = [label_feature.int2str(int(v)) for v in values]
        elif isinstance(label_feature, Value) and label_feature.dtype in ("string", "large_string"):
            raw_names = [str(v) for v in values]
        else:
            raise ValueError(
                f"Hub dataset {source!r} split {split}: column {label_col!r} is {label_feature}, not a ClassLabel "
                f"or string class names, so its values cannot be mapped onto {ALL_CLASS_NAMES}"
            )
        mapped = {raw: class_name_for(raw) for raw in set(raw_names)}
        unknown = sorted(r for r, m in mapped.items() if m is None)
        if unknown:
            raise ValueError(
                f"Hub dataset {source!r}: label name(s) {unknown} match none of {ALL_CLASS_NAMES} "
                "(Kather folder names such as 01_TUMOR are understood too)"
            )
        name_col = _pick_column(features, ["filename", "file_name", "image_path", "path"], None)
        names = [str(n) for n in ds[name_col]] if name_col else None
        slides = [str(s or "") for s in ds["slide"]] if "slide" in features else None
        images = list(ds.cast_column(image_col, ImageFeature(decode=False))[image_col])
        for i, (raw, image) in enumerate(zip(raw_names, images)):
            name = mapped[raw]
            if name not in class_names:
                report.dropped_classes[name] = report.dropped_classes.get(name, 0) + 1
                continue
            filename = names[i] if names else (image.get("path") or f"{split}/{i:06d}.png")
            entries.append(_Entry(filename, name, _hub_reader(image), split if given else None,
                                  slides[i] if slides else None))
    for name in class_names:
        if not any(e.class_name == name for e in entries):
            raise ValueError(f"Hub dataset {source!r} has no tiles of class {name}")
    report.n_image_files = len(entries) + sum(report.dropped_classes.values())
    report.source_kind = "hub" if given else "hub_resplit"
    return entries


def _hub_reader(image: dict[str, Any]) -> Callable[[], bytes]:
    def read() -> bytes:
        if image.get("bytes") is not None:
            return image["bytes"]
        if image.get("path") and os.path.isfile(image["path"]):
            return Path(image["path"]).read_bytes()
        raise ValueError(f"no image bytes and no readable file at {image.get('path')!r}")

    return read


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Where the Kather zip is cached: ``$HF_HOME/hf_tissue_vit/downloads``."""
    return Path(hf_constants.HF_HOME) / "hf_tissue_vit" / "downloads"


def _offline() -> bool:
    flag = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(hf_constants.HF_HUB_OFFLINE) or flag


def download_kather_zip(
    url: str = ZENODO_URL, md5: str | None = ZENODO_MD5, cache_dir: str | os.PathLike | None = None,
    timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
) -> Path:
    """Download ``url`` into the cache (once), check its MD5, and return the zip's path.

    The bytes go to ``<name>.part`` and are renamed only after the checksum matched, so a cut
    connection or a wrong file never looks like a complete download. A cached zip with the right
    checksum is reused without any request.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download.zip"
    final = cache / name
    if final.is_file():
        if md5 is None or md5_of_file(final) == md5:
            logger.info("using cached %s", final)
            return final
        logger.warning("cached %s has the wrong MD5; downloading it again", final)
        final.unlink()
    if _offline():
        raise DownloadError(f"offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) forbids downloading {url}")
    cache.mkdir(parents=True, exist_ok=True)
    part = cache / f"{name}.{os.getpid()}.part"
    digest = hashlib.md5()
    received, expected = 0, None
    logger.info("downloading %s to %s", url, final)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"hf_tissue_vit/{__version__}"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length else None
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        part.unlink(missing_ok=True)
        # URLError wraps the socket error (DNS, refused); HTTPError's own text carries the status code.
        plain_url_error = isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError)
        reason = exc.reason if plain_url_error else exc
        raise DownloadError(f"could not download {url}: {type(exc).__name__}: {reason}") from exc
    if expected is not None and received != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"download of {url} stopped after {received} of {expected} bytes (connection cut); "
            "nothing was cached, run again"
        )
    if md5 is not None and digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise ValueError(
            f"checksum mismatch for {url}: MD5 {digest.hexdigest()} ({received} bytes), expected {md5}; "
            "the file was deleted. Check --url/--md5, or pass a verified local copy with --source."
        )
    os.replace(part, final)
    return final


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def _stratified_assign(
    tiles: Sequence[_Tile], groups: Sequence[list[int]], class_names: Sequence[str], seed: int
) -> list[str]:
    """Split per class; duplicate groups move as one unit (they belong to their first file's class)."""
    assignment = [""] * len(tiles)
    by_class: dict[str, list[list[int]]] = defaultdict(list)
    for group in groups:  # groups are sorted by first file name: the shuffle input is deterministic
        by_class[tiles[group[0]].class_name].append(group)
    for label, name in enumerate(class_names):
        units = by_class.get(name, [])
        rng = np.random.default_rng([seed, label])
        order = rng.permutation(len(units))
        targets = target_split_sizes(sum(len(u) for u in units))
        counts = dict.fromkeys(SPLITS, 0)
        for k in order:
            unit = units[k]
            fits = [s for s in ("test", "validation", "train") if counts[s] + len(unit) <= targets[s]]
            split = fits[0] if fits else max(SPLITS, key=lambda s: targets[s] - counts[s])
            counts[split] += len(unit)
            for i in unit:
                assignment[i] = split
    return assignment


def _slide_assign(
    tiles: Sequence[_Tile], groups: Sequence[list[int]], class_names: Sequence[str], seed: int
) -> list[str]:
    """Slide-disjoint split: whole slides go to one split, chosen to approach 68/16/16 per class.

    Slides linked by a duplicate group are merged into one unit. Slides are placed greedily (largest
    first, seed breaks ties) into the split that lowers the squared per-class deviation from the
    targets most, then single moves and pairwise swaps are applied while they help.
    """
    missing = [t.name for t in tiles if not t.slide]
    if missing:
        raise ValueError(
            f"--split_by slide needs a slide id (CRC-Prim-HE-NN) in every file name; {len(missing)} tile(s) have none, "
            f"e.g. {', '.join(missing[:5])}. Use --split_by stratified."
        )
    parent: dict[str, str] = {t.slide: t.slide for t in tiles}

    def find(s: str) -> str:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    for group in groups:
        roots = sorted({find(tiles[i].slide) for i in group})
        for r in roots[1:]:
            parent[r] = roots[0]
    units = sorted({find(s) for s in parent})
    if len(units) < 3:
        raise ValueError(
            "--split_by slide needs at least 3 slides (or groups of slides sharing duplicate tiles); "
            f"found {len(units)}: "
            f"{', '.join(sorted(parent))}. Use --split_by stratified."
        )
    unit_index = {u: k for k, u in enumerate(units)}
    class_index = {c: k for k, c in enumerate(class_names)}
    counts = np.zeros((len(units), len(class_names)))
    for t in tiles:
        counts[unit_index[find(t.slide)], class_index[t.class_name]] += 1
    totals = counts.sum(axis=0)
    fractions = np.array([SPLIT_FRACTIONS[s] for s in SPLITS])
    targets = fractions[:, None] * totals[None, :]
    scale = np.where(totals > 0, totals, 1.0)

    def cost(assign: np.ndarray) -> float:
        got = np.stack([counts[assign == s].sum(axis=0) for s in range(len(SPLITS))])
        return float((((got - targets) / scale) ** 2).sum())

    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(units))
    order = sorted(range(len(units)), key=lambda u: (-counts[u].sum(), tiebreak[u]))
    assign = np.full(len(units), -1)
    for u in order:
        best = None
        for s in range(len(SPLITS)):
            trial = assign.copy()
            trial[u] = s
            c = cost(np.where(trial < 0, len(SPLITS), trial))
            if best is None or c < best[0] - 1e-12:
                best = (c, s)
        assign[u] = best[1]

    def valid(a: np.ndarray) -> bool:
        return all((a == s).any() for s in range(len(SPLITS)))

    if not valid(assign):  # a split without slides: give it the smallest slide of the fullest split
        for s in range(len(SPLITS)):
            if not (assign == s).any():
                donors = [u for u in order[::-1] if (assign == assign[u]).sum() > 1]
                assign[donors[0]] = s
    current = cost(assign)
    improved = True
    while improved:
        improved = False
        for u in range(len(units)):
            for s in range(len(SPLITS)):
                if s == assign[u]:
                    continue
                trial = assign.copy()
                trial[u] = s
                if valid(trial) and (c := cost(trial)) < current - 1e-12:
                    assign, current, improved = trial, c, True
        for u in range(len(units)):
            for v in range(u + 1, len(units)):
                if assign[u] == assign[v]:
                    continue
                trial = assign.copy()
                trial[u], trial[v] = assign[v], assign[u]
                if (c := cost(trial)) < current - 1e-12:
                    assign, current, improved = trial, c, True
    return [SPLITS[assign[unit_index[find(t.slide)]]] for t in tiles]


def _given_assign(tiles: Sequence[_Tile], groups: Sequence[list[int]], report: BuildReport) -> list[str | None]:
    """Keep the source's split; a duplicate also found in an earlier split (train < validation < test) is dropped."""
    assignment: list[str | None] = [t.split for t in tiles]
    rank = {s: k for k, s in enumerate(SPLITS)}
    for group in groups:
        first = min(rank[tiles[i].split] for i in group)
        for i in group:
            if rank[tiles[i].split] > first:
                assignment[i] = None
                report.removed_cross_split_duplicates.append(tiles[i].name)
    if report.removed_cross_split_duplicates:
        logger.warning(
            "removed %d tile(s) whose pixels also appear in an earlier split (leakage): %s",
            len(report.removed_cross_split_duplicates), ", ".join(report.removed_cross_split_duplicates[:10]),
        )
    return assignment


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------
def dataset_features(class_names: Sequence[str] = CLASS_NAMES) -> Features:
    """Features of every split: image (PNG bytes), label, slide, filename."""
    return Features({
        "image": ImageFeature(),
        "label": ClassLabel(names=list(class_names)),
        "slide": Value("string"),
        "filename": Value("string"),
    })


def split_class_counts(dataset_dict: DatasetDict) -> dict[str, dict[str, int]]:
    """``{split: {class: tiles}}`` of a built dataset."""
    out = {}
    for split, ds in dataset_dict.items():
        names = ds.features["label"].names
        counts = np.bincount(np.asarray(ds["label"], dtype=np.int64), minlength=len(names))
        out[split] = {name: int(n) for name, n in zip(names, counts)}
    return out


def _resolve_source(source: str | os.PathLike | None, source_type: str) -> tuple[str, str]:
    """(kind, source) with kind in ``folder``, ``zip``, ``hub``, ``download``."""
    if source_type not in SOURCE_TYPES:
        raise ValueError(f"source_type must be one of {SOURCE_TYPES}, got {source_type!r}")
    if source is None or str(source) == "" or source_type == "download":
        return "download", ""
    text = str(source)
    path = Path(text).expanduser()
    if source_type == "hub":
        return "hub", text
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"source {text!r} is a file but not a zip archive; pass the release .zip or a folder")
        return "zip", str(path)
    looks_like_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text) is not None and not text.lower().endswith(
        ".zip"
    )
    if source_type == "auto" and looks_like_id and not path.is_absolute() and not text.startswith("."):
        return "hub", text
    raise FileNotFoundError(
        f"source {text!r} does not exist; pass an existing folder (01_TUMOR ... or train/ val/ test/), "
        "a .zip of the release, or a Hub dataset id such as user/name"
    )


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
) -> tuple[DatasetDict, BuildReport]:
    """Build train/validation/test from ``source`` (see the module docstring) and say what was seen.

    ``md5`` checks a local zip before any work; with no source, ``url``/``md5`` (default: Zenodo)
    are downloaded into ``cache_dir``. Sources that come split keep their split; ``split_by``
    (``stratified`` or ``slide``) and ``seed`` apply to the others.
    """
    start = time.perf_counter()
    if split_by not in SPLIT_MODES:
        raise ValueError(f"split_by must be one of {SPLIT_MODES}, got {split_by!r}")
    class_names = list(ALL_CLASS_NAMES if keep_all_classes else CLASS_NAMES)
    kind, where = _resolve_source(source, source_type)
    if kind == "download":
        if url == ZENODO_URL:
            # A mirror of the release (or a test server) can stand in for Zenodo without changing code.
            url = os.environ.get("HF_TISSUE_VIT_KATHER_URL", url)
            md5 = md5 or os.environ.get("HF_TISSUE_VIT_KATHER_MD5")
        where = str(
            download_kather_zip(
                url=url,
                md5=md5 if md5 is not None else (ZENODO_MD5 if url == ZENODO_URL else None),
                cache_dir=cache_dir,
            )
        )
        kind = "zip"
    elif kind == "zip" and md5 is not None:
        actual = md5_of_file(where)
        if actual != md5:
            raise ValueError(f"zip {where!r} has MD5 {actual}, expected {md5}; the file is damaged or not the release")
    report = BuildReport(source=where if source is not None else url, source_kind=kind, split_by=split_by,
                         seed=seed, class_names=class_names)

    layout = source_type if source_type in ("release", "split") else "auto"
    if kind == "zip":
        try:
            zf = zipfile.ZipFile(where)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"source {where!r} is not a readable zip: {exc}") from exc
        with zf:
            entries = _zip_entries(zf, where, class_names, report, layout)
            tiles = _decode_entries(entries, report, skip_bad_files)
    else:
        entries = (_folder_entries(Path(where), class_names, report, layout) if kind == "folder"
                   else _hub_entries(where, class_names, report))
        tiles = _decode_entries(entries, report, skip_bad_files)

    groups = _duplicate_groups(tiles, report)
    if tiles[0].split is not None:
        report.split_by = "given"
        assignment = _given_assign(tiles, groups, report)
    elif split_by == "slide":
        assignment = _slide_assign(tiles, groups, class_names, seed)
    else:
        assignment = _stratified_assign(tiles, groups, class_names, seed)

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
    dataset_dict = DatasetDict(splits)
    report.split_class_counts = split_class_counts(dataset_dict)
    report.split_slides = {
        s: sorted({tiles[i].slide for i, a in enumerate(assignment) if a == s} - {""}) for s in SPLITS
    }
    report.build_seconds = round(time.perf_counter() - start, 2)
    for split, counts in report.split_class_counts.items():
        logger.info("%s: %d tiles %s%s", split, sum(counts.values()), counts,
                    f" slides {report.split_slides[split]}" if report.split_by == "slide" else "")
    empty = [f"{s}/{c}" for s, cc in report.split_class_counts.items() for c, n in cc.items() if n == 0]
    if empty:
        logger.warning("no tiles for: %s (too few tiles or slides for these classes)", ", ".join(empty))
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


# --------------------------------------------------------------------------------------------
# Card, save, push
# --------------------------------------------------------------------------------------------
def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


_SPLIT_METHODS = {
    "stratified": "Stratified per class at random: validation and test get round(16%) of each class's tiles "
    "(100 of 625), train the rest (425 of 625; 357/84/84 of 525). Files are sorted by name and shuffled "
    "with a seeded NumPy generator, so the same files and seed give the same split file by file. "
    "Tiles with identical pixels are kept in one split.",
    "slide": "Slide-disjoint: every tile of a slide (CRC-Prim-HE-NN, parsed from the file name) is in the same "
    "split, so validation and test measure generalisation to unseen slides. Whole slides are assigned greedily "
    "(then improved by moves and swaps) to approach 68/16/16% per class; the achieved counts are in the class "
    "table above and can differ from the targets because slides are few and unevenly sized.",
    "given": "The source came already split (train/val/test folders or Hub splits); that split is kept. "
    "Tiles whose pixels also appear in an earlier split were removed.",
}


def _public_source(metadata: dict[str, Any]) -> str | None:
    source = metadata.get("source")
    if not source or str(metadata.get("source_kind", "")).startswith("hub") or "://" in source:
        return source
    return os.path.basename(str(source).rstrip("/\\"))


def dataset_card(metadata: dict[str, Any]) -> DatasetCard:
    """Dataset card (``model_card/dataset_card.md``) rendered from the build metadata."""
    class_names = metadata["class_names"]
    counts = metadata["split_class_counts"]
    total = sum(sum(c.values()) for c in counts.values())
    card_data = DatasetCardData(
        license="cc-by-4.0",
        task_categories=["image-classification"],
        pretty_name="Kather 2016 colorectal cancer histology tiles",
        size_categories=[_size_category(total)],
        tags=["histology", "pathology", "H&E", "colorectal-cancer", "medical", "hf_tissue_vit"],
        source_datasets=["original"],
    )
    classes = [
        {
            "id": k,
            "name": name,
            "folder": _FOLDER_OF_CLASS.get(name, ""),
            "description": CLASS_DESCRIPTIONS.get(name, ""),
            "counts": [counts.get(s, {}).get(name, 0) for s in SPLITS],
        }
        for k, name in enumerate(class_names)
    ]
    checks = metadata.get("checks", {})
    return render_card(
        "dataset_card.md",
        card_data,
        kind="dataset",
        classes=classes,
        splits=list(SPLITS),
        split_sizes={s: sum(counts.get(s, {}).values()) for s in SPLITS},
        total=total,
        split_by=metadata["split_by"],
        split_method=_SPLIT_METHODS.get(metadata["split_by"], ""),
        seed=metadata.get("seed"),
        split_slides=metadata.get("split_slides") if metadata["split_by"] == "slide" else None,
        # Only the name of a local source: the card is public, the build machine's paths are not.
        source=_public_source(metadata),
        source_kind=metadata.get("source_kind"),
        tile_size=checks.get("tile_size"),
        checks=checks or None,
        hub_dataset_id=metadata.get("hub_dataset_id"),
        version=metadata.get("version"),
        citation=KATHER_CITATION,
        bibtex=KATHER_BIBTEX,
    )


def _metadata(dataset_dict: DatasetDict, report: BuildReport | None, hub_dataset_id: str | None) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    meta: dict[str, Any] = {"builder": "hf_tissue_vit", "version": __version__}
    if report is not None:
        info = report.to_dict()
        for key in ("source", "source_kind", "split_by", "seed", "class_names", "split_slides"):
            meta[key] = info.pop(key)
        info.pop("split_class_counts")
        info.pop("build_seconds")
        checks = info
    else:
        meta.update(source=None, source_kind=None, split_by="unknown", seed=None,
                    class_names=dataset_dict["train"].features["label"].names, split_slides={})
    meta["split_sizes"] = {s: ds.num_rows for s, ds in dataset_dict.items()}
    meta["split_class_counts"] = split_class_counts(dataset_dict)
    meta["checks"] = checks
    meta["hub_dataset_id"] = hub_dataset_id
    return meta


def _is_our_dataset(path: Path) -> bool:
    try:
        return json.loads((path / METADATA_FILE).read_text(encoding="utf-8")).get("builder") == "hf_tissue_vit"
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Absolute output path; error if it is a file or a non-empty folder that is not one of our datasets."""
    out = Path(output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not _is_our_dataset(out):
        raise ValueError(
            f"--output_dir {out} is not empty and holds no dataset built by hf_tissue_vit ({METADATA_FILE} missing); "
            "pass a new or empty folder"
        )
    return out


def _write_extras(folder: Path, metadata: dict[str, Any]) -> None:
    """README.md card and metadata JSON next to the saved arrow files."""
    dataset_card(metadata).save(folder / "README.md")
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def save_dataset(
    dataset_dict: DatasetDict, output_dir: str | os.PathLike, *, report: BuildReport | None = None,
    hub_dataset_id: str | None = None,
) -> Path:
    """Save atomically: ``save_to_disk`` + card + metadata into a temp folder, then rename it into place.

    A previous dataset of ours at ``output_dir`` is replaced only once the new one is complete;
    a non-empty folder of anything else is refused.
    """
    out = check_output_dir(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = _metadata(dataset_dict, report, hub_dataset_id)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        dataset_dict.save_to_disk(str(tmp))
        _write_extras(tmp, metadata)
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes it private; the dataset should not be
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved dataset to %s (%s)", out, metadata["split_sizes"])
    return out


def read_dataset_metadata(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``hf_tissue_vit_dataset.json`` of a saved dataset ({} when absent)."""
    path = Path(dataset_dir) / METADATA_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def record_hub_dataset_id(dataset_dir: str | os.PathLike, hub_dataset_id: str) -> None:
    """Note in the saved metadata and card that the dataset was pushed to ``hub_dataset_id``."""
    folder = Path(dataset_dir)
    metadata = read_dataset_metadata(folder)
    metadata["hub_dataset_id"] = hub_dataset_id
    atomic_write_text(folder / "README.md", str(dataset_card(metadata)))
    atomic_write_json(folder / METADATA_FILE, metadata)


def push_dataset(
    dataset_dict: DatasetDict, repo_id: str, *, metadata: dict[str, Any] | None = None, private: bool = False,
    token: str | None = None,
) -> str:
    """Push the splits and the dataset card (rendered from ``metadata``) to the Hub dataset repo ``repo_id``."""
    from .hub import push_dataset as _push  # hub pulls in model-card code that data users never need

    card = dataset_card({**metadata, "hub_dataset_id": repo_id}) if metadata is not None else None
    return _push(dataset_dict, repo_id, private=private, card=card, token=token,
                 commit_message="Upload Kather 2016 tissue tiles (hf_tissue_vit)")


# --------------------------------------------------------------------------------------------
# Load (used by training)
# --------------------------------------------------------------------------------------------
def load_tissue_dataset(
    dataset_dir: str | os.PathLike | None = None, dataset_name: str | None = None,
    label_names: Sequence[str] | None = None,
) -> DatasetDict:
    """Load a dataset saved by :func:`save_dataset` (``dataset_dir``) or a Hub dataset (``dataset_name``).

    Checks that ``train`` and ``validation`` exist (``val``/``valid`` are renamed), that ``image`` is
    an Image column and ``label`` a ClassLabel, and, when given, that its names equal ``label_names``.
    """
    if (dataset_dir is None) == (dataset_name is None):
        raise ValueError(
            "pass exactly one of dataset_dir (a folder from prepare_dataset.py) or dataset_name (a Hub id)"
        )
    if dataset_dir is not None:
        path = Path(dataset_dir).expanduser()
        where = f"dataset_dir {str(path)!r}"
        if not path.exists():
            partial = sorted(path.parent.glob(f".{path.name}.tmp-*")) if path.parent.is_dir() else []
            hint = (f"; a build into it did not finish (found {partial[0]}): run scripts/prepare_dataset.py again"
                    if partial else "; build it with scripts/prepare_dataset.py --output_dir " + str(path))
            raise FileNotFoundError(f"{where} does not exist{hint}")
        if not (path / "dataset_dict.json").is_file():
            what = (
                "a single split (Dataset), not train/validation/test"
                if (path / "state.json").is_file()
                else "no saved DatasetDict (dataset_dict.json missing)"
            )
            raise ValueError(f"{where} holds {what}; build it with scripts/prepare_dataset.py")
        try:
            loaded = load_from_disk(str(path))
        except Exception as exc:
            raise ValueError(
                f"{where} could not be loaded ({type(exc).__name__}: {exc}); it may be an incomplete copy, rebuild it"
            ) from exc
    else:
        where = f"dataset_name {dataset_name!r}"
        try:
            loaded = load_dataset(dataset_name)
        except Exception as exc:
            raise ValueError(f"{where} could not be loaded from the Hub ({type(exc).__name__}: {exc}); "
                             "check the id, network and token, or pass dataset_dir") from exc
    if not isinstance(loaded, DatasetDict):
        raise ValueError(f"{where} is a single Dataset; expected splits train/validation[/test]")
    renamed = {}
    for split, ds in loaded.items():
        canonical = _SPLIT_ALIASES.get(str(split).lower(), str(split))
        if canonical in renamed:
            raise ValueError(f"{where}: two splits map to {canonical!r}: {list(loaded)}")
        renamed[canonical] = ds
    dataset = DatasetDict(renamed)
    missing = [s for s in ("train", "validation") if s not in dataset]
    if missing:
        raise ValueError(f"{where}: split(s) {missing} missing; found {list(dataset)}")
    for split, ds in dataset.items():
        columns = ", ".join(f"{c} ({type(f).__name__})" for c, f in ds.features.items())
        if "label" not in ds.features or not isinstance(ds.features["label"], ClassLabel):
            raise ValueError(f"{where} split {split}: needs a ClassLabel column 'label'; columns: {columns}")
        if "image" not in ds.features or not isinstance(ds.features["image"], ImageFeature):
            raise ValueError(f"{where} split {split}: needs an Image column 'image'; columns: {columns}")
        names = ds.features["label"].names
        if label_names is not None and list(names) != list(label_names):
            raise ValueError(f"{where} split {split}: label names {names} differ from the expected {list(label_names)}")
        if names != dataset["train"].features["label"].names:
            raise ValueError(
                f"{where}: split {split} has label names {names}, train has {dataset['train'].features['label'].names}"
            )
    return dataset
