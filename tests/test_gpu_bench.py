"""benchmarks/gpu.sh (the GPU benchmark of issue 25) end to end at toy sizes on the CPU, so that the script a
GPU machine runs cannot rot: its folder made by gpu_prepare.py, every item measured, one JSON and one log.
Also the FLOPs per image that MFU divides by, against torch's FLOP counter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import gpu_items, gpu_prepare  # noqa: E402


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    work, out = tmp_path_factory.mktemp("gpu_work"), tmp_path_factory.mktemp("gpu_out")
    assert gpu_prepare.main(["--synthetic", "--no_wheels", "--per_class", "5", "--workdir", str(work)]) == 0
    env = dict(os.environ, OUT=str(out), GPU_WORKDIR=str(work), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--toy"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    return done, out


def test_toy_run_measures_every_item_into_one_json_and_one_log(toy_run) -> None:
    done, out = toy_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.log"]
    results = json.loads((out / "gpu.json").read_text())
    log = (out / "gpu.log").read_text()
    assert "gpu.sh:" in log and "run | images/s" in log  # the shell's and the script's output both
    names = {case.name for case in gpu_items.grid(gpu_items.TOY)}
    assert set(results["items"]) == {"ceiling", "dataset", "cached_batch", "accelerate_launch", "predict",
                                     "tissue_map", *(f"finetune/{n}" for n in names)}  # fmt: skip
    for name, entry in results["items"].items():
        assert not {"error", "skipped"} & set(entry), (name, entry)
    rows = {n: results["items"][f"finetune/{n}"] for n in names}
    assert {(r["size"], r["batch"], r["attn"], r["compile"]) for r in rows.values()} >= {
        (32, 8, "sdpa", False), (24, 8, "sdpa", False), (32, 8, "eager", False), (32, 4, "sdpa", False),
        (32, 8, "sdpa", True)}  # fmt: skip
    for row in rows.values():
        assert row["samples_per_second"] > 0 and row["steady_steps"] >= 2 and row["timer"] == "perf_counter"
        assert row["train_flops_per_image"] > 0 and row["mfu_vs_measured_matmul"] > 0
        assert row["attn_implementation"] == row["attn"] and row["device"] == "cpu"
    assert rows["32px_b8_sdpa_collator_augmentation"]["device_augmentation"] is False
    assert results["items"]["cached_batch"]["samples_per_second"] > 0
    assert set(results["data_pipeline_vs_cached_batch"]) == {"32px_b8_sdpa", "32px_b8_sdpa_collator_augmentation"}
    launch = results["items"]["accelerate_launch"]
    assert launch["returncode"] == 0 and launch["num_processes"] == 1 and launch["train_speed"]["samples_per_second"]
    assert results["items"]["predict"]["tiles"] == gpu_items.TOY.predict_tiles
    assert results["items"]["predict"]["tiles_per_second"] > 0
    assert results["items"]["tissue_map"]["windows_per_s"] > 0
    assert results["items"]["dataset"]["splits"]["train"] % 8 == 0  # whole batches of both sizes
    assert results["toy"] is True and results["gpu"] == {"cuda": False} and results["machine"]["cpu_count"]


def test_flops_per_image_are_torchs_count_of_the_forward() -> None:
    model = tiny_vit(image_size=40, patch_size=8)  # 25 patches + CLS, 2 layers, width 32, 6 labels
    model.config._attn_implementation = "eager"
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.zeros(3, 3, 40, 40))
    forward_per_image = counter.get_total_flops() // 3
    assert gpu_items.train_flops_per_image(model.config) == 3 * forward_per_image  # backward = 2 forwards
    assert gpu_items.vit_forward_flops(224, 16, 768, 12, 3072, 1000) == pytest.approx(35.15e9, rel=0.01)  # ViT-B/16


def test_datasheet_peak_by_device_name() -> None:
    assert gpu_items.datasheet_peak("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_items.datasheet_peak("NVIDIA H200") == 989.4
    assert gpu_items.datasheet_peak("NVIDIA GeForce RTX 4090") is None and gpu_items.datasheet_peak(None) is None


def test_prepare_refuses_a_missing_source(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        gpu_prepare.main(["--source", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w"), "--no_wheels"])
    assert "no such folder" in capsys.readouterr().err


def test_readme_shows_the_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("python benchmarks/gpu_prepare.py", "bash benchmarks/gpu.sh ", "bash benchmarks/gpu.sh --toy"):
        assert command in readme, command
    assert "No GPU measurement exists yet" in readme
