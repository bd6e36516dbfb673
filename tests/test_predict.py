"""Batch prediction (predict.TilePredictor and scripts/predict.py) on tiny random ViT and ConvNeXT models."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from hf_tissue_vit import hardware
from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.imaging import load_rgb8, to_rgb8
from hf_tissue_vit.predict import TilePredictor, iter_input_files, probability_columns
from hf_tissue_vit.transforms import dihedral_views, make_image_processor


@pytest.fixture(scope="module")
def predictor(tiny_model_dir) -> TilePredictor:
    # bf16=False: these tests compare probabilities to fp32 references within 1e-5
    return TilePredictor.from_pretrained(str(tiny_model_dir), device="cpu", batch_size=4, num_workers=2, bf16=False)


@pytest.fixture(scope="module")
def tile_dir(tmp_path_factory) -> Path:
    """7 good tiles (35 px, one 40x30 upper-case .TIF in a subfolder, one RGBA), a zero-byte PNG,
    a corrupt JPEG, and a text file that folder search must skip."""
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (35, 35, 3), dtype=np.uint8)).save(root / f"tile_{i}.png")
    Image.fromarray(rng.integers(0, 255, (35, 35, 4), dtype=np.uint8), "RGBA").save(root / "tile_rgba.png")
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "sub" / "odd.TIF")
    (root / "empty.png").write_bytes(b"")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def test_folder_input_csv_columns_and_error_rows(tiny_model_dir, tile_dir, tmp_path, capsys):
    script = load_script("predict")
    out = tmp_path / "pred.csv"
    assert script.main(["--model", str(tiny_model_dir), "--inputs", str(tile_dir), "--output", str(out),
                        "--batch_size", "3", "--no_progress"]) == 0
    columns, rows = read_csv(out)
    assert columns == ["file", "label", "score", "error", *CLASS_NAMES]
    by_name = {Path(r["file"]).name: r for r in rows}
    assert set(by_name) == {*(f"tile_{i}.png" for i in range(5)), "tile_rgba.png", "odd.TIF", "empty.png", "broken.jpg"}
    for name in ("empty.png", "broken.jpg"):
        assert by_name[name]["error"] and by_name[name]["label"] == "" and by_name[name][CLASS_NAMES[0]] == ""
    good = [r for r in rows if not r["error"]]
    assert len(good) == 7
    for row in good:
        probs = np.array([float(row[c]) for c in CLASS_NAMES])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == CLASS_NAMES[int(probs.argmax())] and float(row["score"]) == pytest.approx(probs.max())
    assert "2 unreadable" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name != "pred.csv"]  # no temp file left


def test_glob_and_file_inputs_and_top_k(tiny_model_dir, tile_dir, tmp_path):
    script = load_script("predict")
    out = tmp_path / "pred.csv"
    assert script.main(["--model", str(tiny_model_dir), "--inputs", str(tile_dir / "tile_[0-2].png"),
                        str(tile_dir / "sub" / "odd.TIF"), "--output", str(out), "--top_k", "3", "--no_progress"]) == 0
    columns, rows = read_csv(out)
    assert columns[-4:] == ["top2_label", "top2_score", "top3_label", "top3_score"]
    assert [Path(r["file"]).name for r in rows] == ["tile_0.png", "tile_1.png", "tile_2.png", "odd.TIF"]
    for row in rows:
        scores = [float(row["score"]), float(row["top2_score"]), float(row["top3_score"])]
        assert scores == sorted(scores, reverse=True) and len({row["label"], row["top2_label"], row["top3_label"]}) == 3
    # recursive glob, extension case is ignored for globs and folders alike
    assert sorted(Path(p).name for p in iter_input_files([str(tile_dir / "**" / "*.[Tt][Ii][Ff]")])) == ["odd.TIF"]


def test_bad_arguments_exit_2(tiny_model_dir, tmp_path, capsys):
    script = load_script("predict")
    assert (
        script.main(["--model", str(tiny_model_dir), "--inputs", str(tmp_path / "missing"), "--output", "x.csv"]) == 2
    )
    assert script.main(["--model", str(tiny_model_dir), "--inputs", str(tmp_path / "*.png"), "--output", "x.csv"]) == 2
    assert script.main(["--model", str(tiny_model_dir), "--inputs", str(tmp_path), "--batch_size", "0"]) == 2
    assert "error:" in capsys.readouterr().err


def test_batched_equals_one_at_a_time_and_processor(predictor, tile_dir):
    paths = sorted(str(p) for p in tile_dir.glob("tile_*.png"))
    batched = np.stack([r.probs for r in predictor.predict_files(paths)])
    one = TilePredictor(predictor.model, make_image_processor(32), batch_size=1, num_workers=0, bf16=False)
    single = np.stack([r.probs for r in one.predict_files(paths)])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    overlapped = TilePredictor(predictor.model, make_image_processor(32), batch_size=2, num_workers=2, bf16=False,
                               overlap=True)
    np.testing.assert_allclose(np.stack([r.probs for r in overlapped.predict_files(paths)]), batched, atol=1e-5)
    # the pixels of the saved processor (the way pipeline() runs the model), on tiles decoded by the
    # package's mode rule (the RGBA tile goes onto white): only the batch differs
    processor = make_image_processor(32)
    images = [to_rgb8(Image.open(p)) for p in paths]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(predictor.pixel_values([np.asarray(im) for im in images]), pixel_values)
    with torch.inference_mode():
        reference = predictor.model(pixel_values=pixel_values).logits.softmax(-1).numpy()
    np.testing.assert_allclose(batched, reference, atol=1e-5)
    assert (batched.argmax(1) == reference.argmax(1)).all()


def test_tta_is_mean_over_dihedral_views(tiny_model_dir, tile_dir, tmp_path):
    tta = TilePredictor.from_pretrained(str(tiny_model_dir), device="cpu", batch_size=4, tta=True, bf16=False)
    paths = sorted(str(p) for p in tile_dir.glob("tile_*.png"))
    probs = np.stack([r.probs for r in tta.predict_files(paths)])
    pixel_values = tta.pixel_values([load_rgb8(p) for p in paths])
    plain = TilePredictor(tta.model, make_image_processor(32), batch_size=4, bf16=False)
    manual = torch.stack([plain.predict_pixel_values(v) for v in dihedral_views(pixel_values)]).mean(0)
    np.testing.assert_allclose(probs, manual.numpy(), atol=1e-5)
    assert not np.allclose(probs, plain.predict_pixel_values(pixel_values).numpy(), atol=1e-4)
    script = load_script("predict")
    assert script.main(["--model", str(tiny_model_dir), "--inputs", *paths, "--output", str(tmp_path / "t.csv"),
                        "--tta", "--no_progress", "--bf16", "false"]) == 0
    _, rows = read_csv(tmp_path / "t.csv")
    np.testing.assert_allclose([[float(r[c]) for c in CLASS_NAMES] for r in rows], probs, atol=2e-6)


@pytest.mark.parametrize("workers, overlap", [(0, False), (2, False), (2, True)])
def test_streaming_consumes_input_lazily(predictor, tile_dir, workers, overlap):
    """10 000 paths of one small tile: the first rows come out after reading only a prefetch window."""
    one = str(tile_dir / "tile_0.png")
    consumed = 0

    def paths():
        nonlocal consumed
        for _ in range(10_000):
            consumed += 1
            yield one

    stream = TilePredictor(predictor.model, make_image_processor(32), batch_size=4, num_workers=workers,
                           overlap=overlap)
    rows = stream.predict_files(paths())
    first = [next(rows) for _ in range(5)]
    assert all(r.error == "" for r in first)
    assert consumed <= 2 * 4 + 2 * 4  # two batches + the prefetch window (two batches), not 10 000
    rows.close()


def test_failed_run_leaves_no_partial_csv(predictor, tile_dir, tmp_path):
    def paths():
        yield str(tile_dir / "tile_0.png")
        raise RuntimeError("disk gone")

    out = tmp_path / "pred.csv"
    with pytest.raises(RuntimeError, match="disk gone"):
        predictor.predict_to_csv(paths(), out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bf16_option_runs(predictor, tile_dir):
    bf16 = TilePredictor(predictor.model, make_image_processor(32), batch_size=4, bf16=True)
    assert bf16.bf16 and bf16.attn_implementation == hardware.default_attn_implementation("cpu", True, training=False)
    rows = list(bf16.predict_files([str(tile_dir / "tile_1.png")]))
    assert rows[0].probs.sum() == pytest.approx(1.0, abs=1e-3)
    fp32 = list(predictor.predict_files([str(tile_dir / "tile_1.png")]))
    np.testing.assert_allclose(rows[0].probs, fp32[0].probs, atol=0.05)
    # bf16 runs a bf16 copy: the model passed in keeps its fp32 weights (it may still be trained or saved)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert next(predictor.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("cpu_bf16, amx, attn", [(True, True, "sdpa"), (True, False, "eager"), (False, False, "sdpa")])
def test_bf16_and_attention_auto_follow_the_hardware(predictor, monkeypatch, cpu_bf16, amx, attn):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(hardware, "cpu_has_amx", lambda: amx)
    auto = TilePredictor(predictor.model, make_image_processor(32), device="cpu")
    assert auto.bf16 is cpu_bf16
    assert auto.attn_implementation == attn  # the kernel measured faster for inference on such a CPU
    assert auto.model.config._attn_implementation == auto.attn_implementation
    forced = TilePredictor(predictor.model, make_image_processor(32), device="cpu", bf16=False,
                           attn_implementation="eager")
    assert not forced.bf16 and forced.attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        TilePredictor(predictor.model, make_image_processor(32), attn_implementation="flash")
    TilePredictor(predictor.model, make_image_processor(32), bf16=False)  # back to fp32 + SDPA for other tests


@pytest.mark.parametrize("flag, expected", [([], None), (["--bf16"], True), (["--bf16", "false"], False),
                                            (["--bf16", "TRUE"], True), (["--bf16", "auto"], None)])
def test_script_bf16_flag(flag, expected, tiny_model_dir, tile_dir, tmp_path, monkeypatch):
    script = load_script("predict")
    seen = {}
    original = TilePredictor.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen["bf16"] = kwargs.get("bf16")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(TilePredictor, "from_pretrained", classmethod(spy))
    assert script.main(["--model", str(tiny_model_dir), "--inputs", str(tile_dir / "tile_0.png"), "--output",
                        str(tmp_path / "p.csv"), "--no_progress", *flag]) == 0
    assert seen["bf16"] is expected


def test_script_bad_bf16_value_exits_2(tiny_model_dir, tile_dir, tmp_path, capsys):
    script = load_script("predict")
    assert script.main(["--model", str(tiny_model_dir), "--inputs", str(tile_dir), "--output", str(tmp_path / "p.csv"),
                        "--bf16", "maybe"]) == 2
    assert "--bf16 must be auto, true or false" in capsys.readouterr().err


def test_probability_columns_are_plain_class_names(predictor):
    from hf_tissue_vit.training import PREDICTION_COLUMNS

    assert probability_columns(CLASS_NAMES, PREDICTION_COLUMNS) == CLASS_NAMES  # training's test_predictions.csv
    assert predictor.csv_columns(2)[4:-2] == CLASS_NAMES  # predict.py: file, label, score, error, classes, top2
    with pytest.raises(ValueError, match="clash"):
        probability_columns(["Tumor", "label"], PREDICTION_COLUMNS)
    with pytest.raises(ValueError, match="clash"):
        probability_columns(["Tumor", "Tumor"], PREDICTION_COLUMNS)


# --- the model gets exactly the saved processor's pixel_values -----------------------------------
def tiny_convnext(image_size: int = 32):
    """A random tiny ``ConvNextForImageClassification`` (two stages, widths 8 and 16) with the 6 classes."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=image_size,
                            id2label=dict(enumerate(CLASS_NAMES)), label2id={n: i for i, n in enumerate(CLASS_NAMES)})
    return ConvNextForImageClassification(config).eval()


