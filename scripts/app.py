"""Launch the demo app for a trained tile classifier (needs the [app] extra: pip install -e ".[app]").

    python scripts/app.py --model outputs/vit-scratch-cpu [--port 7860] [--examples DIR] \
        [--dataset_dir data/kather6] [--bf16 auto|true|false] [--device cpu]

--model is a training output dir or a Hub model id. The app opens on http://127.0.0.1:PORT with three
tabs: Tile (every class with its probability, the attention-rollout overlay, the last layer's heads),
Larger image (tissue map, class areas, CSV and GeoJSON) and About (test results with 95% CIs, the
classes, intended use). Example tiles: the images in --examples DIR, else a few tiles per class from
the test split of --dataset_dir, or of the dataset the model was trained on when that folder exists.
The probabilities equal scripts/predict.py's for the same file and --bf16 setting.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_tissue_vit.cli import run_main
from hf_tissue_vit.hardware import parse_bf16_flag


@dataclass
class AppArguments:
    model: str = field(metadata={"help": "Trained output dir or Hub model id."})
    port: int | None = field(default=None, metadata={"help": "Port on 127.0.0.1 (default: Gradio's, 7860 or the "
                                                             "next free one)."})
    examples: str | None = field(default=None, metadata={"help": "Folder of example tiles (named <Class>_..., or "
                                                                 "in class folders)."})
    dataset_dir: str | None = field(default=None, metadata={"help": "Dataset saved by prepare_dataset.py: example "
                                                                    "tiles come from its test split."})
    n_per_class: int = field(default=2, metadata={"help": "Example tiles per class taken from the test split."})
    bf16: str = field(default="auto", metadata={
        "help": "bf16 autocast as in predict.py: auto, true or false; --bf16 alone = true.", "nargs": "?",
        "const": "true"})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda when available)."})

    def __post_init__(self) -> None:
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.examples is not None and not os.path.isdir(self.examples):
            raise FileNotFoundError(f"--examples {self.examples!r}: no such folder")
        if self.dataset_dir is not None and not os.path.isdir(self.dataset_dir):
            raise FileNotFoundError(f"--dataset_dir {self.dataset_dir!r}: no such folder")
        if self.n_per_class < 1:
            raise ValueError(f"--n_per_class must be >= 1, got {self.n_per_class}")
        parse_bf16_flag(self.bf16)


def _run(argv: list[str] | None) -> int:
    (args,) = HfArgumentParser(AppArguments).parse_args_into_dataclasses(args=argv)
    try:
        from hf_tissue_vit.app.ui import create_app, launch
    except ImportError as err:
        raise FileNotFoundError(f"the app needs the [app] extra ({err}): pip install -e \".[app]\"") from err
    demo, allowed = create_app(args.model, examples_dir=args.examples, dataset_dir=args.dataset_dir,
                               device=args.device, bf16=parse_bf16_flag(args.bf16), n_per_class=args.n_per_class)
    launch(demo, allowed, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Launch the app (blocks until Ctrl-C); 2 on bad input."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
