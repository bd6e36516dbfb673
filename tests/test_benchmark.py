"""scripts/benchmark.py: quick mode end to end on synthetic tiles, output format, bad input, and the
example-baseline transforms (shapes, normalisation) it is compared against."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.transforms import make_image_processor

# benchmarks/ lives in the clone, not in the installed package (scripts/benchmark.py does the same).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import BenchmarkConfig, run_benchmark, write_results
from benchmarks.example_pipeline import (
    ExampleRandomResizedCrop,
    example_collate_fn,
    example_train_transforms,
)
from benchmarks.sources import write_synthetic_tiles
from benchmarks.timing import summarize
from benchmarks.train_bench import window_rates


def _check_stats(row: dict, where: str) -> None:
    for key in ("median", "min", "max"):
        assert isinstance(row[key], float) and row[key] > 0, f"{where}: {key}={row.get(key)}"
    assert row["min"] <= row["median"] <= row["max"], where
    assert row["repeats"] == len(row["values"]) >= 1, where


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("bench_out")
    args = ["--quick", "--synthetic", "--repeats", "3", "--output_dir", str(out), "--quiet"]
    return load_script("benchmark").main(args), out


def test_quick_run_writes_three_tables_with_stats_and_ratios(quick_run) -> None:
    rc, out = quick_run
    assert rc == 0
    results = json.loads((out / "benchmark.json").read_text())
    assert set(results["sections"]) == {"data", "train", "infer"}
    expected_rows = {
        "data": {"baseline", "package", "package_first_epoch"},
        "train": {"small_baseline", "small_package", "base_baseline", "base_package"},
        "infer": {"package", "pipeline_single", "pipeline_batched"},
    }
    for name, rows in expected_rows.items():
        section = results["sections"][name]
        assert rows <= set(section["rows"]), (name, list(section["rows"]))
        for key in rows:
            _check_stats(section["rows"][key], f"{name}/{key}")
        assert section["ratios"], name
        for ratio in section["ratios"]:
            num, den = section["rows"][ratio["numerator"]], section["rows"][ratio["denominator"]]
            assert ratio["ratio"] == pytest.approx(num["median"] / den["median"])
    goals = {r["name"]: r for s in results["sections"].values() for r in s["ratios"] if "goal" in r}
    assert len(goals) == 4 and all(isinstance(r["met"], bool) for r in goals.values())
    assert results["sections"]["infer"]["top1_agreement_package_vs_pipeline"] >= 0.9
    # machine facts, date and command for the README
    machine = results["machine"]
    for key in ("cpu_model", "cpu_count", "torch_threads", "torch", "cpu_flags"):
        assert key in machine
    assert results["command"].startswith("python scripts/benchmark.py --quick")
    assert results["date"] and results["data_source"]["kind"] == "synthetic"
    assert results["settings"]["threads"] == 1  # quick default


def test_quick_run_variants_and_markdown(quick_run) -> None:
    _, out = quick_run
    results = json.loads((out / "benchmark.json").read_text())
    rows = results["variants"]["rows"]
    for key in ("train_eager_fp32", "train_sdpa_fp32", "train_sdpa_bf16", "infer_eager_fp32", "infer_sdpa_fp32",
                "infer_sdpa_bf16", "infer_sdpa_fp32_no_grad", "data_workers_0"):
        _check_stats(rows[key], key)
    chosen = results["package_settings"]
    assert chosen["attn_implementation"] in ("eager", "sdpa")
    assert 0.0 <= chosen["bf16_vs_fp32"]["top1_agreement"] <= 1.0
    markdown = (out / "benchmark.md").read_text()
    for heading in ("## data", "## train", "## infer", "## variants", "| ratio (medians)"):
        assert heading in markdown
    assert not list(out.glob(".*")), "temp files left behind"


def test_sections_subset_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main = load_script("benchmark").main
    assert main(["--sections", "data,bogus", "--output_dir", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["--quick", "--data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["--quick", "--image_size", "30", "--output_dir", str(tmp_path)]) == 2  # 30 not divisible by 8
    assert main(["--quick", "--repeats", "0", "--output_dir", str(tmp_path)]) == 2
    assert not (tmp_path / "benchmark.json").exists()


def test_data_dir_of_class_folders(tmp_path: Path) -> None:
    """--data_dir with class subfolders: the same tiles reach both pipelines; data section only."""
    write_synthetic_tiles(tmp_path / "tiles", 4, size=40, seed=1)
    config = BenchmarkConfig(quick=True, sections="data", repeats=1, variants=False,
                             data_dir=str(tmp_path / "tiles"), num_tiles=24)
    results = run_benchmark(config, command="test")
    assert results["data_source"]["kind"] == "data_dir" and results["data_source"]["tiles"] == 24
    assert set(results["sections"]) == {"data"}
    paths = write_results(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["sections"]["data"]["rows"]["package"]["median"] > 0


def test_example_transforms_match_torchvision_semantics() -> None:
    """The baseline mirrors the example: RandomResizedCrop(size) + flip + ToTensor + Normalize."""
    processor = make_image_processor(24, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.5))
    transform = example_train_transforms(processor)
    flat = Image.fromarray(np.full((37, 41, 3), (51, 102, 204), np.uint8))  # odd size, constant colour
    torch.manual_seed(0)
    batch = transform({"image": [flat, flat.convert("RGBA")], "label": [0, 1]})
    assert len(batch["pixel_values"]) == 2
    for pv in batch["pixel_values"]:
        assert pv.shape == (3, 24, 24) and pv.dtype == torch.float32
        expected = (torch.tensor([51, 102, 204]) / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.5])
        assert torch.allclose(pv.mean(dim=(1, 2)), expected, atol=1e-5)
    examples = [{"pixel_values": pv, "label": i} for i, pv in enumerate(batch["pixel_values"])]
    collated = example_collate_fn(examples)
    assert collated["pixel_values"].shape == (2, 3, 24, 24) and collated["labels"].tolist() == [0, 1]


def test_random_resized_crop_params_follow_torchvision() -> None:
    crop = ExampleRandomResizedCrop((16, 16))
    torch.manual_seed(0)
    areas = []
    for _ in range(200):
        i, j, h, w = crop.get_params(150, 150)
        assert 0 <= i <= 150 - h and 0 <= j <= 150 - w
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
        areas.append(h * w / 150**2)
    assert min(areas) < 0.3 and max(areas) > 0.7  # scale (0.08, 1): wide spread of crop areas


def test_summarize_and_window_rates() -> None:
    stats = summarize([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (stats["median"], stats["min"], stats["max"], stats["repeats"]) == (3.0, 1.0, 10.0, 5)
    times = [0.0, 1.0, 1.5, 2.0, 2.5, 3.5]  # train begin, then 5 steps
    assert window_rates(times, warmup=1, steps=2, repeats=2, batch=4) == pytest.approx([8.0, 8 / 1.5])


def test_dataset_dir_source(tiny_dataset_dir: Path, tmp_path: Path) -> None:
    """--dataset_dir (prepared dataset): its tiles are exported as PNG class folders for the baseline."""
    config = BenchmarkConfig(quick=True, sections="data", repeats=1, variants=False,
                             dataset_dir=str(tiny_dataset_dir), num_tiles=30)
    results = run_benchmark(config, command="test", workdir=tmp_path / "work")
    assert results["data_source"] == {"kind": "dataset_dir", "path": str(tiny_dataset_dir), "tiles": 30}
    pngs = sorted((tmp_path / "work" / "imagefolder").rglob("*.png"))
    assert len(pngs) == 30 and {p.parent.name for p in pngs} <= set(CLASS_NAMES)
    assert results["sections"]["data"]["rows"]["baseline"]["median"] > 0


def test_benchmarks_are_not_part_of_the_installed_library() -> None:
    """benchmarks/ is a root folder of the clone like diffusers' (outside setup.py's
    ``find_packages(include=["hf_tissue_vit", "hf_tissue_vit.*"])``); the library has no benchmark module."""
    import benchmarks

    assert Path(benchmarks.__file__).resolve().parent == ROOT / "benchmarks"
    assert not list((ROOT / "hf_tissue_vit").rglob("benchmark*.py"))


def test_script_runs_from_a_clone_without_pythonpath(tmp_path: Path) -> None:
    """``python scripts/benchmark.py`` finds benchmarks/ by itself: no PYTHONPATH, another working dir."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--help"], check=False,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--sections" in done.stdout and "--infer_batch_size" in done.stdout
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--sections", "bogus"],
                          check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "bogus" in done.stderr