def processor_for(kind: str):
    from transformers import (
        BitImageProcessorPil,
        ConvNextImageProcessorPil,
        ViTImageProcessorPil,
    )

    return {
        "vit_bicubic": lambda: ViTImageProcessorPil(resample=Image.BICUBIC, size={"height": 32, "width": 32}),
        "bit_shortest_edge_crop": lambda: BitImageProcessorPil(size={"shortest_edge": 36},
                                                               crop_size={"height": 32, "width": 32}),
        "convnext_crop_pct": lambda: ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875),
    }[kind]()


@pytest.mark.parametrize("model_kind, processor_kind", [("vit", "vit_bicubic"), ("vit", "bit_shortest_edge_crop"),
                                                        ("convnext", "convnext_crop_pct"), ("convnext", "vit_bicubic")])
def test_probabilities_are_the_model_on_the_saved_processors_pixels(model_kind, processor_kind, tmp_path):
    """Bicubic, shortest-edge + center crop and ConvNeXT crop_pct processors, square and non-square
    tiles: the predictor's probabilities are the model's on the saved processor's pixel_values."""
    from conftest import save_model_dir, tiny_vit
    from transformers import AutoImageProcessor

    model = tiny_vit() if model_kind == "vit" else tiny_convnext()
    save_model_dir(model, tmp_path / "model")
    processor_for(processor_kind).save_pretrained(tmp_path / "model")  # replaces the package's processor
    rng = np.random.default_rng(1)
    paths = []
    for i, shape in enumerate([(35, 35), (150, 150), (30, 41), (47, 36), (32, 32)]):
        paths.append(tmp_path / f"tile_{i}.png")
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(paths[-1])
    predictor = TilePredictor.from_pretrained(str(tmp_path / "model"), device="cpu", batch_size=8, bf16=False)
    assert predictor.processor_transform.fast
    probs = np.stack([r.probs for r in predictor.predict_files(paths)])
    processor = AutoImageProcessor.from_pretrained(tmp_path / "model")
    pixel_values = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    assert torch.equal(predictor.pixel_values([load_rgb8(p) for p in paths]), pixel_values)
    with torch.inference_mode():
        reference = predictor.model(pixel_values=pixel_values).logits.softmax(-1).numpy()
    np.testing.assert_allclose(probs, reference, atol=1e-6)
    tiles = [load_rgb8(p) for p in paths]
    np.testing.assert_allclose(predictor.predict_tiles(tiles).numpy(), reference, atol=1e-6)


