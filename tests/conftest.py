"""Shared fixtures: synthetic Kather-style tiles (folders, zip, split layout), a tiny prepared dataset,
a tiny random ViT saved like a training output, and ``load_script`` to call ``scripts/*.py`` main().

Each class gets its own colour and texture, so a tiny model can learn it in a few steps, and
every tile carries random noise, so no two tiles share pixels unless a test copies one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from hf_tissue_vit.constants import CLASS_NAMES, KATHER_FOLDERS

ALL_FOLDERS: list[str] = list(KATHER_FOLDERS)
SIX_FOLDERS: list[str] = ALL_FOLDERS[:6]
REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "kather2016_6class"

# (base RGB, texture) per class; H&E-like hues but far apart so they are easy to tell apart.
_STYLE: dict[str, tuple[tuple[int, int, int], str]] = {
    "Tumor": ((110, 40, 150), "blobs"),
    "Stroma": ((235, 130, 175), "diagonal"),
    "Complex": ((200, 100, 120), "dots"),
    "Lympho": ((35, 35, 130), "dense_dots"),
    "Debris": ((170, 160, 150), "noise"),
    "Mucosa": ((245, 215, 235), "bands"),
    "Adipose": ((252, 250, 250), "rings"),
    "Empty": ((225, 225, 235), "flat"),
}


def tile_pixels(class_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic ``size`` x ``size`` RGB uint8 tile of ``class_name``."""
    base, texture = _STYLE[class_name]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if texture == "blobs":
        pattern = np.sin(xx / 3.0 + phase) * np.sin(yy / 3.0 + phase)
    elif texture == "diagonal":
        pattern = np.sin((xx + yy) / 2.0 + phase)
    elif texture == "dots":
        pattern = (rng.random((size, size)) > 0.9).astype(np.float32) * -2.0
    elif texture == "dense_dots":
        pattern = (rng.random((size, size)) > 0.5).astype(np.float32) * -1.0
    elif texture == "bands":
        pattern = np.sin(yy / 1.5 + phase)
    elif texture == "rings":
        pattern = np.sin(np.hypot(xx - size / 2, yy - size / 2) / 2.0 + phase)
    else:
        pattern = np.zeros((size, size), np.float32)
    noise = rng.normal(0, 6, (size, size, 3))
    pixels = np.asarray(base, np.float32) + 25 * pattern[..., None] + noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def kather_name(index: int, slide: int, rng: np.random.Generator, ext: str = "tif") -> str:
    """A real-looking Kather file name, e.g. ``1A11_CRC-Prim-HE-07_022.tif_Row_601_Col_151.tif``."""
    hex_id = f"{int(rng.integers(0x1000, 0xFFFFF)):X}"
    row, col = 1 + 150 * (index // 12), 1 + 150 * (index % 12)
    return f"{hex_id}_CRC-Prim-HE-{slide:02d}_{int(rng.integers(1, 40)):03d}.tif_Row_{row}_Col_{col}.{ext}"


def make_tiles(
    root: str | Path,
    n_per_class: int,
    size: int = 150,
    classes: Sequence[str] = tuple(SIX_FOLDERS),
    slides: Sequence[int] = (1, 2, 3, 4, 5),
    fmt: str = "tif",
    seed: int = 0,
) -> dict[str, list[Path]]:
    """Write ``n_per_class`` synthetic tiles into ``root/<folder>/`` for each class folder.

    ``classes`` are Kather folder names (``01_TUMOR`` ...); ``fmt`` is ``tif`` (PackBits, like the
    release), ``png``, ``jpg`` or ``bmp``. Slides rotate per tile (offset per class), so every
    class spans every slide. Returns ``{folder: [paths]}``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for c, folder in enumerate(classes):
        class_name = KATHER_FOLDERS[folder]
        (root / folder).mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(n_per_class):
            slide = slides[(i + c) % len(slides)]
            path = root / folder / kather_name(i, slide, rng, fmt)
            image = Image.fromarray(tile_pixels(class_name, size, rng), "RGB")
            if fmt == "tif":
                image.save(path, format="TIFF", compression="packbits")
            else:
                image.save(path, format={"png": "PNG", "jpg": "JPEG", "bmp": "BMP"}[fmt])
            paths.append(path)
        written[folder] = paths
    return written


def zip_folder(folder: Path, zip_path: Path) -> Path:
    """Zip ``folder`` with its own name as the top-level entry (like the Zenodo zip)."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return zip_path


def make_split_layout(root: str | Path, sizes: dict[str, int] | None = None, size: int = 40, seed: int = 0) -> Path:
    """The lab's hand-out layout: ``root/train|val|test/<class folder>/`` with tiles."""
    root = Path(root)
    sizes = sizes or {"train": 6, "val": 2, "test": 2}
    for k, (split, n) in enumerate(sizes.items()):
        make_tiles(root / split, n, size=size, seed=seed + 100 * (k + 1))
    return root


def make_tiny_dataset(
    output_dir: str | Path, n_per_class: int = 12, size: int = 48, seed: int = 0,
    split_by: str = "stratified", fmt: str = "png",
) -> Path:
    """Build and save (with ``hf_tissue_vit.data``) a small dataset; returns ``output_dir``.

    12 tiles per class give 8 / 2 / 2 per class in train / validation / test.
    """
    from hf_tissue_vit.data import build_dataset_with_report, save_dataset

    output_dir = Path(output_dir)
    tiles = output_dir.parent / f"{output_dir.name}_tiles"
    make_tiles(tiles, n_per_class, size=size, fmt=fmt, seed=seed)
    dataset, report = build_dataset_with_report(tiles, split_by=split_by, seed=seed)
    save_dataset(dataset, output_dir, report=report)
    shutil.rmtree(tiles)
    return output_dir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_data: needs ../shared/data/kather2016_6class (skipped when absent)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "timm: needs the timm package (CI runs these in its second venv)")


