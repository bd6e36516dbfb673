"""What counts as a model: the one check every consumer of a model argument runs (push, predict, tissue
map, attention maps, evaluation, fine-tuning from a checkpoint).

A model argument is one of:

- a **finetune.py run folder** (it holds :data:`RUN_FILE`). Its final files (:data:`RUN_FINAL_FILES`)
  are written at the very end of a run and :data:`COMPLETE_FILE` after them, last and atomically.
  The folder is complete only when both are there; a run that is stopped, still running, or
  restarted (which removes the marker first) is refused, naming what is missing.
- a **plain model folder** from ``save_pretrained`` (transformers' examples, a ``checkpoint-N`` folder):
  valid with ``config.json`` and safetensors weights. Pickled weights (``pytorch_model.bin``) are
  refused: the package loads safetensors only.
- a **Hub model id**, passed through (checked by :func:`hf_tissue_vit.hub.check_repo_id`).

A ``datasets`` folder (``dataset_dict.json``, the package's dataset metadata) is refused as "a dataset
folder, not a model".

What a model says about itself (class names, µm/px, training tile size, processor, results) is read
once, by :func:`hf_tissue_vit.modelfacts.read_model_facts`, beside this module.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from . import __version__
from .fileio import atomic_write_json

logger = logging.getLogger(__name__)

RUN_FILE = "hf_tissue_vit_run.json"  # the signature of the finetune.py run that owns a folder
COMPLETE_FILE = "hf_tissue_vit_complete.json"  # written last, once every final file of a run is there
CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
RESULTS_FILE = "all_results.json"  # a finetune.py run's description and metrics
CARD_FILE = "README.md"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # one of them: the weights
PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
# What a finished run folder must hold beside the marker (the weights: one of WEIGHT_FILES); its card
# (README.md) is written before the marker too, but can always be rendered again from these.
RUN_FINAL_FILES = (CONFIG_FILE, PROCESSOR_FILE, RESULTS_FILE)
# A pretrain.py run (masked-autoencoder pretraining) ends with its record instead of all_results.json.
PRETRAINING_FILE = "pretraining.json"
PRETRAIN_FINAL_FILES = (CONFIG_FILE, PROCESSOR_FILE, PRETRAINING_FILE)
DATASET_METADATA_FILE = "hf_tissue_vit_dataset.json"  # written by prepare_dataset.py beside a dataset
DATASET_FILES = ("dataset_dict.json", DATASET_METADATA_FILE, "dataset_info.json")

ModelKind = Literal["run", "model", "hub"]
HEAD_WEIGHT = "classifier.weight"  # the classification head of transformers' image classifiers
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header

logger = logging.getLogger(__name__)


def check_repo_id(repo_id: str, flag: str = "--repo_id", namespace: bool = True) -> str:
    """The package's one repo-id check: huggingface_hub's rules and, with ``namespace``, USER/NAME.

    Returns ``repo_id``; raises ValueError naming ``flag`` otherwise.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{flag} {repo_id!r} is not a valid Hub repo id: {err}") from None
    if namespace and repo_id.count("/") != 1:
        raise ValueError(f"{flag} must look like USER/NAME (got {repo_id!r})")
    return repo_id


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def missing_run_files(folder: str | os.PathLike) -> list[str]:
    """The final files of a run folder that are not there (the marker last); [] for a complete run."""
    folder = Path(folder)
    missing = [] if _has_weights(folder) else [WEIGHT_FILES[0]]
    finals = PRETRAIN_FINAL_FILES if _is_pretraining_run(folder) else RUN_FINAL_FILES
    missing += [name for name in finals if not (folder / name).is_file()]
    return missing + ([] if (folder / COMPLETE_FILE).is_file() else [COMPLETE_FILE])


def _is_pretraining_run(folder: Path) -> bool:
    """A pretrain.py run folder: its record, or a masked-autoencoder config, is there."""
    if (folder / PRETRAINING_FILE).is_file():
        return True
    try:
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type") == "vit_mae"
    except (OSError, ValueError):
        return False


