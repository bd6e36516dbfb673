"""Create or update a Gradio Space that runs the demo app on a model already on the Hub.

    HF_TOKEN=hf_xxx python scripts/push_space.py outputs/vit-scratch-cpu --repo_id USER/MODEL \
        --space USER/SPACE [--examples DIR] [--dataset_dir data/kather6] [--n_per_class 2] \
        [--package "hf_tissue_vit[app] @ git+https://github.com/OWNER/hf_tissue_vit@v0.1.0"] [--private] \
        [--space_dir folder_to_keep] [--no_push]

Push the model first (scripts/push_to_hub.py OUTPUT_DIR --repo_id USER/MODEL). The Space gets app.py
(loads USER/MODEL from the Hub), requirements.txt (this package's [app] extra from its wheel, built from
this clone and uploaded in wheels/, or the --package line; torch and transformers pinned to the versions
the model was trained with),
README.md (sdk: gradio, sdk_version, app_file, models: [USER/MODEL], license) and examples/: a few
test tiles per class from --examples DIR, else from the test split of --dataset_dir or of the dataset
OUTPUT_DIR was trained on (Kather 2016, CC-BY 4.0, attributed in the Space's README). The model's
card (local and on the Hub) then links the Space.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hf_tissue_vit.cli import parse_folder_first, run_main
from hf_tissue_vit.fileio import scratch_dir
from hf_tissue_vit.hub import HubAuthError, check_repo_id, link_space


@dataclass
class SpaceArguments:
    output_dir: str = field(metadata={"help": "Training output dir of the model (for its dataset and licence); may "
                                              "come first without the flag."})
    repo_id: str = field(metadata={"help": "The model repo on the Hub, USER/MODEL (pushed already)."})
    space: str = field(metadata={"help": "The Space repo, USER/SPACE (created when missing)."})
    examples: str | None = field(default=None, metadata={"help": "Folder of example tiles for the Space."})
    dataset_dir: str | None = field(default=None, metadata={"help": "Dataset whose test split gives the examples "
                                                                    "(default: the one OUTPUT_DIR was trained on)."})
    n_per_class: int = field(default=2, metadata={"help": "Example tiles per class from the test split."})
    package: str | None = field(default=None, metadata={"help": "requirements.txt line installing hf_tissue_vit[app], "
                                                                "e.g. its git URL (default: this package's wheel, "
                                                                "built and uploaded with the Space)."})
    private: bool = field(default=False, metadata={"help": "Create the Space as private."})
    space_dir: str | None = field(default=None, metadata={"help": "Write the Space files here (kept); default a "
                                                                  "temporary folder."})
    no_push: bool = field(default=False, metadata={"help": "Only write the Space files (with --space_dir)."})

    def __post_init__(self) -> None:
        check_repo_id(self.repo_id, "--repo_id")
        check_repo_id(self.space, "--space")
        if not Path(self.output_dir, "config.json").is_file():
            raise FileNotFoundError(f"OUTPUT_DIR {self.output_dir!r} has no config.json: give a training output dir")
        if self.examples is not None and not Path(self.examples).is_dir():
            raise FileNotFoundError(f"--examples {self.examples!r}: no such folder")
        if self.no_push and not self.space_dir:
            raise ValueError("--no_push needs --space_dir (where to keep the files)")
        if self.n_per_class < 1:
            raise ValueError(f"--n_per_class must be >= 1, got {self.n_per_class}")


def _run(argv: list[str] | None) -> int:
    args = parse_folder_first(SpaceArguments, argv, "--repo_id USER/MODEL --space USER/SPACE [options]")
    from hf_tissue_vit.app.examples import MOSAIC_NAME, find_examples, make_mosaic
    from hf_tissue_vit.app.model_info import load_model_info
    from hf_tissue_vit.app.space import check_model_on_hub, check_requirement, push_space, write_space

    if args.package:
        check_requirement(args.package)
    if not args.no_push:
        check_model_on_hub(args.repo_id)  # before any work: the Space would have nothing to load
    info = load_model_info(args.output_dir)
    # The Space's files go to --space_dir when given (kept); otherwise to scratch folders removed at exit.
    folder = Path(args.space_dir) if args.space_dir else scratch_dir("space_")
    picked = scratch_dir("space_examples_")  # copied into the Space by write_space
    examples = find_examples(info.label_names, picked, args.examples, args.dataset_dir or info.dataset_dir,
                             args.n_per_class)
    mosaic = make_mosaic(examples, picked / MOSAIC_NAME) if examples else None
    write_space(folder, args.repo_id, examples, mosaic, args.package, info.license, versions=info.versions)
    print(f"wrote the Space files ({len(examples)} example tiles) to {folder}")
    if not args.no_push:
        url = push_space(folder, args.space, private=args.private)
        print(f"pushed the Space {args.space}: {url}")
        if link_space(args.output_dir, args.repo_id, args.space):
            print(f"the model card of {args.repo_id} now links the Space")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Write and push the Space; 2 on bad input, 1 when the Hub refuses the token."""
    return run_main(_run, argv, exit_codes={HubAuthError: 1})


if __name__ == "__main__":
    sys.exit(main())
