"""Tissue maps of large images (predict.tissue_map, save_tissue_map, scripts/tissue_map.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, tile_pixels
from PIL import Image
from transformers import PretrainedConfig

from hf_tissue_vit.constants import CLASS_NAMES, KATHER_FOLDERS
from hf_tissue_vit.predict import (
    BACKGROUND,
    TilePredictor,
    background_fraction,
    read_large_image,
    save_tissue_map,
    tissue_map,
)
from hf_tissue_vit.transforms import ProcessorTransform, make_image_processor

REPO = Path(__file__).resolve().parents[1]
TILE = 30
# Known layout: class ids, BACKGROUND = glass
LAYOUT = np.array([
    [0, 1, 2, 3, 4],
    [5, 0, BACKGROUND, 1, 1],
    [2, 2, 3, BACKGROUND, 5],
    [4, 3, 0, 5, 2],
])


class MeanColourClassifier(torch.nn.Module):
    """A "model" that classifies a tile by the nearest class prototype of its mean colour; it gets
    every synthetic tile of the conftest styles right, so the map must reproduce the mosaic."""

    def __init__(self, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.config = PretrainedConfig(id2label=dict(enumerate(CLASS_NAMES)))
        self.prototypes = torch.nn.Parameter(prototypes, requires_grad=False)  # [K, 3] in pixel_values space

    def forward(self, pixel_values: torch.Tensor):
        mean = pixel_values.mean(dim=(2, 3))
        logits = -50 * torch.cdist(mean, self.prototypes) ** 2
        return type("Output", (), {"logits": logits})()


def glass(size: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(245, 4, (size, size, 3)), 0, 255).astype(np.uint8)


def mosaic(layout: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([glass(size, rng) if k == BACKGROUND else tile_pixels(CLASS_NAMES[k], size, rng)
                            for k in row], axis=1) for row in layout]
    return np.concatenate(rows, axis=0)


@pytest.fixture(scope="module")
def colour_predictor() -> TilePredictor:
    processor = make_image_processor(32)
    rng = np.random.default_rng(123)
    tiles = [tile_pixels(name, TILE, rng) for name in CLASS_NAMES]
    prototypes = ProcessorTransform(processor)(tiles).mean(dim=(2, 3))
    # batch 2: 4 windows per strip on a 5-column grid, so strips, batches and row offsets all get exercised
    # fp32: the labels follow from exact colour distances
    return TilePredictor(MeanColourClassifier(prototypes), processor, batch_size=2, num_workers=0, bf16=False)


def test_background_fraction():
    rng = np.random.default_rng(0)
    black = np.zeros((20, 20, 3), np.uint8)
    windows = torch.from_numpy(np.stack([glass(20, rng), tile_pixels("Debris", 20, rng), black,
                                         tile_pixels("Mucosa", 20, rng)]))
    frac = background_fraction(windows)
    assert frac[0] == 1.0 and frac[1] < 0.05 and frac[2] == 1.0 and frac[3] < 0.2


def test_map_matches_mosaic_and_fractions(colour_predictor):
    image = mosaic(LAYOUT, TILE)
    result = tissue_map(colour_predictor, image, tile=TILE, stride=TILE)  # 2 strips of 2 rows
    np.testing.assert_array_equal(result.labels, LAYOUT)
    assert np.isnan(result.probs[LAYOUT == BACKGROUND]).all()
    np.testing.assert_allclose(np.nansum(result.probs, axis=-1)[LAYOUT != BACKGROUND], 1.0, atol=1e-5)
    fractions = result.area_fractions()
    tissue = (LAYOUT != BACKGROUND).sum()
    for k, name in enumerate(CLASS_NAMES):
        assert fractions["classes"][name]["cells"] == (k == LAYOUT).sum()
        assert fractions["classes"][name]["fraction_of_tissue"] == pytest.approx((k == LAYOUT).sum() / tissue)
    assert fractions["background_cells"] == 2 and fractions["grid_rows"] == 4 and fractions["grid_cols"] == 5


def test_overlapping_stride_and_margin(colour_predictor):
    image = mosaic(LAYOUT, TILE)
    image = np.pad(image, ((0, 7), (0, 11), (0, 0)), constant_values=250)  # margin no full window covers
    result = tissue_map(colour_predictor, image, tile=TILE, stride=TILE // 2)
    assert result.labels.shape == (2 * 4 - 1, 2 * 5 - 1)
    np.testing.assert_array_equal(result.labels[::2, ::2], LAYOUT)  # windows aligned with mosaic tiles
    assert result.cell_origin() == (TILE / 4, TILE / 4)


def test_save_outputs(colour_predictor, tmp_path):
    image = mosaic(LAYOUT, TILE)
    result = tissue_map(colour_predictor, image, tile=TILE, stride=TILE)
    paths = save_tissue_map(result, image, tmp_path / "out", max_side=64)
    np.testing.assert_array_equal(np.load(paths["label_grid.npy"]), LAYOUT)
    assert np.load(paths["probabilities.npy"]).shape == (4, 5, len(CLASS_NAMES))
    data = json.loads(Path(paths["class_fractions.json"]).read_text())
    assert sum(v["fraction_of_tissue"] for v in data["classes"].values()) == pytest.approx(1.0)
    lines = Path(paths["class_fractions.csv"]).read_text().splitlines()
    assert lines[0] == "class,cells,fraction_of_tissue,fraction_of_grid" and lines[-1].startswith("Background,2,")
    with Image.open(paths["tissue_map.png"]) as im:
        assert im.size[0] > 200
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(paths)  # no temp files left


def test_pil_image_and_file_inputs_give_the_same_map(colour_predictor, tmp_path):
    image = mosaic(LAYOUT, TILE)
    Image.fromarray(image).save(tmp_path / "slide.png")
    from_pil = tissue_map(colour_predictor, Image.fromarray(image), tile=TILE, stride=TILE)  # strips cropped
    from_file = tissue_map(colour_predictor, tmp_path / "slide.png", tile=TILE, stride=TILE)
    np.testing.assert_array_equal(from_pil.labels, LAYOUT)
    np.testing.assert_array_equal(from_file.labels, LAYOUT)


def test_pixel_limit_is_reported_and_restored(tmp_path):
    Image.fromarray(mosaic(LAYOUT, TILE)).save(tmp_path / "slide.png")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="max_image_pixels"):
        read_large_image(tmp_path / "slide.png", max_image_pixels=100)
    assert before == Image.MAX_IMAGE_PIXELS
    assert read_large_image(tmp_path / "slide.png", max_image_pixels=10**6).shape == (4 * TILE, 5 * TILE, 3)


def test_bad_geometry(colour_predictor):
    with pytest.raises(ValueError, match="smaller"):
        tissue_map(colour_predictor, np.zeros((20, 50, 3), np.uint8), tile=30)
    with pytest.raises(ValueError, match="positive"):
        tissue_map(colour_predictor, np.zeros((60, 60, 3), np.uint8), tile=30, stride=0)


def test_windows_get_the_saved_processors_pixels(tmp_path):
    """Each window is classified on exactly the pixel_values the saved (here bicubic) processor gives
    that window: the map's probabilities are the model's on the processor's output."""
    from conftest import tiny_vit
    from transformers import ViTImageProcessorPil

    model = tiny_vit()
    processor = ViTImageProcessorPil(resample=Image.BICUBIC, size={"height": 32, "width": 32})
    predictor = TilePredictor(model, processor, batch_size=4, num_workers=2, bf16=False)
    image = mosaic(np.array([[0, 1, 2], [5, 3, 4]]), 45, seed=3)  # no glass: every window is classified
    result = tissue_map(predictor, image, tile=45, stride=45)
    windows = [Image.fromarray(image[r * 45:(r + 1) * 45, c * 45:(c + 1) * 45]) for r in range(2) for c in range(3)]
    with torch.inference_mode():
        pixel_values = processor(windows, return_tensors="pt")["pixel_values"]
        reference = model(pixel_values=pixel_values).logits.softmax(-1).numpy()
    np.testing.assert_allclose(result.probs.reshape(6, -1), reference, atol=1e-6)


