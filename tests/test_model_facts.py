"""One reader of what a model folder says about itself (``modelfacts.read_model_facts``), used by
predict, the app, evaluation and the model card, with one fallback rule per fact and one "far from
the training tile size" rule; the results file named only by its constant."""

from __future__ import annotations

import ast
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

PACKAGE = Path(__file__).resolve().parents[1] / "hf_tissue_vit"


def _model(tmp_path: Path, tiny_model_dir: Path, name: str = "model", results: dict | None = None,
           **config: object) -> Path:
    """A copy of the tiny model (32 px input) with ``config`` entries added and ``results`` as its run's results."""
    out = tmp_path / name
    shutil.copytree(tiny_model_dir, out)
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, **config}))
    if results is not None:
        (out / "all_results.json").write_text(json.dumps(results))
    return out


def test_facts_of_a_model_folder(tmp_path, tiny_model_dir):
    from hf_tissue_vit.constants import CLASS_NAMES
    from hf_tissue_vit.modelfacts import read_model_facts

    bare = read_model_facts(tiny_model_dir)
    assert bare.label_names == CLASS_NAMES and bare.input_size == 32 and bare.resample == "bilinear"
    assert bare.mpp is None  # nothing records it: unknown, not Kather's 0.495
    assert bare.training_tile_size() == ((32, 32), "its input size; no training tile size is recorded")
    run = read_model_facts(_model(tmp_path, tiny_model_dir, results={"dataset": {"tile_size": [60, 40], "mpp": 0.7}}))
    assert run.tile_size == (40, 60) and run.mpp == 0.7  # tile_size is [w, h]; config.mpp absent: the run's
    assert read_model_facts(_model(tmp_path, tiny_model_dir, "m2", {"dataset": {"mpp": 0.7}}, mpp=1.0)).mpp == 1.0
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_model_facts(tmp_path / "nothing")


def test_app_and_predict_agree_on_the_training_tile_size(tmp_path, tiny_model_dir):
    """Without a recorded tile size the app fell back to 150 px and predict.py to the input size."""
    from hf_tissue_vit.app.model_info import load_model_info
    from hf_tissue_vit.predict import TilePredictor

    info = load_model_info(str(tiny_model_dir))
    predictor = TilePredictor.from_pretrained(str(tiny_model_dir), device="cpu", bf16=False)
    assert predictor.tile_size == (info.train_tile_px, info.train_tile_px) == (32, 32)


def test_app_and_predict_warn_with_one_far_rule(tmp_path, tiny_model_dir, script, caplog):
    """Training tiles of 48 px: 80 px is within 2x (no warning in either), 100 px is not (a warning in both);
    the app warned at 1.5x."""
    from hf_tissue_vit.app.model_info import load_model_info, tile_warnings

    model = _model(tmp_path, tiny_model_dir, results={"dataset": {"tile_size": [48, 48]}})
    info = load_model_info(str(model))
    near, far = tmp_path / "near.png", tmp_path / "far.png"
    Image.new("RGB", (80, 80), (200, 80, 160)).save(near)
    Image.new("RGB", (100, 100), (200, 80, 160)).save(far)
    assert tile_warnings(info, 80, 80) == []
    assert len(tile_warnings(info, 100, 100)) == 1
    caplog.set_level(logging.WARNING)
    assert script("predict").main(["--model", str(model), "--inputs", str(near), str(far),
                                   "--output", str(tmp_path / "p.csv"), "--no_progress", "--bf16", "false"]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "far from" in r.getMessage()]
    assert warning.startswith("1 of 2 images") and "far.png" in warning and "near.png" not in warning


def test_app_uses_the_models_resolution(tmp_path, tiny_model_dir):
    """A model trained at 1 µm/px: the app says so and does not warn for a 1 µm/px tile (it had 0.495 fixed)."""
    from hf_tissue_vit.app.model_info import load_model_info, tile_warnings

    info = load_model_info(str(_model(tmp_path, tiny_model_dir, mpp=1.0)))
    assert info.train_mpp == 1.0 and "1 µm/px" in info.preprocessing_text()
    assert tile_warnings(info, 32, 32, mpp=1.0) == []
    (warning,) = tile_warnings(info, 32, 32, mpp=0.25)
    assert "0.25 µm/px" in warning and "trained at 1 µm/px" in warning


def test_evaluation_and_card_read_the_same_facts(tmp_path, tiny_model_dir):
    from hf_tissue_vit.cards import ModelCardInfo
    from hf_tissue_vit.evaluation import model_label_names
    from hf_tissue_vit.modelfacts import read_model_facts

    model = _model(tmp_path, tiny_model_dir, results={"dataset": {"mpp": 0.7}})
    facts = read_model_facts(model)
    card = ModelCardInfo.from_output_dir(model)
    assert model_label_names(str(model)) == card.label_names == facts.label_names
    assert (card.mpp, card.image_size, card.resample) == (facts.mpp, facts.input_size, facts.resample) == (
        0.7, 32, "bilinear")


def _string_literals(path: Path) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_the_results_file_is_named_once():
    """``all_results.json`` as a literal only where modelfolder.RESULTS_FILE is defined."""
    holders = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if "all_results.json" in _string_literals(p))
    assert holders == ["modelfolder.py"]
