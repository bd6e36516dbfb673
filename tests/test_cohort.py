"""Cohorts under ``accelerate launch``: tissue_map.py, predict.py and evaluate_model.py over 2 CPU processes
(gloo) give the outputs of one process; cohort runs resume after a kill; bad input stops every process.

The slides are synthetic pyramidal TIFFs of different sizes (tests/slide_helpers.py); the model is the
tiny random ViT of conftest (its numbers are arbitrary, but the same in every run). One-process
references run the scripts' ``main()`` in this process; the launches are subprocesses with timeouts,
so a process left waiting for another fails the test instead of hanging it.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import kill_when_exists, load_script, tile_pixels
from slide_helpers import corrupt_tile, layout_image, write_pyramid

from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.slides import DONE_FILE

pytest.importorskip("openslide", reason="the [wsi] extra (openslide-python, openslide-bin) is not installed")
pytest.importorskip("imagecodecs", reason="tifffile needs imagecodecs for JPEG tiles")

REPO = Path(__file__).resolve().parents[1]
MAP_FLAGS = ["--mpp", "0.495", "--bf16", "false", "--batch_size", "16", "--workers", "1"]
TIMEOUT = 300  # a launch that waits longer has a process stuck waiting for another
# summary.csv columns that are timings, different in every run
TIMING_COLUMNS = ("seconds", "windows_per_s")


def _free_port() -> int:
    with socket.socket() as sock:  # other test runs on this machine launch too: not the default port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(script: str, *args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
            "--num_processes", str(processes), "--main_process_port", str(_free_port()),
            f"scripts/{script}.py", *args, "--device", "cpu"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return env


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)


def _slide(folder: Path, name: str, rows: int, cols: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    tiles = {k: [tile_pixels(n, 150, rng) for _ in range(2)] for k, n in enumerate(CLASS_NAMES)}
    layout = rng.integers(-1, len(CLASS_NAMES), (rows, cols))
    return write_pyramid(folder / name, layout_image(layout, tiles, seed), 0.495, levels=2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Three slides of different sizes and one whose overview level is corrupt (an odd number)."""
    folder = tmp_path_factory.mktemp("cohort")
    _slide(folder, "a_small.tif", 2, 3, 1)
    _slide(folder, "b_large.tif", 5, 7, 2)
    _slide(folder, "c_medium.tif", 4, 4, 3)
    bad = _slide(folder, "d_corrupt.tif", 3, 3, 4)
    corrupt_tile(bad, page=0, index=0)  # the overview of a small slide is read from level 0
    return folder


