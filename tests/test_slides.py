"""Whole-slide tissue maps (hf_tissue_vit.slides, scripts/tissue_map.py on slides).

The slides are synthetic pyramidal JPEG TIFFs (tests/slide_helpers.py) of a known layout of tiles:
real Kather tiles from ../shared when present, synthetic ones otherwise, on glass. The model is a
real saved ViT that classifies those tiles by their colours, so every tissue cell of the map must get
its tile's class, and fractions, areas and GeoJSON polygons follow from the layout by hand.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script, tile_pixels
from PIL import Image
from slide_helpers import (
    DEMO_LAYOUT_TEXT,
    KATHER_MPP,
    at_mpp,
    candidate_tiles,
    colour_vit,
    corrupt_tile,
    glass,
    layout_image,
    parse_layout,
    save_model,
    select_tiles,
    write_demo,
    write_pyramid,
)

from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.predict import TilePredictor
from hf_tissue_vit.slides import (
    BACKGROUND,
    UNREADABLE,
    OpenSlideReader,
    SlideMapOptions,
    map_slide,
    open_slide,
    plan_windows,
    tissue_mask,
)
from hf_tissue_vit.slides.tissue import remove_small_components

pytest.importorskip("openslide", reason="the [wsi] extra (openslide-python, openslide-bin) is not installed")
pytest.importorskip("tifffile", reason="tifffile writes the synthetic slides")
pytest.importorskip("imagecodecs", reason="tifffile needs imagecodecs for JPEG tiles")

ROOT = Path(__file__).resolve().parents[1]
B = BACKGROUND
LAYOUT = np.array([
    [B, B, B, B, B, B, B, B],
    [B, 0, 0, 1, 1, 2, 2, B],
    [B, 0, 3, 3, 1, 4, 2, B],
    [B, 5, 5, 3, 4, 4, B, B],
    [B, 5, 1, 2, 0, 3, 5, B],
    [B, B, B, B, B, B, B, B],
])
CELL_UM = 150 * KATHER_MPP  # one layout cell: a 150 px Kather tile


@pytest.fixture(scope="module")
def colour_model():
    """(model, processor, tiles it classifies right): the source of every slide below."""
    candidates = candidate_tiles()
    model, processor = colour_vit(candidates, CLASS_NAMES)
    tiles = select_tiles(model, processor, candidates)
    assert all(len(t) for t in tiles.values()), {k: len(t) for k, t in tiles.items()}
    return model, processor, tiles


@pytest.fixture(scope="module")
def predictor(colour_model) -> TilePredictor:
    model, processor, _ = colour_model
    return TilePredictor(model, processor, batch_size=8, bf16=False, num_workers=0)


@pytest.fixture(scope="module")
def slides(colour_model, tmp_path_factory) -> dict[str, Path]:
    """The layout as a 40x (0.25 µm/px) and a 20x (0.5 µm/px) three-level pyramid, and the same
    40x slide without resolution tags."""
    folder = tmp_path_factory.mktemp("slides")
    image = layout_image(LAYOUT, colour_model[2])
    return {
        "40x": write_pyramid(folder / "layout_40x.tif", at_mpp(image, 0.25), 0.25),
        "20x": write_pyramid(folder / "layout_20x.tif", at_mpp(image, 0.5), 0.5),
        "no_mpp": write_pyramid(folder / "layout_no_mpp.tif", at_mpp(image, 0.25), None),
    }


@pytest.fixture(scope="module")
def model_dir(colour_model, tmp_path_factory) -> Path:
    """The colour model saved like a training run, with config.mpp = 0.495."""
    model, processor, _ = colour_model
    return save_model(model, processor, tmp_path_factory.mktemp("model") / "colour_vit")


def _options(**kw) -> SlideMapOptions:
    return SlideMapOptions(progress=False, **kw)


# --- reading and resolution ------------------------------------------------------------------
def test_reader_levels_and_mpp(slides):
    with open_slide(slides["40x"]) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert [lv.downsample for lv in reader.levels] == pytest.approx([1, 2, 4], rel=1e-2)  # 445.5 px rounds up
        assert reader.mpp == pytest.approx(0.25) and reader.mpp_source == "openslide.mpp-x/-y"
        assert reader.dimensions == (8 * 297, 6 * 297)
        region = np.asarray(reader.read_region(0, 0, 2, 20, 20))
        assert region.shape == (20, 20, 3) and region.min() > 200  # glass
    with open_slide(slides["no_mpp"]) as reader:
        assert reader.mpp is None
    with open_slide(slides["no_mpp"], slide_mpp=0.3) as reader:
        assert reader.mpp == 0.3 and reader.mpp_source == "--slide_mpp"


def test_level_choice_and_window_size(slides):
    with open_slide(slides["40x"]) as reader:
        g = plan_windows(reader, 150, 150, KATHER_MPP)  # level 1 is 0.5 µm/px, coarser than 0.495
        assert (g.level, g.scale, g.window0, g.rows, g.cols) == (0, pytest.approx(1.98), pytest.approx(297), 6, 8)
        assert plan_windows(reader, 150, 150, 0.5).level == 1
        assert plan_windows(reader, 150, 150, 1.2).level == 2
        with pytest.raises(ValueError, match="finer than the finest level"):
            plan_windows(reader, 150, 150, 0.1)
        with pytest.raises(ValueError, match="smaller than one window"):
            plan_windows(reader, 150, 150, 50.0)
    with open_slide(slides["20x"]) as reader:  # 0.5 -> 0.495: level 0, upsampled 1.01x
        g = plan_windows(reader, 150, 150, KATHER_MPP)
        assert (g.level, g.window0, g.rows, g.cols) == (0, pytest.approx(148.5), 6, 8)
    with open_slide(slides["no_mpp"]) as reader, pytest.raises(ValueError, match="--slide_mpp"):
        plan_windows(reader, 150, 150, KATHER_MPP)


# --- the map ---------------------------------------------------------------------------------
@pytest.mark.parametrize("slide", ["40x", "20x"])
def test_map_matches_layout(slides, predictor, slide):
    result = map_slide(predictor, str(slides[slide]), _options(workers=2), KATHER_MPP)
    np.testing.assert_array_equal(result.labels, LAYOUT)
    side = CELL_UM / (0.25 if slide == "40x" else 0.5)  # 297 or 148.5 level-0 px per cell
    assert result.geometry.cell_box(2, 3) == pytest.approx((3 * side, 2 * side, 4 * side, 3 * side))
    assert np.isnan(result.probs[LAYOUT == B]).all() and not np.isnan(result.probs[LAYOUT != B]).any()
    fractions = result.fractions()
    tissue = int((LAYOUT != B).sum())
    cell_mm2 = (CELL_UM / 1000) ** 2
    assert fractions["tissue_area_mm2"] == pytest.approx(tissue * cell_mm2, rel=1e-6)
    for k, name in enumerate(CLASS_NAMES):
        n = int((k == LAYOUT).sum())
        assert fractions["classes"][name]["cells"] == n
        assert fractions["classes"][name]["area_mm2"] == pytest.approx(n * cell_mm2, rel=1e-6)
        assert fractions["classes"][name]["fraction_of_tissue"] == pytest.approx(n / tissue)
    assert fractions["background_windows"] == int((LAYOUT == B).sum()) and fractions["unreadable_windows"] == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_threads_do_not_change_the_map(slides, predictor, overlap):
    one = map_slide(predictor, str(slides["40x"]), _options(workers=0), KATHER_MPP)
    many = map_slide(predictor, str(slides["40x"]), _options(workers=3, stride=75, overlap=overlap), KATHER_MPP)
    np.testing.assert_array_equal(one.labels, LAYOUT)
    np.testing.assert_array_equal(many.labels[::2, ::2], LAYOUT)  # stride 75: every other window is a cell
    np.testing.assert_allclose(many.probs[::2, ::2], one.probs, atol=1e-5)
    assert many.labels.shape == (11, 15)


def test_outputs_and_geojson_coordinates(slides, model_dir, tmp_path):
    script = load_script("tissue_map")
    out = tmp_path / "map"
    assert script.main(["--model", str(model_dir), "--image", str(slides["20x"]), "--output_dir", str(out),
                        "--bf16", "false", "--batch_size", "8"]) == 0
    np.testing.assert_array_equal(np.load(out / "labels.npy"), LAYOUT)
    assert np.load(out / "probabilities.npy").shape == (6, 8, 6)
    data = json.loads((out / "tissue_map.geojson").read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == int((LAYOUT != B).sum())
    side = CELL_UM / 0.5  # 148.5 level-0 px per cell on the 20x slide
    seen = set()
    for feature in data["features"]:
        props = feature["properties"]
        name = props["classification"]["name"]
        if name in seen:
            continue
        seen.add(name)
        ring = feature["geometry"]["coordinates"][0]
        c, r = round(ring[0][0] / side), round(ring[0][1] / side)
        assert LAYOUT[r, c] == CLASS_NAMES.index(name)
        assert ring == [[c * side, r * side], [(c + 1) * side, r * side], [(c + 1) * side, (r + 1) * side],
                        [c * side, (r + 1) * side], [c * side, r * side]]
        assert props["objectType"] == "tile" and len(props["classification"]["color"]) == 3
        probs = props["measurements"]
        assert max(probs, key=probs.get) == f"{name} probability" and sum(probs.values()) == pytest.approx(1, abs=1e-3)
    assert seen == set(CLASS_NAMES)
    # the first Tumor cell by hand: layout (1, 1) -> level-0 square 148.5..297 px
    tumor = next(f for f in data["features"] if f["properties"]["classification"]["name"] == "Tumor")
    assert tumor["geometry"]["coordinates"][0][:3] == [[148.5, 148.5], [297.0, 148.5], [297.0, 297.0]]
    fractions = json.loads((out / "class_fractions.json").read_text())
    assert fractions["level"] == 0 and fractions["slide_mpp"] == pytest.approx(0.5)
    assert fractions["target_mpp"] == pytest.approx(KATHER_MPP)  # the model's config.mpp
    csv_lines = (out / "class_fractions.csv").read_text().splitlines()
    assert csv_lines[0] == "class,cells,area_mm2,fraction_of_tissue" and csv_lines[-1].startswith("Unreadable,0,")
    with Image.open(out / "tissue_map.png") as im:
        assert im.size[0] > 300
    assert (out / "summary.csv").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_several_slides_folder_and_glob(slides, model_dir, tmp_path):
    script = load_script("tissue_map")
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("40x", "20x"):
        os.symlink(slides[name], folder / slides[name].name)
    out = tmp_path / "maps"
    args = ["--model", str(model_dir), "--output_dir", str(out), "--bf16", "false"]
    assert script.main([*args, "--image", str(folder / "*_40x.tif"), str(folder)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["layout_20x", "layout_40x", "summary.csv"]
    for name in ("layout_20x", "layout_40x"):
        np.testing.assert_array_equal(np.load(out / name / "labels.npy"), LAYOUT)
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and "Tumor fraction" in rows[0] and "tissue_area_mm2" in rows[0]
    tumor = int((LAYOUT == 0).sum()) / int((LAYOUT != B).sum())
    assert all(f"{tumor:.6g}" in row for row in rows[1:])


def test_a_slide_failing_while_mapped_does_not_stop_the_others(slides, model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = folder / "a_good.tif"
    good.symlink_to(slides["40x"])
    bad = folder / "b_bad_overview.tif"
    bad.write_bytes(slides["40x"].read_bytes())
    corrupt_tile(bad, page=1, index=0)  # the overview (about 1024 px) is read from level 1
    out = tmp_path / "maps"
    code = load_script("tissue_map").main(["--model", str(model_dir), "--image", str(folder), "--output_dir", str(out),
                                           "--bf16", "false"])
    assert code == 1
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[1].startswith(str(good)) and rows[2].startswith(str(bad)) and "SlideReadError" in rows[2]
    np.testing.assert_array_equal(np.load(out / "a_good" / "labels.npy"), LAYOUT)
    assert not (out / "b_bad_overview").exists()


def test_plain_image_keeps_windows_of_tile_pixels(predictor, colour_model, tmp_path):
    """A PNG has no µm/px: windows are --tile image pixels, as before slides were supported."""
    image = layout_image(LAYOUT, colour_model[2])
    Image.fromarray(image).save(tmp_path / "plain.png")
    result = map_slide(predictor, str(tmp_path / "plain.png"), _options(), KATHER_MPP)
    assert result.geometry.scale == 1.0 and result.slide["reader"] == "image"
    np.testing.assert_array_equal(result.labels, LAYOUT)
    assert result.fractions()["tissue_area_mm2"] is None  # no scale, no mm²
    scaled = map_slide(predictor, str(tmp_path / "plain.png"), _options(slide_mpp=KATHER_MPP), KATHER_MPP)
    assert scaled.fractions()["tissue_area_mm2"] == pytest.approx(int((LAYOUT != B).sum()) * (CELL_UM / 1000) ** 2)


# --- bad input -------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(slides, model_dir, tmp_path, capsys):
    script = load_script("tissue_map")

    def run(image, *extra) -> tuple[int, str]:
        code = script.main(["--model", str(model_dir), "--image", str(image), "--output_dir",
                            str(tmp_path / "out"), "--bf16", "false", *extra])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        return code, "\n".join(errors)  # the one line the user gets (progress bars aside)

    (tmp_path / "not_a_slide.svs").write_bytes(b"this is not a slide")
    code, err = run(tmp_path / "not_a_slide.svs")
    assert code == 2 and "not_a_slide.svs" in err and "neither a slide nor an image" in err
    code, err = run(slides["no_mpp"])
    assert code == 2 and "--slide_mpp" in err and "layout_no_mpp.tif" in err and err.count("\n") == 0
    assert run(slides["no_mpp"], "--slide_mpp", "0.25")[0] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "labels.npy"), LAYOUT)
    code, err = run(slides["40x"], "--mpp", "0.05")
    assert code == 2 and "--mpp 0.05" in err and "finer" in err
    code, err = run(tmp_path / "missing.svs")
    assert code == 2 and "missing.svs" in err


def test_model_without_mpp_needs_mpp(colour_model, slides, tmp_path, capsys):
    model, processor, _ = colour_model
    del model.config.mpp
    try:
        path = save_model(model, processor, tmp_path / "no_mpp_model")
    finally:
        model.config.mpp = KATHER_MPP
    script = load_script("tissue_map")
    args = ["--model", str(path), "--image", str(slides["40x"]), "--output_dir", str(tmp_path / "o"), "--bf16", "false"]
    assert script.main(args) == 2 and "--mpp" in capsys.readouterr().err
    assert script.main([*args, "--mpp", str(KATHER_MPP)]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "labels.npy"), LAYOUT)


def test_slide_without_tissue(predictor, tmp_path):
    path = write_pyramid(tmp_path / "empty.tif", glass(1200, 1500, np.random.default_rng(1)), 0.25)
    result = map_slide(predictor, str(path), _options(), KATHER_MPP)
    assert (result.labels == BACKGROUND).all() and result.fractions()["tissue_area_mm2"] == 0
    from hf_tissue_vit.slides import save_slide_map

    paths = save_slide_map(result, tmp_path / "out")
    assert json.loads(Path(paths["tissue_map.geojson"]).read_text())["features"] == []


def test_corrupt_tile_is_reported_and_the_run_goes_on(colour_model, predictor, tmp_path):
    image = at_mpp(layout_image(LAYOUT, colour_model[2]), 0.25)
    path = write_pyramid(tmp_path / "corrupt.tif", image, 0.25)
    tiles_across = -(-image.shape[1] // 256)
    corrupt_tile(path, page=0, index=1 * tiles_across + 2)  # level-0 x 512..768, y 256..512
    result = map_slide(predictor, str(path), _options(workers=2), KATHER_MPP)
    expected = LAYOUT.copy()
    expected[1, 1] = expected[1, 2] = UNREADABLE  # the two tissue windows on that tile (x 297..891, y 297..594)
    np.testing.assert_array_equal(result.labels, expected)
    assert len(result.errors) == 2 and all("Corrupt JPEG" in e or "JPEG" in e for e in result.errors)
    assert result.fractions()["unreadable_windows"] == 2


def test_slide_regions_become_rgb_on_white():
    """OpenSlide gives RGBA: transparent where nothing was scanned (glass), opaque elsewhere."""
    from hf_tissue_vit.imaging import to_rgb8

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (200, 50, 150, 255)  # scanned tissue
    out = np.asarray(to_rgb8(Image.fromarray(rgba, "RGBA")))
    assert (out[:2] == (200, 50, 150)).all() and (out[2:] == 255).all()
    opaque = np.asarray(to_rgb8(Image.fromarray(np.dstack([rgba[..., :3], np.full((4, 4), 255, np.uint8)]), "RGBA")))
    assert (opaque == rgba[..., :3]).all()


# --- tissue detection ------------------------------------------------------------------------
def test_tissue_mask_drops_small_pieces():
    rgb = np.full((60, 80, 3), 245, np.uint8)
    rgb[10:40, 10:40] = (180, 80, 140)  # tissue, 900 px
    rgb[50, 70] = (180, 80, 140)  # a speck
    rgb[45:47, 2:4] = (60, 40, 120)  # 4 px of dust
    rgb[0:3, 60:80] = 0  # black scanner padding
    mask = tissue_mask(rgb)
    assert mask[10:40, 10:40].all() and mask[50, 70] and not mask[0:3, 60:80].any()
    clean = tissue_mask(rgb, min_area_px=10)
    assert clean.sum() == 900 and clean[10:40, 10:40].all()


def test_components_are_eight_connected():
    mask = np.zeros((6, 6), bool)
    mask[[0, 1, 2, 3], [0, 1, 2, 3]] = True  # a diagonal line of 4 px: one component
    mask[5, 5] = True
    kept = remove_small_components(mask, 3)
    assert kept[[0, 1, 2, 3], [0, 1, 2, 3]].all() and not kept[5, 5]


# --- the README commands ---------------------------------------------------------------------
def _doc_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    text = readme.split("## 5. Whole-slide images", 1)[1].split("\n## ", 1)[0]
    blocks = text.split("```bash")[1:]
    return [line.strip() for block in blocks for line in block.split("```")[0].splitlines()
            if line.strip().startswith("python scripts/tissue_map.py")]


def test_readme_slide_command(colour_model, tmp_path):
    """The command of README.md, verbatim, in a folder holding its model and slide."""
    commands = _doc_commands()
    assert commands, "README.md shows no tissue_map.py command"
    work = write_demo(tmp_path / "work", *colour_model)  # the model and slide of the README picture
    layout = parse_layout(DEMO_LAYOUT_TEXT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in commands:
        argv = shlex.split(command)
        argv[0:2] = [sys.executable, str(ROOT / argv[1])]
        done = subprocess.run(argv, check=False, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    out = work / "maps" / "synthetic_40x"
    assert (out / "tissue_map.geojson").is_file() and (out / "tissue_map.png").is_file()
    np.testing.assert_array_equal(np.load(out / "labels.npy"), layout)  # bf16 or not: select_tiles checked both


# --- memory ----------------------------------------------------------------------------------
_MEMORY_RUN = textwrap.dedent("""
    import resource, subprocess, sys
    done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"PEAK_MB {peak_mb:.0f} RC {done.returncode}")
    print(done.stderr[-2000:], file=sys.stderr)
