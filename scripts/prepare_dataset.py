"""Build labelled tissue tiles as a Hugging Face dataset (train / validation / test).

Your own tiles: one folder per class (any names; sorted names give the label ids), or train/ val/ test/
folders of class folders, or a CSV/Parquet manifest of path,label[,slide][,split] rows:

    python scripts/prepare_dataset.py --source my_tiles/ --output_dir data/my_tiles --mpp 0.25
    python scripts/prepare_dataset.py --source tiles.csv --output_dir data/my_tiles --classes tumour,normal \
        --label_map tumor=tumour --split_by slide

Known releases are presets, recognised by their folder names: Kather 2016 (``01_TUMOR`` ...; 6 classes,
``--keep_all_classes`` for 8) and NCT-CRC-HE-100K / CRC-VAL-HE-7K (``ADI`` ... ``TUM``; 9 classes, 0.5 µm/px):

    python scripts/prepare_dataset.py --source ../shared/data/kather2016_6class --output_dir data/kather6

Other sources: a ``.zip`` of class folders, a Hub dataset id, or nothing (downloads the Kather 2016
Zenodo zip into the HF cache). Slide-disjoint split and push to the Hub:

    python scripts/prepare_dataset.py --source Kather_texture_2016_image_tiles_5000.zip \\
        --output_dir data/kather6_slides --split_by slide --push_to_hub --hub_dataset_id user/kather6
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_tissue_vit.cli import run_main
from hf_tissue_vit.constants import KATHER_MPP, NCT_MPP, ZENODO_URL
from hf_tissue_vit.data import (
    PRESET_NAMES,
    SOURCE_TYPES,
    SPLIT_MODES,
    ClassChoice,
    build_dataset_with_report,
    build_workspace,
    check_hub_id,
    check_md5,
    check_mpp,
    check_output_dir,
    load_tissue_dataset,
    read_dataset_metadata,
    record_hub_dataset_id,
    save_dataset,
)
from hf_tissue_vit.hub import HubAuthError, push_dataset


@dataclass
class PrepareArguments:
    output_dir: str = field(metadata={"help": "Folder to write the dataset to (save_to_disk format + README.md card)."})
    source: str | None = field(default=None, metadata={
        "help": "A folder (or .zip) of class folders, a train/ val/ test/ folder, a .csv/.parquet manifest "
        "(path,label[,slide][,split]) or a Hub dataset id. Omit to download the Kather 2016 Zenodo zip."})
    source_type: str = field(default="auto", metadata={"help": f"How to read --source: one of {SOURCE_TYPES}."})
    split_by: str = field(default="stratified", metadata={
        "help": "stratified: 68/16/16%% per class at random; slide: no slide in two splits."})
    seed: int = field(default=42, metadata={"help": "Seed of the split (same files + seed = same split)."})
    classes: str | None = field(default=None, metadata={
        "help": "Comma-separated class names to keep, in label order (default: all, sorted folder names, a "
        "manifest's order of first appearance, or the preset's order)."})
    label_map: str | None = field(default=None, metadata={
        "help": "Rename or merge classes: comma-separated source=class pairs, e.g. tumour=Tumor,TUM=Tumor."})
    preset: str = field(default="auto", metadata={
        "help": f"Known release: one of {PRESET_NAMES} (auto: recognised by folder names; none: names as they are)."})
    citation: str | None = field(default=None, metadata={
        "help": "How to cite your data, for the dataset and model cards (presets bring their own)."})
    num_proc: int | None = field(default=None, metadata={
        "help": "Processes that decode tiles (default: the machine's cores, at most 8)."})
    keep_all_classes: bool = field(default=False, metadata={
        "help": "Kather 2016 release: keep 07_ADIPOSE and 08_EMPTY too (8 classes)."})
    skip_bad_files: bool = field(default=False, metadata={
        "help": "Skip unreadable/truncated/empty image files (listed in the log) instead of stopping."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the dataset and its card to --hub_dataset_id."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset repo, user/name."})
    private: bool = field(default=False, metadata={"help": "Create the Hub dataset repo as private."})
    url: str = field(default=ZENODO_URL, metadata={
        "help": "Where to download the release zip when --source is omitted."})
    md5: str | None = field(default=None, metadata={
        "help": "Expected MD5 of the zip (download or local --source zip); the Zenodo MD5 for the default --url."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Download cache (default $HF_HOME/hf_tissue_vit/downloads)."})
    mpp: float | None = field(default=None, metadata={
        "help": "Micrometres per pixel of your tiles, recorded in the metadata and card. Without it: the "
        f"preset's (Kather 2016 {KATHER_MPP}, NCT-CRC-HE {NCT_MPP}), else the TIFF files' resolution tags."})

    def __post_init__(self) -> None:
        if self.split_by not in SPLIT_MODES:
            raise ValueError(f"--split_by must be one of {SPLIT_MODES}, got {self.split_by!r}")
        if self.source_type not in SOURCE_TYPES:
            raise ValueError(f"--source_type must be one of {SOURCE_TYPES}, got {self.source_type!r}")
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("--push_to_hub needs --hub_dataset_id user/name")
        if self.hub_dataset_id:
            check_hub_id(self.hub_dataset_id, "--hub_dataset_id", namespace=True)
        check_mpp(self.mpp, "--mpp")
        ClassChoice(self.preset, self.classes, self.label_map)  # bad --classes/--label_map/--preset: one line
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"--num_proc must be at least 1, got {self.num_proc}")
        if self.private and not self.push_to_hub:
            raise ValueError("--private only applies with --push_to_hub")
        self.md5 = check_md5(self.md5, "--md5")


def _run(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses(args=argv)
    check_output_dir(args.output_dir)  # refuse before any decoding
    with build_workspace(args.output_dir) as work:  # Arrow shards, streamed as tiles are decoded
        dataset, report = build_dataset_with_report(
            args.source, split_by=args.split_by, seed=args.seed, keep_all_classes=args.keep_all_classes,
            skip_bad_files=args.skip_bad_files, source_type=args.source_type, md5=args.md5, url=args.url,
            cache_dir=args.cache_dir, mpp=args.mpp, classes=args.classes, label_map=args.label_map,
            preset=args.preset, citation=args.citation, num_proc=args.num_proc, work_dir=work,
        )
        output_dir = save_dataset(dataset, args.output_dir, report=report)
        del dataset
    if args.push_to_hub:
        url = push_dataset(load_tissue_dataset(output_dir), args.hub_dataset_id,
                           metadata=read_dataset_metadata(output_dir), private=args.private,
                           commit_message="Upload tissue tiles (hf_tissue_vit)")
        record_hub_dataset_id(output_dir, args.hub_dataset_id)
        print(f"pushed to {url}")
    sizes = ", ".join(f"{split} {sum(c.values())}" for split, c in report.split_class_counts.items())
    print(f"saved {output_dir} ({sizes}; split by {report.split_by}, {report.build_seconds:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Build, save (and optionally push) the dataset; 2 on bad input, 1 when the Hub refuses the token
    (the dataset is saved by then; rerun with a valid token to push it)."""
    return run_main(_run, argv, exit_codes={HubAuthError: 1})


if __name__ == "__main__":
    sys.exit(main())
