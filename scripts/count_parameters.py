"""Print a model's parameter count per component: for a ViT the closed-form formula next to the counted number,
for the other supported backbones (DINOv2 with or without registers, timm) the counts by part.

    python scripts/count_parameters.py --model outputs/vit-scratch-cpu
    python scripts/count_parameters.py --model google/vit-base-patch16-224   # 86,567,656

Only the config is read (local folder, config.json or Hub id); the model is built on the meta device,
so even ViT-L costs no memory. The last line printed is the total as a plain integer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_tissue_vit import backbones
from hf_tissue_vit.cli import run_main
from hf_tissue_vit.interpret import (
    format_parameter_table,
    load_vit_config,
    parameter_report_from_config,
)
from hf_tissue_vit.interpret.parameters import component_counts, format_component_counts


def _supported(config, what: str, name: str) -> None:
    backbones.require_family(config, name, what)


def _print_counts(config) -> int:
    """A DINOv2 or timm model, built on the meta device: counts by part (no closed form)."""
    import torch
    from transformers import AutoModelForImageClassification

    with torch.device("meta"):
        rows = component_counts(AutoModelForImageClassification.from_config(config))
    print(format_component_counts(rows))
    print(rows[-1][1])
    return 0


@dataclass
class CountArguments:
    model: str = field(metadata={"help": "Trained output dir, a config.json, or a Hub model id."})
    num_labels: int | None = field(default=None, metadata={"help": "Count with this many classes instead "
                                                                     "(e.g. 1000 for the ImageNet head)."})

    def __post_init__(self) -> None:
        if self.num_labels is not None and self.num_labels < 0:
            raise ValueError(f"--num_labels must be >= 0, got {self.num_labels}")


def _run(argv: list[str] | None) -> int:
    parser = HfArgumentParser(CountArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    config = load_vit_config(args.model, "parameter counts", args.num_labels, require=_supported)
    if config.model_type != "vit":
        return _print_counts(config)
    rows = parameter_report_from_config(config)  # the model is built on the meta device: no memory
    print(format_parameter_table(rows))
    if rows[-1].expected != rows[-1].counted:
        print(f"note: closed form {rows[-1].expected:,} differs from the model ({rows[-1].counted:,})")
    print(rows[-1].counted)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Print the parameter table and the total; 2 on an unreadable or non-ViT model."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
