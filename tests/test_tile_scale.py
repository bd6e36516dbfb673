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
from hf_tissue_vit.transforms import make_image_processor


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


def test_a_larger_tile_is_centre_cropped_to_the_recorded_training_field(tmp_path: Path) -> None:
    """NCT's case: 224 px at 0.5 µm/px for a model of 150 px training tiles at 0.5: the model sees the
    centre 150 px (the field it learnt on), not the whole tile squeezed into its input."""
    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, (90, 90, 3), dtype=np.uint8)  # 0.25 µm/px: 22.5 µm
    model = tiny_vit(label_names=["a", "b"])
    model.config.mpp = 0.5
    processor = make_image_processor(32)
    fielded = TilePredictor(model, processor, device="cpu", bf16=False, num_workers=0, tile_size=30, mpp=0.25)
    half = np.asarray(Image.fromarray(tile).resize((45, 45), Image.BILINEAR))
    centre = half[7:37, 7:37]  # (45 - 30) // 2 = 7
    plain = TilePredictor(model, processor, device="cpu", bf16=False, num_workers=0, tile_size=30, mpp=0.5)
    assert torch.equal(fielded.pixel_values([tile]), plain.pixel_values([centre]))
    assert "30x30 px training field" in fielded.scale.describe()
    small = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)  # 25 px at the model's scale: as it is
    assert torch.equal(fielded.pixel_values([small]),
                       plain.pixel_values([np.asarray(Image.fromarray(small).resize((25, 25), Image.BILINEAR))]))
    guessed = TilePredictor(model, processor, device="cpu", bf16=False, num_workers=0, mpp=0.25)
    assert guessed.scale.field is None  # no recorded training tile size: no crop on a guess
    unknown = TilePredictor(model, processor, device="cpu", bf16=False, num_workers=0, tile_size=30)
    assert unknown.scale.field is None and unknown.pixel_values([tile]).shape == (1, 3, 32, 32)  # the whole tile


def test_scale_rules() -> None:
    assert TileScale(0.5, 0.495).factor is None  # within 2 %: the same scale
    assert TileScale(None, 0.5).factor is None and "unknown" in TileScale(None, 0.5).describe()
    assert TileScale(0.5, None).describe().startswith("the model's µm/px")
    assert TileScale(0.25, 0.5)(Image.new("RGB", (101, 60))).size == (50, 30)


def test_predict_script_takes_mpp(tmp_path: Path, script, capsys) -> None:
    code = script("predict").main(["--model", str(tmp_path), "--inputs", str(tmp_path), "--mpp", "-1"])
    assert code == 2 and "--mpp must be a positive number" in capsys.readouterr().err
