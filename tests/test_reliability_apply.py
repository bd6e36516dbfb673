"""Reliability of applying a model (issue 12): predict.py, tissue_map.py and attention_maps.py on inputs
and outputs that used to end in a traceback, a silent wrong answer, or gigabytes of memory.

* a huge image given to attention_maps.py is downscaled as it is read: memory stays flat, the log says so;
* an output that cannot be written is refused in one line before the model is loaded, and an OSError
  while writing becomes one line naming the path;
* images far from the training tile size and greyscale files get one warning each, with counts;
  whole-slide images are skipped with the reason; one broken file or dataset row is reported and the
  others are processed; no message shows ``<_io.BytesIO object at 0x...>``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hf_tissue_vit.modeling
from hf_tissue_vit.constants import CLASS_NAMES

REPO = Path(__file__).resolve().parents[1]


def write_tile(path: Path, size: tuple[int, int] = (32, 32), mode: str = "RGB", seed: int = 0) -> Path:
    """A random tile of ``size`` (width, height) in ``mode`` (RGB, L or I;16)."""
    rng = np.random.default_rng(seed)
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    elif mode == "L":
        Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8), "L").save(path)
    else:  # 16-bit grey PNG: PIL reads it back as I;16
        Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16)).save(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading a model fail the test: an output error must be found before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(hf_tissue_vit.modeling, "load_for_inference", refuse)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("hf_tissue_vit")]


# --- 1. a huge image in attention_maps.py: memory stays flat ---------------------------------------
# The child imports what every run needs first (torch, transformers, matplotlib: a few hundred MB that
# differ between machines) and reports its peak RSS before and after the run, so the test bounds what
# the image costs, not what the libraries cost.
_PEAK_RSS = textwrap.dedent("""
    import resource, runpy, sys
    import matplotlib.figure, torch, transformers.models.vit.modeling_vit, hf_tissue_vit.modeling
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.argv = ["attention_maps.py", *sys.argv[1:]]
    try:
        runpy.run_path({script!r}, run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    else:
        code = 0
    print("RSS_KB", base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "RC", code)
""")


def test_attention_maps_on_a_huge_image_stays_small_and_says_it_downscaled(tmp_path, tiny_model_dir):
    """6000x6000 px: the old code made full-size float maps and overlays (a peak about 5 GB above the
    libraries'); the image is now downscaled as it is read, so the run adds about one decoded image
    (6000 * 6000 * 3 bytes = 103 MiB) and small figures."""
    image = tmp_path / "huge.png"
    Image.new("RGB", (6000, 6000), (200, 100, 150)).save(image, compress_level=1)
    out = tmp_path / "att"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = _PEAK_RSS.format(script=str(REPO / "scripts" / "attention_maps.py"))
    done = subprocess.run([sys.executable, "-c", code, "--model", str(tiny_model_dir), "--images", str(image),
                           "--output_dir", str(out), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[0] == "RSS_KB" and last[-1] == "0", done.stdout + done.stderr
    base_mb, peak_mb = int(last[1]) / 1024, int(last[2]) / 1024  # ru_maxrss is in KiB on Linux
    assert peak_mb - base_mb < 600, f"peak RSS {peak_mb:.0f} MiB, {base_mb:.0f} MiB after the imports"
    assert "huge.png is 6000x6000 px: downscaled to 1024x1024 px" in done.stderr
    (figure,) = (out / "tiles").glob("*.png")
    with Image.open(figure) as fig:
        assert max(fig.size) < 3000  # the figure is drawn from the downscaled image


def test_explain_tiles_draws_a_large_array_at_most_max_side(tiny_model_dir):
    """Library callers passing a big array get maps at the drawn size, not at the array's."""
    from transformers import AutoImageProcessor, ViTForImageClassification

    from hf_tissue_vit.interpret import explain_tiles

    model = ViTForImageClassification.from_pretrained(tiny_model_dir)
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    big = np.full((2100, 1400, 3), 180, np.uint8)
    (item,) = explain_tiles(model, processor, [big])
    assert item.tile.shape == (1024, 683, 3)
    assert item.rollout.shape == (1024, 683) and item.heads.shape[1:] == (1024, 683)


# --- 6. outputs that cannot be written ----------------------------------------------------------------
def test_predict_output_that_is_a_folder_or_under_a_file_fails_before_the_model(
        tmp_path, tiny_model_dir, script, capsys, no_model_load):
    tile = write_tile(tmp_path / "tiles" / "a.png")
    predict = script("predict")
    folder = tmp_path / "out_folder"
    folder.mkdir()
    assert predict.main(["--model", str(tiny_model_dir), "--inputs", str(tile), "--output", str(folder)]) == 2
    line = one_error_line(capsys)
    assert "--output" in line and str(folder) in line and "is a folder" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    for output in (blocker / "pred.csv", blocker / "sub" / "pred.csv"):
        assert predict.main(["--model", str(tiny_model_dir), "--inputs", str(tile), "--output", str(output)]) == 2
        line = one_error_line(capsys)
        assert str(output) in line and str(blocker) in line and "is a file" in line


@pytest.mark.parametrize("name", ["tissue_map", "attention_maps"])
def test_output_dir_that_is_a_file_fails_before_the_model(name, tmp_path, tiny_model_dir, script, capsys,
                                                          no_model_load):
    image = write_tile(tmp_path / "image.png", (64, 64))
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    source = ["--image", str(image), "--tile", "32"] if name == "tissue_map" else ["--images", str(image)]
    for output_dir in (blocker, blocker / "sub"):
        assert script(name).main(["--model", str(tiny_model_dir), *source, "--output_dir", str(output_dir)]) == 2
        line = one_error_line(capsys)
        assert "--output_dir" in line and str(output_dir) in line and "is a file" in line
    assert blocker.read_text() == "in the way"


def _ro_mount_works() -> str | None:
    """None when ``unshare -rm`` + a read-only bind mount works here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount --bind -o ro $d $d && "
                            "! touch $d/x 2>/dev/null"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -rm / mount --bind -o ro unavailable: {probe.stderr.strip()}"


_RUN_SCRIPTS = textwrap.dedent("""
    import importlib.util, json, sys
    for name, argv in json.loads(sys.argv[1]):
        spec = importlib.util.spec_from_file_location("script_" + name, {scripts!r} + "/" + name + ".py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        print("RC=%s" % module.main(argv), flush=True)
""")


def test_read_only_outputs_fail_in_one_line_before_the_work(tmp_path, tiny_model_dir):
    """Root ignores chmod, so the outputs sit on a read-only bind mount (a private mount namespace)."""
    why = _ro_mount_works()
    if why:
        pytest.skip(why)
    image = str(write_tile(tmp_path / "image.png", (64, 64)))
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "existing").mkdir()
    model = ["--model", str(tiny_model_dir)]
    runs = [
        ("predict", [*model, "--inputs", image, "--output", f"{ro}/pred.csv"]),
        ("predict", [*model, "--inputs", image, "--output", f"{ro}/new/pred.csv"]),
        ("tissue_map", [*model, "--image", image, "--tile", "32", "--output_dir", f"{ro}/existing"]),
        ("attention_maps", [*model, "--images", image, "--output_dir", f"{ro}/new_maps"]),
    ]
    code = _RUN_SCRIPTS.format(scripts=str(REPO / "scripts"))
    shell = f'mount --bind -o ro "{ro}" "{ro}" && exec "$0" -c "$1" "$2"'
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", shell, sys.executable, code, json.dumps(runs)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.split() == ["RC=2"] * len(runs), done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(runs) and "Traceback" not in done.stderr, done.stderr
    for line, where in zip(errors, ["pred.csv", "new/pred.csv", "existing", "new_maps"]):
        assert f"{ro}/{where}" in line and "cannot be written" in line and "Read-only file system" in line


def test_an_oserror_while_writing_is_one_line_naming_the_output(tmp_path, tiny_model_dir, script, capsys,
                                                                monkeypatch):
    """The folder passed the check but went away (disk full, permissions changed) during the run."""
    import hf_tissue_vit.predict

    output = tmp_path / "pred.csv"

    def disk_full(rows, handle, *args, **kwargs):
        raise OSError(28, "No space left on device", str(output))

    monkeypatch.setattr(hf_tissue_vit.predict, "write_prediction_rows", disk_full)  # what predict.py writes with
    tile = write_tile(tmp_path / "a.png")
    assert script("predict").main(["--model", str(tiny_model_dir), "--inputs", str(tile),
                                   "--output", str(output), "--no_progress"]) == 2
    line = one_error_line(capsys)
    assert str(output) in line and "No space left on device" in line


# --- 11. clear words --------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_predict_warns_once_with_counts_on_far_sizes_and_greyscale(tmp_path, tiny_model_dir, script, caplog):
    """tiny_model_dir has no training record: its 32 px input size is the reference, so 1x1, 10x10 and
    200x200 are far (a side over 2x off), 20x20 and 60x60 are not."""
    tiles = tmp_path / "tiles"
    for name, size in (("a_1px", (1, 1)), ("b_10px", (10, 10)), ("c_wide", (200, 32)), ("d_ok", (32, 32)),
                       ("e_small_ok", (20, 20)), ("f_big_ok", (60, 60))):
        write_tile(tiles / f"{name}.png", size)
    write_tile(tiles / "g_grey.png", mode="L")
    write_tile(tiles / "h_grey16.png", mode="I;16")
    out = tmp_path / "pred.csv"
    caplog.set_level(logging.WARNING)
    assert script("predict").main(["--model", str(tiny_model_dir), "--inputs", str(tiles), "--output", str(out),
                                   "--batch_size", "3", "--no_progress"]) == 0
    assert len(read_rows(out)) == 8 and not any(r["error"] for r in read_rows(out))
    messages = warnings_of(caplog)
    far = [m for m in messages if "far from" in m]
    grey = [m for m in messages if "greyscale" in m]
    assert len(far) == 1 and len(grey) == 1, messages
    assert far[0].startswith("3 of 8 images are far from the 32x32 px") and "a_1px.png (1x1)" in far[0]
    assert "its input size" in far[0] and "2x" in far[0]
    assert grey[0].startswith("2 of 8 images are greyscale") and "I;16: 1, L: 1" in grey[0]


def test_the_reference_is_the_training_tile_size_when_recorded(tmp_path, trained_run_dir, script, caplog):
    """trained_run_dir learnt from 48 px tiles (its run records them) at a 32 px input: a 20 px tile is
    far from 48 (20 * 2 < 48) though not from 32; the recorded dataset.tile_size wins over both, and
    without it the training dataset's metadata is read."""
    tile = write_tile(tmp_path / "t20.png", (20, 20))
    caplog.set_level(logging.WARNING)
    assert script("predict").main(["--model", str(trained_run_dir), "--inputs", str(tile),
                                   "--output", str(tmp_path / "p.csv"), "--no_progress"]) == 0
    (far,) = [m for m in warnings_of(caplog) if "far from" in m]
    assert "48x48 px" in far and "its training run recorded" in far
    from hf_tissue_vit.modelfacts import is_far, training_tile_size

    assert training_tile_size(str(trained_run_dir))[0] == (48, 48)
    assert is_far((20, 20), (48, 48)) and not is_far((20, 20), (32, 32))
    recorded = tmp_path / "model"
    shutil.copytree(trained_run_dir, recorded)
    results = json.loads((recorded / "all_results.json").read_text())
    results["dataset"]["tile_size"] = [150, 150]
    (recorded / "all_results.json").write_text(json.dumps(results))
    assert training_tile_size(str(recorded)) == ((150, 150), "the tile size its training run recorded")
    del results["dataset"]["tile_size"]
    (recorded / "all_results.json").write_text(json.dumps(results))
    assert training_tile_size(str(recorded)) == ((48, 48), "the tile size of its training dataset")


def test_predict_skips_whole_slide_images_with_the_reason(tmp_path, tiny_model_dir, script, caplog, capsys):
    tile = write_tile(tmp_path / "tiles" / "a.png")
    slides = [tmp_path / "slide.svs", tmp_path / "scan.NDPI", tmp_path / "tiles" / "in_folder.mrxs"]
    for slide in slides:
        slide.write_bytes(b"II*\x00 not really a slide")
    out = tmp_path / "pred.csv"
    caplog.set_level(logging.WARNING)
    predict = script("predict")
    assert predict.main(["--model", str(tiny_model_dir), "--inputs", str(slides[0]), str(slides[1]),
                         str(tmp_path / "tiles"), "--output", str(out), "--no_progress"]) == 0
    assert [Path(r["file"]).name for r in read_rows(out)] == [tile.name]  # no error row per slide
    (skipped,) = [m for m in warnings_of(caplog) if "whole-slide" in m]
    assert skipped.startswith("skipped 3 whole-slide image(s)") and "scripts/tissue_map.py" in skipped
    assert "slide.svs" in skipped
    assert predict.main(["--model", str(tiny_model_dir), "--inputs", str(slides[0]), "--output", str(out)]) == 2
    line = one_error_line(capsys)
    assert "only whole-slide images" in line and "tissue_map.py" in line


def test_attention_maps_reports_a_broken_file_and_explains_the_others(tmp_path, tiny_model_dir, script, caplog):
    good = [write_tile(tmp_path / "tiles" / f"good_{i}.png", seed=i) for i in range(2)]
    broken = tmp_path / "tiles" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "att"
    caplog.set_level(logging.WARNING)
    assert script("attention_maps").main(["--model", str(tiny_model_dir), "--images", str(tmp_path / "tiles"),
                                          "--output_dir", str(out)]) == 0
    figures = sorted(p.name for p in (out / "tiles").glob("*.png"))
    assert len(figures) == len(good) and all("good_" in name for name in figures)
    (skipped,) = [m for m in warnings_of(caplog) if m.startswith("skipped")]
    assert str(broken) in skipped and "--images" in skipped


def make_dataset_with_a_broken_row(root: Path) -> Path:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    def png(seed: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    features = Features(image=ImageFeature(), label=ClassLabel(names=CLASS_NAMES), filename=Value("string"))
    splits = {}
    for split, broken in (("train", False), ("validation", False), ("test", True)):
        images = [{"bytes": png(k), "path": None} for k in range(2)]
        names = [f"{split}_{k}.png" for k in range(2)]
        if broken:
            images[1] = {"bytes": b"not an image at all", "path": None}
            names[1] = "corrupt_row.png"
        splits[split] = Dataset.from_dict({"image": images, "label": [0, 1], "filename": names}, features=features)
    DatasetDict(splits).save_to_disk(str(root))
    return root


def test_a_broken_dataset_row_is_named_by_its_file_not_by_bytesio(tmp_path, tiny_model_dir, script, caplog, capsys):
    dataset = make_dataset_with_a_broken_row(tmp_path / "dataset")
    out = tmp_path / "att"
    caplog.set_level(logging.WARNING)
    assert script("attention_maps").main(["--model", str(tiny_model_dir), "--dataset_dir", str(dataset),
                                          "--output_dir", str(out), "--n_per_class", "2"]) == 0
    assert len(list((out / "tiles").glob("*.png"))) == 1
    (skipped,) = [m for m in warnings_of(caplog) if m.startswith("skipped")]
    assert "corrupt_row.png" in skipped and "cannot be decoded" in skipped
    captured = capsys.readouterr()
    assert "BytesIO" not in skipped + captured.out + captured.err + caplog.text


def test_error_text_names_the_file_instead_of_an_object_repr():
    from hf_tissue_vit.imaging import decode_bytes
    from hf_tissue_vit.predict import error_text

    with pytest.raises(OSError) as raised:
        decode_bytes(b"junk bytes")
    assert "BytesIO" not in str(raised.value) and "10 bytes" in str(raised.value)  # fixed where it arises
    # PIL's own message, should another path still produce one, never reaches a user either
    pil_message = OSError("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b8e50>")
    text = error_text(pil_message, "tile_7.png")
    assert "BytesIO" not in text and "0x" not in text and "'tile_7.png'" in text
