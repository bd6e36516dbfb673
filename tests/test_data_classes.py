"""Any labelled tile set: class folders of any names, NCT-CRC-HE folders, manifests, --classes, --label_map;
their bad inputs are one line before any work; the build's memory is flat in the number of tiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_tissue_vit import data
from hf_tissue_vit.constants import NCT_CITATION, NCT_CLASSES
from hf_tissue_vit.data import build_dataset, build_dataset_with_report, read_dataset_metadata

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_class_folders(root: Path, counts: dict[str, int], size: int = 24, seed: int = 0,
                        fmt: str = "png") -> dict[str, list[Path]]:
    """``counts[name]`` random PNG tiles (each class its own colour) in ``root/<name>/``."""
    rng = np.random.default_rng(seed)
    written = {}
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(n):
            pixels = np.clip(rng.normal(40 + 20 * k, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            path = root / name / f"{name}_{i:03d}.{fmt}"
            Image.fromarray(pixels).save(path)
            paths.append(path)
        written[name] = paths
    return written


def _run_prepare(script, argv: list[str], capsys) -> tuple[int, str]:
    code = script("prepare_dataset").main(argv)
    return code, capsys.readouterr().err.strip()


# ------------------------------------------------------------------------------------------
# Classes from the data
# ------------------------------------------------------------------------------------------
def test_two_class_folders_sorted_names_and_no_kather_card(tmp_path: Path, script, capsys) -> None:
    write_class_folders(tmp_path / "tiles", {"tumour": 7, "normal": 7})
    out = tmp_path / "ds"
    code, err = _run_prepare(script, ["--source", str(tmp_path / "tiles"), "--output_dir", str(out),
                                      "--citation", "Our lab, 2026."], capsys)
    assert code == 0, err
    meta = read_dataset_metadata(out)
    assert meta["class_names"] == ["normal", "tumour"] and meta["preset"] is None and "mpp" not in meta
    card = (out / "README.md").read_text()
    assert "Our lab, 2026." in card and "Kather et al" not in card and "| 1 | tumour |" in card
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # the build's shards are gone
    loaded = data.load_tissue_dataset(out)
    assert loaded["train"].features["label"].names == ["normal", "tumour"]
    assert sum(ds.num_rows for ds in loaded.values()) == 14


def test_nct_folders_are_a_preset_with_readable_names_and_mpp(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "NCT-CRC-HE-100K", dict.fromkeys(NCT_CLASSES, 4), size=20)
    dataset, report = build_dataset_with_report(tmp_path / "NCT-CRC-HE-100K", num_proc=2)
    assert report.class_names == list(NCT_CLASSES.values()) and report.preset == "nct-crc-he"
    assert report.mpp == 0.5 and report.citation == NCT_CITATION
    assert dataset["train"].features["label"].names[8] == "Tumor epithelium"
    out = data.save_dataset(dataset, tmp_path / "nct", report=report)
    card = (out / "README.md").read_text()
    assert "NCT-CRC-HE" in card and "`TUM`" in card and "doi:10.5281/zenodo.1214456" in card


def test_classes_pick_and_order_a_subset_and_label_map_merges(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "t", {"a": 5, "b": 5, "c": 5, "c2": 5})
    dataset, report = build_dataset_with_report(tmp_path / "t", classes="c,a", label_map="c2=c")
    assert report.class_names == ["c", "a"] and report.dropped_classes == {"b": 5}
    counts = {name: sum(c[name] for c in report.split_class_counts.values()) for name in report.class_names}
    assert counts == {"c": 10, "a": 5}
    # the Kather preset keeps its own names; --classes orders them
    assert build_dataset_with_report(tmp_path / "t", classes=["b", "a"])[1].class_names == ["b", "a"]


def test_manifest_csv_and_parquet_with_slide_and_split(tmp_path: Path) -> None:
    files = write_class_folders(tmp_path / "tiles", {"GP4": 6, "GP3": 6})
    rows = [(p.relative_to(tmp_path).as_posix(), name, f"slide{i % 3}") for name, ps in files.items()
            for i, p in enumerate(ps)]
    csv = tmp_path / "tiles.csv"
    csv.write_text("path,label,slide\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))
    dataset, report = build_dataset_with_report(csv, split_by="slide")
    assert report.class_names == ["GP4", "GP3"] and report.source_kind == "manifest"  # first appearance
    for split in ("train", "validation", "test"):
        assert len(set(dataset[split]["slide"])) == 1  # slide-disjoint by the manifest's slide column
    import pyarrow as pa
    import pyarrow.parquet as pq

    split_of = {0: "train", 1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}
    table = pa.table({"path": [r[0] for r in rows], "label": [r[1] for r in rows],
                      "split": [split_of[int(r[0].split("_")[-1][:3]) % 6] for r in rows]})
    pq.write_table(table, tmp_path / "tiles.parquet")
    given, report = build_dataset_with_report(tmp_path / "tiles.parquet")
    assert report.split_by == "given" and {s: ds.num_rows for s, ds in given.items()} == {
        "train": 8, "validation": 2, "test": 2}


def test_tiff_resolution_is_recorded(tmp_path: Path) -> None:
    for k, name in enumerate(("x", "y")):
        (tmp_path / "t" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((16, 16, 3), 30 * k + i, np.uint8)).save(
                tmp_path / "t" / name / f"{i}.tif", dpi=(50800, 50800))  # 0.5 µm/px
    assert build_dataset_with_report(tmp_path / "t")[1].mpp == 0.5
    assert build_dataset_with_report(tmp_path / "t", mpp=0.25)[1].mpp == 0.25  # --mpp wins


# ------------------------------------------------------------------------------------------
# Bad inputs: one line, before any tile is decoded
# ------------------------------------------------------------------------------------------
def _no_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a tile was decoded before the input was checked")

    monkeypatch.setattr(data.decode, "write_tiles", refuse)
    monkeypatch.setattr(data.build, "write_tiles", refuse)


def _manifest(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "m.csv"
    path.write_text("path,label\n" + "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case", ["empty_folder", "missing_file", "not_in_classes", "case_clash"])
def test_bad_any_class_inputs_are_one_line_before_work(case: str, tmp_path: Path, script, capsys,
                                                       monkeypatch) -> None:
    files = write_class_folders(tmp_path / "t", {"tumour": 3, "normal": 3})
    extra: list[str] = []
    if case == "empty_folder":
        (tmp_path / "t" / "stroma").mkdir()
        source, expect = tmp_path / "t", "class folder stroma is empty"
    elif case == "missing_file":
        source = _manifest(tmp_path, ["t/tumour/tumour_000.png,tumour", "t/normal/gone.png,normal"])
        expect = "row 3: t/normal/gone.png"
    elif case == "not_in_classes":
        source = _manifest(tmp_path, [f"{p.relative_to(tmp_path)},{n}" for n, ps in files.items() for p in ps])
        extra, expect = ["--classes", "tumour"], "label not in --classes (tumour)"
    else:
        write_class_folders(tmp_path / "t", {"Tumour": 2})
        source, expect = tmp_path / "t", "'Tumour' and 'tumour' differ only in case"
    _no_decoding(monkeypatch)
    out = tmp_path / "out"
    code, err = _run_prepare(script, ["--source", str(source), "--output_dir", str(out), *extra], capsys)
    assert code == 2 and err.startswith("error: ") and expect in err and "\n" not in err, err
    assert not out.exists()


def test_bad_classes_and_label_map_arguments(script, tmp_path: Path, capsys) -> None:
    for argv, expect in ((["--classes", "a,,b"], "--classes must be"), (["--classes", "a,a"], "more than once"),
                         (["--label_map", "tumour"], "source=class"), (["--preset", "nct"], "--preset must be")):
        code, err = _run_prepare(script, ["--source", str(tmp_path), "--output_dir", str(tmp_path / "o"), *argv],
                                 capsys)
        assert code == 2 and expect in err, err


def test_missing_class_named_by_classes(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "t", {"a": 3, "b": 3})
    with pytest.raises(ValueError, match="class folder\\(s\\) missing for c"):
        build_dataset(tmp_path / "t", classes="a,c")


# ------------------------------------------------------------------------------------------
# Memory: flat in the number of tiles
# ------------------------------------------------------------------------------------------
# Peak anonymous RSS (the process's own memory; mapped Arrow files are page cache, shared), sampled.
PEAK_SAMPLER = textwrap.dedent("""
    import json, sys, threading, time
    peak = [0]
    def _sample():
        while True:
            with open("/proc/self/status") as fh:
                anon = next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:"))
            peak[0] = max(peak[0], anon)
            time.sleep(0.002)
    threading.Thread(target=_sample, daemon=True).start()
