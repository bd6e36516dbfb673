"""A simulated other centre: copies of a dataset's test split re-stained to other H&E colours, as class
folders of PNG tiles that ``scripts/evaluate_model.py --inputs`` scores.

    python -m benchmarks.restain --dataset_dir data/kather6 --split test --out /tmp/restain/kather6

Targets (``--targets``, comma-separated; each a sub-folder of ``--out``):

- ``original``: the tiles unchanged (the same scoring path, for the unshifted number);
- ``other_centre``: each tile's per-channel optical-density mean and s.d. (OD = -ln((I + 1) / 256))
  moved to those of CRC-VAL-HE-7K (Kather et al. 2019, another centre, Macenko-normalised), measured
  on 32 of its tiles (issue 26): mean 0.361 / 0.920 / 0.390, s.d. 0.278 / 0.873 / 0.278;
- ``macenko``: Macenko et al. (2009) normalisation to the widely used reference stain matrix and
  maximal concentrations (H = 0.5626 / 0.7201 / 0.4062, E = 0.2159 / 0.8012 / 0.5581; 1.9705, 1.0308),
  the normalisation many public sets (CRC-VAL-HE-7K among them) were published with.

No other centre's tiles are on this machine; these copies stand in for them. Write them outside the
repository; nothing generated is committed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hf_tissue_vit.data import load_tissue_dataset
from hf_tissue_vit.imaging import decode_dataset_image
from hf_tissue_vit.transforms.stain import match_od_statistics

OTHER_CENTRE_OD_MEAN = (0.361, 0.920, 0.390)
OTHER_CENTRE_OD_STD = (0.278, 0.873, 0.278)
MACENKO_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])  # columns H, E
MACENKO_MAX_CONC = np.array([1.9705, 1.0308])
TARGETS = ("original", "other_centre", "macenko")
# Macenko's constants: transmitted light 240, OD threshold for tissue 0.15, angle percentile 1 %.
_IO, _BETA, _ALPHA = 240.0, 0.15, 1.0
_MIN_TISSUE_PIXELS = 50


def macenko(tile: np.ndarray, stains: np.ndarray = MACENKO_STAINS,
            max_conc: np.ndarray = MACENKO_MAX_CONC) -> np.ndarray:
    """HxWx3 uint8 tile normalised by Macenko's method to ``stains`` (3x2, columns H and E) and ``max_conc``.

    The tile's own two stain vectors are the extreme angles (1st and 99th percentile) of its tissue
    pixels' OD in the plane of the two largest eigenvectors; the concentrations, scaled so that their
    99th percentiles equal ``max_conc``, are re-coloured with ``stains``. A tile with almost no tissue
    (under 50 pixels with OD above 0.15 in every channel) is returned unchanged.
    """
    pixels = tile.reshape(-1, 3).astype(np.float64)
    od = -np.log((pixels + 1) / _IO)
    tissue = od[(od > _BETA).all(axis=1)]
    if len(tissue) < _MIN_TISSUE_PIXELS:
        return tile.copy()
    _, vectors = np.linalg.eigh(np.cov(tissue.T))
    plane = vectors[:, 1:3]  # the two largest
    projected = tissue @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [_ALPHA, 100 - _ALPHA])
    v_low = plane @ np.array([np.cos(low), np.sin(low)])
    v_high = plane @ np.array([np.cos(high), np.sin(high)])
    # eigenvectors' signs are arbitrary; stain vectors are positive ODs
    v_low, v_high = (v if v.sum() > 0 else -v for v in (v_low, v_high))
    # haematoxylin first: the vector with the larger red OD
    own = np.stack([v_low, v_high], axis=1) if v_low[0] > v_high[0] else np.stack([v_high, v_low], axis=1)
    conc = np.linalg.lstsq(own, od.T, rcond=None)[0]  # 2 x pixels
    scale = np.percentile(conc, 99, axis=1) / max_conc
    conc = conc / np.where(scale > 0, scale, 1)[:, None]
    out = _IO * np.exp(-stains @ conc) - 1
    return np.clip(np.rint(out.T), 0, 255).astype(np.uint8).reshape(tile.shape)


def other_centre(tile: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 tile with the other centre's per-channel OD mean and s.d. (see the module docstring)."""
    x = torch.tensor(tile, dtype=torch.float64).permute(2, 0, 1).unsqueeze(0)
    moved = match_od_statistics(x, torch.tensor(OTHER_CENTRE_OD_MEAN), torch.tensor(OTHER_CENTRE_OD_STD))
    return moved[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


RESTAIN = {"original": np.copy, "other_centre": other_centre, "macenko": macenko}


def write_restained(dataset_dir: str | os.PathLike, out: str | os.PathLike, split: str = "test",
                    targets: tuple[str, ...] = TARGETS) -> dict[str, int]:
    """Write ``out/<target>/<class>/<split>-<index>.png`` for every tile of the split; tiles per target.

    Existing files are kept, and a tile whose copies all exist is not decoded (a rerun finishes a killed one;
    each file is written under a temporary name and renamed)."""
    split_ds = load_tissue_dataset(dataset_dir, require_validation=False)[split]
    names = split_ds.features["label"].names
    written = dict.fromkeys(targets, 0)
    for index, label in enumerate(split_ds["label"]):
        paths = {t: Path(out) / t / names[label] / f"{split}-{index:06d}.png" for t in targets}
        missing = [t for t, path in paths.items() if not path.exists()]
        tile = decode_dataset_image(split_ds[index]["image"]) if missing else None
        for target in missing:
            path = paths[target]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(RESTAIN[target](tile)).save(tmp, format="PNG")
            os.replace(tmp, path)
        for target in targets:
            written[target] += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True, help="folder written by scripts/prepare_dataset.py")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="folder to write (outside the repository)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    args = parser.parse_args(argv)
    targets = tuple(t for t in args.targets.split(",") if t)
    unknown = [t for t in targets if t not in RESTAIN]
    if unknown or not targets:
        parser.error(f"--targets {args.targets!r}: unknown {unknown}; choose from {', '.join(TARGETS)}")
    counts = write_restained(args.dataset_dir, args.out, args.split, targets)
    print(f"wrote {counts} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
