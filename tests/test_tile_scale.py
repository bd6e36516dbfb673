"""Tiles of a known µm/px are brought to the model's µm/px before its image processor; unknown: one warning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_model_dir, tiny_vit
from PIL import Image

from hf_tissue_vit.predict import TilePredictor
from hf_tissue_vit.predict.scale import TileScale


def _predictor(tmp_path: Path, model_mpp: float | None, **kwargs) -> TilePredictor:
    model = tiny_vit(label_names=["a", "b", "c"])
    if model_mpp is not None:
        model.config.mpp = model_mpp
    save_model_dir(model, tmp_path / "m")
    return TilePredictor.from_pretrained(str(tmp_path / "m"), device="cpu", bf16=False, num_workers=0, **kwargs)


def test_tiles_of_another_scale_are_resized_to_the_models(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)  # 0.25 µm/px: 24 µm across
    Image.fromarray(tile).save(tmp_path / "t.png")
    scaled = _predictor(tmp_path, 0.5, mpp=0.25)
    assert scaled.scale.factor == pytest.approx(0.5)
    half = np.asarray(Image.fromarray(tile).resize((48, 48), Image.BILINEAR))  # the same 24 µm at 0.5 µm/px
    plain = _predictor(tmp_path, 0.5, mpp=0.5)
    assert torch.equal(scaled.pixel_values([tile]), plain.pixel_values([half]))
    assert not torch.equal(scaled.pixel_values([tile]), plain.pixel_values([tile]))
    (row,) = list(scaled.predict_files([tmp_path / "t.png"]))
    assert np.allclose(row.probs, plain.predict_tiles([half])[0].numpy(), atol=1e-6)
    with caplog.at_level(logging.WARNING):
        unknown = _predictor(tmp_path, 0.5)
        unknown.predict_tiles([tile, tile])
        list(unknown.predict_files([tmp_path / "t.png"] * 3))
    warnings = [r.message for r in caplog.records if "µm/px" in r.message]
    assert len(warnings) == 1 and "pass --mpp" in warnings[0]  # once per run, naming the fix
    assert torch.equal(unknown.pixel_values([tile]), plain.pixel_values([tile]))  # as they are


def test_scale_rules() -> None:
    assert TileScale(0.5, 0.495).factor is None  # within 2 %: the same scale
    assert TileScale(None, 0.5).factor is None and "unknown" in TileScale(None, 0.5).describe()
    assert TileScale(0.5, None).describe().startswith("the model's µm/px")
    assert TileScale(0.25, 0.5)(Image.new("RGB", (101, 60))).size == (50, 30)


def test_predict_script_takes_mpp(tmp_path: Path, script, capsys) -> None:
    code = script("predict").main(["--model", str(tmp_path), "--inputs", str(tmp_path), "--mpp", "-1"])
    assert code == 2 and "--mpp must be a positive number" in capsys.readouterr().err
