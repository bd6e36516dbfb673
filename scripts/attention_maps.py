"""Attention rollout and last-layer per-head CLS attention, overlaid on tiles.

    python scripts/attention_maps.py --model outputs/vit_scratch_cpu --dataset_dir data/kather_ds \
        --split test --output_dir attention [--n_per_class 4] [--head_fusion mean|max]
    python scripts/attention_maps.py --model USER/vit-kather --images a.tif b.tif tiles/ --output_dir attention

Writes attention_grid.png (rows = classes, --n_per_class tiles each, titled with true and predicted
label; the row is the predicted class when the true one is unknown) and tiles/<row>_<name>.png with
the tile, its rollout and one map per last-layer head. With --images the true label is taken from a
parent folder named like a class (e.g. 01_TUMOR or Tumor).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser

from hf_tissue_vit.cli import run_main
from hf_tissue_vit.constants import KATHER_FOLDERS
from hf_tissue_vit.imaging import decode_dataset_image
from hf_tissue_vit.interpret import (
    HEAD_FUSIONS,
    explain_tiles,
    load_vit_config,
    save_attention_grid,
    save_tile_figure,
)
from hf_tissue_vit.predict import (
    check_inputs,
    iter_input_files,
    label_names_of,
    read_large_image,
)


@dataclass
class AttentionArguments:
    model: str = field(metadata={"help": "Trained output dir or Hub model id."})
    output_dir: str = field(metadata={"help": "Folder for attention_grid.png and tiles/*.png."})
    images: list[str] | None = field(default=None, metadata={"help": "Tile files, folders or globs.", "nargs": "+"})
    dataset_dir: str | None = field(default=None, metadata={"help": "Dataset saved by prepare_dataset.py."})
    split: str = field(default="test", metadata={"help": "Split of --dataset_dir to draw tiles from."})
    n_per_class: int = field(default=4, metadata={"help": "Tiles per class (grid columns)."})
    head_fusion: str = field(default="mean", metadata={"help": "Rollout head fusion: mean or max."})
    discard_ratio: float = field(default=0.0, metadata={"help": "Rollout: drop this fraction of weakest attentions."})
    alpha: float = field(default=0.5, metadata={"help": "Heatmap opacity."})
    seed: int = field(default=0, metadata={"help": "Which tiles are drawn from the split."})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda when available)."})

    def __post_init__(self) -> None:
        if (self.images is None) == (self.dataset_dir is None):
            raise ValueError("give exactly one of --images FILE... or --dataset_dir DIR (with --split)")
        if self.head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"--head_fusion must be one of {HEAD_FUSIONS}, got {self.head_fusion!r}")
        if self.n_per_class < 1 or not 0 <= self.discard_ratio < 1 or not 0 <= self.alpha <= 1:
            raise ValueError("--n_per_class must be >= 1, --discard_ratio in [0, 1) and --alpha in [0, 1]")
        if self.images is not None:
            check_inputs(self.images)


def label_from_path(path: str, label_names: list[str]) -> str | None:
    """Class of a tile from a parent folder named like a class (01_TUMOR, Tumor, tumor)."""
    lookup = {name.lower(): name for name in label_names}
    lookup.update({folder.lower(): name for folder, name in KATHER_FOLDERS.items() if name in label_names})
    return next((lookup[p.lower()] for p in reversed(Path(path).parts[:-1]) if p.lower() in lookup), None)


def tiles_from_dataset(args: AttentionArguments) -> tuple[list[np.ndarray], list[str], list[str]]:
    from hf_tissue_vit.data import load_tissue_dataset

    dataset = load_tissue_dataset(dataset_dir=args.dataset_dir)
    if args.split not in dataset:
        raise ValueError(f"--split {args.split!r} not in --dataset_dir (splits: {list(dataset)})")
    split = dataset[args.split]
    names = split.features["label"].names
    order = np.random.default_rng(args.seed).permutation(len(split))
    labels = np.asarray(split["label"])
    picked = [i for k in range(len(names)) for i in order[labels[order] == k][: args.n_per_class]]
    rows = split.select(picked)
    files = rows["filename"] if "filename" in rows.column_names else [f"{args.split}_{i}" for i in picked]
    return [decode_dataset_image(r["image"]) for r in rows], [Path(f).stem for f in files], [names[k] for k in rows["label"]]


def _run(argv: list[str] | None) -> int:
    parser = HfArgumentParser(AttentionArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    load_vit_config(args.model, "attention maps")  # a non-ViT model is refused before any work
    if args.dataset_dir is not None:
        tiles, names, truths = tiles_from_dataset(args)
    from hf_tissue_vit.modeling import load_for_inference

    model, processor = load_for_inference(args.model, device=args.device)
    label_names = label_names_of(model)
    if args.images is not None:
        paths = list(iter_input_files(args.images))
        tiles = [read_large_image(p) for p in paths]
        names, truths = [Path(p).stem for p in paths], [label_from_path(p, label_names) for p in paths]
    if not tiles:
        raise ValueError("no tiles found to explain")
    items = explain_tiles(model, processor, tiles, names, truths, args.head_fusion, args.discard_ratio)
    out = Path(args.output_dir)
    per_row: dict[str, int] = {}
    grid_items = []
    for item in items:
        row = item.true_label or item.pred_label
        per_row[row] = per_row.get(row, 0) + 1
        save_tile_figure(item, out / "tiles" / f"{row}_{per_row[row]:03d}_{item.name}.png", args.alpha)
        if per_row[row] <= args.n_per_class:
            grid_items.append(item)
    save_attention_grid(grid_items, out / "attention_grid.png", label_names, args.alpha)
    correct = sum(i.true_label == i.pred_label for i in items if i.true_label)
    known = sum(i.true_label is not None for i in items)
    print(f"wrote {out / 'attention_grid.png'} and {len(items)} tile figures ({correct}/{known} correct)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Explain the tiles and write the attention figures; 2 on bad input."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
