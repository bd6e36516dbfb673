"""Timing: repeats after a warm-up, contenders interleaved within each repeat, and the
median/min/max rows and ratios that every table is made of."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median / min / max of per-repeat throughputs (plus the raw values)."""
    values = [float(v) for v in values]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "repeats": len(values),
        "values": [round(v, 3) for v in values],
    }


def time_interleaved(runs: dict[str, Callable[[], int]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Items/s of each contender (``run()`` returns the items it processed): ``warmup`` untimed rounds,
    then ``repeats`` timed rounds that alternate the contenders, so that load changes on a shared
    machine hit all of them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            n = run()
            rates[name].append(n / max(time.perf_counter() - start, 1e-9))
    return rates


def time_repeats(run: Callable[[], int], repeats: int, warmup: int = 1) -> list[float]:
    """:func:`time_interleaved` for a single contender."""
    return time_interleaved({"run": run}, repeats, warmup)["run"]


def row(label: str, rates: Sequence[float], **extra: Any) -> dict[str, Any]:
    """A table row: its label, any extra columns, and :func:`summarize` of ``rates``."""
    return {"label": label, **extra, **summarize(rates)}


def ratio(
    name: str, rows: dict[str, dict[str, Any]], numerator: str, denominator: str, goal: float | None = None
) -> dict[str, Any]:
    """Ratio of two rows' medians, judged against ``goal`` when one is given."""
    value = rows[numerator]["median"] / rows[denominator]["median"]
    out = {"name": name, "numerator": numerator, "denominator": denominator, "ratio": value}
    if goal is not None:
        out.update(goal=goal, met=bool(value >= goal))
    return out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Stopwatch:
    """Seconds per named step, rounded to 0.1 s (``results["section_seconds"]``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the stopwatch was made."""
        return round(time.perf_counter() - self._start, 1)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as ``name``."""
        mark = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - mark, 1)
