"""Tissue maps of large plain images, and the one map path: scripts/tissue_map.py and the demo app both
map through ``slides.map_slide`` + ``save_slide_map`` (same grid, tissue detection, files, GeoJSON).
Whole-slide specifics (levels, µm/px, streaming) are in test_slides.py."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, tile_pixels
from PIL import Image
from transformers import PretrainedConfig

from hf_tissue_vit.constants import CLASS_NAMES, KATHER_FOLDERS
from hf_tissue_vit.predict import TilePredictor, read_downscaled
from hf_tissue_vit.slides import BACKGROUND, SlideMapOptions, map_slide
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


def options(**kw) -> SlideMapOptions:
    return SlideMapOptions(progress=False, **kw)


@pytest.fixture(scope="module")
def colour_predictor() -> TilePredictor:
    processor = make_image_processor(32)
    rng = np.random.default_rng(123)
    tiles = [tile_pixels(name, TILE, rng) for name in CLASS_NAMES]
    prototypes = ProcessorTransform(processor)(tiles).mean(dim=(2, 3))
    # batch 2: batches cut across window rows; fp32: the labels follow from exact colour distances
    return TilePredictor(MeanColourClassifier(prototypes), processor, batch_size=2, num_workers=0, bf16=False)


def test_map_of_a_plain_image_matches_its_mosaic(colour_predictor, tmp_path):
    Image.fromarray(mosaic(LAYOUT, TILE)).save(tmp_path / "mosaic.png")
    result = map_slide(colour_predictor, str(tmp_path / "mosaic.png"), options(tile=TILE, stride=TILE), None)
    np.testing.assert_array_equal(result.labels, LAYOUT)
    assert np.isnan(result.probs[LAYOUT == BACKGROUND]).all()
    np.testing.assert_allclose(np.nansum(result.probs, axis=-1)[LAYOUT != BACKGROUND], 1.0, atol=1e-5)
    fractions = result.fractions()
    tissue = (LAYOUT != BACKGROUND).sum()
    for k, name in enumerate(CLASS_NAMES):
        assert fractions["classes"][name]["cells"] == (k == LAYOUT).sum()
        assert fractions["classes"][name]["fraction_of_tissue"] == pytest.approx((k == LAYOUT).sum() / tissue)
    assert fractions["background_windows"] == 2 and (fractions["rows"], fractions["cols"]) == LAYOUT.shape


def test_windows_get_the_saved_processors_pixels(tmp_path):
    """Each window is classified on exactly the pixel_values the saved (here bicubic) processor gives
    that window: the map's probabilities are the model's on the processor's output."""
    from conftest import tiny_vit
    from transformers import ViTImageProcessorPil

    model = tiny_vit()
    processor = ViTImageProcessorPil(resample=Image.BICUBIC, size={"height": 32, "width": 32})
    predictor = TilePredictor(model, processor, batch_size=4, num_workers=2, bf16=False)
    image = mosaic(np.array([[0, 1, 2], [5, 3, 4]]), 45, seed=3)  # no glass: every window is classified
    Image.fromarray(image).save(tmp_path / "image.png")
    result = map_slide(predictor, str(tmp_path / "image.png"), options(tile=45, stride=45), None)
    windows = [Image.fromarray(image[r * 45:(r + 1) * 45, c * 45:(c + 1) * 45]) for r in range(2) for c in range(3)]
    with torch.inference_mode():
        pixel_values = processor(windows, return_tensors="pt")["pixel_values"]
        reference = model(pixel_values=pixel_values).logits.softmax(-1).numpy()
    np.testing.assert_allclose(result.probs.reshape(6, -1), reference, atol=1e-6)


def test_pixel_limit_is_reported_and_restored(tmp_path):
    Image.fromarray(mosaic(LAYOUT, TILE)).save(tmp_path / "slide.png")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="max_image_pixels"):
        read_downscaled(tmp_path / "slide.png", 64, max_image_pixels=100)
    assert before == Image.MAX_IMAGE_PIXELS
    assert read_downscaled(tmp_path / "slide.png", 1000, max_image_pixels=10**6)[0].shape == (4 * TILE, 5 * TILE, 3)


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
def test_real_tile_mosaic(real_data_dir, tiny_model_dir, tmp_path):
    """Real 150 px Kather tiles, one per class: none is taken for background, the grid has the
    mosaic's shape, and the mechanics hold with a (random, untrained) tiny ViT."""
    folders = list(KATHER_FOLDERS)[:6]
    tiles = []
    for folder in folders:
        path = next(p for p in sorted((real_data_dir / folder).iterdir()) if p.suffix.lower() in (".tif", ".png"))
        with Image.open(path) as im:
            tiles.append(np.asarray(im.convert("RGB"))[:150, :150])
    image = np.concatenate([np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:], axis=1)], axis=0)
    Image.fromarray(image).save(tmp_path / "real.png")
    predictor = TilePredictor.from_pretrained(str(tiny_model_dir), device="cpu", batch_size=8)
    result = map_slide(predictor, str(tmp_path / "real.png"), options(tile=150, stride=150), None)
    assert result.labels.shape == (2, 3) and (result.labels != BACKGROUND).all()
    assert sum(v["fraction_of_tissue"] for v in result.fractions()["classes"].values()) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# One map path: the demo app gives scripts/tissue_map.py's map and files
# --------------------------------------------------------------------------------------------
MODEL_MPP = 1.0  # the model below was "trained" at 1 µm/px on 32 px tiles
IMAGE_MPP = 0.5  # the images below are scanned at 0.5 µm/px: a model window is 64 image px


