"""Classify tile images in batches and write one CSV row per file.

    python scripts/predict.py --model outputs/vit-scratch-cpu --inputs tiles/ "more/**/*.tif" one.png \
        --output predictions.csv [--tta] [--batch_size 128] [--top_k 3] [--bf16 auto|true|false]

Folders are searched recursively for image files (any case of the extensions in
hf_tissue_vit.constants.IMAGE_EXTENSIONS); quote glob patterns. CSV columns: file, label, score,
error (empty when fine), one probability column per class, then top2_label, top2_score, ... when
--top_k > 1. Unreadable files are rows with `error` set; the exit status stays 0. Whole-slide images
(.svs, .ndpi, .mrxs, ...) are skipped with a warning (make a tissue map of a slide with
scripts/tissue_map.py). Files far from the model's training tile size (a side over 2x smaller or
larger) and greyscale files are classified, with one warning per kind (see hf_tissue_vit.predict.input_checks).
--mpp (the images' µm/px) resizes tiles of another scale to the model's (config.mpp) before its image
processor, as tissue_map.py reads slides at the model's scale; when either is unknown, one warning.
The --output file is checked to be writable before the model is loaded.
Many GPUs: `accelerate launch [--num_processes N] scripts/predict.py ...` (add --device cpu for CPU
processes) gives each process a contiguous shard of the files, on its own device; the main process
joins the shards into the one --output CSV, in input order.
--bf16 auto (default) runs a bf16 copy of the model where the CPU/GPU has native bf16 (predictions
can differ slightly from fp32); --bf16 false gives fp32 numbers. Each tile gets exactly the
pixel_values the saved image processor gives it (as pipeline() does).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_tissue_vit.cli import argument_parser, run_main
from hf_tissue_vit.distributed import ShardedCSV, gather, process_device, process_state, progress_name, split
from hf_tissue_vit.fileio import check_writable_file
from hf_tissue_vit.hardware import parse_bf16_flag
from hf_tissue_vit.predict import TilePredictor, check_inputs, check_top_k, list_input_files, write_prediction_rows
from hf_tissue_vit.units import check_mpp


@dataclass
class PredictArguments:
    model: str = field(metadata={"help": "Trained output dir or Hub model id."})
    inputs: list[str] = field(metadata={"help": "Image files, folders (recursive) and/or glob patterns.", "nargs": "+"})
    output: str = field(default="predictions.csv", metadata={"help": "CSV file to write (atomically)."})
    tta: bool = field(default=False, metadata={"help": "Average softmax over the 8 dihedral views."})
    batch_size: int = field(default=128, metadata={"help": "Tiles per forward pass."})
    top_k: int = field(default=1, metadata={"help": "Also write the top-k labels and scores (k >= 2)."})
    num_workers: int = field(default=4, metadata={"help": "Image decoding threads (0 = none)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's)."})
    mpp: float | None = field(default=None, metadata={
        "help": "Micrometres per pixel of the images: tiles of another scale than the model's (config.mpp) are "
                "resized to it before its image processor (without it: one warning, tiles as they are)."})
    bf16: str = field(default="auto", metadata={
        "help": "bf16 model copy: auto (on where the CPU/GPU has native bf16), true or false; --bf16 alone = true.",
        "nargs": "?", "const": "true"})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda when available; under "
                                                                  "accelerate launch each process its own GPU)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.top_k < 1:
            raise ValueError(f"--top_k must be >= 1, got {self.top_k}")
        if self.num_workers < 0 or (self.num_threads is not None and self.num_threads < 1):
            raise ValueError("--num_workers must be >= 0 and --num_threads >= 1")
        parse_bf16_flag(self.bf16)
        check_mpp(self.mpp, "--mpp")
        check_inputs(self.inputs)
        check_writable_file(self.output, "--output")  # before the model is loaded


def _run(argv: list[str] | None) -> int:
    parser = argument_parser(PredictArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    state = process_state(args.device)
    # Paths only (not images): gives the progress bar a total and fails early on empty inputs.
    paths = list_input_files(args.inputs, "--inputs")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    predictor = TilePredictor.from_pretrained(
        args.model, device=process_device(state, args.device), batch_size=args.batch_size, tta=args.tta,
        num_workers=args.num_workers, bf16=parse_bf16_flag(args.bf16), mpp=args.mpp,
    )
    check_top_k(args.top_k, predictor.label_names)
    mine = split(state, paths)  # a contiguous shard each: the joined CSV keeps the input order
    with ShardedCSV(state, args.output, predictor.csv_columns(args.top_k)) as handle:
        counts = write_prediction_rows(predictor.predict_files(mine), handle, predictor.label_names, args.top_k,
                                       progress=not args.no_progress, total=len(mine), desc=progress_name(state))
    everyone = gather([counts])
    if state.is_main_process:
        files, errors = sum(c["files"] for c in everyone), sum(c["errors"] for c in everyone)
        print(f"wrote {files} predictions to {Path(args.output)} ({errors} unreadable files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Classify the input tiles into the CSV; 2 on bad input."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