""")
_BUILD_PEAK = PEAK_SAMPLER + textwrap.dedent("""
    import datasets
    # save_to_disk writes batches of up to 100 MB whatever the size; this keeps the test's sizes in that regime
    datasets.config.MAX_ROW_GROUP_SIZE = "2MB"
    from hf_tissue_vit.data import build_dataset_with_report, save_dataset
    dataset, report = build_dataset_with_report(sys.argv[1], num_proc=1, work_dir=sys.argv[3])
    save_dataset(dataset, sys.argv[2], report=report)
    time.sleep(0.05)
    print(json.dumps({"peak_kb": peak[0]}))
""")


def _noisy_tiles(root: Path, n: int, size: int = 192) -> int:
    """``n`` incompressible tiles in two class folders; returns their decoded bytes."""
    rng = np.random.default_rng(n)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png",
                                                                                    compress_level=0)
    return n * size * size * 3


def _peak_kb(code: str, *args: str) -> int:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_kb"]


def test_build_memory_does_not_grow_with_the_number_of_tiles(tmp_path: Path) -> None:
    n = 80  # more than a writer batch (64 rows) in both builds
    _noisy_tiles(tmp_path / "small", n)
    added = _noisy_tiles(tmp_path / "large", 4 * n) - n * 192 * 192 * 3  # ~26 MB more pixels (and PNG bytes)
    peaks = [_peak_kb(_BUILD_PEAK, str(tmp_path / name), str(tmp_path / f"{name}_ds"), str(tmp_path / f"{name}_w"))
             for name in ("small", "large")]
    growth = (peaks[1] - peaks[0]) * 1024
    # Holding the tiles (as the old builder did) grows the peak by at least the added PNG bytes.
    assert growth < added / 2, f"peak RSS grew by {growth / 1e6:.1f} MB for {added / 1e6:.1f} MB more tiles"


def test_readme_own_data_commands(tmp_path: Path) -> None:
    """README section 1's own-data commands, as shown, on a class-folder tree and a manifest."""
    import re
    import shlex

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## 1\. The dataset.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [shlex.split(c) for c in block.replace("\\\n", " ").strip().splitlines()]
    assert [c[:2] for c in commands] == [["python", "scripts/prepare_dataset.py"]] * 2
    write_class_folders(tmp_path / "my_tiles", {"tumour": 6, "normal": 6})
    files = write_class_folders(tmp_path / "gleason", {"benign": 6, "GP3": 6, "GP4": 6, "GP4_cribriform": 3, "GP5": 6})
    (tmp_path / "tiles.csv").write_text("path,label,slide\n" + "".join(
        f"{p.relative_to(tmp_path).as_posix()},{name},s{i % 3}\n" for name, ps in files.items()
        for i, p in enumerate(ps)))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for command in commands:
        done = subprocess.run([sys.executable, str(REPO_ROOT / command[1]), *command[2:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert read_dataset_metadata(tmp_path / "data" / "my_tiles")["mpp"] == 0.25
    gleason = read_dataset_metadata(tmp_path / "data" / "gleason")
    assert gleason["class_names"] == ["benign", "GP3", "GP4", "GP5"] and gleason["split_by"] == "slide"
    assert sum(gleason["split_class_counts"][s]["GP4"] for s in ("train", "validation", "test")) == 9