def test_slow_path_processor_gives_its_own_pixels(predictor, tile_dir, caplog):
    """A processor the fast path does not reproduce (EfficientNet's own rescale) is called itself per
    batch, with a warning saying so; the probabilities are still the model's on its pixel_values."""
    from transformers import EfficientNetImageProcessorPil

    processor = EfficientNetImageProcessorPil(size={"height": 32, "width": 32}, rescale_offset=True)
    with caplog.at_level("WARNING", logger="hf_tissue_vit.transforms.processor"):
        slow = TilePredictor(predictor.model, processor, batch_size=3, num_workers=2, bf16=False)
    assert not slow.processor_transform.fast and "slow path" in caplog.text
    paths = sorted(str(p) for p in tile_dir.glob("tile_*.png"))
    probs = np.stack([r.probs for r in slow.predict_files(paths)])
    pixel_values = processor([Image.fromarray(load_rgb8(p)) for p in paths], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        reference = slow.model(pixel_values=pixel_values).logits.softmax(-1).numpy()
    np.testing.assert_allclose(probs, reference, atol=1e-6)


def test_convnext_model_predicts_without_attention_warnings(tmp_path, tile_dir, caplog):
    """pipeline() runs any image classifier; so does the predictor (no attention kernel to pick)."""
    from conftest import save_model_dir

    save_model_dir(tiny_convnext(), tmp_path / "convnext")
    with caplog.at_level("WARNING"):
        predictor = TilePredictor.from_pretrained(str(tmp_path / "convnext"), device="cpu", batch_size=4)
    assert not [r for r in caplog.records if r.name.startswith("hf_tissue_vit")]
    rows = list(predictor.predict_files(sorted(str(p) for p in tile_dir.glob("*.png"))))
    assert len(rows) == 7 and sum(bool(r.error) for r in rows) == 1  # empty.png
    assert all(r.probs.sum() == pytest.approx(1.0, abs=1e-3) for r in rows if not r.error)
