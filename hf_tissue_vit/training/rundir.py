"""Ownership of an output dir and resume: a run signature (``hf_tissue_vit_run.json``) says which run
a folder holds, so a rerun resumes its own last complete checkpoint and refuses another run's folder.

A folder's life: :func:`check_output_dir` (writes nothing) -> :func:`claim_output_dir` when training
starts: the completion marker (:data:`~hf_tissue_vit.modelfolder.COMPLETE_FILE`) and the final files a
previous run of the package left (:data:`RUN_OUTPUT_FILES`) are removed, then the signature is
written -> the run writes its final files at its end, and the marker last
(:func:`~hf_tissue_vit.modelfolder.mark_run_complete`). A rerun of a finished run
(:func:`finished_run`) changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..cards.model_card import EVALUATIONS_FILE
from ..fileio import atomic_write_json, check_writable_dir
from ..modelfolder import (
    COMPLETE_FILE,
    CONFIG_FILE,
    PROCESSOR_FILE,
    RESULTS_FILE,
    RUN_FILE,
    WEIGHT_FILES,
    is_complete_run,
    read_run_file,
)
from .arguments import DataArguments, ModelArguments, TissueTrainingArguments

logger = logging.getLogger(__name__)

# What a run writes into its folder's root, besides checkpoints and README.md (removed only when it
# is the package's card): removed when a run starts in a folder a run of the package owned, so a
# folder never mixes one run's final files with another's. External evaluations describe old weights.
RUN_OUTPUT_FILES = (
    *WEIGHT_FILES, CONFIG_FILE, PROCESSOR_FILE, RESULTS_FILE, "test_predictions.csv", "confusion_matrix.png",
    "training_curves.png", "trainer_state.json",
    "training_args.bin", EVALUATIONS_FILE,
)  # fmt: skip
_SHARDS = "model-*-of-*.safetensors"
SIGNATURE_TRAINING_FIELDS = (
    "seed", "data_seed", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
    "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "label_smoothing_factor",
    "max_grad_norm", "optim", "metric_for_best_model", "ema_decay", "teacher_epochs", "distill_alpha",
    "distill_temperature", "guidance_weight", "guidance_layers", "clean_end",
    "clean_end_keep_colour", "progressive_resolution",
)  # fmt: skip
# Data arguments that change where or how fast tiles are read, not what is learnt.
# Where the augmentation runs changes speed, not the pixels (the device path draws and computes the same).
_UNSIGNED_DATA_FIELDS = ("config", "cache_decoded", "decode_cache_dir", "device_augmentation")


def plain_values(args: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """``{name: getattr(args, name)}`` with enums as their values."""
    values = {name: getattr(args, name) for name in names}
    return {name: (v.value if hasattr(v, "value") else v) for name, v in values.items()}


def run_signature(
    model_args: Any, data_args: Any, training_args: TrainingArguments, dataset_dir: str | os.PathLike | None = None
) -> dict:
    """What makes a run the same run (for resume / refusing a foreign output dir).

    ``dataset_dir`` is the folder the run reads when it differs from ``data_args.dataset_dir`` (the
    default dataset); folders are compared as absolute paths.
    """
    data = {k: v for k, v in dataclasses.asdict(data_args).items() if k not in _UNSIGNED_DATA_FIELDS}
    folder = dataset_dir or data["dataset_dir"]
    data["dataset_dir"] = str(Path(folder).resolve()) if folder else None
    # The attention kernel changes speed, not what is learned: left out, so a run resumes under either.
    model = {k: v for k, v in dataclasses.asdict(model_args).items() if k != "attn_implementation"}
    training = plain_values(training_args, SIGNATURE_TRAINING_FIELDS)
    return json.loads(json.dumps({"model": model, "data": data, "training": training}))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Newest ``checkpoint-N`` whose trainer_state.json is readable (a SIGKILL can leave a partial one)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("skipping incomplete checkpoint %s", path)
            continue
        if any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            return str(path)
    return None


def _field_defaults() -> dict[str, dict[str, Any]]:
    """The default of every model and data argument and signed training argument, as signed (a run signed
    before an option existed has that option at its default)."""
    def defaults(cls: type) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return json.loads(json.dumps(out))

    training = {k: v for k, v in defaults(TissueTrainingArguments).items() if k in SIGNATURE_TRAINING_FIELDS}
    return {"model": defaults(ModelArguments), "data": defaults(DataArguments), "training": training}


def _diff(old: Any, new: Any, prefix: str = "", defaults: Any = None) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            if key not in old and key in defaults and new.get(key) == defaults[key]:
                continue  # an option newer than the run, left at its default: the same run
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.", defaults.get(key))
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _requested_resume(value: Any) -> str | bool | None:
    """``--resume_from_checkpoint`` as True (the last checkpoint), a folder, or None."""
    if isinstance(value, str) and value.lower() in ("true", "last"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "none", ""):
        return None
    return value or None


def _check_owner(out: Path, signature: dict) -> None:
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise ValueError(
            f"--output_dir {out} is not empty and holds no {RUN_FILE} (not a finetune.py run); "
            "choose another folder or pass --overwrite_output_dir"
        )
    differences = _diff(json.loads(run_file.read_text(encoding="utf-8")), signature, defaults=_field_defaults())
    if differences:
        raise ValueError(
            f"--output_dir {out} holds a different run ({'; '.join(differences[:8])}); use another "
            "--output_dir or pass --overwrite_output_dir to replace it"
        )


def finished_run(signature: dict, training_args: TrainingArguments) -> bool:
    """True when the output dir holds this very run, finished (complete), and ``--overwrite_output_dir``
    is not set: there is nothing to train or write."""
    out = Path(training_args.output_dir)
    if training_args.overwrite_output_dir or not out.is_dir() or not is_complete_run(out):
        return False
    return read_run_file(out) is not None and not _diff(read_run_file(out), signature, defaults=_field_defaults())


def check_output_dir(signature: dict, training_args: TrainingArguments) -> str | None:
    """Check that the output dir can be written and is free or holds this run, and return the checkpoint
    to resume from.

    Raises ``ValueError`` when it cannot be created or written, or holds another run (or unrelated
    files) and ``--overwrite_output_dir`` is not set. Writes nothing (see :func:`claim_output_dir`).
    """
    out = Path(training_args.output_dir)
    check_writable_dir(out, "--output_dir")
    if out.is_dir() and any(out.iterdir()) and not training_args.overwrite_output_dir:
        _check_owner(out, signature)
    resume = _requested_resume(training_args.resume_from_checkpoint)
    if resume is True:
        resume = last_complete_checkpoint(out)
        if resume is None:
            raise FileNotFoundError(f"--resume_from_checkpoint: no complete checkpoint in {out}")
    elif isinstance(resume, str):
        if not Path(resume, "trainer_state.json").is_file():
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume}: not a checkpoint folder (no trainer_state.json)"
            )
    elif not training_args.overwrite_output_dir:
        resume = last_complete_checkpoint(out)
        if resume:
            logger.info("resuming from the last checkpoint %s", resume)
    return resume


def remove_run_outputs(output_dir: str | os.PathLike) -> list[str]:
    """Remove the final files a run of the package wrote into ``output_dir`` (:data:`RUN_OUTPUT_FILES`, model
    shards, the package's README.md card) and the completion marker first; the user's other files, the
    logs and the checkpoints stay. Returns the names removed."""
    from ..cards.build import existing_card, is_package_card

    out = Path(output_dir)
    (out / COMPLETE_FILE).unlink(missing_ok=True)  # first: from here on the folder is not a finished run
    names = [name for name in RUN_OUTPUT_FILES if (out / name).is_file()]
    names += sorted(path.name for path in out.glob(_SHARDS) if path.is_file())
    try:
        ours = is_package_card(existing_card(out))
    except (OSError, ValueError):  # an unreadable README.md is not the package's
        ours = False
    names += ["README.md"] if ours else []
    for name in names:
        (out / name).unlink(missing_ok=True)
    if names:
        logger.info("removed the previous run's final files from %s: %s", out, ", ".join(names))
    return names


def claim_output_dir(signature: dict, training_args: TrainingArguments, resume: str | None) -> None:
    """Make the output dir this run's (main process): remove the marker and final files a previous run of
    the package left (see :func:`remove_run_outputs`; they are written again at the end); with
    ``--overwrite_output_dir`` and nothing to resume, remove old checkpoints so that they cannot be resumed
    by mistake; then write the signature."""
    if not training_args.should_save:
        return
    out = Path(training_args.output_dir)
    if (out / RUN_FILE).is_file() or (out / COMPLETE_FILE).is_file():
        remove_run_outputs(out)
    if training_args.overwrite_output_dir and resume is None and out.is_dir():
        for path in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, signature)