def _summary(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def _same_maps(one: Path, two: Path) -> None:
    """Same summary rows in the same order, same label grids, probabilities within float tolerance."""
    assert _summary(one / "summary.csv") == [{**row, "output_dir": row["output_dir"].replace(str(two), str(one))}
                                             for row in _summary(two / "summary.csv")]
    names = sorted(p.name for p in one.iterdir() if p.is_dir())
    assert names == sorted(p.name for p in two.iterdir() if p.is_dir())
    for name in names:
        p1, p2 = np.load(one / name / "probabilities.npy"), np.load(two / name / "probabilities.npy")
        np.testing.assert_allclose(p1.astype(np.float32), p2.astype(np.float32), atol=2e-3, equal_nan=True)
        l1, l2 = np.load(one / name / "labels.npy"), np.load(two / name / "labels.npy")
        top2 = np.sort(np.nan_to_num(p1.astype(np.float32)), axis=-1)[..., -2:]
        clear = (top2[..., 1] - top2[..., 0]) > 5e-3  # float16 ties aside
        np.testing.assert_array_equal(l1[clear], l2[clear])


def test_tissue_map_two_processes_give_the_one_process_outputs(cohort, tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--model", str(tiny_model_dir), "--image", str(cohort), *MAP_FLAGS]
    assert load_script("tissue_map").main([*args, "--output_dir", str(one), "--device", "cpu"]) == 1  # the corrupt one
    done = _run(_launch("tissue_map", *args, "--output_dir", str(two)))
    assert done.returncode == 1, done.stderr[-4000:]
    _same_maps(one, two)
    rows = _summary(two / "summary.csv")
    assert [Path(r["slide"]).name for r in rows] == ["a_small.tif", "b_large.tif", "c_medium.tif", "d_corrupt.tif"]
    assert [bool(r["error"]) for r in rows] == [False, False, False, True] and "SlideReadError" in rows[3]["error"]
    assert done.stdout.count("d_corrupt.tif: failed") == 1  # the main process reports, once
    assert not (two / "d_corrupt" / DONE_FILE).exists()
    records = {name: json.loads((two / name / DONE_FILE).read_text()) for name in ("a_small", "b_large", "c_medium")}
    # longest first, to the process with least work: b_large (35 windows) alone, the others on the second
    assert {n: r["process"] for n, r in records.items()} == {"b_large": [0, 2], "a_small": [1, 2], "c_medium": [1, 2]}
    assert not [p for p in two.rglob(".*")]  # no temp or part file left


def test_fewer_slides_than_processes(cohort, tiny_model_dir, tmp_path):
    out = tmp_path / "single"
    done = _run(_launch("tissue_map", "--model", str(tiny_model_dir), "--image", str(cohort / "c_medium.tif"),
                        *MAP_FLAGS, "--output_dir", str(out)))
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out / DONE_FILE).is_file() and (out / "labels.npy").is_file()  # one file: the folder is its folder
    assert [r["error"] for r in _summary(out / "summary.csv")] == [""]


def test_killed_cohort_resumes_without_redoing_finished_slides(cohort, tiny_model_dir, tmp_path):
    """SIGKILL of the launch (the launcher and its processes, as when a node dies) after the first
    slide is done; the same command then maps only the rest, and --overwrite maps everything again."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a_small", "b_large", "c_medium"):
        (folder / f"{name}.tif").symlink_to(cohort / f"{name}.tif")
        (folder / f"{name}_copy.tif").symlink_to(cohort / f"{name}.tif")
    out = tmp_path / "maps"
    command = _launch("tissue_map", "--model", str(tiny_model_dir), "--image", str(folder), *MAP_FLAGS,
                      "--output_dir", str(out))
    proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # b_large and its copy are the longest: each process's first slide
    kill_when_exists(proc, out / "b_large" / DONE_FILE, timeout=TIMEOUT, group=True)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob(f"*/{DONE_FILE}")}
    assert 1 <= len(finished) < 6 and not (out / "summary.csv").exists() and "a_small_copy" not in finished
    # what a kill in the middle of an atomic write leaves: removed by the next run
    (out / ".summary.csv.k1ll3d.tmp.csv").write_text("slide,output_dir\n")
    (out / "a_small_copy").mkdir(exist_ok=True)
    (out / "a_small_copy" / ".labels.npy.k1ll3d.tmp.npy").write_bytes(b"\x93NUMPY")
    done = _run(command)
    assert done.returncode == 0, done.stderr[-4000:]
    assert all((out / name / DONE_FILE).stat().st_mtime_ns == t for name, t in finished.items())  # not redone
    rows = _summary(out / "summary.csv")
    assert len(rows) == 6 and not any(r["error"] for r in rows)
    assert len(list(out.glob(f"*/{DONE_FILE}"))) == 6 and not [p for p in out.rglob(".*")]
    for name in ("a_small", "b_large", "c_medium"):  # a copy mapped after the kill equals its original
        np.testing.assert_array_equal(np.load(out / name / "labels.npy"), np.load(out / f"{name}_copy" / "labels.npy"))
    # --overwrite maps them again (in this process: the one-process case of the same code)
    assert load_script("tissue_map").main([*command[command.index("scripts/tissue_map.py") + 1:], "--overwrite"]) == 0
    assert all((out / name / DONE_FILE).stat().st_mtime_ns > t for name, t in finished.items())


@pytest.mark.parametrize("script, args, message", [
    ("tissue_map", ["--image", "{tmp}/not_a_slide.svs", "{cohort}/a_small.tif", "{cohort}/b_large.tif",
                    "--output_dir", "{tmp}/o", *MAP_FLAGS], "neither a slide nor an image"),
    ("predict", ["--inputs", "{tmp}/no_tiles", "--output", "{tmp}/o/p.csv"], "no such file or folder"),
    ("evaluate_model", ["--inputs", "{tmp}/no_tiles", "--output_dir", "{tmp}/o"], "no_tiles': no such folder"),
])  # fmt: skip
def test_bad_input_under_a_launch_is_one_line_printed_once(script, args, message, cohort, tiny_model_dir, tmp_path):
    """Every process stops with the error (a bad slide is met by one process only: the checks are
    shared out), the main process prints it once, no process is left waiting, nothing is written."""
    (tmp_path / "not_a_slide.svs").write_bytes(b"this is not a slide")
    args = [a.format(cohort=cohort, tmp=tmp_path) for a in args]
    done = _run(_launch(script, "--model", str(tiny_model_dir), *args))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 1 and message in errors[0], done.stderr[-4000:]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", ["tissue_map", "predict", "evaluate_model"])
def test_a_usage_error_under_a_launch_is_printed_once(script, tmp_path):
    """argparse's own errors (a missing or unknown flag) too: the main process prints them, every process exits."""
    done = _run(_launch(script, "--model", str(tmp_path / "m"), "--no_such_flag"))
    errors = [line for line in done.stderr.splitlines() if f"{script}.py: error: " in line]
    assert done.returncode != 0 and len(errors) == 1, done.stderr[-4000:]


# --- predict.py -------------------------------------------------------------------------------
def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _same_rows(one: list[dict[str, str]], two: list[dict[str, str]], numeric: set[str]) -> None:
    """Same rows in the same order: text cells equal, numbers within float tolerance."""
    assert [r["file"] for r in one] == [r["file"] for r in two] and one[0].keys() == two[0].keys()
    for a, b in zip(one, two, strict=True):
        assert {k: v for k, v in a.items() if k not in numeric} == {k: v for k, v in b.items() if k not in numeric}
        for key in numeric:
            assert (a[key] == b[key] == "") or float(a[key]) == pytest.approx(float(b[key]), abs=2e-6), (key, a, b)


def test_predict_two_processes_write_the_one_process_csv(tile_factory, tiny_model_dir, tmp_path, capsys):
    tiles = tmp_path / "tiles"
    tile_factory(tiles, 2, size=40, classes=["01_TUMOR", "02_STROMA", "03_COMPLEX"], fmt="png")  # 6 tiles
    (tiles / "03_COMPLEX" / "broken.png").write_bytes(b"not an image")  # 7 files: an odd number
    args = ["--model", str(tiny_model_dir), "--inputs", str(tiles), "--bf16", "false", "--top_k", "2",
            "--batch_size", "2", "--no_progress"]
    assert load_script("predict").main([*args, "--output", str(tmp_path / "one.csv"), "--device", "cpu"]) == 0
    done = _run(_launch("predict", *args, "--output", str(tmp_path / "two.csv")))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("wrote 7 predictions") == 1 and "(1 unreadable files)" in done.stdout
    one, two = _csv(tmp_path / "one.csv"), _csv(tmp_path / "two.csv")
    assert len(two) == 7 and sum(bool(r["error"]) for r in two) == 1
    _same_rows(one, two, {"score", "top2_score", *CLASS_NAMES})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "tiles", "two.csv"]  # no part file left


