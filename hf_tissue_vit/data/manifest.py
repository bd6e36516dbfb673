"""A CSV or Parquet manifest as a tile source: one row per tile, ``path,label[,slide][,split]``.

This is how tiles cut from slides are usually listed. ``path`` is relative to the manifest's folder
(or absolute); ``label`` is the class name; ``slide`` (optional) groups tiles for ``--split_by slide``;
``split`` (optional, on every row) keeps a given train / validation / test split. Class order: the
labels' first appearance, unless ``--classes`` gives one. Every row is checked before any file is read.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from .classes import ClassChoice, ClassPlan, plan_classes
from .report import BuildReport
from .schema import SPLITS, split_name_for
from .sources import Entry, read_file

MANIFEST_SUFFIXES: tuple[str, ...] = (".csv", ".parquet", ".pq")
_PATH_COLUMNS = ("path", "file", "filename", "image", "image_path")
_LABEL_COLUMNS = ("label", "class", "class_name")
_EXAMPLES = 5


def is_manifest(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a manifest file (by its suffix)."""
    return str(path).lower().endswith(MANIFEST_SUFFIXES)


def _read_table(path: Path) -> dict[str, list]:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if path.suffix.lower() == ".csv":
            options = pyarrow.csv.ConvertOptions(strings_can_be_null=False,
                                                 column_types={c: pa.string() for c in ("label", "slide", "split")})
            table = pyarrow.csv.read_csv(path, convert_options=options)
        else:
            table = pyarrow.parquet.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"manifest {str(path)!r} could not be read as {path.suffix[1:]}: {exc}") from exc
    return {name.strip().lower(): table.column(name).to_pylist() for name in table.column_names}


def _column(table: dict[str, list], names: tuple[str, ...], where: str, required: bool = True) -> list | None:
    for name in names:
        if name in table:
            return table[name]
    if required:
        raise ValueError(f"{where}: needs a column {names[0]!r} (or {', '.join(names[1:])}); columns: "
                         f"{', '.join(table) or 'none'}")
    return None


def _rows_with(problem: list[tuple[int, str]], what: str, where: str, fix: str) -> None:
    if problem:
        shown = "; ".join(f"row {i + 2}: {v}" for i, v in problem[:_EXAMPLES])
        raise ValueError(f"{where}: {len(problem)} row(s) {what} (e.g. {shown}); {fix}")


def _splits(values: list | None, where: str) -> list[str | None]:
    if values is None:
        return []
    splits = [split_name_for(str(v)) if v not in (None, "") else None for v in values]
    _rows_with([(i, repr(v)) for i, (v, s) in enumerate(zip(values, splits)) if s is None],
               "have no split train/validation/test", where, "give every row a split or drop the split column")
    missing = [s for s in SPLITS if s not in set(splits)]
    if missing:
        raise ValueError(f"{where}: no rows for split(s) {', '.join(missing)}; a given split needs train, "
                         "validation and test (or drop the split column to split by --split_by)")
    return splits


def manifest_entries(manifest: str | os.PathLike, choice: ClassChoice,
                     report: BuildReport) -> tuple[list[Entry], ClassPlan]:
    """Entries of a manifest and the classes they give; bad rows are one error before any file is read."""
    path = Path(manifest).expanduser()
    where = f"manifest {str(path)!r}"
    table = _read_table(path)
    paths = [str(p) if p is not None else "" for p in _column(table, _PATH_COLUMNS, where)]
    labels = [str(v).strip() if v is not None else "" for v in _column(table, _LABEL_COLUMNS, where)]
    if not paths:
        raise ValueError(f"{where} has no rows")
    _rows_with([(i, repr(p)) for i, (p, lab) in enumerate(zip(paths, labels)) if not p or not lab],
               "have an empty path or label", where, "fill them in or remove the rows")
    slides = _column(table, ("slide", "slide_id"), where, required=False)
    splits = _splits(_column(table, ("split",), where, required=False), where)
    plan = plan_classes(labels, ClassChoice("none", choice.classes, choice.label_map), where, given_order=True)
    outside = [(i, lab) for i, lab in enumerate(labels) if plan.mapping.get(lab) not in plan.class_names]
    _rows_with(outside, f"have a label not in --classes ({', '.join(plan.class_names)})", where,
               "add the label to --classes, map it with --label_map, or remove the rows")
    root = path.parent
    files = [Path(p) if os.path.isabs(p) else root / p for p in paths]
    _rows_with([(i, p) for i, (p, f) in enumerate(zip(paths, files)) if not f.is_file()],
               "name a file that does not exist", where,
               "fix the paths (relative to the manifest's folder) or remove the rows")
    entries = [
        Entry(name=paths[i], class_name=plan.mapping[labels[i]], read=partial(read_file, str(files[i])),
              split=splits[i] if splits else None,
              slide=None if slides is None or slides[i] in (None, "") else str(slides[i]))
        for i in range(len(paths))
    ]
    report.n_image_files = len(entries)
    report.source_kind = "manifest"
    return entries, plan
