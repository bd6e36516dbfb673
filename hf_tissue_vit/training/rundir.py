"""Ownership of an output dir and resume: a run signature (``hf_tissue_vit_run.json``) says which run
a folder holds, so a rerun resumes its own last complete checkpoint and refuses another run's folder."""

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

from ..fileio import atomic_write_json

logger = logging.getLogger(__name__)

RUN_FILE = "hf_tissue_vit_run.json"  # identifies the run that owns an output dir
SIGNATURE_TRAINING_FIELDS = (
    "seed", "data_seed", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
    "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "label_smoothing_factor",
    "max_grad_norm", "optim", "metric_for_best_model", "ema_decay",
)  # fmt: skip
# Data arguments that change where or how fast tiles are read, not what is learnt.
_UNSIGNED_DATA_FIELDS = ("config", "cache_decoded", "decode_cache_dir")


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


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
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
    differences = _diff(json.loads(run_file.read_text(encoding="utf-8")), signature)
    if differences:
        raise ValueError(
            f"--output_dir {out} holds a different run ({'; '.join(differences[:8])}); use another "
            "--output_dir or pass --overwrite_output_dir to replace it"
        )


def check_output_dir(signature: dict, training_args: TrainingArguments) -> str | None:
    """Check that the output dir is free or holds this run, and return the checkpoint to resume from.

    Raises ``ValueError`` when it holds another run (or unrelated files) and ``--overwrite_output_dir``
    is not set. Writes nothing (see :func:`claim_output_dir`).
    """
    out = Path(training_args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file; give a folder")
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


def claim_output_dir(signature: dict, training_args: TrainingArguments, resume: str | None) -> None:
    """Make the output dir this run's (main process): write the signature; with ``--overwrite_output_dir``
    and nothing to resume, remove old checkpoints so that they cannot be resumed by mistake."""
    if not training_args.should_save:
        return
    out = Path(training_args.output_dir)
    if training_args.overwrite_output_dir and resume is None and out.is_dir():
        for path in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, signature)
