"""Speed benchmark: the package's data pipeline, Trainer steps and batch predictor side by side with
the transformers example pipeline (run_image_classification.py) and pipeline("image-classification").

    python scripts/benchmark.py --output_dir outputs/benchmark
    python scripts/benchmark.py --sections data,infer --repeats 7 --threads 2 \
        --data_dir ../shared/data/kather2016_6class
    python scripts/benchmark.py --quick --synthetic            # tiny sizes, seconds (what the tests run)

Tiles: --dataset_dir (prepared dataset) or --data_dir (class subfolders), else the real Kather tiles
in ../shared/data/kather2016_6class when present, else synthetic tiles in a temp folder. Writes
<output_dir>/benchmark.json and benchmark.md (atomically) and prints the Markdown tables with ratios.
Each figure is the median (min, max) of --repeats timed repeats after a warm-up. Numbers depend on
the machine and its load: compare the ratios, and re-run on a quiet machine before adding a run to
benchmarks/RESULTS.md (with its machine, date and command). The code lives in benchmarks/.
"""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_tissue_vit.cli import run_main

# benchmarks/ sits next to scripts/ in the clone and is not installed with the library.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
from benchmarks import BenchmarkConfig, run_benchmark, to_markdown, write_results  # noqa: E402 - after the repo root is on sys.path


@dataclass
class OutputArguments:
    output_dir: str = field(
        default="outputs/benchmark", metadata={"help": "Folder for benchmark.json and benchmark.md."}
    )
    workdir: str | None = field(
        default=None,
        metadata={"help": "Keep the temporary tiles, caches and saved model here (default: a temp dir, removed)."},
    )
    quiet: bool = field(default=False, metadata={"help": "Log warnings only (default: progress at INFO level)."})

    def __post_init__(self) -> None:
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output_dir {out} is a file; give a folder")


def _run(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((BenchmarkConfig, OutputArguments))
    config, output = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    logging.basicConfig(
        level=logging.WARNING if output.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    command = ("python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in argv)).strip()
    results = run_benchmark(config, command=command, workdir=output.workdir)
    paths = write_results(results, output.output_dir)
    print(to_markdown(results))
    print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables; 2 on bad input."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
