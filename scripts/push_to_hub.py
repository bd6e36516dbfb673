"""Push a training output dir (model.safetensors, config, processor, model card, figures) to the Hub.

    HF_TOKEN=hf_xxx python scripts/push_to_hub.py outputs/vit-scratch-cpu --repo_id USER/NAME \
        [--private] [--revision BRANCH] [--commit_message TEXT] [--license cc-by-4.0] \
        [--base_model google/vit-base-patch16-224] [--dataset_id USER/DATASET] [--replace_card]

The token comes from huggingface_hub's usual places (HF_TOKEN, or `hf auth login`); it is never
printed or written. Pushing again makes a new commit on the same repo. Checkpoints and pickles
are never uploaded. A README.md the folder's author wrote (e.g. by plain `Trainer`) is pushed as it
is; `--replace_card` replaces it with the package's card, which keeps its metadata (saved first as
README.user.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from hf_tissue_vit.cli import parse_folder_first, run_main
from hf_tissue_vit.hub import HubAuthError, check_repo_id, push_output_dir


@dataclass
class PushArguments:
    output_dir: str = field(metadata={"help": "Training output dir (holds model.safetensors, config.json, ...); "
                                              "may come first without the flag."})
    repo_id: str = field(metadata={"help": "Model repo on the Hub, USER/NAME (created when missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created from main)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})
    license: str | None = field(default=None, metadata={"help": "Licence id for the card (default: the existing "
                                                                 "card's, else cc-by-4.0 for this package's runs, "
                                                                 "the licence of the Kather 2016 tiles)."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the model this one was fine-tuned "
                                                                    "from, when the folder does not say."})
    dataset_id: str | None = field(default=None, metadata={"help": "Hub id of the training dataset, when the "
                                                                    "folder does not say."})
    replace_card: bool = field(default=False, metadata={"help": "Replace a README.md that this package did not "
                                                                "write (kept as README.user.md)."})

    def __post_init__(self) -> None:
        check_repo_id(self.repo_id)
        for flag in ("base_model", "dataset_id"):
            if getattr(self, flag) is not None:
                check_repo_id(getattr(self, flag), f"--{flag}")
        if self.revision is not None and not self.revision.strip():
            raise ValueError("--revision must be a branch name")


def _run(argv: list[str] | None) -> int:
    args = parse_folder_first(PushArguments, argv, "--repo_id USER/NAME [options]")
    url = push_output_dir(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message, license=args.license, base_model=args.base_model,
                          dataset_id=args.dataset_id, replace_user_card=args.replace_card)
    print(f"pushed {args.output_dir} to {args.repo_id}: {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Push the output dir; 2 on bad input, 1 when the Hub refuses the token."""
    return run_main(_run, argv, exit_codes={HubAuthError: 1})


if __name__ == "__main__":
    sys.exit(main())
