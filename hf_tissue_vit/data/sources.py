"""Finding the tiles in a folder or a zip: class folders, or a train/ val/ test/ layout.

A *release* layout has one folder of tiles per class (any names, as ``imagefolder`` reads them; the
Kather ``01_TUMOR`` ... and NCT ``ADI`` ... folders are recognised, see :mod:`.classes`); a *split*
layout has ``train/ val|validation/ test/`` folders, each holding class folders. The layout's root
is the shallowest folder that looks like one, so a zip with a top folder works too.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..constants import IMAGE_EXTENSIONS
from .classes import ClassChoice, ClassPlan, folder_hint, plan_classes
from .report import BuildReport
from .schema import SPLITS, split_name_for

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
    """(kind, root) with kind ``"split"`` or ``"release"`` (class folders): the shallowest folder that
    holds split folders, or class folders with image files in them."""
    children: dict[str, set[str]] = defaultdict(set)
    class_roots: set[str] = set()
    for name in files:
        if _is_os_junk(name):
            continue
        parts = name.split("/")[:-1]
        if parts:
            class_roots.add("/".join(parts[:-1]))
        for depth in range(len(parts)):
            children["/".join(parts[:depth])].add(parts[depth])
    for root in sorted(children, key=lambda d: (d.count("/") + bool(d), d)):
        if any(split_name_for(s) for s in children[root]):
            return "split", root
        if root in class_roots:
            return "release", root
    return "", ""


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
    """The image files of a folder or zip."""

    images: Sequence[str]
    reader: Reader
    source: str
    folders: Sequence[str] = ()  # every folder of the source (``a/b``), also those without image files

    def subfolders(self, base: str) -> set[str]:
        """The folders directly in ``base``: those holding images, and empty ones (so they are not 'missing')."""
        names = {p[len(base):].split("/")[0] for p in self.images if p.startswith(base) and "/" in p[len(base):]}
        names |= {f[len(base):].split("/")[0] for f in self.folders if f.startswith(base) and len(f) > len(base)}
        return {name for name in names if name and not _is_os_junk(name)}

    def check_folders(self, base: str, split: str | None, plan: ClassPlan, label_mapped: bool) -> dict[str, str]:
        """folder -> class for the class folders in ``base``; every wanted class has a folder with images."""
        where = f"source {self.source!r}" + (f" split {split!r}" if split else "")
        mapping = {sub: plan.mapping.get(sub) for sub in sorted(self.subfolders(base))}
        seen: dict[str, str] = {}
        for sub, name in mapping.items():
            if name is not None and name in seen and not label_mapped:
                raise ValueError(f"{where}: folders {seen[name]!r} and {sub!r} both hold class {name}; keep one")
            seen.setdefault(name or "", sub)
        missing = [c for c in plan.class_names if c not in seen]
        if missing:
            raise ValueError(
                f"{where}: class folder(s) missing for {', '.join(missing)} "
                f"(expected {', '.join(folder_hint(c) for c in missing)}); found folders: "
                f"{', '.join(sorted(mapping)) or 'none'}"
            )
        for sub, name in mapping.items():
            if name in plan.class_names and not any(p.startswith(f"{base}{sub}/") for p in self.images):
                raise ValueError(f"source {self.source!r}: class folder {base}{sub} is empty (no image files); "
                                 "add its tiles or remove the folder")
        return mapping

    def entries_under(self, base: str, split: str | None, prefix: str, mapping: dict[str, str | None],
                      plan: ClassPlan, report: BuildReport, used: set[str]) -> list[Entry]:
        """Entries of the class folders in ``base``; adds each file it takes to ``used``."""
        entries = []
        for path in self.images:
            rel = path[len(base):]
            if not path.startswith(base) or "/" not in rel:
                continue
            folder = rel.split("/")[0]
            name = mapping.get(folder)
            if name is None:
                continue
            used.add(path)
            if name not in plan.class_names:
                report.drop_class_tile(name)
                continue
            entries.append(Entry(name=path[len(prefix):], class_name=name, read=self.reader(path), split=split))
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
        logger.info("dropped classes not asked for (--classes, or --keep_all_classes for Kather): %s",
                    report.dropped_classes)


def tree_entries(
    files: Sequence[str], reader: Reader, source: str, choice: ClassChoice, report: BuildReport,
    container: str, expected_kind: str = "auto", folders: Sequence[str] = (),
) -> tuple[list[Entry], ClassPlan]:
    """Entries of a class-folder or split layout given the file list (and the folders) of a folder or a zip,
    and the classes they give (see :mod:`.classes`). Every check runs before any file is read."""
    images = [f for f in files if _is_image_name(f)]
    if not images:
        raise ValueError(
            f"source {source!r} holds no image files ({', '.join(e.upper() for e in IMAGE_EXTENSIONS)}); "
            "pass the folder with one folder of tiles per class, or train/ val/ test/ folders"
        )
    kind, root = find_layout(images)
    if not kind:
        raise ValueError(
            f"source {source!r}: no class folders (one folder of tiles per class) and no train/ val/ test/ "
            "folders found; or pass a CSV/Parquet manifest with path,label columns"
        )
    if expected_kind not in ("auto", kind):
        raise ValueError(f"--source_type {expected_kind} was given, but {source!r} looks like a {kind} layout")
    prefix = f"{root}/" if root else ""
    groups = _split_folders(images, prefix, source) if kind == "split" else [(None, prefix)]
    tree = _Tree(images, reader, source, folders)
    raw = sorted({sub for _, base in groups for sub in tree.subfolders(base)})
    plan = plan_classes(raw, choice, f"source {source!r}")
    used: set[str] = set()
    mappings = [tree.check_folders(base, split, plan, bool(choice.label_map)) for split, base in groups]
    entries = [e for (split, base), mapping in zip(groups, mappings)
               for e in tree.entries_under(base, split, prefix, mapping, plan, report, used)]
    _note_ignored(files, used, report)
    report.source_kind = f"{kind}_{container}"
    return entries, plan


def read_file(path: str) -> bytes:
    """The bytes of a file (a module-level function, so readers can be sent to worker processes)."""
    with open(path, "rb") as fh:
        return fh.read()


_OPEN_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


@dataclass(frozen=True)
class ZipMember:
    """Reads one member of a zip; each process opens the zip once (zip handles do not cross processes)."""

    zip_path: str
    member: str

    def __call__(self) -> bytes:
        key = (os.getpid(), self.zip_path)
        if key not in _OPEN_ZIPS:
            _OPEN_ZIPS[key] = zipfile.ZipFile(self.zip_path)
        return _OPEN_ZIPS[key].read(self.member)


def folder_entries(root: Path, choice: ClassChoice, report: BuildReport,
                   expected_kind: str) -> tuple[list[Entry], ClassPlan]:
    """Entries of a folder on disk (symlinked folders followed)."""
    files: list[str] = []
    folders: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).as_posix()
        files.extend(f if rel == "." else f"{rel}/{f}" for f in filenames)
        folders.extend(d if rel == "." else f"{rel}/{d}" for d in dirnames)
    files.sort()
    return tree_entries(files, lambda p: partial(read_file, str(root / p)), str(root), choice, report, "folder",
                        expected_kind, folders)


def zip_entries(zip_path: str, choice: ClassChoice, report: BuildReport,
                expected_kind: str) -> tuple[list[Entry], ClassPlan]:
    """Entries of a zip archive."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"source {zip_path!r} is not a readable zip: {exc}") from exc
    files = sorted(n for n in names if n and not n.endswith("/"))
    folders = sorted({n.rstrip("/") for n in names if n.endswith("/")}
                     | {f.rsplit("/", 1)[0] for f in files if "/" in f})
    return tree_entries(files, lambda p: ZipMember(zip_path, p), zip_path, choice, report, "zip", expected_kind,
                        folders)