""")


@pytest.mark.slow
def test_gigapixel_slide_memory_stays_flat(model_dir, tmp_path):
    """A 40000 x 40000 px slide (four levels, mostly glass, one band of tissue) maps with a peak
    RSS under 2 GB; the level-0 pixels alone would be 4.8 GB."""
    from slide_helpers import write_tiled_pyramid

    size, band = 40000, (16384, 16384 + 2048)
    rng = np.random.default_rng(0)
    tissue = tile_pixels("Stroma", 256, rng)
    white = np.full((256, 256, 3), 245, np.uint8)

    def draw(ds: int, y0: int, x0: int, n: int) -> np.ndarray:
        rows = np.arange(y0, y0 + n) * ds
        inside = (rows >= band[0]) & (rows < band[1])
        return np.where(inside[:, None, None], tissue, white) if inside.any() else white

    path = write_tiled_pyramid(tmp_path / "big.tif", size, size, 0.25, (1, 4, 16, 64), draw)
    out = tmp_path / "big_map"
    cmd = [sys.executable, str(ROOT / "scripts" / "tissue_map.py"), "--model", str(model_dir), "--image", str(path),
           "--output_dir", str(out), "--bf16", "false", "--batch_size", "64"]
    done = subprocess.run([sys.executable, "-c", _MEMORY_RUN, *cmd], check=False, capture_output=True, text=True,
                          timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak_mb, rc = (int(v) for v in done.stdout.split()[1::2])
    assert rc == 0, done.stderr
    fractions = json.loads((out / "class_fractions.json").read_text())
    rows_in_band = 2048 / 297
    assert fractions["width"] == size and fractions["tissue_windows"] >= int(rows_in_band - 1) * (size // 297)
    assert peak_mb < 2048, f"peak RSS {peak_mb} MB"
    print(f"peak RSS {peak_mb} MB for {fractions['tissue_windows']} tissue windows")

