"""Push a training output dir (model.safetensors, config, processor, model card, figures) to the Hub.

    HF_TOKEN=hf_xxx python scripts/push_to_hub.py outputs/vit_scratch_cpu --repo_id USER/NAME \
        [--private] [--revision BRANCH] [--commit_message TEXT] [--license cc-by-4.0]

The token comes from huggingface_hub's usual places (HF_TOKEN, or `hf auth login`); it is never
printed or written. Pushing again makes a new commit on the same repo. Checkpoints and pickles
are never uploaded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_tissue_vit.cli import run_main
from hf_tissue_vit.hub import HubAuthError, push_output_dir


@dataclass
class PushArguments:
    output_dir: str = field(metadata={"help": "Training output dir (holds model.safetensors, config.json, ...)."})
    repo_id: str = field(metadata={"help": "Model repo on the Hub, USER/NAME (created when missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created from main)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})
    license: str | None = field(default=None, metadata={"help": "Licence id for the card (default cc-by-4.0, "
                                                                 "the licence of the Kather 2016 training data)."})

    def __post_init__(self) -> None:
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise ValueError(f"--repo_id must look like USER/NAME (got {self.repo_id!r})")
        if self.revision is not None and not self.revision.strip():
            raise ValueError("--revision must be a branch name")


def _run(argv: list[str] | None) -> int:
    parser = HfArgumentParser(PushArguments)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # OUTPUT_DIR given positionally, as documented
        argv = ["--output_dir", *argv]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    url = push_output_dir(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message, license=args.license)
    print(f"pushed {args.output_dir} to {args.repo_id}: {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Push the output dir; 2 on bad input, 1 when the Hub refuses the token."""
    return run_main(_run, argv, exit_codes={HubAuthError: 1})


if __name__ == "__main__":
    sys.exit(main())
