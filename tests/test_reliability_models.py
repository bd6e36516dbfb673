"""Reliability of damaged or incomplete model folders (issue 27, cases 2-4), through the real scripts.

* a truncated ``model.safetensors`` is one line, "weights file is damaged or incomplete: <path>", in
  predict.py, evaluate_model.py, attention_maps.py, tissue_map.py, finetune.py (--model_name_or_path) and app.py;
* a config.json without id2label/label2id: the head's size is read from the weights (the model loads with
  LABEL_i names and a warning saying what is missing); count_parameters.py counts the real head;
* a path-like --model that does not exist is a missing folder at once (app.py, count_parameters.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DAMAGED = "weights file is damaged or incomplete: "


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _tiles(root: Path) -> Path:
    for k, name in enumerate(("Tumor", "Stroma")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (60 * k + 20 * i, 80, 150)).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture
def damaged_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """``tiny_model_dir`` with its model.safetensors cut to half its size (an interrupted copy)."""
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


def _runs(model: Path, tmp_path: Path, tiny_dataset_dir: Path, finetune_tiny_args: list[str]) -> dict[str, list]:
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 64), (200, 120, 160)).save(image)
    tiny = [a for a in finetune_tiny_args if a not in ("--from_scratch",)]
    tiny = tiny[:tiny.index("--model_preset")] + tiny[tiny.index("--model_preset") + 2:]
    return {
        "predict": ["--model", str(model), "--inputs", str(image), "--output", str(tmp_path / "p.csv")],
        "evaluate_model": ["--model", str(model), "--inputs", str(_tiles(tmp_path / "tiles")), "--output_dir",
                     str(tmp_path / "eval")],
        "attention_maps": ["--model", str(model), "--images", str(image), "--output_dir", str(tmp_path / "att")],
        "tissue_map": ["--model", str(model), "--image", str(image), "--tile", "32", "--output_dir",
                       str(tmp_path / "map")],
        "finetune": ["--model_name_or_path", str(model), "--dataset_dir", str(tiny_dataset_dir), "--output_dir",
                     str(tmp_path / "ft"), "--image_size", "32", "--max_steps", "1", "--n_bootstrap", "0",
                     "--dataloader_num_workers", "0", "--report_to", "none", "--use_cpu", "true"],
        "app": ["--model", str(model)],
    }


@pytest.mark.parametrize("name", ["predict", "evaluate_model", "attention_maps", "tissue_map", "finetune", "app"])
def test_truncated_weights_are_one_line_naming_the_file(name, damaged_model, tmp_path, tiny_dataset_dir,
                                                        finetune_tiny_args, script, capsys):
    argv = _runs(damaged_model, tmp_path, tiny_dataset_dir, finetune_tiny_args)[name]
    assert script(name).main(argv) == 2
    line = one_error_line(capsys)
    assert DAMAGED + str(damaged_model / "model.safetensors") in line, line


def test_a_missing_shard_is_a_damaged_weights_file(tiny_model_dir, tmp_path, script, capsys):
    from hf_tissue_vit.modelfolder import check_model_folder

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"classifier.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(ValueError, match=DAMAGED + ".*model-00001-of-00001.safetensors"):
        check_model_folder(folder)
    assert check_model_folder(tiny_model_dir) == "model"  # a whole file passes


@pytest.fixture
def unlabelled_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """``tiny_model_dir`` (six classes) whose config.json lost id2label and label2id."""
    folder = tmp_path / "unlabelled"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["id2label"], config["label2id"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_config_without_id2label_loads_the_heads_classes_and_says_what_is_missing(unlabelled_model, tmp_path,
                                                                                   script, caplog):
    import csv

    image = tmp_path / "tile.png"
    Image.new("RGB", (32, 32), (200, 120, 160)).save(image)
    with caplog.at_level(logging.WARNING):
        assert script("predict").main(["--model", str(unlabelled_model), "--inputs", str(image), "--output",
                                       str(tmp_path / "p.csv"), "--no_progress"]) == 0
    with open(tmp_path / "p.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header[-6:] == [f"LABEL_{i}" for i in range(6)]
    assert any("no id2label" in r.getMessage() and "6 classes" in r.getMessage() for r in caplog.records)
    assert script("tissue_map").main(["--model", str(unlabelled_model), "--image", str(image), "--tile", "32",
                                      "--output_dir", str(tmp_path / "map")]) == 0
    mapping = json.dumps({"Tumor": "LABEL_0", "Stroma": "LABEL_1"})
    assert script("evaluate_model").main(["--model", str(unlabelled_model), "--inputs", str(_tiles(tmp_path / "tiles")),
                                    "--label_map", mapping, "--output_dir", str(tmp_path / "eval"),
                                    "--n_bootstrap", "0"]) == 0


def test_count_parameters_reads_the_head_size_from_the_weights(unlabelled_model, tiny_model_dir, tmp_path, script,
                                                              capsys):
    from hf_tissue_vit.modeling import load_for_inference

    truth = load_for_inference(str(tiny_model_dir), device="cpu")[0].num_parameters()
    assert script("count_parameters").main(["--model", str(unlabelled_model)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(truth)
    bare = tmp_path / "bare" / "config.json"  # no weights beside it: no number rather than a wrong one
    bare.parent.mkdir()
    shutil.copy(unlabelled_model / "config.json", bare)
    assert script("count_parameters").main(["--model", str(bare)]) == 2
    assert "--num_labels" in one_error_line(capsys)
    assert script("count_parameters").main(["--model", str(bare), "--num_labels", "6"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(truth)


@pytest.mark.parametrize("name", ["app", "count_parameters"])
def test_missing_model_folder_is_said_before_any_hub_try(name, tmp_path):
    """The Hub endpoint is a closed local port: a Hub try would end in a connection error instead."""
    (tmp_path / "outputs").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    for missing in (str(tmp_path / "no" / "model"), "outputs/missing-run"):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), "--model", missing],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "no such folder" in errors[0] and "Traceback" not in done.stderr, done.stderr