@pytest.fixture
def tile_factory():
    """The :func:`make_tiles` function."""
    return make_tiles


@pytest.fixture
def release_dir(tmp_path: Path) -> Path:
    """A Kather release folder with all 8 class folders, 10 TIFF tiles of 40 px each, 5 slides."""
    root = tmp_path / "Kather_texture_2016_image_tiles_5000"
    make_tiles(root, 10, size=40, classes=ALL_FOLDERS)
    return root


@pytest.fixture
def release_zip(tmp_path: Path, release_dir: Path) -> Path:
    """``release_dir`` zipped with its folder name as the top-level entry."""
    return zip_folder(release_dir, tmp_path / "Kather_texture_2016_image_tiles_5000.zip")


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    """A ``train/ val/ test/`` layout (6 / 2 / 2 tiles per class, six classes, 40 px TIFF)."""
    return make_split_layout(tmp_path / "lab_split")


@pytest.fixture
def tiny_dataset_factory():
    """The :func:`make_tiny_dataset` function, for tests that need other sizes or split modes."""
    return make_tiny_dataset


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved dataset (load with ``load_tissue_dataset`` / ``load_from_disk``): six classes,
    48 px PNG tiles, 8 / 2 / 2 per class in train / validation / test. Shared: do not modify."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_dataset") / "dataset")


@pytest.fixture
def real_data_dir() -> Path:
    """``../shared/data/kather2016_6class``; skips the test when it is absent."""
    if not REAL_DATA_DIR.is_dir():
        pytest.skip(
            f"real Kather data not found at {REAL_DATA_DIR} (needs ../shared/data/kather2016_6class next to the repo)"
        )
    return REAL_DATA_DIR


def readme_commands(section: str) -> list[list[str]]:
    """The ``python scripts/...`` commands of README's section whose heading starts with ``section`` (e.g.
    ``"## 8. Self-supervised"``), joined over line breaks; an ``HF_TOKEN=...`` prefix is dropped."""
    import shlex

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    text = readme.split(section, 1)[1].split("\n## ", 1)[0]
    commands, current = [], ""
    for block in text.split("```bash")[1:]:
        for line in block.split("```")[0].splitlines():
            line = line.strip()
            line = line.split(" ", 1)[1] if line.startswith("HF_TOKEN=") else line
            if current or line.startswith("python scripts/"):
                current += " " + line.rstrip("\\")
                if not line.endswith("\\"):
                    commands.append(shlex.split(current))
                    current = ""
    return commands


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module, so tests call its ``main([...])`` in-process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


