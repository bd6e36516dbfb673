"""training.speed: images/s over the steady steps (warm-up and steps that also evaluated or saved left out), as
finetune.py records it in all_results.json (``train_speed``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_tissue_vit.training.speed import SpeedCallback


def test_steady_window_leaves_out_warmup_and_evaluation_steps(monkeypatch) -> None:
    clock = iter([0.0, 5.0, 6.0, 7.0, 17.0, 18.0, 19.0])  # step 1 slow (compile), step 4 evaluated (10 s)
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    args = SimpleNamespace(device=torch.device("cpu"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           world_size=3)  # fmt: skip
    callback = SpeedCallback(warmup_fraction=0.2, min_warmup_steps=2)
    callback.on_train_begin(args, None, None)
    for step in range(6):
        callback.on_step_begin(args, None, None)
        callback.on_step_end(args, None, None)
        if step == 2:
            callback.on_evaluate(args, None, None)  # after step 3's end: the next interval holds it
    summary = callback.summary()
    # steps 1-2 warm-up; steps 3, 5, 6 of 1 s each kept; step 4 (with the evaluation) left out
    assert summary["warmup_steps"] == 2 and summary["steady_steps"] == 3
    assert summary["samples_per_second"] == pytest.approx(3 * 24 / 3.0)
    assert summary["images_per_step"] == 24 and summary["timer"] == "perf_counter"
    assert "gpu_busy_fraction" not in summary  # CPU: no CUDA events


def test_finetune_records_train_speed(trained_run_dir: Path) -> None:
    results = json.loads((trained_run_dir / "all_results.json").read_text())
    speed = results["train_speed"]
    assert speed["images_per_step"] == 4 and speed["timer"] == "perf_counter"
    assert speed["steady_steps"] == 0 and speed["samples_per_second"] is None  # 2 steps: all warm-up