def test_script(tmp_path, capsys, tiny_model_dir):
    script = load_script("tissue_map")
    Image.fromarray(mosaic(LAYOUT, 40)).save(tmp_path / "slide.tif")
    out = tmp_path / "map"

    def run(image: str, *extra: str) -> int:
        return script.main(["--model", str(tiny_model_dir), "--image", str(tmp_path / image), "--output_dir", str(out),
                            *extra])

    assert run("slide.tif", "--tile", "40", "--stride", "20", "--batch_size", "8") == 0
    labels = np.load(out / "labels.npy")
    assert labels.shape == (7, 9) and labels[2, 4] == BACKGROUND  # the glass tile (1, 2) at stride 20
    assert (out / "tissue_map.png").is_file() and "background windows" in capsys.readouterr().out
    assert run("slide.tif", "--tile", "500") == 2
    assert run("nope.tif") == 2
    (tmp_path / "bad.tif").write_bytes(b"garbage")
    assert run("bad.tif") == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.real_data
def test_real_tile_mosaic(real_data_dir, tiny_model_dir):
    """Real 150 px Kather tiles, one per class: none is taken for background, the grid has the
    mosaic's shape, and the mechanics hold with a (random, untrained) tiny ViT."""
    folders = list(KATHER_FOLDERS)[:6]
    tiles = []
    for folder in folders:
        path = next(p for p in sorted((real_data_dir / folder).iterdir()) if p.suffix.lower() in (".tif", ".png"))
        with Image.open(path) as im:
            tiles.append(np.asarray(im.convert("RGB"))[:150, :150])
    image = np.concatenate([np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:], axis=1)], axis=0)
    predictor = TilePredictor.from_pretrained(str(tiny_model_dir), device="cpu", batch_size=8)
    result = tissue_map(predictor, image, tile=150, stride=150)
    assert result.labels.shape == (2, 3) and (result.labels != BACKGROUND).all()
    assert sum(v["fraction_of_tissue"] for v in result.area_fractions()["classes"].values()) == pytest.approx(1.0)