@pytest.fixture(scope="module")
def mpp_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny ViT (32 px input) as a model trained at 1 µm/px (config.mpp) on 32 px tiles."""
    out = tmp_path_factory.mktemp("mpp_model") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "mpp": MODEL_MPP}))
    (out / "all_results.json").write_text(json.dumps({"dataset": {"tile_size": [32, 32]}}))
    return out


@pytest.fixture(scope="module")
def app_model(mpp_model):
    from hf_tissue_vit.app.handlers import AppModel

    return AppModel(str(mpp_model), device="cpu", bf16=False)


def _scanned_tiff(path: Path, image: np.ndarray, mpp: float) -> Path:
    """A flat TIFF recording its µm/px in centimetres (what microscope software writes)."""
    Image.fromarray(image).save(path, resolution=1e4 / mpp, resolution_unit=3)
    return path


def _tissue_map_py(model: Path, image: Path, out: Path, *extra: str) -> int:
    return load_script("tissue_map").main(["--model", str(model), "--image", str(image), "--output_dir", str(out),
                                           "--tile", "32", "--stride", "32", "--batch_size", "128", "--bf16", "false",
                                           *extra])


def _same_outputs(app_files: dict[str, str], script_dir: Path) -> None:
    """labels.npy, probabilities.npy and the GeoJSON are the same bytes; the fractions equal but for time.
    (The script's run bookkeeping, summary.csv and the done mark of a re-run, is not part of a map.)"""
    from hf_tissue_vit.slides.cohort import DONE_FILE

    assert sorted(Path(p).name for p in app_files.values()) == sorted(p.name for p in script_dir.iterdir()
                                                                      if p.name not in ("summary.csv", DONE_FILE))
    for name in ("labels.npy", "probabilities.npy", "tissue_map.geojson"):
        assert Path(app_files[name]).read_bytes() == (script_dir / name).read_bytes(), name

    def facts(path: str | Path) -> dict:
        data = json.loads(Path(path).read_text())
        return {k: v for k, v in data.items() if k not in ("seconds", "windows_per_s")}

    assert facts(app_files["class_fractions.json"]) == facts(script_dir / "class_fractions.json")


def test_the_app_maps_an_image_as_tissue_map_py_does(app_model, mpp_model, tmp_path):
    """Same image, same model: identical labels.npy and GeoJSON, read at the model's µm/px (config.mpp)."""
    layout = np.array([[0, 1, BACKGROUND, 3], [4, 5, 2, BACKGROUND], [1, 1, 3, 0]])
    image = _scanned_tiff(tmp_path / "scan.tif", mosaic(layout, 64, seed=5), IMAGE_MPP)
    result = app_model.map_image(image)
    assert _tissue_map_py(mpp_model, image, tmp_path / "cli") == 0
    _same_outputs(result.files, tmp_path / "cli")
    fractions = result.fractions
    assert fractions["target_mpp"] == MODEL_MPP and fractions["scale"] == MODEL_MPP / IMAGE_MPP  # 64 px windows
    labels = np.load(result.files["labels.npy"])
    assert labels.shape == layout.shape and ((labels == BACKGROUND) == (layout == BACKGROUND)).all()
    assert result.warnings == [] and result.table[-1][:2] == ["Background (not classified)", 2]
    assert result.table[0][3] == pytest.approx(float(f"{fractions['classes'][CLASS_NAMES[0]]['area_mm2']:.4g}"))


def test_the_app_maps_a_whole_slide(app_model, mpp_model, tmp_path):
    """A pyramidal slide through the app: the map tissue_map.py makes (the app's slide map was a stub)."""
    pytest.importorskip("openslide", reason="whole slides need the [wsi] extra")
    from slide_helpers import write_pyramid

    layout = np.array([[BACKGROUND] * 5, [BACKGROUND, 0, 3, 5, BACKGROUND], [BACKGROUND, 2, 1, 4, BACKGROUND],
                       [BACKGROUND] * 5])
    slide = write_pyramid(tmp_path / "slide.tif", mosaic(layout, 128, seed=7), 0.25, levels=2)  # 40x
    result = app_model.map_image(slide)
    assert result.fractions["reader"] == "openslide" and result.fractions["level"] == 1  # 0.5 µm/px level
    assert _tissue_map_py(mpp_model, slide, tmp_path / "cli") == 0
    _same_outputs(result.files, tmp_path / "cli")


def test_the_app_accepts_what_the_slides_read():
    from hf_tissue_vit.app import handlers
    from hf_tissue_vit.constants import WHOLE_SLIDE_EXTENSIONS
    from hf_tissue_vit.slides.reader import SLIDE_EXTENSIONS

    assert ".dcm" in SLIDE_EXTENSIONS and set(WHOLE_SLIDE_EXTENSIONS) <= set(SLIDE_EXTENSIONS)
    assert not hasattr(handlers, "SLIDE_SUFFIXES") and not hasattr(handlers, "stated_mpp")  # no second list/reader


def test_the_app_reads_a_files_resolution_as_the_slides_do(app_model, tmp_path):
    """Centimetre resolution tags are a scale; an inch resolution is a photo program's DPI, not one."""
    tile = mosaic(np.array([[0]]), 32)
    by_cm = _scanned_tiff(tmp_path / "cm.tif", tile, 0.25)
    Image.fromarray(tile).save(tmp_path / "inch.tif", resolution=101600.0, resolution_unit=2)  # 0.25 µm/px in inches
    (warning,) = app_model.classify_tile(by_cm).warnings
    assert "0.25 µm/px" in warning
    assert app_model.classify_tile(tmp_path / "inch.tif").warnings == []


def test_background_is_defined_once():
    holders = []
    for path in sorted((REPO / "hf_tissue_vit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BACKGROUND" for t in node.targets):
                holders.append(str(path.relative_to(REPO)))
    assert holders == ["hf_tissue_vit/slides/outputs.py"]