def is_complete_run(folder: str | os.PathLike) -> bool:
    """True for a finetune.py run folder whose run has finished (see the module docstring)."""
    return (Path(folder) / RUN_FILE).is_file() and not missing_run_files(folder)


def mark_run_complete(folder: str | os.PathLike) -> Path:
    """Write :data:`COMPLETE_FILE` (atomically) once the run's final files are in ``folder``."""
    folder = Path(folder)
    missing = [name for name in missing_run_files(folder) if name != COMPLETE_FILE]
    if missing:
        raise FileNotFoundError(f"{folder}: cannot mark the run complete, {', '.join(missing)} missing")
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != COMPLETE_FILE)
    return atomic_write_json(folder / COMPLETE_FILE, {"complete": True, "files": files, "hf_tissue_vit": __version__})


def is_dataset_folder(folder: str | os.PathLike) -> bool:
    """True for a saved ``datasets`` folder (a DatasetDict, a single split, or one of the package's)."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in DATASET_FILES) or (folder / "state.json").is_file()


def _looks_like_hub_id(text: str) -> bool:
    """A missing path that could be a Hub id: no absolute/relative path syntax, at most one ``/``, and no
    local folder named like its namespace."""
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1:
        return False
    return not ("/" in text and Path(text.split("/")[0]).is_dir())


def _check_run(folder: Path, flag: str) -> None:
    missing = missing_run_files(folder)
    if not missing:
        return
    checkpoints = sorted((p.name for p in folder.glob("checkpoint-*") if p.is_dir() and _has_weights(p)),
                         key=lambda name: int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else -1)
    hint = f", or pass one of its checkpoints (e.g. {folder / checkpoints[-1]})" if checkpoints else ""
    raise ValueError(
        f"{flag} {folder} is an unfinished finetune.py run ({', '.join(missing)} missing; {COMPLETE_FILE} is "
        f"written when a run has finished): it was stopped, is still running or was restarted. Rerun "
        f"finetune.py with the same command to finish it (it resumes from its last checkpoint){hint}"
    )


def _check_plain(folder: Path, flag: str) -> None:
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{flag} {folder} holds no {CONFIG_FILE}: it is not a model folder (pass the "
                         "--output_dir of finetune.py, a save_pretrained folder or a Hub model id)")
    if _has_weights(folder):
        return
    pickled = [name for name in PICKLED_WEIGHT_FILES if (folder / name).is_file()]
    if pickled:
        raise ValueError(
            f"{flag} {folder} has its weights only as {', '.join(pickled)}: this package loads safetensors only "
            "(pickles can run code). Convert them: `AutoModelForImageClassification.from_pretrained(folder)"
            ".save_pretrained(folder)` writes model.safetensors"
        )
    raise ValueError(f"{flag} {folder} has {CONFIG_FILE} but no weights (model.safetensors): save the model with "
                     "save_pretrained, or pass the --output_dir of a finished finetune.py run")


def check_model_folder(path: str | os.PathLike, flag: str = "--model") -> ModelKind:
    """Check a model argument before any work; returns its kind (``"run"``, ``"model"`` or ``"hub"``).

    Raises ValueError (one line naming ``flag``, the folder, what is missing and what to do) for an
    unfinished run folder, a dataset folder, a folder without config or safetensors weights, a file,
    or a missing local path; FileNotFoundError for a missing path that cannot be a Hub id.
    """
    text = os.fspath(path)
    folder = Path(text).expanduser()
    if folder.is_dir():
        if (folder / RUN_FILE).is_file():
            _check_run(folder, flag)
            check_weight_files(folder, flag)
            return "run"
        if is_dataset_folder(folder) and not (folder / CONFIG_FILE).is_file():
            raise ValueError(f"{flag} {folder} is a dataset folder, not a model: pass a model (the --output_dir of "
                             "finetune.py, a save_pretrained folder or a Hub model id)")
        _check_plain(folder, flag)
        check_weight_files(folder, flag)
        return "model"
    if folder.exists():
        raise ValueError(f"{flag} {folder} is a file, not a model folder")
    check_model_path(text, flag)
    check_repo_id(text, flag, namespace=False)
    return "hub"


def check_model_path(path: str | os.PathLike, flag: str = "--model") -> None:
    """Raise FileNotFoundError for a path that does not exist and cannot be a Hub id (an absolute or
    relative path, a folder under a local folder): a missing folder is said at once, not after a Hub try."""
    text = os.fspath(path)
    if not Path(text).expanduser().exists() and not _looks_like_hub_id(text):
        raise FileNotFoundError(f"{flag} {Path(text).expanduser()}: no such folder (pass a model folder or a Hub "
                                "model id USER/NAME)")


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors weight files of ``folder``: model.safetensors, or the shards its index names."""
    folder = Path(folder)
    if (folder / WEIGHT_FILES[0]).is_file():
        return [folder / WEIGHT_FILES[0]]
    index = folder / WEIGHT_FILES[1]
    if not index.is_file():
        return []
    try:
        return [folder / name for name in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                                                     .values()))]
    except (ValueError, KeyError, TypeError, AttributeError):
        return [index]  # an unreadable index: reported as the damaged file


