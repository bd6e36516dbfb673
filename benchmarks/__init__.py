"""Speed benchmark: the package's pipeline side by side with the transformers example pipeline.

Not part of the installed library (like diffusers' ``benchmarks/``): it runs from a clone, through
``python scripts/benchmark.py``, and measures the library's own pieces. Three sections, each on the
same tiles, model config, batch size, resolution and thread count, in one process (ratios matter more
than absolute numbers on a noisy, shared machine):

``data`` (:mod:`benchmarks.data_bench`)
    decode + augment + collate into ``pixel_values`` (images/s): decoded-once uint8 tiles +
    ``TileCollator`` vs :mod:`benchmarks.example_pipeline`, a faithful copy of
    ``examples/pytorch/image-classification/run_image_classification.py``.
``train`` (:mod:`benchmarks.train_bench`)
    ``Trainer`` steps (images/s) for the scratch CPU recipe's ViT and a ViT-B/16-shaped model.
``infer`` (:mod:`benchmarks.infer_bench`)
    tiles/s over PNG files: ``TilePredictor`` vs ``pipeline("image-classification")``.

Each figure is the median (with min and max) of ``repeats`` timed repeats after a warm-up
(:mod:`benchmarks.timing`). The ``variants`` table (:mod:`benchmarks.variants`) records what was
measured to pick the package's speed settings. Measured results: ``benchmarks/RESULTS.md``.

Example::

    from benchmarks import BenchmarkConfig, run_benchmark, write_results

    results = run_benchmark(BenchmarkConfig(quick=True, synthetic=True), command="python scripts/benchmark.py --quick")
    write_results(results, "outputs/benchmark")
"""

from .config import BenchmarkConfig
from .report import to_markdown, write_results
from .run import run_benchmark

__all__ = ["BenchmarkConfig", "run_benchmark", "to_markdown", "write_results"]