# --- evaluate_model.py ------------------------------------------------------------------------
METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "accuracy_ci95", "balanced_accuracy_ci95",
               "macro_f1_ci95", "per_class", "confusion_matrix", "n_scored", "n_skipped", "skipped", "label_names")


@pytest.mark.parametrize("source", ["folder", "dataset"])
def test_evaluate_two_processes_give_the_one_process_metrics(source, tile_factory, tiny_dataset_dir, tiny_model_dir,
                                                             tmp_path):
    if source == "folder":
        tiles = tmp_path / "tiles"
        tile_factory(tiles, 3, size=40, classes=["01_TUMOR", "02_STROMA", "04_LYMPHO"], fmt="png")
        (tiles / "02_STROMA" / "broken.png").write_bytes(b"not an image")  # 10 files, one unreadable
        data = ["--inputs", str(tiles)]
    else:
        data = ["--dataset_dir", str(tiny_dataset_dir), "--split", "test"]  # 12 rows
    args = ["--model", str(tiny_model_dir), *data, "--bf16", "false", "--batch_size", "4", "--n_bootstrap", "50",
            "--no_progress"]
    assert load_script("evaluate_model").main([*args, "--output_dir", str(tmp_path / "one"), "--device", "cpu"]) == 0
    done = _run(_launch("evaluate_model", *args, "--output_dir", str(tmp_path / "two")))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("## Evaluation on") == 1
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert {k: two[k] for k in METRIC_KEYS} == {k: one[k] for k in METRIC_KEYS}
    assert two["n_scored"] == (9 if source == "folder" else 12)
    probabilities = {*CLASS_NAMES, "score"}
    _same_rows(_csv(tmp_path / "one" / "eval_predictions.csv"), _csv(tmp_path / "two" / "eval_predictions.csv"),
               probabilities)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["eval_confusion_matrix.png", "eval_predictions.csv",
                                                                    "eval_results.json"]