def safetensors_header(path: str | os.PathLike) -> dict[str, Any] | None:
    """The tensor table of a safetensors file, or None when the file is damaged or incomplete: its header
    cannot be read, or its data is not exactly as long as the header says (a truncated copy or save)."""
    path = Path(path)
    if not path.is_file():
        return None
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
            return None
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return None
    if not isinstance(header, dict):
        return None
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    try:
        end = max((int(info["data_offsets"][1]) for info in tensors.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return tensors if end == size - 8 - length else None


def check_weight_files(folder: str | os.PathLike, flag: str = "--model") -> None:
    """Raise ValueError (one line naming the file) when a safetensors weight file of ``folder`` is
    damaged or incomplete, before anything loads it."""
    for path in safetensors_files(folder):
        if safetensors_header(path) is None:
            raise ValueError(f"weights file is damaged or incomplete: {path} ({flag} {folder}; its size does not "
                             "match its header, or a shard is missing: copy, download or save it again)")


def head_size(folder: str | os.PathLike) -> int | None:
    """Classes of the model's head, read from its weights' header (no tensor loaded); None when unknown."""
    for path in safetensors_files(folder):
        info = (safetensors_header(path) or {}).get(HEAD_WEIGHT)
        if info and info.get("shape"):
            return int(info["shape"][0])
    return None


def lacks_label_names(model: str | os.PathLike) -> bool:
    """True for a local model folder (or config.json file) whose config has no id2label: transformers
    would then give it two LABEL_i classes whatever its head holds."""
    path = Path(os.fspath(model)).expanduser()
    try:
        config = json.loads((path / CONFIG_FILE if path.is_dir() else path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # a timm model's config (TimmWrapperConfig) keeps its classes as timm's label_names instead of id2label
    return isinstance(config, dict) and not config.get("id2label") and not config.get("label_names")


def label_overrides(model: str | os.PathLike) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a local model folder whose config.json has no id2label:
    ``num_labels`` read from the weights' head (with a warning saying what is missing), so the model
    loads with generic LABEL_i names instead of failing on a 2-class head. {} otherwise."""
    folder = Path(os.fspath(model)).expanduser()
    if not lacks_label_names(folder):
        return {}
    classes = head_size(folder)
    if classes is None:
        return {}
    logger.warning("%s has no id2label/label2id: its %d classes (the head's size in its weights) are unnamed, "
                   "shown as LABEL_0..LABEL_%d; add id2label and label2id to config.json to name them",
                   folder / CONFIG_FILE, classes, classes - 1)
    return {"num_labels": classes}


def read_run_file(folder: str | os.PathLike) -> dict | None:
    """The run signature a folder holds, or None when it holds none (or an unreadable one)."""
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
