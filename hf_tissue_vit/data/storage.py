"""A built dataset on disk and on the Hub: atomic save with card and metadata, load with checks, push.

Next to the ``save_to_disk`` files, a saved dataset holds ``README.md`` (the dataset card) and
``hf_tissue_vit_dataset.json`` (:data:`METADATA_FILE`: the build report, split sizes, resolution).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasets import ClassLabel, DatasetDict, load_dataset, load_from_disk
from datasets import Image as ImageFeature

from .. import __version__
from ..fileio import (
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    remove_stale_temps,
    temp_name,
)
from .card import dataset_card
from .report import BuildReport
from .schema import SPLITS, describe_columns, split_class_counts, split_name_for
from .splits import stratified_split_labels

logger = logging.getLogger(__name__)

METADATA_FILE = "hf_tissue_vit_dataset.json"
_TOP_LEVEL = ("source", "source_kind", "split_by", "seed", "class_names", "split_slides", "preset", "citation")
_NOT_CHECKS = ("split_class_counts", "build_seconds", "mpp")
# Temporaries of a save, inside the output folder, named after the saving process (fileio.temp_name).
_TMP_PREFIX = ".hf_tissue_vit-tmp-"
_OLD_PREFIX = ".hf_tissue_vit-old-"


def dataset_metadata(
    dataset_dict: DatasetDict, report: BuildReport | None, hub_dataset_id: str | None = None
) -> dict[str, Any]:
    """What :data:`METADATA_FILE` holds; ``mpp`` only when the report knows it."""
    meta: dict[str, Any] = {"builder": "hf_tissue_vit", "version": __version__}
    checks: dict[str, Any] = {}
    if report is not None:
        info = report.to_dict()
        meta.update({key: info.pop(key) for key in _TOP_LEVEL})
        if report.mpp is not None:
            meta["mpp"] = report.mpp
        checks = {k: v for k, v in info.items() if k not in _NOT_CHECKS}
    else:
        meta.update(source=None, source_kind=None, split_by="unknown", seed=None,
                    class_names=dataset_dict["train"].features["label"].names, split_slides={})
    meta["split_sizes"] = {s: ds.num_rows for s, ds in dataset_dict.items()}
    meta["split_class_counts"] = split_class_counts(dataset_dict)
    meta["checks"] = checks
    meta["hub_dataset_id"] = hub_dataset_id
    return meta


def read_dataset_metadata(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``hf_tissue_vit_dataset.json`` of a saved dataset ({} when absent); ``mpp`` is in it when known."""
    path = Path(dataset_dir) / METADATA_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _is_our_dataset(path: Path) -> bool:
    try:
        return read_dataset_metadata(path).get("builder") == "hf_tissue_vit"
    except (OSError, ValueError, AttributeError):
        return False


def _is_temp(name: str) -> bool:
    return name.startswith((_TMP_PREFIX, _OLD_PREFIX))


