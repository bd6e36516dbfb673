"""Tests of hf_tissue_vit.data and scripts/prepare_dataset.py (offline, small synthetic tiles)."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import threading
import zipfile
from collections import Counter
from pathlib import Path

import datasets.config
import numpy as np
import pytest
from conftest import load_script, make_split_layout, make_tiles, zip_folder
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_from_disk
from datasets import Image as ImageFeature
from huggingface_hub import DatasetCard
from huggingface_hub import constants as hf_constants
from PIL import Image

from hf_tissue_vit import data
from hf_tissue_vit.constants import (
    ALL_CLASS_NAMES,
    CLASS_NAMES,
    KATHER_FOLDERS,
    KATHER_MPP,
)
from hf_tissue_vit.data import (
    METADATA_FILE,
    DatasetCardInfo,
    DownloadError,
    build_dataset,
    build_dataset_with_report,
    dataset_features,
    download_kather_zip,
    load_tissue_dataset,
    parse_slide,
    read_dataset_metadata,
    save_dataset,
    target_split_sizes,
)


def split_files(dataset: DatasetDict) -> dict[str, list[str]]:
    return {split: list(ds["filename"]) for split, ds in dataset.items()}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------
def test_release_folder_features_labels_and_lossless_pixels(release_dir: Path) -> None:
    dataset, report = build_dataset_with_report(release_dir)
    assert list(dataset) == ["train", "validation", "test"]
    for ds in dataset.values():
        assert ds.features == dataset_features(CLASS_NAMES)
        assert ds.features["label"].names == CLASS_NAMES
    # 10 per class -> 6/2/2; ADIPOSE and EMPTY dropped by default
    assert report.split_class_counts == {s: dict.fromkeys(CLASS_NAMES, n) for s, n in
                                         (("train", 6), ("validation", 2), ("test", 2))}
    assert report.dropped_classes == {"Adipose": 10, "Empty": 10}
    assert report.source_kind == "release_folder"
    row = dataset["train"][0]
    folder, name = row["filename"].split("/")
    assert KATHER_FOLDERS[folder] == CLASS_NAMES[row["label"]]
    assert row["slide"] == parse_slide(name) and row["slide"].startswith("CRC-Prim-HE-")
    assert np.array_equal(pixels(row["image"]), pixels(Image.open(release_dir / row["filename"])))
    # stored as PNG bytes, not as a path to the source
    raw = dataset["train"].cast_column("image", ImageFeature(decode=False))[0]["image"]
    assert raw["bytes"][:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_all_classes(release_dir: Path) -> None:
    dataset = build_dataset(release_dir, keep_all_classes=True)
    assert dataset["train"].features["label"].names == ALL_CLASS_NAMES
    assert sorted(set(dataset["train"]["label"])) == list(range(8))


def test_release_zip_matches_folder(release_dir: Path, release_zip: Path) -> None:
    from_folder = build_dataset(release_dir)
    from_zip, report = build_dataset_with_report(release_zip)
    assert report.source_kind == "release_zip"
    assert split_files(from_zip) == split_files(from_folder)
    assert pixels(from_zip["test"][3]["image"]).tolist() == pixels(from_folder["test"][3]["image"]).tolist()


def test_split_layout_keeps_given_split(split_dir: Path) -> None:
    dataset, report = build_dataset_with_report(split_dir)
    assert report.split_by == "given" and report.source_kind == "split_folder"
    assert {s: ds.num_rows for s, ds in dataset.items()} == {"train": 36, "validation": 12, "test": 12}
    prefix = {"train": "train/", "validation": "val/", "test": "test/"}
    for split, files in split_files(dataset).items():
        assert all(f.startswith(prefix[split]) for f in files)


def test_split_layout_validation_folder_and_zip(tmp_path: Path) -> None:
    root = make_split_layout(tmp_path / "handout", {"train": 3, "validation": 1, "test": 1})
    dataset = build_dataset(zip_folder(root, tmp_path / "handout.zip"))
    assert {s: ds.num_rows for s, ds in dataset.items()} == {"train": 18, "validation": 6, "test": 6}


def test_split_layout_missing_split_is_refused(tmp_path: Path) -> None:
    root = make_split_layout(tmp_path / "handout", {"train": 2, "test": 1})
    with pytest.raises(ValueError, match="validation"):
        build_dataset(root)


def _fake_hub(columns: dict, features: Features, splits=("train",)) -> DatasetDict:
    return DatasetDict({s: Dataset.from_dict(columns, features=features) for s in splits})


def _hub_columns(n_per_class: int, names: list[str]) -> tuple[list, list]:
    rng = np.random.default_rng(0)
    from conftest import tile_pixels

    images, labels = [], []
    for k, name in enumerate(names):
        for _ in range(n_per_class):
            images.append(Image.fromarray(tile_pixels(ALL_CLASS_NAMES[k], 32, rng)))
            labels.append(name)
    return images, labels


def test_hub_source_other_columns_and_string_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    raw_names = ["01_TUMOR", "stroma", "COMPLEX", "Lympho", "05_DEBRIS", "mucosa", "ADIPOSE", "08_EMPTY"]
    images, labels = _hub_columns(5, raw_names)
    fake = _fake_hub({"img": images, "labels": labels},
                     Features({"img": ImageFeature(), "labels": Value("string")}))
    calls = []
    monkeypatch.setattr(data.hub_source, "load_dataset", lambda name: calls.append(name) or fake)
    dataset, report = build_dataset_with_report("someone/kather-tiles")
    assert calls == ["someone/kather-tiles"]
    assert report.source_kind == "hub_resplit"
    assert dataset["train"].features == dataset_features(CLASS_NAMES)
    assert report.split_class_counts["train"] == dict.fromkeys(CLASS_NAMES, 3)
    assert report.dropped_classes == {"Adipose": 5, "Empty": 5}


def test_hub_source_classlabel_with_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    names = [n.lower() for n in ALL_CLASS_NAMES]
    images, labels = _hub_columns(2, names)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
    fake = _fake_hub({"image": images, "label": labels}, features, splits=("train", "valid", "test"))
    monkeypatch.setattr(data.hub_source, "load_dataset", lambda name: fake)
    dataset, report = build_dataset_with_report("lab/kather", keep_all_classes=True)
    assert report.source_kind == "hub"
    assert dataset["validation"].features["label"].names == ALL_CLASS_NAMES
    # the same pixels are in every fake split: only train keeps them (no leakage)
    assert dataset["validation"].num_rows == 0 and dataset["train"].num_rows == 16
    assert len(report.removed_cross_split_duplicates) == 32


def test_hub_source_decodes_in_parallel_to_the_same_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    names = [n.lower() for n in CLASS_NAMES]
    images, labels = _hub_columns(4, names)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
    fake = _fake_hub({"image": images, "label": labels}, features)
    monkeypatch.setattr(data.hub_source, "load_dataset", lambda name: fake)
    one = build_dataset("lab/tiles", num_proc=1)
    two = build_dataset("lab/tiles", num_proc=2)
    for split in one:
        raw = [d[split].cast_column("image", ImageFeature(decode=False)) for d in (one, two)]
        assert raw[0]["filename"] == raw[1]["filename"] and raw[0]["label"] == raw[1]["label"]
        assert [im["bytes"] for im in raw[0]["image"]] == [im["bytes"] for im in raw[1]["image"]]


@pytest.mark.parametrize(
    ("features", "labels", "match"),
    [
        (Features({"img": ImageFeature(), "label": Value("int64")}), [0, 1], "not a ClassLabel"),
        (Features({"img": ImageFeature(), "y": Value("int64")}), [0, 1], "no label column"),
    ],
)
def test_hub_source_unmappable_is_refused(monkeypatch, features, labels, match) -> None:
    images = [Image.new("RGB", (8, 8))] * 2
    columns = {"img": images, list(features)[1]: labels}
    monkeypatch.setattr(data.hub_source, "load_dataset", lambda name: _fake_hub(columns, features))
    with pytest.raises(ValueError, match=match):
        build_dataset("lab/other")


def test_hub_source_id_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.hub_source, "load_dataset", lambda name: pytest.fail("loaded an invalid id"))
    with pytest.raises(ValueError, match="source 'lab/bad id' is not a valid Hub repo id"):
        build_dataset("lab/bad id", source_type="hub")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # auto: not a path and not an id
        build_dataset("lab/a--b")


def test_hub_source_unreachable_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(data.hub_source, "load_dataset", offline)
    with pytest.raises(ValueError, match="not an existing local path"):
        build_dataset("kather/missing")


# ------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------
def test_target_split_sizes() -> None:
    assert target_split_sizes(625) == {"train": 425, "validation": 100, "test": 100}
    assert target_split_sizes(525) == {"train": 357, "validation": 84, "test": 84}
    assert target_split_sizes(12) == {"train": 8, "validation": 2, "test": 2}
    assert target_split_sizes(3) == {"train": 1, "validation": 1, "test": 1}


def test_stratified_split_is_deterministic_per_seed(release_dir: Path) -> None:
    first = split_files(build_dataset(release_dir, seed=7))
    assert split_files(build_dataset(release_dir, seed=7)) == first
    assert split_files(build_dataset(release_dir, seed=8)) != first
    everything = [f for files in first.values() for f in files]
    assert len(everything) == len(set(everything)) == 60


def test_slide_split_is_slide_disjoint(tmp_path: Path) -> None:
    root = tmp_path / "tiles"
    make_tiles(root, 12, size=24, slides=(1, 2, 3, 4, 5, 6, 7))
    dataset, report = build_dataset_with_report(root, split_by="slide")
    slides = {split: set(ds["slide"]) for split, ds in dataset.items()}
    assert all(slides.values())
    assert not (slides["train"] & slides["validation"] or slides["train"] & slides["test"]
                or slides["validation"] & slides["test"])
    assert report.split_slides == {s: sorted(v) for s, v in slides.items()}
    assert sum(n for counts in report.split_class_counts.values() for n in counts.values()) == 72
    assert split_files(build_dataset(root, split_by="slide")) == split_files(dataset)


def test_slide_split_needs_three_slides_and_slide_ids(tmp_path: Path) -> None:
    make_tiles(tmp_path / "two", 4, size=16, slides=(1, 2))
    with pytest.raises(ValueError, match="at least 3 slides"):
        build_dataset(tmp_path / "two", split_by="slide")
    make_tiles(tmp_path / "plain", 4, size=16)
    for path in (tmp_path / "plain" / "01_TUMOR").iterdir():
        path.rename(path.with_name(f"tile_{path.stat().st_ino}.tif"))
    with pytest.raises(ValueError, match="slide id"):
        build_dataset(tmp_path / "plain", split_by="slide")


# ------------------------------------------------------------------------------------------
# Bad input and checks
# ------------------------------------------------------------------------------------------
def test_missing_class_folder(release_dir: Path) -> None:
    shutil.rmtree(release_dir / "08_EMPTY")
    assert build_dataset(release_dir).num_rows["train"] == 36  # EMPTY is only needed when asked for
    with pytest.raises(ValueError, match="08_EMPTY"):
        build_dataset(release_dir, keep_all_classes=True)
    shutil.rmtree(release_dir / "03_COMPLEX")
    with pytest.raises(ValueError, match="missing for Complex.*03_COMPLEX"):
        build_dataset(release_dir)


def test_source_type_must_match_layout(release_dir: Path, split_dir: Path) -> None:
    with pytest.raises(ValueError, match="looks like a release layout"):
        build_dataset(release_dir, source_type="split")
    assert build_dataset(split_dir, source_type="split").num_rows["test"] == 12


def test_empty_and_unknown_sources(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        build_dataset(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("hello")
    with pytest.raises(ValueError, match="no image files"):
        build_dataset(tmp_path / "notes")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(tmp_path / "nowhere")
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a zip"):
        build_dataset(tmp_path / "fake.zip")


def test_zip_with_bad_checksum_is_refused_before_decoding(release_zip: Path, monkeypatch) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("decoded before the checksum was checked")

    monkeypatch.setattr(data.decode, "_decode", no_work)
    with pytest.raises(ValueError, match="MD5"):
        build_dataset(release_zip, md5="0" * 32)


def _write_bad_files(release_dir: Path) -> list[str]:
    good = next((release_dir / "01_TUMOR").iterdir()).read_bytes()
    (release_dir / "01_TUMOR" / "truncated.tif").write_bytes(good[: len(good) // 2])
    (release_dir / "02_STROMA" / "empty.TIF").write_bytes(b"")
    (release_dir / "04_LYMPHO" / "garbage.png").write_bytes(b"this is not a png")
    return ["01_TUMOR/truncated.tif", "02_STROMA/empty.TIF", "04_LYMPHO/garbage.png"]


def test_bad_image_files_are_all_listed(release_dir: Path) -> None:
    bad = _write_bad_files(release_dir)
    with pytest.raises(ValueError) as info:
        build_dataset(release_dir)
    message = str(info.value)
    assert all(name in message for name in bad) and "--skip_bad_files" in message


def test_skip_bad_files(release_dir: Path) -> None:
    bad = _write_bad_files(release_dir)
    dataset, report = build_dataset_with_report(release_dir, skip_bad_files=True)
    assert [line.split(":")[0] for line in report.skipped_bad_files] == sorted(bad)
    assert sum(ds.num_rows for ds in dataset.values()) == 60


def test_non_image_files_are_ignored_and_counted(release_dir: Path, tmp_path: Path) -> None:
    (release_dir / ".DS_Store").write_bytes(b"\0\0")
    (release_dir / "01_TUMOR" / "Thumbs.db").write_bytes(b"\0")
    (release_dir / "02_STROMA" / "notes.txt").write_text("slide 3 was re-stained")
    (release_dir / "01_TUMOR" / "._1A11_CRC-Prim-HE-01_001.tif_Row_1_Col_1.tif").write_bytes(b"\0\5\26\7")
    dataset, report = build_dataset_with_report(release_dir)
    assert report.n_ignored_files == 4
    assert sum(ds.num_rows for ds in dataset.values()) == 60
    archive = zip_folder(release_dir, tmp_path / "mac.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("__MACOSX/Kather_texture_2016_image_tiles_5000/01_TUMOR/._x.tif", b"\0\5")
    assert build_dataset_with_report(archive)[1].n_ignored_files == 5


def test_non_rgb_images_are_converted(release_dir: Path) -> None:
    folder = release_dir / "05_DEBRIS"
    rng = np.random.default_rng(1)
    rgba = np.dstack([rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), np.full((40, 40), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "a_CRC-Prim-HE-01_1.tif_Row_1_Col_1.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L").save(
        folder / "b_CRC-Prim-HE-01_1.tif_Row_1_Col_2.tif"
    )
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).quantize(16).save(
        folder / "c_CRC-Prim-HE-01_1.tif_Row_1_Col_3.png"
    )
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("CMYK").save(
        folder / "d_CRC-Prim-HE-01_1.tif_Row_1_Col_4.tif"
    )
    grey16 = np.full((40, 40), 65535, np.uint16)
    grey16[:20] = 256 * 100
    Image.fromarray(grey16).save(folder / "e_CRC-Prim-HE-01_1.tif_Row_1_Col_5.png")
    dataset, report = build_dataset_with_report(release_dir)
    assert set(report.converted_modes) >= {"RGBA", "L", "P", "CMYK"}
    assert sum(report.converted_modes.values()) == 5
    rows = [r for ds in dataset.values() for r in ds if r["filename"].startswith("05_DEBRIS/e_")]
    tile = pixels(rows[0]["image"])
    assert rows[0]["image"].mode == "RGB" and tile[0, 0].tolist() == [100] * 3 and tile[-1, -1].tolist() == [255] * 3


def test_other_tile_sizes_are_reported(release_dir: Path, caplog) -> None:
    image = Image.fromarray(np.zeros((50, 52, 3), np.uint8) + 90)
    image.save(release_dir / "06_MUCOSA" / "big_CRC-Prim-HE-02_1.tif_Row_1_Col_1.tif")
    with caplog.at_level("WARNING"):
        _, report = build_dataset_with_report(release_dir)
    assert report.tile_size == [40, 40]
    assert report.other_size_counts == {"52x50": 1}
    assert "06_MUCOSA/big_" in caplog.text


@pytest.mark.parametrize("split_by", ["stratified", "slide"])
def test_duplicates_are_reported_and_kept_in_one_split(release_dir: Path, split_by: str) -> None:
    source = min((release_dir / "01_TUMOR").iterdir())
    copies = [source.with_name(f"COPY{k}_CRC-Prim-HE-0{k % 2 + 1}_9.tif_Row_1_Col_1.tif") for k in range(3)]
    for copy in copies:
        shutil.copy(source, copy)
    Image.open(source).save(
        release_dir / "02_STROMA" / "X_CRC-Prim-HE-02_1.tif_Row_1_Col_1.png"
    )  # same pixels, other class
    group = {
        f"01_TUMOR/{source.name}",
        *(f"01_TUMOR/{c.name}" for c in copies),
        "02_STROMA/X_CRC-Prim-HE-02_1.tif_Row_1_Col_1.png",
    }
    for seed in range(4):
        dataset, report = build_dataset_with_report(release_dir, split_by=split_by, seed=seed)
        assert [set(g) for g in report.duplicate_groups] == [group]
        where = {split for split, files in split_files(dataset).items() for f in files if f in group}
        assert len(where) == 1


def test_duplicates_across_given_splits_are_removed_from_later_split(split_dir: Path) -> None:
    source = min((split_dir / "train" / "01_TUMOR").iterdir())
    shutil.copy(source, split_dir / "test" / "01_TUMOR" / source.name)
    dataset, report = build_dataset_with_report(split_dir)
    assert report.removed_cross_split_duplicates == [f"test/01_TUMOR/{source.name}"]
    assert f"train/01_TUMOR/{source.name}" in dataset["train"]["filename"]
    assert dataset["test"].num_rows == 12


# ------------------------------------------------------------------------------------------
# Save, card, load
# ------------------------------------------------------------------------------------------
def test_save_writes_card_metadata_and_loads(release_dir: Path, tmp_path: Path) -> None:
    dataset, report = build_dataset_with_report(release_dir, split_by="slide")
    out = save_dataset(dataset, tmp_path / "out", report=report)
    loaded = load_from_disk(str(out))
    assert split_files(loaded) == split_files(dataset)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["split_by"] == "slide" and meta["split_class_counts"] == report.split_class_counts
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "cc-by-4.0"
    assert card.data.task_categories == ["image-classification"]
    assert "histology" in card.data.tags and card.data.size_categories == ["n<1K"]
    assert "10.1038/srep27988" in card.text and "10.5281/zenodo.53169" in card.text
    assert "hyperchromatic" in card.text and "`06_MUCOSA`" in card.text
    assert "Slide-disjoint" in card.text and str(tmp_path) not in card.text


def test_save_is_atomic(release_dir: Path, tmp_path: Path, monkeypatch) -> None:
    dataset, report = build_dataset_with_report(release_dir, seed=1)
    out = tmp_path / "out"

    def crash(folder, metadata):
        raise KeyboardInterrupt  # killed after save_to_disk, before the card

    monkeypatch.setattr(data.storage, "_write_extras", crash)
    with pytest.raises(KeyboardInterrupt):
        save_dataset(dataset, out, report=report)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    monkeypatch.undo()
    save_dataset(dataset, out, report=report)
    monkeypatch.setattr(data.storage, "_write_extras", crash)
    other = build_dataset(release_dir, seed=2)
    with pytest.raises(KeyboardInterrupt):
        save_dataset(other, out)
    assert split_files(load_from_disk(str(out))) == split_files(dataset)  # the previous build survives


def test_save_refuses_foreign_folder_but_replaces_own(release_dir: Path, tmp_path: Path) -> None:
    dataset = build_dataset(release_dir)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_bytes(b"x")
    with pytest.raises(ValueError, match="not empty"):
        save_dataset(dataset, foreign)
    out = save_dataset(dataset, tmp_path / "own")
    other = build_dataset(release_dir, seed=3)
    save_dataset(other, out)
    assert split_files(load_from_disk(str(out))) == split_files(other)


def test_load_tissue_dataset(tiny_dataset_dir: Path) -> None:
    dataset = load_tissue_dataset(tiny_dataset_dir, label_names=CLASS_NAMES)
    assert {s: ds.num_rows for s, ds in dataset.items()} == {"train": 48, "validation": 12, "test": 12}
    assert Counter(dataset["validation"]["label"]) == dict.fromkeys(range(6), 2)
    assert dataset["train"][0]["image"].size == (48, 48)


def test_load_tissue_dataset_errors(tiny_dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tissue_dataset(tmp_path / "missing")
    (tmp_path / "half" / ".hf_tissue_vit-tmp-123-abcd").mkdir(parents=True)  # a first build was killed
    with pytest.raises(ValueError, match="did not finish"):
        load_tissue_dataset(tmp_path / "half")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="dataset_dict.json"):
        load_tissue_dataset(tmp_path / "junk")
    with pytest.raises(ValueError, match="differ"):
        load_tissue_dataset(tiny_dataset_dir, label_names=ALL_CLASS_NAMES)
    with pytest.raises(ValueError, match="exactly one"):
        load_tissue_dataset()
    plain = Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "labels": [0]},
                              features=Features({"image": ImageFeature(), "labels": Value("int64")}))
    DatasetDict({"train": plain, "val": plain}).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(ValueError, match=r"ClassLabel column 'label'; columns: image \(Image\), labels \(Value\)"):
        load_tissue_dataset(tmp_path / "nolabel")
    DatasetDict({"train": plain}).save_to_disk(str(tmp_path / "trainonly"))
    with pytest.raises(ValueError, match="validation"):
        load_tissue_dataset(tmp_path / "trainonly")
    plain.save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ValueError, match="single split"):
        load_tissue_dataset(tmp_path / "single")


def test_push_dataset_sends_card_with_repo_id(release_dir: Path, tmp_path: Path, monkeypatch) -> None:
    # The HTTP round trip is tested against the Hub emulator in test_hub.py; here: the card rendered from
    # the saved metadata and what goes to the Hub client.
    from types import SimpleNamespace

    from hf_tissue_vit import hub

    dataset, report = build_dataset_with_report(release_dir)
    out = save_dataset(dataset, tmp_path / "out", report=report)
    cards, pushes = [], []

    class Api:
        def __init__(self, token=None) -> None:
            pass

        def upload_file(self, path_or_fileobj, **kw) -> None:
            cards.append(path_or_fileobj.decode())

    monkeypatch.setattr(hub, "HfApi", Api)
    monkeypatch.setattr(hub, "_create_repo", lambda *args: None)
    monkeypatch.setattr(type(dataset), "push_to_hub", lambda self, repo_id, **kw:
                        pushes.append((repo_id, kw["private"])) or SimpleNamespace(commit_url=f"https://hub/{repo_id}"))
    hub.push_dataset(dataset, "user/kather6", metadata=data.read_dataset_metadata(out), private=True)
    assert pushes == [("user/kather6", True)]
    (card,) = cards
    assert "user/kather6" in card and "cc-by-4.0" in card
    data.record_hub_dataset_id(out, "user/kather6")
    assert data.read_dataset_metadata(out)["hub_dataset_id"] == "user/kather6"
    assert "huggingface.co/datasets/user/kather6" in (out / "README.md").read_text()


# ------------------------------------------------------------------------------------------
# Resolution (mpp) and the card's known facts
# ------------------------------------------------------------------------------------------
def _card_text(folder: Path) -> str:
    return (folder / "README.md").read_text(encoding="utf-8")


def test_kather_tiles_record_their_resolution(tmp_path: Path) -> None:
    make_tiles(tmp_path / "tiles", 3, size=150)  # 150 px tiles named by Kather slides: release tiles
    dataset, report = build_dataset_with_report(tmp_path / "tiles")
    assert report.mpp == KATHER_MPP
    out = save_dataset(dataset, tmp_path / "out", report=report)
    assert read_dataset_metadata(out)["mpp"] == KATHER_MPP
    assert "mpp" not in read_dataset_metadata(out)["checks"]
    text = _card_text(out)
    assert f"Resolution: {KATHER_MPP} µm per pixel." in text
    assert f"150 x 150 px ({round(150 * KATHER_MPP, 1)} x {round(150 * KATHER_MPP, 1)} µm)" in text


def test_resolution_is_recorded_only_when_known(release_dir: Path, tmp_path: Path) -> None:
    dataset, report = build_dataset_with_report(release_dir)  # 40 px tiles: not the Kather release
    assert report.mpp is None
    out = save_dataset(dataset, tmp_path / "unknown", report=report)
    assert "mpp" not in read_dataset_metadata(out)
    assert "µm" not in _card_text(out)
    dataset, report = build_dataset_with_report(release_dir, mpp=0.25)
    assert report.mpp == 0.25
    out = save_dataset(dataset, tmp_path / "given", report=report)
    assert read_dataset_metadata(out)["mpp"] == 0.25
    assert "Resolution: 0.25 µm per pixel." in _card_text(out) and "40 x 40 px (10.0 x 10.0 µm)" in _card_text(out)
    with pytest.raises(ValueError, match="mpp must be a positive number"):
        build_dataset(release_dir, mpp=-1.0)


def test_card_leaves_unknown_values_out(release_dir: Path, tmp_path: Path) -> None:
    out = save_dataset(build_dataset(release_dir), tmp_path / "out")  # no report: split, source, checks unknown
    text = _card_text(out)
    body = text.split("---", 2)[2]
    assert not [line for line in body.splitlines() if line.rstrip().endswith(":") and not line.startswith("#")]
    assert "None" not in body and "unknown" not in body and "()" not in body
    assert not re.search(r"(?<!`)``(?!`)", body)  # no empty code span
    assert "## How the split was made" not in body and "## Checks while building" not in body
    assert "Built with hf_tissue_vit" in body and "µm" not in body
    assert "60 tiles in 6 classes." in body  # what is known is still stated


def test_card_info_from_metadata(release_dir: Path, tmp_path: Path) -> None:
    dataset, report = build_dataset_with_report(release_dir, split_by="slide", mpp=0.5)
    out = save_dataset(dataset, tmp_path / "out", report=report)
    info = DatasetCardInfo.from_metadata(read_dataset_metadata(out))
    assert info.split_by == "slide" and info.mpp == 0.5 and info.tile_size == [40, 40]
    assert info.source == release_dir.name  # only the folder's name: the card is public
    assert info.split_sizes == {s: sum(c.values()) for s, c in report.split_class_counts.items()}
    assert info.card_data().license == "cc-by-4.0"
    variables = info.template_variables()
    assert variables["mpp"] == 0.5 and variables["tile_microns"] == [20.0, 20.0]
    assert variables["split_slides"] == report.split_slides and "hub_dataset_id" not in variables
    minimal = DatasetCardInfo(class_names=["Tumor", "Stroma"], split_class_counts={"train": {"Tumor": 1, "Stroma": 2}})
    known = minimal.template_variables()
    assert not {"split_by", "seed", "source", "source_kind", "tile_size", "mpp", "checks", "version"} & set(known)
    assert known["total"] == 3
    text = str(minimal.render())
    assert "| 1 | Stroma |  |" in text and "µm" not in text and "Split mode" not in text
    assert "Kather et al" not in text and "## Citation" not in text  # other data: no Kather citation, no folder
    counts = {"train": {"Tumor": 1, "Stroma": 2}}
    kather = str(DatasetCardInfo(class_names=["Tumor", "Stroma"], split_class_counts=counts, preset="kather2016",
                                 citation="Kather 2016").render())
    assert "| 1 | Stroma | `02_STROMA` |" in kather
    assert DatasetCardInfo.from_metadata({**read_dataset_metadata(out), "split_by": "unknown"}).split_by is None


# ------------------------------------------------------------------------------------------
# Download, for real, from a loopback HTTP server
# ------------------------------------------------------------------------------------------
@pytest.fixture
def zip_server(release_zip: Path):
    payload = release_zip.read_bytes()
    requests: Counter[str] = Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # the name is http.server API
            requests[self.path] += 1
            if self.path not in ("/good/kather.zip", "/cut/kather.zip"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            # /cut/ closes the connection half-way, like a dropped download
            self.wfile.write(payload if self.path.startswith("/good") else payload[: len(payload) // 2])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hashlib.md5(payload).hexdigest(), requests
    server.shutdown()
    server.server_close()


def test_download_good_checksum_builds_and_is_reused(zip_server, tmp_path: Path) -> None:
    base, md5, requests = zip_server
    cache = tmp_path / "cache"
    dataset, report = build_dataset_with_report(None, url=f"{base}/good/kather.zip", md5=md5, cache_dir=cache)
    assert sum(ds.num_rows for ds in dataset.values()) == 60 and report.source_kind == "release_zip"
    cached = data.cached_zip_path(f"{base}/good/kather.zip", cache)
    assert [p for p in cache.rglob("*") if p.is_file()] == [cached] and cached.name == "kather.zip"
    again = build_dataset(None, url=f"{base}/good/kather.zip", md5=md5, cache_dir=cache)
    assert requests["/good/kather.zip"] == 1
    assert split_files(again) == split_files(dataset)


def test_download_bad_checksum_caches_nothing(zip_server, tmp_path: Path) -> None:
    base, md5, requests = zip_server
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_kather_zip(f"{base}/good/kather.zip", md5="f" * 32, cache_dir=cache)
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    # a wrong file in the cache is not trusted either: it is fetched again
    data.cached_zip_path(f"{base}/good/kather.zip", cache).write_bytes(b"stale")
    assert download_kather_zip(f"{base}/good/kather.zip", md5=md5, cache_dir=cache).read_bytes()[:2] == b"PK"
    assert requests["/good/kather.zip"] == 2


def test_download_cut_connection_caches_nothing(zip_server, tmp_path: Path) -> None:
    base, md5, _ = zip_server
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="connection cut"):
        download_kather_zip(f"{base}/cut/kather.zip", md5=md5, cache_dir=cache)
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    with pytest.raises(DownloadError, match="404"):
        download_kather_zip(f"{base}/missing.zip", md5=md5, cache_dir=cache)


def test_offline_fails_fast_with_hint(zip_server, tmp_path: Path, monkeypatch) -> None:
    base, md5, requests = zip_server
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="--source /path/to/Kather_texture_2016_image_tiles_5000"):
        build_dataset(None, url=f"{base}/good/kather.zip", md5=md5, cache_dir=tmp_path / "cache")
    assert sum(requests.values()) == 0
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # HF_DATASETS_OFFLINE=1, as datasets reads it
    with pytest.raises(DownloadError, match="offline mode"):
        download_kather_zip(f"{base}/good/kather.zip", md5=md5, cache_dir=tmp_path / "cache")
    assert sum(requests.values()) == 0
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    import socket

    with socket.socket() as s:  # a port nobody listens on: what "no network" looks like
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(DownloadError, match="--source"):
        build_dataset(None, url=f"http://127.0.0.1:{closed}/k.zip", cache_dir=tmp_path / "cache", )


# ------------------------------------------------------------------------------------------
# Script
# ------------------------------------------------------------------------------------------
def test_script_end_to_end(release_zip: Path, tmp_path: Path, capsys) -> None:
    main = load_script("prepare_dataset").main
    out = tmp_path / "kather6"
    assert main(["--source", str(release_zip), "--output_dir", str(out), "--split_by", "slide", "--seed", "3"]) == 0
    loaded = load_from_disk(str(out))
    assert loaded["train"].features == dataset_features(CLASS_NAMES)
    assert json.loads((out / METADATA_FILE).read_text())["seed"] == 3
    assert "saved" in capsys.readouterr().out
    # rebuilding into our own folder is fine; refused inputs exit non-zero with "error:"
    assert main(["--source", str(release_zip), "--output_dir", str(out), "--keep_all_classes"]) == 0
    assert load_from_disk(str(out))["train"].features["label"].names == ALL_CLASS_NAMES
    assert main(["--source", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "x")]) == 2
    assert main(["--source", str(release_zip), "--output_dir", str(tmp_path / "y"), "--push_to_hub"]) == 2
    assert main(["--source", str(release_zip), "--output_dir", str(tmp_path / "z"), "--md5", "0" * 32]) == 2
    assert "error:" in capsys.readouterr().err
    for bad in (["--mpp", "0"], ["--mpp", "-0.5"], ["--hub_dataset_id", "lab/bad id"], ["--hub_dataset_id", "kather6"]):
        assert main(["--source", str(release_zip), "--output_dir", str(tmp_path / "z"), *bad]) == 2
        assert bad[0] in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    # --mpp: the resolution of user tiles, into the metadata the training reads
    assert main(["--source", str(release_zip), "--output_dir", str(out), "--mpp", "0.3"]) == 0
    assert read_dataset_metadata(out)["mpp"] == 0.3


def test_script_push(release_dir: Path, tmp_path: Path, monkeypatch) -> None:
    module = load_script("prepare_dataset")
    pushed = []
    monkeypatch.setattr(module, "push_dataset", lambda ds, repo, **kw: pushed.append((repo, kw["private"])) or f"https://hub/{repo}")
    out = tmp_path / "out"
    assert module.main(["--source", str(release_dir), "--output_dir", str(out), "--push_to_hub",
                        "--hub_dataset_id", "lab/kather6", "--private"]) == 0
    assert pushed == [("lab/kather6", True)]
    assert data.read_dataset_metadata(out)["hub_dataset_id"] == "lab/kather6"


# ------------------------------------------------------------------------------------------
# Real data
# ------------------------------------------------------------------------------------------
@pytest.mark.real_data
@pytest.mark.slow
def test_real_kather_6class(real_data_dir: Path, tmp_path: Path) -> None:
    main = load_script("prepare_dataset").main
    assert main(["--source", str(real_data_dir), "--output_dir", str(tmp_path / "real")]) == 0
    first = load_tissue_dataset(tmp_path / "real", label_names=CLASS_NAMES)
    assert read_dataset_metadata(tmp_path / "real")["mpp"] == KATHER_MPP  # recognised as Kather release tiles
    expected = {"train": 357, "validation": 84, "test": 84}
    for split, ds in first.items():
        assert Counter(ds["label"]) == dict.fromkeys(range(6), expected[split])
        for label, filename in zip(ds["label"], ds["filename"]):
            assert KATHER_FOLDERS[filename.split("/")[0]] == CLASS_NAMES[label]
    files = [f for names in split_files(first).values() for f in names]
    assert len(files) == len(set(files)) == 3150
    assert split_files(build_dataset(real_data_dir)) == split_files(first)
    row = first["test"][0]
    assert row["image"].size == (150, 150) and row["slide"] == parse_slide(row["filename"])


def test_complete_splits_makes_validation_and_test_from_train(tiny_dataset_dir):
    from datasets import DatasetDict, concatenate_datasets, load_from_disk

    from hf_tissue_vit.data import complete_splits

    local = load_from_disk(str(tiny_dataset_dir))
    whole = DatasetDict({"train": concatenate_datasets([local[s] for s in local])})
    made, record = complete_splits(whole, seed=1)
    assert {k: len(v) for k, v in made.items()} == {"train": 48, "validation": 12, "test": 12}
    assert all(sorted(made[s]["label"]).count(c) == 2 for s in ("validation", "test") for c in range(6))
    assert record["made"] == {"validation": 12, "test": 12} and record["seed"] == 1
    again, _ = complete_splits(whole, seed=1)
    assert again["test"]["filename"] == made["test"]["filename"]  # seeded: the same split every time
    # a dataset with its own test split keeps it; validation comes from train
    with_test = DatasetDict({"train": whole["train"], "test": local["test"]})
    kept, record = complete_splits(with_test, seed=1)
    assert kept["test"]["filename"] == local["test"]["filename"] and record["made"] == {"validation": 12}
    assert complete_splits(local, seed=1) == (local, None)