# --- README -----------------------------------------------------------------------------------
def _readme_launches() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    text = readme.split("### Many slides, many GPUs", 1)[1].split("\n## ", 1)[0]
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("accelerate launch")]


def test_readme_launch_commands(cohort, tile_factory, tiny_dataset_dir, tiny_model_dir, tmp_path):
    """README's "many slides, many GPUs" commands, with 2 CPU processes for 4 GPUs, in a folder holding
    what they name (the tiny model with config.mpp, two slides, tiles, the tiny dataset)."""
    import shutil

    commands = _readme_launches()
    assert len(commands) == 3
    work = tmp_path / "work"
    model = shutil.copytree(tiny_model_dir, work / "outputs" / "vit-scratch-cpu")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "mpp": 0.495}))
    (work / "slides").mkdir()
    for name in ("a_small.tif", "c_medium.tif"):
        (work / "slides" / name).symlink_to(cohort / name)
    tile_factory(work / "tiles", 2, size=40, classes=["01_TUMOR", "05_DEBRIS"], fmt="png")
    (work / "data").mkdir()
    (work / "data" / "kather2016").symlink_to(tiny_dataset_dir)
    for command in commands:
        argv = command.split()
        assert argv[:5] == ["accelerate", "launch", "--config_file", "accelerate_config.yaml", "--num_processes"]
        argv[:6] = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "accelerate_config.yaml"), "--num_processes", "2", "--main_process_port",
                    str(_free_port())]
        script = next(i for i, a in enumerate(argv) if a.startswith("scripts/"))
        argv[script] = str(REPO / argv[script])
        done = subprocess.run([*argv, "--device", "cpu"], cwd=work, env=_env(), capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
        assert done.returncode == 0, f"{command}\n{done.stderr[-4000:]}"
    assert [r["error"] for r in _summary(work / "maps" / "summary.csv")] == ["", ""]
    assert all((work / "maps" / name / DONE_FILE).is_file() for name in ("a_small", "c_medium"))
    assert len(_csv(work / "predictions.csv")) == 4
    assert json.loads((work / "eval_test" / "eval_results.json").read_text())["n_scored"] == 12


def test_dataset_rows_in_shards_and_decoded_ahead_are_the_same_rows(tiny_dataset_dir, tiny_model_dir):
    """A shard of the rows is that slice of all rows (names included), whether the next batch decodes
    while the model runs (on a GPU) or not."""
    from hf_tissue_vit.evaluation.labels import resolve_labels
    from hf_tissue_vit.evaluation.sources import load_dataset_dir
    from hf_tissue_vit.predict import TilePredictor

    data = load_dataset_dir(tiny_dataset_dir, "test")
    mapping = resolve_labels(data.class_names, CLASS_NAMES, None, where="test")
    plain = TilePredictor.from_pretrained(str(tiny_model_dir), batch_size=5, bf16=False, num_workers=2, overlap=False)
    ahead = TilePredictor.from_pretrained(str(tiny_model_dir), batch_size=5, bf16=False, num_workers=2, overlap=True)

    def rows(predictor, shard=None):
        return [(r.file, r.label, r.probs[0].round(5).tolist()) for r in data.rows(mapping, [predictor], shard)]

    everything = rows(plain)
    assert len(everything) == data.n_rows(mapping) == 12 and rows(ahead) == everything
    assert rows(ahead, range(3, 10)) == everything[3:10] and data.n_scored_in(mapping, range(3, 10)) == 7


def test_longest_first_deals_whole_items_to_the_process_with_least_work():
    from hf_tissue_vit.distributed import longest_first

    assert longest_first([6, 35, 16, 9], 2) == [[1], [2, 3, 0]]  # the cohort above: b alone, then c, d, a
    assert longest_first([5, 5, 5], 4) == [[0], [1], [2], []]  # fewer items than processes
    assert longest_first([], 3) == [[], [], []]
