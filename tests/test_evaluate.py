"""scripts/evaluate_model.py: scores of a model on labelled tiles in the three folder layouts, a saved dataset and a
Hub dataset; the label mapping; the card update; bad input.

Most tests use a ViT whose prediction is a known function of the tile (:func:`colour_keyed_vit`): a tile
whose red channel is above 150 on average is Stroma, else Tumor. The synthetic tiles' colours are far
from that threshold (Tumor and Lympho tiles are dark red, all others bright), so every expected score is
exact.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ALL_FOLDERS, save_model_dir, tile_pixels, tiny_vit
from hub_emulator import start_hub

from hf_tissue_vit.cards import EVALUATIONS_FILE, write_model_card
from hf_tissue_vit.constants import CLASS_NAMES, KATHER_FOLDERS
from hf_tissue_vit.evaluation import (
    find_class_folders,
    parse_label_map,
    resolve_labels,
    tissue_of,
)
from hf_tissue_vit.metrics import bootstrap_ci, classification_report

REPO_ROOT = Path(__file__).resolve().parents[1]
NCT_FOLDERS = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
# The tile style of each NCT class: the nearest Kather look (tile colours only matter for the red rule).
NCT_STYLE = {"ADI": "Adipose", "BACK": "Empty", "DEB": "Debris", "LYM": "Lympho", "MUC": "Mucosa",
             "MUS": "Stroma", "NORM": "Mucosa", "STR": "Stroma", "TUM": "Tumor"}
DARK = {"Tumor", "Lympho"}  # the colour-keyed model calls these Tumor, every other style Stroma
INTERFACE_KEYS = {"accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1", "macro_f1_ci95", "per_class",
                  "n_scored", "n_skipped", "label_map"}


# --------------------------------------------------------------------------- helpers
def colour_keyed_vit(label_names=CLASS_NAMES):
    """A tiny ViT that says ``label_names[1]`` when a tile's mean red is above 150, else ``label_names[0]``.

    Patch embedding: dims 0/1 = +-(mean red of the patch - threshold); layer norm turns that into its sign;
    layer 0 attends uniformly (zero q/k) and copies (identity v/o), so the CLS token gets the mean sign;
    everything else is zero; the classifier reads dim 0.
    """
    import torch

    model = tiny_vit(label_names=label_names)
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            value.fill_(1.0 if "layernorm" in key and key.endswith("weight") else 0.0)
        patch, threshold = model.config.patch_size, 150 / 127.5 - 1  # red 150 after the processor's (x/255-.5)/.5
        state["vit.embeddings.patch_embeddings.projection.weight"][0, 0] = 1 / patch**2
        state["vit.embeddings.patch_embeddings.projection.weight"][1, 0] = -1 / patch**2
        state["vit.embeddings.patch_embeddings.projection.bias"][:2] = torch.tensor([-threshold, threshold])
        state["vit.layers.0.attention.v_proj.weight"].copy_(torch.eye(model.config.hidden_size))
        state["vit.layers.0.attention.o_proj.weight"].copy_(torch.eye(model.config.hidden_size))
        state["classifier.weight"][0, 0], state["classifier.weight"][1, 0] = -1.0, 1.0
    model.load_state_dict(state)
    return model


def expected_label(style: str, label_names=CLASS_NAMES) -> str:
    return label_names[0] if style in DARK else label_names[1]


@pytest.fixture(scope="session")
def colour_model_dir(tmp_path_factory) -> Path:
    """The colour-keyed ViT saved with its processor (read-only: copy before updating its card)."""
    return save_model_dir(colour_keyed_vit(), tmp_path_factory.mktemp("colour_model") / "model")


def write_tiles(root: Path, spec: dict[str, tuple[str, int]], size: int = 40, fmt: str = "png",
                seed: int = 0) -> dict[str, list[Path]]:
    """``root/<folder>/`` with ``n`` synthetic tiles of tissue ``style`` each, for ``folder: (style, n)``."""
    rng = np.random.default_rng(seed)
    written = {}
    for folder, (style, n) in spec.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        written[folder] = []
        for i in range(n):
            path = root / folder / f"{folder.lower()}_{i:03d}.{fmt}"
            Image.fromarray(tile_pixels(style, size, rng)).save(path)
            written[folder].append(path)
    return written


def evaluate(script, capsys, *argv: str) -> tuple[int, dict | None, str]:
    """``evaluate.main(argv)``: (exit status, eval_results.json or None, stdout + stderr)."""
    argv = [*argv, "--no_progress"]
    rc = script("evaluate_model").main(argv)
    captured = capsys.readouterr()
    out = Path(argv[argv.index("--output_dir") + 1])
    results = json.loads((out / "eval_results.json").read_text()) if (out / "eval_results.json").is_file() else None
    return rc, results, captured.out + captured.err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def macro_f1_dark_bright(counts: dict[str, int], bright_as: str = "Stroma") -> float:
    """Macro-F1 of the colour rule on the six classes, from the per-class tile counts (hand formula)."""
    dark = sum(n for c, n in counts.items() if c in DARK)
    bright = sum(counts.values()) - dark
    f1 = {"Tumor": 2 * counts["Tumor"] / (counts["Tumor"] + dark),
          bright_as: 2 * counts[bright_as] / (counts[bright_as] + bright)}
    present = [c for c in CLASS_NAMES if counts.get(c, 0) > 0 or c in f1]
    return sum(f1.get(c, 0.0) for c in present) / len(present)


# --------------------------------------------------------------------------- labels
def test_alias_table_maps_only_unambiguous_names():
    assert [tissue_of(f) for f in KATHER_FOLDERS] == list(KATHER_FOLDERS.values())
    assert {f: tissue_of(f) for f in ("TUM", "LYM", "NORM", "DEB", "ADI", "BACK")} == {
        "TUM": "Tumor", "LYM": "Lympho", "NORM": "Mucosa", "DEB": "Debris", "ADI": "Adipose", "BACK": "Empty"}
    assert [tissue_of(f) for f in ("STR", "MUS", "MUC", "str")] == [None] * 4  # ambiguous: never guessed
    assert tissue_of("tumour") == "Tumor" and tissue_of("01_Tumor") == "Tumor" and tissue_of("xyz") is None


def test_release_folders_with_a_six_class_model_leave_out_adipose_and_empty():
    mapping = resolve_labels(ALL_FOLDERS, CLASS_NAMES)
    assert mapping.as_json() == {**dict(zip(ALL_FOLDERS[:6], CLASS_NAMES)), "07_ADIPOSE": None, "08_EMPTY": None}
    assert mapping.left_out == ["07_ADIPOSE", "08_EMPTY"]


def test_nct_folders_need_a_label_map_for_stroma_muscle_and_mucus():
    with pytest.raises(ValueError, match="--label_map") as err:
        resolve_labels(NCT_FOLDERS, CLASS_NAMES)
    message = str(err.value)
    assert all(f"{name} (" in message for name in ("STR", "MUS", "MUC"))
    assert "TUM (" not in message and "ADI (" not in message
    example = json.loads(message.split("--label_map '")[1].rstrip("'"))  # the suggestion is valid JSON
    assert example == {"MUC": "Debris", "MUS": "Stroma", "STR": "Stroma"}
    mapping = resolve_labels(NCT_FOLDERS, CLASS_NAMES, {"STR": "Stroma", "mus": None, "MUC": None})
    assert mapping.as_json() == {"ADI": None, "BACK": None, "DEB": "Debris", "LYM": "Lympho", "MUC": None,
                                 "MUS": None, "NORM": "Mucosa", "STR": "Stroma", "TUM": "Tumor"}


def test_a_model_with_nct_labels_reads_kather_folders_only_where_unambiguous():
    with pytest.raises(ValueError, match=r"02_STROMA .*03_COMPLEX"):
        resolve_labels(ALL_FOLDERS, NCT_FOLDERS)
    mapping = resolve_labels(ALL_FOLDERS, NCT_FOLDERS, {"02_STROMA": "STR", "03_COMPLEX": None})
    assert mapping.as_json()["01_TUMOR"] == "TUM" and mapping.as_json()["07_ADIPOSE"] == "ADI"
    assert mapping.as_json()["08_EMPTY"] == "BACK" and mapping.as_json()["06_MUCOSA"] == "NORM"


def test_a_model_with_unknown_class_names_never_drops_a_folder_silently():
    with pytest.raises(ValueError, match="01_TUMOR"):
        resolve_labels(["a", "01_TUMOR"], ["a", "b"])
    assert resolve_labels(["A", "b"], ["a", "b"]).as_json() == {"A": "a", "b": "b"}


@pytest.mark.parametrize("label_map, match", [
    ({"NOPE": "Tumor"}, r"names \['NOPE'\], which are not classes of the data"),
    ({"STR": "Muscle"}, r"maps to \['Muscle'\], which are not classes of the model"),
])
def test_label_map_naming_unknown_classes_is_refused(label_map, match):
    with pytest.raises(ValueError, match=match):
        resolve_labels(NCT_FOLDERS, CLASS_NAMES, label_map)


def test_label_map_inline_or_file(tmp_path):
    path = tmp_path / "map.json"
    path.write_text('{"STR": "Stroma", "MUS": null}')
    assert parse_label_map(str(path)) == parse_label_map('{"STR": "Stroma", "MUS": null}') == {"STR": "Stroma",
                                                                                             "MUS": None}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_label_map("{STR: Stroma}")
    with pytest.raises(FileNotFoundError, match="neither a JSON object nor a JSON file"):
        parse_label_map(str(tmp_path / "missing.json"))


def test_class_folders_are_found_below_wrapper_folders(tmp_path):
    write_tiles(tmp_path / "download" / "NCT-CRC-HE-100K", {"TUM": ("Tumor", 1), "STR": ("Stroma", 1)})
    found = find_class_folders(tmp_path / "download")
    assert found.root == tmp_path / "download" / "NCT-CRC-HE-100K" and list(found.folders) == ["STR", "TUM"]
    write_tiles(tmp_path / "one_class", {"TUM": ("Tumor", 1)})
    (tmp_path / "one_class" / "TUM" / "slide_1").mkdir()  # a class folder may hold sub-folders of its own
    write_tiles(tmp_path / "one_class" / "TUM", {"slide_1": ("Tumor", 1)})
    found = find_class_folders(tmp_path / "one_class")  # a single class folder is not a wrapper
    assert list(found.folders) == ["TUM"]


# --------------------------------------------------------------------------- balanced accuracy (metrics)
def test_balanced_accuracy_is_the_mean_recall_of_the_classes_present():
    y_true, y_pred = [0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 0, 0, 0]
    report = classification_report(y_true, y_pred, ["a", "b", "c", "d"])  # "d" never occurs: not averaged
    assert report["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 0) / 3)
    low, high = bootstrap_ci(y_true, y_pred, metric="balanced_accuracy", n_boot=200)
    assert 0 <= low <= report["balanced_accuracy"] <= high <= 1
    assert bootstrap_ci([0, 1, 1], [0, 1, 1], metric="balanced_accuracy", n_boot=50) == (1.0, 1.0)


# --------------------------------------------------------------------------- folders, known scores
def test_kather_release_folder_exact_scores(script, capsys, colour_model_dir, tmp_path):
    counts = {"Tumor": 4, "Stroma": 3, "Complex": 2, "Lympho": 2, "Debris": 1, "Mucosa": 2}
    spec = {folder: (name, counts.get(name, 2)) for folder, name in KATHER_FOLDERS.items()}
    root = tmp_path / "unzipped" / "Kather_texture_2016_image_tiles_5000"  # class folders two levels down
    write_tiles(root, spec, fmt="tif")
    (root / "01_TUMOR" / "broken.tif").write_bytes(b"not a tiff")
    out = tmp_path / "eval"
    rc, results, output = evaluate(script, capsys, "--model", str(colour_model_dir), "--inputs",
                                   str(tmp_path / "unzipped"), "--output_dir", str(out), "--tta")
    assert rc == 0, output
    assert INTERFACE_KEYS | {f"{k}_tta" for k in INTERFACE_KEYS - {"n_scored", "n_skipped", "label_map"}} <= set(
        results)
    n = sum(counts.values())
    assert results["n_scored"] == n and results["n_skipped"] == 1
    assert results["skipped"][0]["file"].endswith("broken.tif")
    assert results["n_left_out"] == 4 and results["left_out"] == {"07_ADIPOSE": 2, "08_EMPTY": 2}
    assert results["accuracy"] == pytest.approx((counts["Tumor"] + counts["Stroma"]) / n)
    assert results["balanced_accuracy"] == pytest.approx(2 / 6)
    assert results["macro_f1"] == pytest.approx(macro_f1_dark_bright(counts))
    assert {c: v["support"] for c, v in results["per_class"].items()} == counts
    low, high = results["accuracy_ci95"]
    assert low <= results["accuracy"] <= high
    assert results["accuracy_tta"] == results["accuracy"]  # the colour rule does not change under flips
    rows = read_csv(out / "eval_predictions.csv")
    assert len(rows) == n + 1  # every scored image, and the unreadable one with its error
    for row in rows:
        if row["error"]:
            assert row["file"].endswith("broken.tif") and row["prediction"] == ""
            continue
        style = KATHER_FOLDERS[row["data_class"]]
        assert row["label"] == style and row["prediction"] == expected_label(style) == row["prediction_tta"]
        assert abs(sum(float(row[c]) for c in CLASS_NAMES) - 1) < 1e-4
    assert (out / "eval_confusion_matrix.png").stat().st_size > 0 and (out / "eval_confusion_matrix_tta.png").is_file()
    assert f"| accuracy | {results['accuracy']:.4f} |" in output and "07_ADIPOSE (2 images)" in output


def test_nct_folder_scored_with_a_six_class_model(script, capsys, colour_model_dir, tmp_path):
    sizes = {"TUM": 3, "STR": 2, "LYM": 1, "DEB": 2, "MUC": 1, "NORM": 2, "ADI": 1, "BACK": 1, "MUS": 2}
    write_tiles(tmp_path / "CRC-VAL-HE-7K", {f: (NCT_STYLE[f], n) for f, n in sizes.items()})
    args = ["--model", str(colour_model_dir), "--inputs", str(tmp_path / "CRC-VAL-HE-7K"), "--output_dir"]
    rc, _, output = evaluate(script, capsys, *args, str(tmp_path / "refused"))
    assert rc == 2 and "STR (" in output and "MUS (" in output and "MUC (" in output
    assert not (tmp_path / "refused").exists()  # refused before any image was read
    rc, results, output = evaluate(script, capsys, *args, str(tmp_path / "eval"), "--label_map",
                                   '{"STR": "Stroma", "MUC": null, "MUS": null}')
    assert rc == 0, output
    scored = ["TUM", "STR", "LYM", "DEB", "NORM"]  # right: TUM (Tumor) and STR (Stroma, bright)
    assert results["n_scored"] == sum(sizes[f] for f in scored)
    assert results["accuracy"] == pytest.approx((sizes["TUM"] + sizes["STR"]) / results["n_scored"])
    assert results["left_out"] == {"ADI": 1, "BACK": 1, "MUC": 1, "MUS": 2}
    assert results["label_map"] == {"ADI": None, "BACK": None, "DEB": "Debris", "LYM": "Lympho", "MUC": None,
                                    "MUS": None, "NORM": "Mucosa", "STR": "Stroma", "TUM": "Tumor"}
    assert results["per_class"]["Complex"]["support"] == 0


def test_imagefolder_layout(script, capsys, colour_model_dir, tmp_path):
    for split, n in (("train", 1), ("test", 3)):
        write_tiles(tmp_path / "tiles" / split, {"tumor": ("Tumor", n), "STROMA": ("Stroma", n),
                                                 "Lympho": ("Lympho", n)}, fmt="jpg")
    args = ["--model", str(colour_model_dir), "--output_dir", str(tmp_path / "eval")]
    rc, _, output = evaluate(script, capsys, *args, "--inputs", str(tmp_path / "tiles"))
    assert rc == 2 and "split folders" in output and "tiles/test'" in output.replace(os.sep, "/")
    rc, results, output = evaluate(script, capsys, *args, "--inputs", str(tmp_path / "tiles" / "test"))
    assert rc == 0, output
    assert results["n_scored"] == 9 and results["accuracy"] == pytest.approx(6 / 9)
    assert results["label_map"] == {"Lympho": "Lympho", "STROMA": "Stroma", "tumor": "Tumor"}


# --------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("split, n_per_class", [("test", 2), ("val", 2), ("train", 8)])
def test_dataset_dir_split(script, capsys, colour_model_dir, tiny_dataset_dir, tmp_path, split, n_per_class):
    rc, results, output = evaluate(script, capsys, "--model", str(colour_model_dir), "--dataset_dir",
                                   str(tiny_dataset_dir), "--split", split, "--output_dir", str(tmp_path / "eval"))
    assert rc == 0, output
    assert results["n_scored"] == 6 * n_per_class and results["accuracy"] == pytest.approx(1 / 3)
    assert results["split"] == ("validation" if split == "val" else split)
    assert results["data"]["kind"] == "dataset_dir" and results["data"]["fingerprint"]
    rows = read_csv(tmp_path / "eval" / "eval_predictions.csv")
    assert all(row["prediction"] == expected_label(row["label"]) for row in rows)


def test_finetune_test_score_equals_evaluate_on_the_test_split(script, capsys, trained_run_dir, tiny_dataset_dir,
                                                               tmp_path):
    """The score finetune.py reports on its test split is evaluate_model.py's on the same split and model: same
    decoding, preprocessing and precision (fp32, or bf16 autocast where the run trained in bf16)."""
    trained = json.loads((trained_run_dir / "all_results.json").read_text())
    assert trained["seed"] != 0  # the training seed is not the bootstrap's
    rc, results, output = evaluate(script, capsys, "--model", str(trained_run_dir), "--dataset_dir",
                                   str(tiny_dataset_dir), "--split", "test", "--output_dir", str(tmp_path / "eval"),
                                   "--n_bootstrap", "50")  # finetune_tiny_args' resamples
    assert rc == 0, output
    assert results["accuracy"] == trained["test_accuracy"] and results["macro_f1"] == trained["test_macro_f1"]
    # one bootstrap (seed, resampling) for the card's intervals and evaluate.py's
    assert results["accuracy_ci95"] == trained["test_accuracy_ci95"]
    assert results["macro_f1_ci95"] == trained["test_macro_f1_ci95"]
    assert results["per_class"] == trained["test_per_class"] and results["n_scored"] == trained["test_samples"]
    assert results["precision"].startswith("bf16 autocast" if trained["hyperparameters"]["bf16"] else "fp32")
    ours = read_csv(tmp_path / "eval" / "eval_predictions.csv")
    theirs = read_csv(trained_run_dir / "test_predictions.csv")
    assert [r["file"] for r in ours] == [r["filename"] for r in theirs]
    names = results["label_names"]
    diff = max(abs(float(a[c]) - float(b[c])) for a, b in zip(ours, theirs) for c in names)
    assert diff < 1e-5


# --------------------------------------------------------------------------- the card
def test_card_round_trip_keeps_training_results(script, capsys, trained_run_dir, colour_model_dir, tmp_path):
    model = tmp_path / "run"
    shutil.copytree(trained_run_dir, model, ignore=shutil.ignore_patterns("checkpoint-*"))
    write_tiles(tmp_path / "external", {"01_TUMOR": ("Tumor", 2), "02_STROMA": ("Stroma", 2)})
    base = ["--model", str(model), "--inputs", str(tmp_path / "external"), "--update_card", "--tta"]
    for name in ("External tiles", "External tiles", "Second set"):  # the same name twice: replaced
        rc, results, output = evaluate(script, capsys, *base, "--eval_name", name, "--output_dir",
                                       str(tmp_path / name.replace(" ", "_")))
        assert rc == 0, output
    card = ModelCard.load(model / "README.md")
    entries = card.data.eval_results
    by_name = {}
    for entry in entries:
        by_name.setdefault(entry.dataset_name, {})[entry.metric_type] = entry.metric_value
    trained = json.loads((model / "all_results.json").read_text())
    assert by_name["Kather 2016 colorectal cancer histology tiles"] == {"accuracy": trained["test_accuracy"],
                                                                       "f1": trained["test_macro_f1"]}
    assert by_name["external"] == {"accuracy": results["accuracy"], "balanced_accuracy":
                                   results["balanced_accuracy"], "f1": results["macro_f1"]}
    # two evaluations of one dataset: one model-index entry, each metric once, from the later evaluation
    assert len([e for e in entries if e.dataset_name == "external"]) == 3
    index = [r for r in card.data.to_dict()["model-index"][0]["results"] if r["dataset"]["name"] == "external"]
    assert len(index) == 1 and sorted(m["type"] for m in index[0]["metrics"]) == ["accuracy", "balanced_accuracy",
                                                                                   "f1"]
    assert card.text.count("## Evaluation on External tiles") == 1 and "## Evaluation on Second set" in card.text
    recorded = json.loads((model / EVALUATIONS_FILE).read_text())["evaluations"]
    assert [ev["name"] for ev in recorded] == ["External tiles", "Second set"]
    assert (model / recorded[0]["confusion_matrix_file"]).is_file()
    assert f"]({recorded[0]['confusion_matrix_file']})" in card.text
    assert recorded[1]["metrics"]["accuracy_tta"] == results["accuracy_tta"]
    rerendered = ModelCard.load(write_model_card(model, "alice/tiny"))  # push_to_hub.py renders it again
    assert "## Evaluation on Second set" in rerendered.text and len(rerendered.data.eval_results) == len(entries)


def test_a_users_own_card_keeps_its_text_and_gets_the_evaluation(script, capsys, colour_model_dir, tmp_path):
    model = tmp_path / "trainer_output"
    shutil.copytree(colour_model_dir, model)
    (model / "README.md").write_text(textwrap.dedent("""\
        ---
        license: apache-2.0
        tags:
        - generated_from_trainer
        model-index:
        - name: bob/vit
          results:
          - task: {type: image-classification}
            dataset: {name: imagefolder, type: imagefolder, split: validation}
            metrics:
            - {type: accuracy, value: 0.9}
        ---

        # bob/vit

        My own words.
        """))
    write_tiles(tmp_path / "tiles", {"TUM": ("Tumor", 2), "NORM": ("Mucosa", 2)})
    for _ in range(2):
        rc, results, output = evaluate(script, capsys, "--model", str(model), "--inputs", str(tmp_path / "tiles"),
                                       "--output_dir", str(tmp_path / "eval"), "--update_card")
        assert rc == 0, output
    card = ModelCard.load(model / "README.md")
    assert "My own words." in card.text and card.text.count("## Evaluation on tiles") == 1
    assert "Labels: data classes scored as model classes: NORM → Mucosa, TUM → Tumor." in card.text
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["generated_from_trainer"]
    assert [entry["name"] for entry in meta["model-index"]] == ["bob/vit"]
    assert "| Tumor | 1.000 | 1.000 | 1.000 | 2 |" in card.text and "| Stroma | 0.000 |" in card.text
    assert "| Complex |" not in card.text  # neither in the data nor predicted: no row
    datasets = {(e.dataset_name, e.metric_type): e.metric_value for e in card.data.eval_results}
    assert datasets[("imagefolder", "accuracy")] == 0.9  # the user's own result stays
    assert datasets[("tiles", "accuracy")] == results["accuracy"] == 0.5


# --------------------------------------------------------------------------- the Hub
HUB_STEPS = """
    import contextlib, io, json, os, runpy, sys
    from datasets import load_from_disk
    from hf_tissue_vit.hub import push_dataset, push_output_dir
    os.environ["HF_TOKEN"] = "hf_alice_token"
    push_output_dir({model!r}, "alice/colour")
    push_dataset(load_from_disk({dataset!r}), "alice/tiles")
    script = runpy.run_path({script!r})
    out = []
    for token, argv in json.loads({steps!r}):
        os.environ.pop("HF_TOKEN", None)
        if token:
            os.environ["HF_TOKEN"] = token
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = script["main"](argv)
        out.append({{"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}})
    print(json.dumps(out))
"""


def test_hub_model_and_dataset_card_commit_and_pull_request(colour_model_dir, tiny_dataset_dir, tmp_path):
    url, server = start_hub()
    try:
        model = tmp_path / "colour"
        shutil.copytree(colour_model_dir, model)

        def argv(name: str) -> list[str]:
            return ["--model", "alice/colour", "--dataset_name", "alice/tiles", "--split", "test", "--output_dir",
                    str(tmp_path / name), "--update_card", "--push", "--eval_name", name, "--no_progress"]

        steps = [("hf_alice_token", argv("by_alice")), ("hf_bob_token", argv("by_bob")), (None, argv("anonymous"))]
        code = HUB_STEPS.format(model=str(model), dataset=str(tiny_dataset_dir), steps=json.dumps(steps),
                                script=str(REPO_ROOT / "scripts" / "evaluate_model.py"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                              timeout=400, cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stderr[-5000:]
        alice, bob, anonymous = json.loads(proc.stdout.strip().splitlines()[-1])
        assert alice["rc"] == 0 and bob["rc"] == 0, (alice, bob)
        assert "/commit/" in alice["stdout"] and "/discussions/1" in bob["stdout"]
        assert anonymous["rc"] == 1 and "token" in anonymous["stderr"]
        results = json.loads((tmp_path / "by_alice" / "eval_results.json").read_text())
        assert results["accuracy"] == pytest.approx(1 / 3) and results["data"]["dataset_name"] == "alice/tiles"
        main = server.state.main_files("model", "alice/colour")
        pull_request = server.state.main_files("model", "alice/colour", "refs/pr/1")
    finally:
        server.shutdown()
        server.server_close()
    main_card = main["README.md"].decode()
    assert "## Evaluation on by_alice" in main_card and "by_bob" not in main_card  # bob's change waits in a PR
    assert "## Evaluation on by_alice" in pull_request["README.md"].decode()
    assert "## Evaluation on by_bob" in pull_request["README.md"].decode()
    assert "eval_by_bob_confusion_matrix.png" in pull_request and "model.safetensors" in main
    entries = ModelCard(main_card).data.eval_results
    assert {(e.dataset_type, e.dataset_split, e.metric_type) for e in entries} == {
        ("alice/tiles", "test", m) for m in ("accuracy", "balanced_accuracy", "f1")}


# --------------------------------------------------------------------------- bad input
def _only_images(root: Path) -> None:
    write_tiles(root.parent, {root.name: ("Tumor", 2)})


@pytest.mark.parametrize("case, extra, message", [
    ("no class folders", [], "has no class sub-folders"),
    ("unknown classes", ["--label_map", "{}"], "foo (matches no class of the model)"),
    ("label map names unknown classes", ["--label_map", '{"TUMOR": "Tumor"}'], "not classes of the data"),
    ("label map to unknown model class", ["--label_map", '{"foo": "Fat"}'], "not classes of the model"),
    ("two sources", ["--dataset_name", "alice/tiles"], "exactly one of --inputs"),
    ("split with a folder", ["--split", "test"], "--split is for --dataset_dir"),
    ("push without card", ["--push"], "--push pushes the updated card"),
    ("push of a local model", ["--update_card", "--push"], "--push is for a Hub model"),
    ("bad bf16", ["--bf16", "maybe"], "--bf16 must be"),
])
def test_bad_input_exits_2_before_any_image_is_read(script, capsys, colour_model_dir, tmp_path, case, extra, message):
    data = tmp_path / "data"
    if case == "no class folders":
        _only_images(data)
    else:
        write_tiles(data, {"foo": ("Tumor", 1), "01_TUMOR": ("Tumor", 1)})
    out = tmp_path / "eval"
    rc, _, output = evaluate(script, capsys, "--model", str(colour_model_dir), "--inputs", str(data),
                             "--output_dir", str(out), *extra)
    assert rc == 2 and message in output, output
    assert output.strip().startswith("error:") and not out.exists()


def test_missing_split_and_missing_model(script, capsys, colour_model_dir, tiny_dataset_dir, tmp_path):
    out = str(tmp_path / "eval")
    rc, _, output = evaluate(script, capsys, "--model", str(colour_model_dir), "--dataset_dir", str(tiny_dataset_dir),
                             "--split", "holdout", "--output_dir", out)
    assert rc == 2 and "no split 'holdout'" in output and "'test'" in output
    rc, _, output = evaluate(script, capsys, "--model", str(tmp_path / "nowhere" / "x" / "y"), "--dataset_dir",
                             str(tiny_dataset_dir), "--output_dir", out)
    assert rc == 2 and "--model" in output


# --------------------------------------------------------------------------- the documented commands
def _documented_commands() -> list[list[str]]:
    """The ``python scripts/evaluate_model.py ...`` commands of README's evaluation section, as argv lists."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    text = readme.split("## 6. Evaluating a model on labelled tiles", 1)[1].split("\n## 7.", 1)[0]
    commands, current = [], ""
    for line in text.splitlines():
        line = line.strip()
        if current or line.startswith("python scripts/evaluate_model.py"):
            current += " " + line.rstrip("\\")
            if not line.endswith("\\"):
                commands.append(shlex.split(current)[2:])
                current = ""
    return commands


def test_documented_commands_run(script, capsys, trained_run_dir, tiny_dataset_dir, tmp_path, monkeypatch):
    """README.md's commands, as typed, in a folder laid out like the project's: outputs/scratch (a
    finetune.py run), data/kather6 (its dataset), ../shared/data/kather2016_tif_sample and CRC-VAL-HE-7K
    (synthetic tiles in the Kather and NCT layouts)."""
    work = tmp_path / "work"
    shutil.copytree(trained_run_dir, work / "outputs" / "scratch", ignore=shutil.ignore_patterns("checkpoint-*"))
    shutil.copytree(tiny_dataset_dir, work / "data" / "kather6")
    write_tiles(tmp_path / "shared" / "data" / "kather2016_tif_sample",
                {f: (KATHER_FOLDERS[f], 2) for f in ALL_FOLDERS[:6]}, fmt="tif")
    write_tiles(work / "CRC-VAL-HE-7K", {f: (NCT_STYLE[f], 1) for f in NCT_FOLDERS})
    monkeypatch.chdir(work)
    commands = _documented_commands()
    assert len(commands) >= 3
    for argv in commands:
        rc, results, output = evaluate(script, capsys, *argv)
        assert rc == 0, f"{argv}: {output}"
        assert results["n_scored"] > 0
    test_split = next(a for a in commands if "--dataset_dir" in a)
    out = Path(test_split[test_split.index("--output_dir") + 1])
    trained = json.loads((work / "outputs" / "scratch" / "all_results.json").read_text())
    assert json.loads((out / "eval_results.json").read_text())["accuracy"] == trained["test_accuracy"]
    assert "## Evaluation on" in (work / "outputs" / "scratch" / "README.md").read_text()


def test_the_script_runs_as_a_program(colour_model_dir, tiny_dataset_dir, tmp_path):
    """``python scripts/evaluate_model.py`` puts scripts/ first on sys.path: no script there may shadow the
    ``evaluate`` library that the metrics load (the script was evaluate.py, and metrics worked around it)."""
    imported = set()
    for path in (REPO_ROOT / "hf_tissue_vit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    assert "evaluate" in imported and not imported & {p.stem for p in (REPO_ROOT / "scripts").glob("*.py")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    script = REPO_ROOT / "scripts" / "evaluate_model.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(colour_model_dir),
                           "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(tmp_path / "eval"),
                           "--n_bootstrap", "20", "--no_progress"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| accuracy | 0.3333 |" in proc.stdout


@pytest.mark.real_data
def test_real_tiff_tiles_scored_and_card_updated(script, capsys, real_data_dir, trained_run_dir, tmp_path):
    """The original Kather TIFFs (../shared/data/kather2016_tif_sample, 10 per class) in the release's
    folder layout: all read, all scored, the card updated."""
    tiles = real_data_dir.parent / "kather2016_tif_sample"
    if not tiles.is_dir():
        pytest.skip(f"real TIFF sample not found at {tiles}")
    model = tmp_path / "run"
    shutil.copytree(trained_run_dir, model, ignore=shutil.ignore_patterns("checkpoint-*"))
    rc, results, output = evaluate(script, capsys, "--model", str(model), "--inputs", str(tiles), "--output_dir",
                                   str(tmp_path / "eval"), "--update_card", "--eval_name", "Kather TIFF sample")
    assert rc == 0, output
    assert results["n_scored"] == 60 and results["n_skipped"] == 0 and results["n_left_out"] == 0
    assert {c: v["support"] for c, v in results["per_class"].items()} == dict.fromkeys(CLASS_NAMES, 10)
    assert "## Evaluation on Kather TIFF sample" in (model / "README.md").read_text()
