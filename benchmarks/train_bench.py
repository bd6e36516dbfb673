"""The ``train`` section: ``Trainer`` steps (forward + backward + AdamW, images/s) for the scratch
recipe's ViT and a ViT-B/16-shaped one. The package side is the library's
:class:`~hf_tissue_vit.training.TissueTrainer` on decoded tiles with batched augmentation and the
measured speed settings (bf16 autocast, attention kernel, workers); the baseline is the transformers
example pipeline under a plain ``Trainer`` with default (fp32) ``TrainingArguments``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_tissue_vit.training import TissueTrainer

from .config import GOALS, BenchmarkConfig
from .example_pipeline import example_collate_fn
from .models import make_model, model_label
from .timing import ratio, row

logger = logging.getLogger(__name__)


class StepTimer(TrainerCallback):
    """Records the wall time at the start of training and at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.times = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def window_rates(times: list[float], warmup: int, steps: int, repeats: int, batch: int) -> list[float]:
    """images/s over ``repeats`` windows of ``steps`` steps after ``warmup`` untimed steps."""
    rates = []
    for r in range(repeats):
        t0, t1 = times[warmup + r * steps], times[warmup + (r + 1) * steps]
        rates.append(steps * batch / max(t1 - t0, 1e-9))
    return rates


@dataclass
class TrainCase:
    """One model of the section: its spec, batch size and steps per timed repeat."""

    name: str  # "small" or "base"
    spec: dict[str, Any]
    batch: int
    steps: int


def train_run(
    kind: str, case: TrainCase, dataset: Any, collator: Any, config: BenchmarkConfig, workdir: Path,
    *, bf16: bool = False, workers: int = 0, attn: str | None = None,
) -> tuple[list[float], Any]:
    """One ``trainer.train()`` of ``warmup + repeats * steps`` steps; per-window images/s and the model."""
    model = make_model(case.spec, config.seed, attn)
    timer = StepTimer()
    # The example needs remove_unused_columns=False (its README passes --remove_unused_columns False:
    # set_transform reads the `image` column the Trainer would otherwise drop); the package sets it too.
    args = TrainingArguments(
        output_dir=str(workdir / f"trainer_{kind}"),
        use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=case.batch,
        max_steps=config.warmup_steps + config.repeats * case.steps,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=config.seed,
        remove_unused_columns=False,
        bf16=bf16,
        dataloader_num_workers=workers,
    )
    trainer_cls = TissueTrainer if kind == "package" else Trainer
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[timer])
    trainer.train()
    return window_rates(timer.times, config.warmup_steps, case.steps, config.repeats, case.batch), trainer.model


def train_cases(config: BenchmarkConfig) -> list[TrainCase]:
    """The small model, and the ViT-B/16-shaped one unless ``--skip_base``."""
    cases = [TrainCase("small", config.small_model, config.batch_size, config.train_steps)]
    if not config.skip_base:
        cases.append(TrainCase("base", config.base_model, config.base_batch_size, config.base_train_steps))
    return cases


def bench_train(
    config: BenchmarkConfig,
    packages: dict[str, Any],
    baselines: dict[str, Any],
    settings: dict[str, Any],
    workdir: Path,
) -> tuple[dict[str, Any], Any]:
    """Trainer images/s per model: example pipeline (fp32 defaults) vs the package (its speed settings).

    ``packages`` and ``baselines`` hold each case's pipeline by name; returns the table and the
    package-trained small model (the inference section classifies with it)."""
    rows: dict[str, dict[str, Any]] = {}
    ratios, trained = [], None
    package_label = (f"package (bf16 autocast={settings['train_bf16']}, attn={settings['attn_implementation']}, "
                     f"workers={settings['train_dataloader_num_workers']})")
    for case in train_cases(config):
        logger.info("train benchmark: %s model (%s), batch %d", case.name, model_label(case.spec), case.batch)
        base_rates, _ = train_run("baseline", case, baselines[case.name], example_collate_fn, config, workdir)
        pkg_rates, model = train_run(
            "package", case, packages[case.name].dataset, packages[case.name].collator, config, workdir,
            bf16=settings["train_bf16"], workers=settings["train_dataloader_num_workers"],
            attn=settings["attn_implementation"],
        )
        shown = {"model": model_label(case.spec, model), "batch_size": case.batch}
        rows[f"{case.name}_baseline"] = row("transformers example + Trainer defaults (fp32)", base_rates, **shown)
        rows[f"{case.name}_package"] = row(package_label, pkg_rates, **shown)
        goal = GOALS["train_small"] if case.name == "small" else None
        ratios.append(ratio(f"{case.name}: package / example", rows, f"{case.name}_package",
                            f"{case.name}_baseline", goal))
        if case.name == "small":
            trained = model
    return {
        "title": "Training steps through Trainer (forward + backward + AdamW)",
        "unit": "images/s",
        "warmup_steps": config.warmup_steps,
        "steps_per_repeat": {"small": config.train_steps, "base": config.base_train_steps},
        "rows": rows,
        "ratios": ratios,
    }, trained