# hidden 32, 2 layers, 4 heads: a forward pass over a few 32 px tiles takes milliseconds
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def tiny_vit(image_size: int = 32, patch_size: int = 8, seed: int = 0, label_names: Sequence[str] = CLASS_NAMES):
    """A random tiny ``ViTForImageClassification`` (eval mode) with ``label_names`` as its labels."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(**TINY_VIT, image_size=image_size, patch_size=patch_size,
                       id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    return ViTForImageClassification(config).eval()


def save_model_dir(model, path: Path) -> Path:
    """Save ``model`` (safetensors) and a matching image processor into ``path``, like a training run."""
    from hf_tissue_vit.transforms import make_image_processor

    model.save_pretrained(path)
    make_image_processor(model.config.image_size).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_vit()`` saved with its processor (32 px, patch 8, the 6 classes). Read-only for tests."""
    return save_model_dir(tiny_vit(), tmp_path_factory.mktemp("tiny_model") / "model")


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def kill_when_exists(proc, path: Path, timeout: float = 240, group: bool = False, whole_json: bool = False) -> None:
    """SIGKILL the process ``proc`` as soon as ``path`` exists (it must still run then), and reap it.

    ``group``: kill its whole process group (start it with ``start_new_session=True``), e.g. an
    ``accelerate launch`` and the processes it started, as when the machine goes down. ``whole_json``:
    wait until ``path`` is a whole JSON file (e.g. a checkpoint's trainer_state.json, written last)."""
    import os
    import signal
    import time

    try:
        deadline = time.monotonic() + timeout
        while not (_whole_json(path) if whole_json else path.exists()):
            assert proc.poll() is None, f"the run ended before {path} was written"
            assert time.monotonic() < deadline, f"{path} not written within {timeout} s"
            time.sleep(0.02)
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGKILL)
    finally:
        if group:  # whatever happened, nothing of the group is left running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def kill_after_first_epoch(command: list[str], out: Path, env: dict[str, str]) -> None:
    """Run a training ``command`` of a shipped recipe (it must run DataLoader workers here) into ``out`` and
    SIGKILL it once its epoch-1 checkpoint (``checkpoint-3`` at 3 steps an epoch) is whole."""
    import signal
    import subprocess

    from hf_tissue_vit.hardware import auto_num_workers

    assert auto_num_workers() >= 1, "the recipe runs DataLoader workers: this machine gives it none"
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_exists(proc, out / "checkpoint-3" / "trainer_state.json", whole_json=True)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture
def script():
    """:func:`load_script`: ``script("finetune").main([...])`` runs a script in-process."""
    return load_script


# A few optimizer steps of a tiny scratch ViT: enough for a complete run folder in seconds.
FINETUNE_TINY: list[str] = [
    "--from_scratch", "--model_preset", "tiny", "--image_size", "32", "--patch_size", "8", "--hidden_size", "32",
    "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "64", "--max_steps", "2",
    "--per_device_train_batch_size", "4", "--n_bootstrap", "50", "--dataloader_num_workers", "0",
    "--report_to", "none", "--use_cpu", "true",
]  # fmt: skip


@pytest.fixture(scope="session")
def finetune_tiny_args() -> list[str]:
    """finetune.py flags of a tiny scratch run (add --dataset_dir and --output_dir)."""
    return list(FINETUNE_TINY)


@pytest.fixture(scope="session")
def trained_run_dir(tiny_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of a real ``finetune.py`` run on ``tiny_dataset_dir``. Read-only: copy it first."""
    out = tmp_path_factory.mktemp("trained_run") / "run"
    rc = load_script("finetune").main(["--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(out),
                                       *FINETUNE_TINY])
    assert rc in (0, None), f"finetune.py exited {rc}"
    return out


def assert_pipeline_matches_predict(model: Path, files: Sequence[Path], tmp_path: Path) -> None:
    """``pipeline("image-classification")`` on the saved ``model`` gives predict.py's probabilities for ``files``:
    the model needs nothing but transformers."""
    import csv
    import json

    import pytest
    from transformers import pipeline

    output = tmp_path / "pipeline_vs_predict.csv"
    assert load_script("predict").main(["--model", str(model), "--inputs", *map(str, files), "--output", str(output),
                                        "--no_progress", "--bf16", "false"]) == 0
    with open(output, newline="") as handle:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(handle)}
    classifier = pipeline("image-classification", model=str(model), device="cpu")
    classes = len(json.loads((Path(model) / "config.json").read_text())["id2label"])
    for file in files:
        scores = {s["label"]: s["score"] for s in classifier(str(file), top_k=classes)}
        assert len(scores) == classes
        assert scores == pytest.approx({k: float(rows[Path(file).name][k]) for k in scores}, abs=1e-4)
