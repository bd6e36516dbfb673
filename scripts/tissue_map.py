"""Classify a large H&E image window by window and draw a colour-coded tissue map.

    python scripts/tissue_map.py --model outputs/vit_scratch_cpu --image CRC-Prim-HE-01.tif \
        --output_dir tissue_map_01 [--tile 150] [--stride 150|75] [--background_threshold 0.8] [--bf16 auto]

Writes tissue_map.png (class colours over the downscaled image, legend with area fractions),
class_fractions.csv/.json, label_grid.npy (int16, -1 = background window) and probabilities.npy.
With --stride < --tile windows overlap and the grid has one cell per window (see hf_tissue_vit.predict).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from hf_tissue_vit.cli import run_main
from hf_tissue_vit.hardware import parse_bf16_flag
from hf_tissue_vit.predict import (
    TilePredictor,
    open_large_image,
    save_tissue_map,
    tissue_map,
)
from hf_tissue_vit.predict.outputs import check_output_dir, output_errors


@dataclass
class TissueMapArguments:
    model: str = field(metadata={"help": "Trained output dir or Hub model id."})
    image: str = field(metadata={"help": "Large RGB image (TIFF, PNG, JPEG ...)."})
    output_dir: str = field(metadata={"help": "Folder for the map, fractions and label grid."})
    tile: int = field(default=150, metadata={"help": "Window size in pixels (150 = Kather tiles at 0.495 um/px)."})
    stride: int = field(default=150, metadata={"help": "Step between windows; < tile gives overlapping windows."})
    background_threshold: float = field(default=0.8, metadata={"help": "Windows with at least this fraction of "
                                                                         "glass/background pixels are not classified."})
    batch_size: int = field(default=64, metadata={"help": "Windows per forward pass."})
    tta: bool = field(default=False, metadata={"help": "Average softmax over the 8 dihedral views."})
    max_side: int = field(default=1024, metadata={"help": "Longest side of the picture's background image."})
    max_image_pixels: int | None = field(default=None, metadata={"help": "Raise PIL's decompression-bomb limit "
                                                                           "(default about 89 Mpx)."})
    bf16: str = field(default="auto", metadata={
        "help": "bf16 autocast: auto (on where the CPU/GPU has native bf16), true or false; --bf16 alone = true.",
        "nargs": "?", "const": "true"})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda when available)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's)."})

    def __post_init__(self) -> None:
        if self.tile < 1 or self.stride < 1 or self.batch_size < 1 or self.max_side < 16:
            raise ValueError("--tile, --stride and --batch_size must be >= 1 and --max_side >= 16")
        if not 0 < self.background_threshold <= 1:
            raise ValueError(f"--background_threshold must be in (0, 1], got {self.background_threshold}")
        parse_bf16_flag(self.bf16)
        check_output_dir(self.output_dir, "--output_dir")  # before the image and the model are loaded


def _run(argv: list[str] | None) -> int:
    parser = HfArgumentParser(TissueMapArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    with open_large_image(args.image, args.max_image_pixels) as image:  # fails before loading the model
        if min(image.size) < args.tile:
            raise ValueError(f"--image {args.image!r} ({image.width}x{image.height} px) is smaller than "
                             f"--tile {args.tile}")
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        predictor = TilePredictor.from_pretrained(args.model, device=args.device, batch_size=args.batch_size,
                                                  tta=args.tta, bf16=parse_bf16_flag(args.bf16))
        result = tissue_map(predictor, image, tile=args.tile, stride=args.stride,
                            background_threshold=args.background_threshold, progress=True)
        with output_errors(args.output_dir, "--output_dir"):
            paths = save_tissue_map(result, image, args.output_dir, max_side=args.max_side)
    fractions = result.area_fractions()
    print(json.dumps({name: round(v["fraction_of_tissue"], 4) for name, v in fractions["classes"].items()}))
    print(f"background windows: {fractions['background_cells']} of {fractions['cells']}; "
          f"wrote {paths['tissue_map.png']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Classify the image window by window and write the map; 2 on bad input."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
