"""Reliability of the small cases of issue 27: each drives the real script.

* ``evaluate_model.py --help`` prints its help (a ``%`` in a help text crashed argparse);
* ``predict.py`` with a folder and a glob that overlap writes one row per file;
* a float32 TIFF holding 0-255 values is refused with the reason, not read as white.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_tissue_vit.imaging import load_rgb8


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_help_prints(script, capsys):
    with pytest.raises(SystemExit) as stop:
        script("evaluate_model").main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--n_bootstrap" in out and "95% intervals" in out


def test_predict_overlapping_folder_and_glob_writes_one_row_per_file(tmp_path, tiny_model_dir, script):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(tiles / f"t{i}.png")
    out = tmp_path / "pred.csv"
    rc = script("predict").main(["--model", str(tiny_model_dir), "--inputs", str(tiles), f"{tiles}/*.png",
                                 str(tiles / "t1.png"), "--output", str(out), "--no_progress"])
    assert rc == 0
    files = [Path(row["file"]).name for row in _rows(out)]
    assert sorted(files) == ["t0.png", "t1.png", "t2.png"], files


def _float_tiff(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.float32), "F").save(path)
    with Image.open(path) as image:
        assert image.mode == "F"
    return path


def test_float_tiff_with_0_255_values_is_refused_with_the_reason(tmp_path, tiny_model_dir, script):
    rng = np.random.default_rng(0)
    wide = _float_tiff(tmp_path / "wide.tif", rng.uniform(0, 255, (32, 32)))
    unit = _float_tiff(tmp_path / "unit.tif", rng.uniform(0, 1, (32, 32)))
    with pytest.raises(ValueError, match=r"values up to 25\d.*0-1.*divide the values by 255"):
        load_rgb8(wide)
    assert 0 < load_rgb8(unit).mean() < 255
    out = tmp_path / "pred.csv"
    assert script("predict").main(["--model", str(tiny_model_dir), "--inputs", str(wide), str(unit),
                                   "--output", str(out), "--no_progress"]) == 0
    rows = {Path(row["file"]).name: row for row in _rows(out)}
    assert "values up to" in rows["wide.tif"]["error"], rows["wide.tif"]
    assert rows["unit.tif"]["error"] == ""
