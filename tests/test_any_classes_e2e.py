"""A 2-class and a 9-class (NCT-CRC-HE-style) tile set each go build -> finetune -> push (Hub emulator) ->
pipeline() -> evaluate -> tissue map, with the class names of the data all the way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FINETUNE_TINY, load_script
from PIL import Image
from test_data_classes import write_class_folders
from test_hub import ALICE, client_env, fresh_home, hub, run_python  # noqa: F401 (hub: the emulator fixture)

from hf_tissue_vit.constants import NCT_CLASSES

REPO_ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "two": ({"tumour": 9, "normal": 9}, ["normal", "tumour"], ["--mpp", "0.25"], 0.25),
    "nct": (dict.fromkeys(NCT_CLASSES, 6), list(NCT_CLASSES.values()), [], 0.5),
}

PIPELINE = """
    import json, numpy as np
    from PIL import Image
    from transformers import pipeline
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (33, 33, 3), dtype=np.uint8))
    preds = pipeline("image-classification", model={repo!r}, top_k=50)(image)
    print(json.dumps({{"labels": [p["label"] for p in preds], "total": sum(p["score"] for p in preds)}}))
"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_any_classes_build_train_push_pipeline_evaluate_map(case, hub, tmp_path, tmp_path_factory, capsys):  # noqa: F811
    counts, names, build_flags, mpp = CASES[case]
    url, _server = hub
    write_class_folders(tmp_path / "tiles", counts, size=32)
    dataset = tmp_path / "ds"
    assert load_script("prepare_dataset").main(["--source", str(tmp_path / "tiles"), "--output_dir", str(dataset),
                                                *build_flags]) == 0
    run = tmp_path / "run"
    repo = f"alice/{case}-classes"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "finetune.py"), "--dataset_dir", str(dataset),
         "--output_dir", str(run), *FINETUNE_TINY, "--push_to_hub", "--hub_model_id", repo],
        env=client_env(url, fresh_home(tmp_path_factory), ALICE), capture_output=True, text=True, timeout=300,
        check=False, cwd=REPO_ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    config = json.loads((run / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(names))] == names and config["mpp"] == mpp
    card = (run / "README.md").read_text()
    assert all(f"| {name} |" in card for name in names)
    assert ("NCT-CRC-HE" in card) == (case == "nct") and "Kather et al. (2016)" not in card

    preds = run_python(url, fresh_home(tmp_path_factory), PIPELINE.format(repo=repo))  # downloaded, no token
    assert sorted(preds["labels"]) == sorted(names) and preds["total"] == pytest.approx(1.0, abs=1e-4)

    capsys.readouterr()
    assert load_script("evaluate_model").main(["--model", str(run), "--dataset_dir", str(dataset), "--output_dir",
                                         str(tmp_path / "eval"), "--n_bootstrap", "0", "--num_workers", "0",
                                         "--no_progress"]) == 0
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["label_names"] == names
    # the tiles' own folders score against the model's readable names (NCT codes -> names)
    assert load_script("evaluate_model").main(["--model", str(run), "--inputs", str(tmp_path / "tiles"), "--output_dir",
                                         str(tmp_path / "eval_folders"), "--n_bootstrap", "0", "--num_workers",
                                         "0", "--no_progress", "--mpp", str(mpp)]) == 0

    rng = np.random.default_rng(1)
    mosaic = rng.integers(90, 200, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(mosaic).save(tmp_path / "slide.png")
    assert load_script("tissue_map").main(["--model", str(run), "--image", str(tmp_path / "slide.png"),
                                           "--output_dir", str(tmp_path / "map"), "--tile", "32", "--stride", "32",
                                           "--bf16", "false", "--device", "cpu", "--background_threshold", "1",
                                           "--min_tissue_area", "0"]) == 0
    maps = list((tmp_path / "map").rglob("tissue_map.geojson"))
    assert maps, sorted(p.name for p in (tmp_path / "map").rglob("*"))
    geojson = json.loads(maps[0].read_text())
    classes = {f["properties"]["classification"]["name"] for f in geojson["features"]}
    assert classes and classes <= set(names)
    colours = {tuple(f["properties"]["classification"]["color"]) for f in geojson["features"]}
    assert len(colours) == len(classes)


@pytest.mark.parametrize("n", [2, 9, 20, 37])
def test_palette_for_any_number_of_classes(n: int) -> None:
    from hf_tissue_vit.slides.outputs import class_colours, colours_255

    colours = class_colours(n)
    assert colours.shape == (n, 3) and ((colours >= 0) & (colours <= 1)).all()
    assert len({tuple(c) for c in colours_255(n)}) == n  # every class its own colour in maps and GeoJSON
