"""Finding the tiles in a folder or a zip: the Kather release layout or a train/ val/ test/ layout.

A *release* layout has class folders (``01_TUMOR`` ... ``08_EMPTY``, or plain class names); a
*split* layout has ``train/ val|validation/ test/`` folders, each holding class folders. The
layout's root is the shallowest folder that looks like one, so a zip with a top folder works too.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..constants import IMAGE_EXTENSIONS
from .report import BuildReport
from .schema import FOLDER_OF_CLASS, SPLITS, class_name_for, split_name_for

logger = logging.getLogger(__name__)

_OS_JUNK_DIRS = {"__MACOSX", "$RECYCLE.BIN", "System Volume Information"}
_OS_JUNK_FILES = {"Thumbs.db", "desktop.ini"}

Reader = Callable[[str], Callable[[], bytes]]  # path in the source -> function returning its bytes


@dataclass
class Entry:
    """One image file of the source, not decoded yet."""

    name: str  # path relative to the source root (POSIX), stored as ``filename``
    class_name: str
    read: Callable[[], bytes]
    split: str | None = None  # set when the source comes split already
    slide: str | None = None  # set when the source has a slide column


def _is_os_junk(relpath: str) -> bool:
    parts = relpath.split("/")
    return any(p in _OS_JUNK_DIRS or p.startswith(".") for p in parts) or parts[-1] in _OS_JUNK_FILES


def _is_image_name(relpath: str) -> bool:
    return relpath.lower().endswith(IMAGE_EXTENSIONS) and not _is_os_junk(relpath)


def find_layout(files: Sequence[str]) -> tuple[str, str]:
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
        if any(split_name_for(s) for s in subdirs):
            return "split", root
        if any(class_name_for(s) for s in subdirs):
            return "release", root
    return "", ""


def _class_folders(
    subdirs: Iterable[str], class_names: Sequence[str], where: str
) -> tuple[dict[str, str], list[str]]:
    """Map folder -> class for the given folders, and the folders that are no class.

    Error if two folders hold one class or a wanted class has no folder.
    """
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
        expected = ", ".join(FOLDER_OF_CLASS[c] for c in missing)
        raise ValueError(
            f"{where}: class folder(s) missing for {', '.join(missing)} (expected {expected}); "
            f"found folders: {', '.join(sorted(subdirs)) or 'none'}"
        )
    return mapping, unknown


def _split_folders(images: Sequence[str], prefix: str, source: str) -> list[tuple[str, str]]:
    """(split, folder path with ``/``) for each of train/validation/test under ``prefix``."""
    top = {p[len(prefix):].split("/")[0] for p in images if p.startswith(prefix) and "/" in p[len(prefix):]}
    splits: dict[str, str] = {}
    for folder in sorted(top):
        split = split_name_for(folder)
        if split is None:
            continue
        if split in splits:
            raise ValueError(f"source {source!r}: folders {splits[split]!r} and {folder!r} are both the {split} split")
        splits[split] = folder
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise ValueError(
            f"source {source!r}: split folder(s) missing for {', '.join(missing)}; "
            "a split layout needs train/, val/ (or validation/) and test/"
        )
    return [(split, f"{prefix}{folder}/") for split, folder in splits.items()]


@dataclass
class _Tree:
    """The image files of a folder or zip and what the build asked for."""

    images: Sequence[str]
    reader: Reader
    source: str
    class_names: Sequence[str]
    report: BuildReport
    folders: Sequence[str] = ()  # every folder of the source (``a/b``), also those without image files

    def subfolders(self, base: str, below: Sequence[str]) -> set[str]:
        """The folders directly in ``base``: those holding images, and empty ones (so they are not 'missing')."""
        names = {p.split("/")[0] for p in below if "/" in p}
        names |= {f[len(base):].split("/")[0] for f in self.folders if f.startswith(base) and len(f) > len(base)}
        return {name for name in names if name and not _is_os_junk(name)}

    def entries_under(self, base: str, split: str | None, prefix: str, used: set[str]) -> list[Entry]:
        """Entries of the class folders in ``base``; adds each file it takes to ``used``."""
        below = [p[len(base):] for p in self.images if p.startswith(base)]
        where = f"source {self.source!r}" + (f" split {split!r}" if split else "")
        mapping, unknown = _class_folders(self.subfolders(base, below), self.class_names, where)
        if unknown:
            logger.warning("ignoring folder(s) that are no Kather class: %s", ", ".join(base + u for u in unknown))
        entries = []
        for rel in below:
            name = mapping.get(rel.split("/")[0]) if "/" in rel else None
            if name is None:
                continue
            used.add(base + rel)
            if name not in self.class_names:
                self.report.drop_class_tile(name)
                continue
            entries.append(Entry(name=(base + rel)[len(prefix):], class_name=name, read=self.reader(base + rel),
                                 split=split))
        folder_of = {name: folder for folder, name in mapping.items()}
        for name in self.class_names:
            if not any(e.class_name == name for e in entries):
                folder = folder_of.get(name, FOLDER_OF_CLASS[name])
                raise ValueError(f"source {self.source!r}: class folder {base}{folder} is empty (no image files)")
        return entries


def _note_ignored(files: Sequence[str], used: set[str], report: BuildReport) -> None:
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


def tree_entries(
    files: Sequence[str], reader: Reader, source: str, class_names: Sequence[str], report: BuildReport,
    container: str, expected_kind: str = "auto", folders: Sequence[str] = (),
) -> list[Entry]:
    """Entries of a release or split layout given the file list (and the folders) of a folder or a zip."""
    images = [f for f in files if _is_image_name(f)]
    if not images:
        raise ValueError(
            f"source {source!r} holds no image files ({', '.join(e.upper() for e in IMAGE_EXTENSIONS)}); "
            "pass the folder with the class folders 01_TUMOR ... or train/ val/ test/"
        )
    kind, root = find_layout(images)
    if not kind:
        raise ValueError(
            f"source {source!r}: no class folders (01_TUMOR ... 06_MUCOSA) and no train/ val/ test/ folders found"
        )
    if expected_kind not in ("auto", kind):
        raise ValueError(f"--source_type {expected_kind} was given, but {source!r} looks like a {kind} layout")
    prefix = f"{root}/" if root else ""
    groups = _split_folders(images, prefix, source) if kind == "split" else [(None, prefix)]
    tree = _Tree(images, reader, source, class_names, report, folders)
    used: set[str] = set()
    entries = [e for split, base in groups for e in tree.entries_under(base, split, prefix, used)]
    _note_ignored(files, used, report)
    report.source_kind = f"{kind}_{container}"
    return entries


def folder_entries(root: Path, class_names: Sequence[str], report: BuildReport, expected_kind: str) -> list[Entry]:
    """Entries of a folder on disk (symlinked folders followed)."""
    files: list[str] = []
    folders: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).as_posix()
        files.extend(f if rel == "." else f"{rel}/{f}" for f in filenames)
        folders.extend(d if rel == "." else f"{rel}/{d}" for d in dirnames)
    files.sort()
    return tree_entries(files, lambda p: lambda: (root / p).read_bytes(), str(root), class_names, report, "folder",
                        expected_kind, folders)


def zip_entries(zf: zipfile.ZipFile, source: str, class_names: Sequence[str], report: BuildReport,
                expected_kind: str) -> list[Entry]:
    """Entries of an open zip; they read from ``zf``, so decode them before it is closed."""
    files = sorted(n for n in zf.namelist() if n and not n.endswith("/"))
    folders = sorted({n.rstrip("/") for n in zf.namelist() if n.endswith("/")}
                     | {f.rsplit("/", 1)[0] for f in files if "/" in f})
    # Zip readers are not thread-safe, but decoding here is sequential.
    return tree_entries(files, lambda p: (lambda: zf.read(p)), source, class_names, report, "zip", expected_kind,
                        folders)
