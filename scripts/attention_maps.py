"""Attention rollout and last-layer per-head CLS attention, overlaid on tiles.

    python scripts/attention_maps.py --model outputs/vit-scratch-cpu --dataset_dir data/kather_ds \
        --split test --output_dir attention [--n_per_class 4] [--head_fusion mean|max]
    python scripts/attention_maps.py --model USER/vit-kather --images a.tif b.tif tiles/ --output_dir attention

Writes attention_grid.png (rows = classes, --n_per_class tiles each, titled with true and predicted
label; the row is the predicted class when the true one is unknown) and tiles/<row>_<name>.png with
the tile, its rollout and one map per last-layer head. With --images the true label is taken from a
parent folder named like a class (e.g. 01_TUMOR or Tumor). An unreadable file or dataset row is
reported and skipped; images larger than --max_side px are downscaled as they are read (the maps
are computed at the model's input size, and memory stays bounded whatever the image size).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_tissue_vit.cli import run_main
from hf_tissue_vit.fileio import check_writable_dir
from hf_tissue_vit.interpret import (
    HEAD_FUSIONS,
    explain_tiles,
    load_vit_config,
    save_attention_grid,
    save_tile_figure,
    tiles_from_dataset,
    tiles_from_images,
)
from hf_tissue_vit.predict import check_inputs, label_names_of, list_input_files


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
    max_side: int = field(default=1024, metadata={"help": "Longest side an image is read and drawn at (larger "
                                                          "images are downscaled as they are read)."})
    seed: int = field(default=0, metadata={"help": "Which tiles are drawn from the split."})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda when available)."})

    def __post_init__(self) -> None:
        if (self.images is None) == (self.dataset_dir is None):
            raise ValueError("give exactly one of --images FILE... or --dataset_dir DIR (with --split)")
        if self.head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"--head_fusion must be one of {HEAD_FUSIONS}, got {self.head_fusion!r}")
        if self.n_per_class < 1 or not 0 <= self.discard_ratio < 1 or not 0 <= self.alpha <= 1:
            raise ValueError("--n_per_class must be >= 1, --discard_ratio in [0, 1) and --alpha in [0, 1]")
        if self.max_side < 16:
            raise ValueError(f"--max_side must be >= 16, got {self.max_side}")
        if self.images is not None:
            check_inputs(self.images)
        check_writable_dir(self.output_dir, "--output_dir")  # before any model or data is loaded


def _run(argv: list[str] | None) -> int:
    parser = HfArgumentParser(AttentionArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    config = load_vit_config(args.model, "attention maps")  # a non-ViT model is refused before any work
    if args.dataset_dir is not None:
        found = tiles_from_dataset(args.dataset_dir, args.split, args.n_per_class, args.seed)
    else:
        found = tiles_from_images(list_input_files(args.images, "--images"), label_names_of(config), args.max_side)
    if not found.tiles:
        raise ValueError("no tiles to explain" + (f": {'; '.join(found.skipped)}" if found.skipped else ""))
    from hf_tissue_vit.modeling import load_for_inference

    model, processor = load_for_inference(args.model, device=args.device)
    items = explain_tiles(model, processor, found.tiles, found.names, found.true_labels, args.head_fusion,
                          args.discard_ratio, max_side=args.max_side)
    out = Path(args.output_dir)
    per_row: dict[str, int] = {}
    grid_items = []
    for item in items:
        row = item.true_label or item.pred_label
        per_row[row] = per_row.get(row, 0) + 1
        save_tile_figure(item, out / "tiles" / f"{row}_{per_row[row]:03d}_{item.name}.png", args.alpha)
        if per_row[row] <= args.n_per_class:
            grid_items.append(item)
    save_attention_grid(grid_items, out / "attention_grid.png", label_names_of(model), args.alpha)
    correct = sum(i.true_label == i.pred_label for i in items if i.true_label)
    known = sum(i.true_label is not None for i in items)
    skipped = f"; {len(found.skipped)} unreadable skipped" if found.skipped else ""
    print(f"wrote {out / 'attention_grid.png'} and {len(items)} tile figures ({correct}/{known} correct{skipped})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Explain the tiles and write the attention figures; 2 on bad input."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
