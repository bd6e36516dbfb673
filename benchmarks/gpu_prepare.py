"""Prepare the folder that travels with the GPU benchmark (benchmarks/gpu.sh): a real dataset and wheels.

    python benchmarks/gpu_prepare.py                      # .gpu/: 100 real tiles per class + wheels
    python benchmarks/gpu_prepare.py --synthetic --no_wheels --workdir W   # what the tests run

Writes into --workdir (default ``.gpu/`` in the clone, git-ignored):

- ``data/kather6/``: a dataset made by the package (``prepare_dataset.py``'s build) from --per_class tiles of
  each class of ../shared/data/kather2016_6class (real H&E tiles, lossless PNG, about 45 kB each), or from
  synthetic tiles with --synthetic. The GPU machine has no network and no ../shared.
- ``wheels/``: the packages the GPU machine's image lacks or has in another version (its list is in the
  device notes): pure-Python wheels of this environment's versions, plus hf-xet, regex and OpenSlide's
  binaries for Python 3.12 on x86-64. ``gpu.sh`` installs them with ``pip --no-index --no-deps``.

What travels (the tracked files and this folder) must stay under 64 MiB: the script says how much it is and
refuses when it is over.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.config import DEFAULT_REAL_DATA  # noqa: E402 - after the repo root is on sys.path
from benchmarks.sources import subset_folder, write_synthetic_tiles  # noqa: E402

logger = logging.getLogger("gpu_prepare")

DEFAULT_WORKDIR = ROOT / ".gpu"
DATASET = "data/kather6"
LIMIT_BYTES = 64 * 2**20
# Packages the GPU image lacks (datasets, evaluate, dill, multiprocess, httpx2 and its own, OpenSlide) or has
# in an older version than the package needs (transformers, huggingface_hub, accelerate, ...): this
# environment's versions, so the GPU runs what the tests ran.
WHEELS = ("transformers", "huggingface_hub", "httpx2", "httpcore2", "truststore", "hf-xet", "click", "regex",
          "fsspec", "datasets", "evaluate", "accelerate", "dill", "multiprocess", "openslide-python",
          "openslide-bin")  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_5_x86_64", "any")  # fmt: skip


def build_dataset(workdir: Path, per_class: int, source: Path | None, seed: int = 0) -> Path:
    """``workdir/data/kather6``: the package's dataset of ``per_class`` tiles of each class folder of ``source``
    (synthetic 150 px tiles when None)."""
    from hf_tissue_vit.data import build_dataset_with_report, save_dataset

    target = workdir / DATASET
    with tempfile.TemporaryDirectory(prefix="gpu_tiles_") as tmp:
        tiles = Path(tmp) / "tiles"
        if source is None:
            write_synthetic_tiles(tiles, per_class, seed=seed)
        else:
            classes = sum(1 for p in source.iterdir() if p.is_dir())
            subset_folder(source, tiles, per_class * classes, seed)
        dataset, report = build_dataset_with_report(tiles, seed=seed)
        save_dataset(dataset, target, report=report)
    logger.info("dataset %s: %s", target, {name: len(split) for name, split in dataset.items()})
    return target


def download_wheels(workdir: Path, names: tuple[str, ...] = WHEELS) -> list[Path]:
    """Wheels of this environment's versions of ``names`` for CPython 3.12 on x86-64 Linux, into ``workdir/wheels``."""
    folder = workdir / "wheels"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in names]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)  # fmt: skip
    return sorted(folder.glob("*.whl"))


def travelling_bytes(workdir: Path) -> int:
    """Bytes of the tracked files of the clone plus ``workdir``: what a GPU run carries."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tracked = sum((ROOT / name).stat().st_size for name in listed.decode().split("\0")
                  if name and (ROOT / name).is_file())  # fmt: skip
    return tracked + sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="Folder to write (git-ignored).")
    parser.add_argument("--source", type=Path, default=DEFAULT_REAL_DATA, help="Kather class folders.")
    parser.add_argument("--per_class", type=int, default=100, help="Tiles per class in the dataset.")
    parser.add_argument("--synthetic", action="store_true", help="Synthetic tiles instead of --source.")
    parser.add_argument("--no_wheels", action="store_true", help="Do not download wheels (CPU runs, tests).")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not args.synthetic and not args.source.is_dir():
        parser.error(f"--source {args.source}: no such folder (pass --synthetic for synthetic tiles)")
    if args.per_class < 3:
        parser.error(f"--per_class must be at least 3 (train, validation and test tiles), got {args.per_class}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    build_dataset(args.workdir, args.per_class, None if args.synthetic else args.source)
    if not args.no_wheels:
        wheels = download_wheels(args.workdir)
        logger.info("%d wheels in %s", len(wheels), args.workdir / "wheels")
    size = travelling_bytes(args.workdir)
    print(f"{args.workdir}: with the tracked files {size / 2**20:.1f} MiB travel (limit {LIMIT_BYTES / 2**20:.0f})")
    if size > LIMIT_BYTES:
        print(f"over the limit: pass a smaller --per_class than {args.per_class}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