def _is_ignorable(name: str) -> bool:
    """Entries that do not make a folder the user's: our temporaries, a file system's lost+found."""
    return _is_temp(name) or name == "lost+found"


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Absolute output path; error if it cannot be created or written (a file in the way, a read-only
    place), or is a non-empty folder that is not one of our datasets. Writes nothing."""
    out = check_writable_dir(output_dir, "--output_dir")
    if out.is_dir() and not _is_our_dataset(out) and any(not _is_ignorable(p.name) for p in out.iterdir()):
        raise ValueError(
            f"--output_dir {out} is not empty and holds no dataset built by hf_tissue_vit ({METADATA_FILE} missing); "
            "pass a new or empty folder"
        )
    return out


def _write_extras(folder: Path, metadata: dict[str, Any]) -> None:
    """README.md card and metadata JSON next to the saved arrow files."""
    dataset_card(metadata).save(folder / "README.md")
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def _package_entries(out: Path) -> set[str]:
    """The names of what a previous save wrote into ``out``: its splits, dataset_dict.json, card, metadata."""
    names = {"dataset_dict.json", "README.md", METADATA_FILE}
    try:
        splits = json.loads((out / "dataset_dict.json").read_text(encoding="utf-8")).get("splits") or []
    except (OSError, ValueError, AttributeError):
        splits = []
    return names | {str(split) for split in splits if "/" not in str(split) and str(split) not in ("", ".", "..")}


def _swap_in(new: Path, out: Path) -> None:
    """Replace the package's entries of ``out`` by those of ``new`` (a folder inside ``out``), entry by entry.

    The user's other files stay. dataset_dict.json goes first and comes back last, so no loader sees a
    mix of two builds; the metadata file (the mark of our folder) is replaced in one rename and so is
    always there, and a rebuild after a kill mid-swap is accepted.
    """
    incoming = {p.name for p in new.iterdir()}
    first, last = [n for n in (METADATA_FILE,) if n in incoming], [n for n in ("dataset_dict.json",) if n in incoming]
    ordered = first + sorted(incoming - {METADATA_FILE, "dataset_dict.json"}) + last
    trash = out / temp_name(_OLD_PREFIX)
    trash.mkdir()
    leaving = (_package_entries(out) | incoming) - {METADATA_FILE}
    for name in ["dataset_dict.json", *sorted(leaving - {"dataset_dict.json"})]:
        if (out / name).exists() or (out / name).is_symlink():
            os.replace(out / name, trash / name)
    for name in ordered:
        os.replace(new / name, out / name)
    shutil.rmtree(trash, ignore_errors=True)
    new.rmdir()


def save_dataset(
    dataset_dict: DatasetDict, output_dir: str | os.PathLike, *, report: BuildReport | None = None,
    hub_dataset_id: str | None = None,
) -> Path:
    """Save: ``save_to_disk`` + card + metadata into a temporary folder inside ``output_dir``, then move
    its entries into place (see :func:`_swap_in`).

    A previous dataset of ours at ``output_dir`` is replaced only once the new one is complete, and
    only what the package wrote is replaced: the user's other files there (notes, scripts) stay. A
    non-empty folder of anything else is refused. Temporaries left by a killed save are removed first.
    Saving inside the folder, not next to it, also works when ``output_dir`` is a mount point.
    """
    out = check_output_dir(output_dir)
    for prefix in (_TMP_PREFIX, _OLD_PREFIX):
        remove_stale_temps(out, prefix)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    metadata = dataset_metadata(dataset_dict, report, hub_dataset_id)
    tmp = out / temp_name(_TMP_PREFIX)
    try:
        dataset_dict.save_to_disk(str(tmp))
        _write_extras(tmp, metadata)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    logger.info("saved dataset to %s (%s)", out, metadata["split_sizes"])
    return out


@contextmanager
def build_workspace(output_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder inside ``output_dir`` for a build's Arrow shards (removed on exit; one left by a
    killed build is removed by the next save). ``output_dir`` is created if needed, and removed again
    when it was created here and is left empty."""
    out = check_output_dir(output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    work = out / temp_name(_TMP_PREFIX)
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def record_hub_dataset_id(dataset_dir: str | os.PathLike, hub_dataset_id: str) -> None:
    """Note in the saved metadata and card that the dataset was pushed to ``hub_dataset_id``."""
    folder = Path(dataset_dir)
    metadata = read_dataset_metadata(folder)
    metadata["hub_dataset_id"] = hub_dataset_id
    atomic_write_text(folder / "README.md", str(dataset_card(metadata)))
    atomic_write_json(folder / METADATA_FILE, metadata)


# --------------------------------------------------------------------------------------------
# Load (used by training)
# --------------------------------------------------------------------------------------------
def _load_from_dir(path: Path, where: str) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist; build it with scripts/prepare_dataset.py --output_dir {path}")
    if not (path / "dataset_dict.json").is_file():
        if _is_our_dataset(path) or any(_is_temp(p.name) for p in path.iterdir()):
            raise ValueError(f"{where}: a build into it did not finish; run scripts/prepare_dataset.py again")
        what = (
            "a single split (Dataset), not train/validation/test"
            if (path / "state.json").is_file()
            else "no saved DatasetDict (dataset_dict.json missing)"
        )
        raise ValueError(f"{where} holds {what}; build it with scripts/prepare_dataset.py")
    try:
        return load_from_disk(str(path))
    except Exception as exc:
        raise ValueError(
            f"{where} could not be loaded ({type(exc).__name__}: {exc}); it may be an incomplete copy, rebuild it"
        ) from exc


def _load_from_hub(dataset_name: str, where: str) -> Any:
    try:
        return load_dataset(dataset_name)
    except Exception as exc:
        raise ValueError(f"{where} could not be loaded from the Hub ({type(exc).__name__}: {exc}); "
                         "check the id, network and token, or pass dataset_dir") from exc


def _canonical_splits(loaded: Any, where: str, required: Sequence[str]) -> DatasetDict:
    """``loaded`` with our split names (``val``/``valid`` -> ``validation``); the ``required`` ones must exist."""
    if not isinstance(loaded, DatasetDict):
        # ValueError, not TypeError: a wrong dataset is bad user input (one-line error in the scripts)
        raise ValueError(f"{where} is a single Dataset; expected splits train/validation[/test]")
    renamed = {}
    for split, ds in loaded.items():
        canonical = split_name_for(split) or str(split)
        if canonical in renamed:
            raise ValueError(f"{where}: two splits map to {canonical!r}: {list(loaded)}")
        renamed[canonical] = ds
    dataset = DatasetDict(renamed)
    missing = [s for s in required if s not in dataset]
    if missing:
        raise ValueError(f"{where}: split(s) {missing} missing; found {list(dataset)}")
    return dataset


def _check_columns(dataset: DatasetDict, where: str, label_names: Sequence[str] | None) -> None:
    """Every split has an Image ``image`` and a ClassLabel ``label`` with the train split's names."""
    train_names = dataset["train"].features["label"].names if "label" in dataset["train"].features else None
    for split in sorted(dataset, key=lambda s: s != "train"):  # train first: the others are compared to it
        ds = dataset[split]
        columns = describe_columns(ds.features)
        if "label" not in ds.features or not isinstance(ds.features["label"], ClassLabel):
            raise ValueError(f"{where} split {split}: needs a ClassLabel column 'label'; columns: {columns}")
        if "image" not in ds.features or not isinstance(ds.features["image"], ImageFeature):
            raise ValueError(f"{where} split {split}: needs an Image column 'image'; columns: {columns}")
        names = ds.features["label"].names
        if label_names is not None and list(names) != list(label_names):
            raise ValueError(f"{where} split {split}: label names {names} differ from the expected {list(label_names)}")
        if names != train_names:
            raise ValueError(f"{where}: split {split} has label names {names}, train has {train_names}")


def load_tissue_dataset(
    dataset_dir: str | os.PathLike | None = None, dataset_name: str | None = None,
    label_names: Sequence[str] | None = None, require_validation: bool = True,
) -> DatasetDict:
    """Load a dataset saved by :func:`save_dataset` (``dataset_dir``) or a Hub dataset (``dataset_name``).

    Checks that ``train`` and (with ``require_validation``) ``validation`` exist (``val``/``valid`` are
    renamed), that ``image`` is an Image column and ``label`` a ClassLabel, and, when given, that its
    names equal ``label_names``. Without ``require_validation``, :func:`complete_splits` can make the
    missing splits from train.
    """
    if (dataset_dir is None) == (dataset_name is None):
        raise ValueError(
            "pass exactly one of dataset_dir (a folder from prepare_dataset.py) or dataset_name (a Hub id)"
        )
    if dataset_dir is not None:
        path = Path(dataset_dir).expanduser()
        where = f"dataset_dir {str(path)!r}"
        loaded = _load_from_dir(path, where)
    else:
        where = f"dataset_name {dataset_name!r}"
        loaded = _load_from_hub(dataset_name, where)
    dataset = _canonical_splits(loaded, where, ("train", "validation") if require_validation else ("train",))
    _check_columns(dataset, where, label_names)
    return dataset


def complete_splits(dataset: DatasetDict, seed: int) -> tuple[DatasetDict, dict[str, Any] | None]:
    """``dataset`` with validation (and test, when it has none) made from its train split by the
    package's stratified splitter (68/16/16 % per class, ``seed``), and a record of what was made;
    a dataset that has a validation split is returned as it is, with None."""
    if "validation" in dataset:
        return dataset, None
    assignment = stratified_split_labels(dataset["train"]["label"], seed)
    if "test" in dataset:  # keep the dataset's own test split: what would be test stays in train
        assignment = ["train" if split == "test" else split for split in assignment]
    made = [split for split in SPLITS if split not in dataset or split == "train"]
    splits = dict(dataset)
    for split in made:
        indices = [i for i, name in enumerate(assignment) if name == split]
        if not indices:
            raise ValueError(f"the train split ({len(assignment)} examples) is too small to make a {split} "
                             "split from it: give the dataset a validation split")
        splits[split] = dataset["train"].select(indices)
    record = {"made_from": "train", "split_by": "stratified", "seed": seed,
              "made": {split: len(splits[split]) for split in made if split != "train"}}
    logger.info("no validation split: made %s from train (stratified, seed %d)", record["made"], seed)
    return DatasetDict({name: splits[name] for name in SPLITS if name in splits}), record
