"""One image, the same pixels everywhere: every PIL mode gives the same uint8 RGB through the dataset
build, the training decode, predict.py and tissue_map.py (all go through hf_tissue_vit.imaging)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_tissue_vit.imaging import to_uint8

SIZE = 24  # the tiny model's input size: no resize on any path, so the decoded pixels reach the model as they are


def _mode_images(rng: np.random.Generator) -> dict[str, tuple[Image.Image, str]]:
    """(image, file format) per mode, each with random content and, where the mode has one, transparency."""
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    alpha[:4] = 0  # fully transparent rows
    grey = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 3
    return {
        "RGB": (Image.fromarray(rgb), "PNG"),
        "RGBA": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"),
        "LA": (Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"),
        "L": (Image.fromarray(grey), "PNG"),
        "P": (palette, "PNG"),
        "I;16": (Image.fromarray(rng.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)), "PNG"),
        "I": (Image.fromarray(rng.integers(0, 70000, (SIZE, SIZE)).astype(np.int32)), "TIFF"),
        "F": (Image.fromarray(rng.uniform(-0.1, 1.1, (SIZE, SIZE)).astype(np.float32)), "TIFF"),
        "CMYK": (Image.fromarray(np.dstack([rgb, grey]), "CMYK"), "TIFF"),
    }


@pytest.fixture(scope="module")
def mode_files(tmp_path_factory) -> dict[str, Path]:
    """A Kather-style release folder: one file per mode in 01_TUMOR, an RGB tile in every other class."""
    root = tmp_path_factory.mktemp("modes") / "release"
    rng = np.random.default_rng(0)
    files = {}
    for mode, (image, fmt) in _mode_images(rng).items():
        (root / "01_TUMOR").mkdir(parents=True, exist_ok=True)
        path = root / "01_TUMOR" / f"tile_{mode.replace(';', '_')}.{'png' if fmt == 'PNG' else 'tif'}"
        image.save(path, format=fmt)
        with Image.open(path) as reread:
            assert reread.mode == mode, f"{path} reads back as {reread.mode}"
        files[mode] = path
    for folder in ("02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA"):
        (root / folder).mkdir()
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / folder / "t.png")
    return files


@pytest.fixture(scope="module")
def expected(mode_files) -> dict[str, np.ndarray]:
    out = {}
    for mode, path in mode_files.items():
        with Image.open(path) as image:
            out[mode] = to_uint8(image)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from hf_tissue_vit.constants import CLASS_NAMES
    from hf_tissue_vit.transforms import make_image_processor

    torch.manual_seed(0)
    config = ViTConfig(image_size=SIZE, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=24, id2label=dict(enumerate(CLASS_NAMES)),
                       label2id={n: i for i, n in enumerate(CLASS_NAMES)})
    path = tmp_path_factory.mktemp("parity_model") / "model"
    ViTForImageClassification(config).save_pretrained(path)
    make_image_processor(SIZE).save_pretrained(path)
    return path


def test_the_rule_is_not_the_identity(expected):
    """The fixture really exercises the conversions: transparency on white, 16-bit and float scaled."""
    assert (expected["RGBA"][:4] == 255).all() and (expected["LA"][:4] == 255).all()
    assert expected["I;16"].max() <= 255 and expected["F"].min() == 0 and expected["F"].max() == 255


def test_dataset_build(mode_files, expected, tmp_path, script):
    from datasets import load_from_disk

    from hf_tissue_vit.imaging import decode_dataset_image

    source = next(iter(mode_files.values())).parents[1]
    assert script("prepare_dataset").main(["--source", str(source), "--output_dir", str(tmp_path / "ds")]) == 0
    dataset = load_from_disk(str(tmp_path / "ds"))
    stored = {row["filename"]: decode_dataset_image(row["image"]) for split in dataset.values() for row in
              split.cast_column("image", split.features["image"].__class__(decode=False))}
    for mode, path in mode_files.items():
        (name,) = [n for n in stored if n.endswith(path.name)]
        np.testing.assert_array_equal(stored[name], expected[mode], err_msg=mode)


def test_training_decode_of_original_files(mode_files, expected):
    """A dataset that holds the original files (as a Hub dataset does) decodes to the same tiles."""
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    from hf_tissue_vit.training import decode_tiles

    modes = list(mode_files)
    split = Dataset.from_dict({"image": [{"path": str(mode_files[m]), "bytes": mode_files[m].read_bytes()}
                                         for m in modes]}, features=Features({"image": ImageFeature()}))
    tiles = decode_tiles(split, cache=False)
    for i, mode in enumerate(modes):
        np.testing.assert_array_equal(tiles[i].numpy(), expected[mode], err_msg=mode)


def _capture_prepared(monkeypatch) -> list[np.ndarray]:
    from hf_tissue_vit.predict import TilePredictor

    seen: list[np.ndarray] = []
    original = TilePredictor._predict_prepared

    def spy(self, prepared):
        seen.extend(np.array(t) for t in prepared)
        return original(self, prepared)

    monkeypatch.setattr(TilePredictor, "_predict_prepared", spy)
    return seen


def test_predict_script(mode_files, expected, model_dir, tmp_path, script, monkeypatch):
    seen = _capture_prepared(monkeypatch)
    modes = list(mode_files)
    argv = ["--model", str(model_dir), "--inputs", *map(str, mode_files.values()),
            "--output", str(tmp_path / "p.csv"), "--num_workers", "0"]
    assert script("predict").main(argv) == 0
    assert len(seen) == len(modes)
    for tile, mode in zip(seen, modes):
        np.testing.assert_array_equal(tile, expected[mode], err_msg=mode)


def test_tissue_map_script(mode_files, expected, model_dir, tmp_path, script, monkeypatch):
    import hf_tissue_vit.slides.run as slide_run

    # every window is classified, also the white ones that tissue detection would leave out
    monkeypatch.setattr(slide_run, "window_tissue_fraction",
                        lambda mask, downsample, geometry: np.ones((geometry.rows, geometry.cols), np.float32))
    seen = _capture_prepared(monkeypatch)
    for mode, path in mode_files.items():
        seen.clear()
        argv = ["--model", str(model_dir), "--image", str(path), "--output_dir", str(tmp_path / mode),
                "--tile", str(SIZE), "--stride", str(SIZE)]
        assert script("tissue_map").main(argv) == 0, mode
        (tile,) = seen
        np.testing.assert_array_equal(tile, expected[mode], err_msg=mode)
