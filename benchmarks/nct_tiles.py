"""Write an NCT-CRC-HE-100K-shaped tile set: 224 x 224 px PNG tiles in the nine class folders
``ADI BACK DEB LYM MUC MUS NORM STR TUM`` with the release's class proportions.

    nice -n 10 python -m benchmarks.nct_tiles --out /tmp/nct_bench/NCT-100K --num_tiles 100000

Each tile is made from four real Kather 2016 tiles (``../shared/data/kather2016_6class``) of one
source class, each flipped / rotated at random, laid out 2 x 2 (300 px), cropped at a random 224 px
window and given a little noise, so that no two tiles are equal. The real set has nine classes, the
shared tiles six: ADI, BACK and MUC are made from Stroma, Debris and Mucosa tiles with their colours
shifted (the pixels only have to look like H&E for a memory and speed benchmark, not be right).
Write it on local disk outside the repository; it is never committed. A rerun keeps the tiles that
are there (each is written to a temporary name and renamed), so a killed run resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .config import DEFAULT_REAL_DATA as DEFAULT_SOURCE

# Tiles per class in NCT-CRC-HE-100K (Kather et al. 2018, Zenodo 1214456).
NCT_COUNTS = {"ADI": 10407, "BACK": 10566, "DEB": 11512, "LYM": 11557, "MUC": 8896,
              "MUS": 13536, "NORM": 8763, "STR": 10446, "TUM": 14317}
# Source Kather class folder and an RGB multiplier per NCT class.
_RECIPE = {
    "ADI": ("02_STROMA", (1.25, 1.25, 1.25)), "BACK": ("05_DEBRIS", (1.3, 1.3, 1.35)),
    "DEB": ("05_DEBRIS", (1.0, 1.0, 1.0)), "LYM": ("04_LYMPHO", (1.0, 1.0, 1.0)),
    "MUC": ("06_MUCOSA", (1.1, 1.0, 1.2)), "MUS": ("03_COMPLEX", (1.0, 1.0, 1.0)),
    "NORM": ("06_MUCOSA", (1.0, 1.0, 1.0)), "STR": ("02_STROMA", (1.0, 1.0, 1.0)),
    "TUM": ("01_TUMOR", (1.0, 1.0, 1.0)),
}
TILE = 224


def class_counts(num_tiles: int) -> dict[str, int]:
    """Tiles per class for ``num_tiles`` in all, in the release's proportions (largest remainders)."""
    total = sum(NCT_COUNTS.values())
    exact = {c: num_tiles * n / total for c, n in NCT_COUNTS.items()}
    counts = {c: int(v) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: counts[c] - exact[c])[: num_tiles - sum(counts.values())]:
        counts[c] += 1
    return counts


def _load_sources(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff"))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])


def _make_tile(sources: np.ndarray, scale: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = sources.shape[1]
    parts = []
    for k in rng.choice(len(sources), 4):
        part = np.rot90(sources[k], int(rng.integers(4)))
        parts.append(part[:, ::-1] if rng.integers(2) else part)
    mosaic = np.concatenate([np.concatenate(parts[:2], 1), np.concatenate(parts[2:], 1)], 0)
    y, x = rng.integers(0, 2 * side - TILE + 1, 2)
    crop = mosaic[y:y + TILE, x:x + TILE].astype(np.int16)
    noise = rng.integers(-3, 4, crop.shape, dtype=np.int16)
    return np.clip(crop * scale + noise, 0, 255).astype(np.uint8)


def write_class(out: str, source: str, name: str, count: int, seed: int) -> int:
    """Write the ``count`` tiles of class ``name`` that are not there yet; returns how many were written."""
    from PIL import Image

    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    kather, scale = _RECIPE[name]
    sources = _load_sources(Path(source) / kather)
    written = 0
    for i in range(count):
        path = folder / f"{name}-{i:06d}.png"
        rng = np.random.default_rng([seed, list(_RECIPE).index(name), i])  # same tile on a rerun
        if path.exists():
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(_make_tile(sources, np.asarray(scale), rng)).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
        written += 1
    return written


def write_nct_tiles(out: str | os.PathLike, num_tiles: int, source: str | os.PathLike = DEFAULT_SOURCE,
                    seed: int = 0, workers: int = 2) -> dict[str, int]:
    """Write the set (see the module docstring) into ``out``; returns the tiles per class."""
    counts = class_counts(num_tiles)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [pool.submit(write_class, str(out), str(source), name, n, seed) for name, n in counts.items()]
        for job in jobs:
            job.result()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (local disk, outside the repository)")
    parser.add_argument("--num_tiles", type=int, default=100_000)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="Kather 2016 class folders")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not Path(args.source).is_dir():
        parser.error(f"--source {args.source} is not a folder of Kather class folders")
    counts = write_nct_tiles(args.out, args.num_tiles, args.source, args.seed, args.workers)
    print(f"wrote {sum(counts.values())} tiles into {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
