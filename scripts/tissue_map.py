"""Classify a whole-slide image (or a large plain image) window by window and draw a tissue map.

    python scripts/tissue_map.py --model outputs/vit-scratch-cpu --image slide.svs --output_dir maps/slide \
        [--mpp 0.495] [--slide_mpp 0.25] [--tile 150] [--stride 150|75] [--workers 2] [--bf16 auto]
    python scripts/tissue_map.py --model M --image slides/ "more/*.tiff" --output_dir maps/   (many slides)
    accelerate launch --num_processes 4 scripts/tissue_map.py --model M --image slides/ --output_dir maps/
        (many slides on 4 GPUs; add --device cpu for CPU processes)

Slides (SVS, NDPI, MRXS, pyramidal TIFF ...) are read with OpenSlide (pip install 'hf_tissue_vit[wsi]')
at the model's µm/px (its config.mpp, or --mpp) from the level nearest above it; plain images
(PNG, JPEG, flat TIFF) with PIL, in windows of --tile image pixels unless they record a µm/px.
Only windows with tissue (found on a low-resolution level) are read and classified. Writes
tissue_map.png, class_fractions.csv/.json (mm² and fraction of tissue per class), labels.npy
(int16: class id, -1 background, -2 unreadable), probabilities.npy and tissue_map.geojson (QuPath:
File > Import objects) per slide, one folder per slide for several, and summary.csv.

Under `accelerate launch` the slides are dealt out whole, longest first, to the processes (each on
its own GPU); the outputs are those of a one-process run. A slide's folder ends with
slide_map_done.json: running the same command again skips the slides that are done (a killed run
resumes); --overwrite maps them again. A slide that fails while mapped is reported in summary.csv
(exit status 1) and the others go on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch

from hf_tissue_vit.cli import argument_parser, run_main
from hf_tissue_vit.distributed import process_device, process_state
from hf_tissue_vit.fileio import check_writable_dir
from hf_tissue_vit.hardware import parse_bf16_flag
from hf_tissue_vit.predict import TilePredictor
from hf_tissue_vit.slides import SlideMapOptions, map_slides


@dataclass
class TissueMapArguments:
    model: str = field(metadata={"help": "Trained output dir or Hub model id."})
    image: list[str] = field(metadata={"help": "Slides or images: files, folders or glob patterns (quote them)."})
    output_dir: str = field(metadata={"help": "Folder for the map, fractions, label grid and GeoJSON "
                                              "(one sub-folder per slide when there are several)."})
    mpp: float | None = field(default=None, metadata={"help": "µm/px the model was trained at (default: its "
                                                               "config.mpp; Kather tiles: 0.495)."})
    slide_mpp: float | None = field(default=None, metadata={"help": "µm/px of the slides' level 0, for slides "
                                                                     "that do not record it."})
    tile: int = field(default=150, metadata={"help": "Window size in px at the model's µm/px (Kather: 150)."})
    stride: int = field(default=150, metadata={"help": "Step between windows; < tile gives overlapping windows."})
    background_threshold: float = field(default=0.8, metadata={"help": "Windows with at least this fraction of "
                                                                         "background are not classified."})
    min_tissue_area: float = field(default=0.25, metadata={"help": "Tissue pieces smaller than this many "
                                                                    "window areas are ignored (dust)."})
    batch_size: int = field(default=64, metadata={"help": "Windows per forward pass."})
    workers: int = field(default=2, metadata={"help": "Threads reading windows (0 = read in the main thread)."})
    tta: bool = field(default=False, metadata={"help": "Average softmax over the 8 dihedral views."})
    max_side: int = field(default=1024, metadata={"help": "Longest side of the picture's background image."})
    max_image_pixels: int | None = field(default=None, metadata={"help": "Raise PIL's decompression-bomb limit "
                                                                           "for plain images (default about 89 Mpx)."})
    bf16: str = field(default="auto", metadata={
        "help": "bf16 autocast: auto (on where the CPU/GPU has native bf16), true or false; --bf16 alone = true.",
        "nargs": "?", "const": "true"})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda when available; under "
                                                                  "accelerate launch each process its own GPU)."})
    overwrite: bool = field(default=False, metadata={"help": "Map slides again whose folder is marked done."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's)."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("--batch_size must be >= 1")
        parse_bf16_flag(self.bf16)
        self.options = SlideMapOptions(  # checks the mapping flags
            tile=self.tile, stride=self.stride, mpp=self.mpp, slide_mpp=self.slide_mpp,
            background_threshold=self.background_threshold, min_tissue_area=self.min_tissue_area,
            workers=self.workers, max_side=self.max_side, max_image_pixels=self.max_image_pixels)
        check_writable_dir(self.output_dir, "--output_dir")  # before the slides and the model are read


def _run(argv: list[str] | None) -> int:
    parser = argument_parser(TissueMapArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    state = process_state(args.device)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    predictor = TilePredictor.from_pretrained(args.model, device=process_device(state, args.device),
                                              batch_size=args.batch_size, tta=args.tta,
                                              bf16=parse_bf16_flag(args.bf16))
    rows = map_slides(predictor, args.image, args.output_dir, args.options, overwrite=args.overwrite, state=state)
    for row in rows if state.is_main_process else []:
        if row["error"]:
            print(f"{row['slide']}: failed: {row['error']}")
            continue
        fractions = {k[: -len(" fraction")]: round(v, 4) for k, v in row.items() if k.endswith(" fraction")}
        area = "" if row["tissue_area_mm2"] is None else f", {row['tissue_area_mm2']:.2f} mm² of tissue"
        print(json.dumps(fractions))
        print(f"{row['slide']}: {row['tissue_windows']} tissue windows ({row['unreadable_windows']} unreadable), "
              f"{row['background_windows']} background windows{area}, {row['windows_per_s'] or 0:.1f} windows/s; "
              f"wrote {row['output_dir']}")
    return 1 if any(row["error"] for row in rows) else 0


def main(argv: list[str] | None = None) -> int:
    """Map the slides and write their outputs; 2 on bad input, 1 when a slide failed while mapping."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
