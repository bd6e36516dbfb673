"""Assigning tiles to train / validation / test: stratified per class, slide-disjoint, or as given.

Tiles with identical pixels (a duplicate group) always land in one split, so no pixels leak
between training and evaluation.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .decode import Tile
from .report import BuildReport
from .schema import SPLITS

logger = logging.getLogger(__name__)

# 425 / 100 / 100 of 625 tiles per class in the lab protocol.
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.68, "validation": 0.16, "test": 0.16}
SPLIT_MODES: tuple[str, ...] = ("stratified", "slide")
_EPS = 1e-12  # a cost must drop by more than rounding noise to count as better


def target_split_sizes(n: int) -> dict[str, int]:
    """Tiles per split for a class of ``n`` tiles: 68/16/16 %, 425/100/100 for 625.

    Validation and test get ``round(0.16 * n)`` each (halves rounded up, so 525 -> 357/84/84),
    at least one each when ``n >= 3``; train gets the rest.
    """
    held_out = math.floor(SPLIT_FRACTIONS["test"] * n + 0.5)
    if n >= 3:
        held_out = max(held_out, 1)
    held_out = min(held_out, n // 2)
    return {"train": n - 2 * held_out, "validation": held_out, "test": held_out}


def _assign_class(unit_sizes: Sequence[int], seed: Sequence[int]) -> list[str]:
    """Split names for the units (tiles, or groups of identical tiles) of one class, 68/16/16 %."""
    order = np.random.default_rng(list(seed)).permutation(len(unit_sizes))
    targets = target_split_sizes(sum(unit_sizes))
    counts = dict.fromkeys(SPLITS, 0)
    names = [""] * len(unit_sizes)
    for k in order:
        size = unit_sizes[k]
        fits = [s for s in ("test", "validation", "train") if counts[s] + size <= targets[s]]
        names[k] = fits[0] if fits else max(SPLITS, key=lambda s: targets[s] - counts[s])
        counts[names[k]] += size
    return names


def stratified_assign(
    tiles: Sequence[Tile], groups: Sequence[list[int]], class_names: Sequence[str], seed: int
) -> list[str]:
    """Split per class; duplicate groups move as one unit (they belong to their first file's class)."""
    assignment = [""] * len(tiles)
    by_class: dict[str, list[list[int]]] = defaultdict(list)
    for group in groups:  # groups are sorted by first file name: the shuffle input is deterministic
        by_class[tiles[group[0]].class_name].append(group)
    for label, name in enumerate(class_names):
        units = by_class.get(name, [])
        for unit, split in zip(units, _assign_class([len(u) for u in units], [seed, label])):
            for i in unit:
                assignment[i] = split
    return assignment


def stratified_split_labels(labels: Sequence[int], seed: int) -> list[str]:
    """Split name (train / validation / test) per example of a labelled dataset, stratified per class
    as :func:`stratified_assign` splits tiles (68/16/16 % of each class, seeded)."""
    labels = np.asarray(labels)
    assignment = [""] * len(labels)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        for i, split in zip(members, _assign_class([1] * len(members), [seed, int(label)])):
            assignment[i] = split
    return assignment


def _slide_units(tiles: Sequence[Tile], groups: Sequence[list[int]]) -> dict[str, str]:
    """Slide -> its unit: slides linked by a duplicate group are one unit (union-find)."""
    parent: dict[str, str] = {t.slide: t.slide for t in tiles}

    def find(s: str) -> str:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    for group in groups:
        roots = sorted({find(tiles[i].slide) for i in group})
        for r in roots[1:]:
            parent[r] = roots[0]
    return {s: find(s) for s in parent}


class _SlideCost:
    """Squared per-class deviation of a unit -> split assignment from the 68/16/16 targets."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts  # units x classes
        totals = counts.sum(axis=0)
        fractions = np.array([SPLIT_FRACTIONS[s] for s in SPLITS])
        self.targets = fractions[:, None] * totals[None, :]
        self.scale = np.where(totals > 0, totals, 1.0)

    def __call__(self, assign: np.ndarray) -> float:
        got = np.stack([self.counts[assign == s].sum(axis=0) for s in range(len(SPLITS))])
        return float((((got - self.targets) / self.scale) ** 2).sum())


def _every_split_used(assign: np.ndarray) -> bool:
    return all((assign == s).any() for s in range(len(SPLITS)))


def _greedy(cost: _SlideCost, order: Sequence[int]) -> np.ndarray:
    """Place units in ``order`` one by one into the split that lowers the cost most."""
    assign = np.full(len(order), -1)
    for u in order:
        best = None
        for s in range(len(SPLITS)):
            trial = assign.copy()
            trial[u] = s
            c = cost(np.where(trial < 0, len(SPLITS), trial))  # unplaced units count in no split
            if best is None or c < best[0] - _EPS:
                best = (c, s)
        assign[u] = best[1]
    if not _every_split_used(assign):  # a split without slides: give it the smallest slide of the fullest split
        for s in range(len(SPLITS)):
            if not (assign == s).any():
                donors = [u for u in order[::-1] if (assign == assign[u]).sum() > 1]
                assign[donors[0]] = s
    return assign


def _improve(cost: _SlideCost, assign: np.ndarray) -> np.ndarray:
    """Single moves and pairwise swaps while they lower the cost (every split keeps a slide)."""
    current = cost(assign)
    n = len(assign)
    improved = True
    while improved:
        improved = False
        moves = [(u, s) for u in range(n) for s in range(len(SPLITS))]
        for u, s in moves:
            if s == assign[u]:
                continue
            trial = assign.copy()
            trial[u] = s
            if _every_split_used(trial) and (c := cost(trial)) < current - _EPS:
                assign, current, improved = trial, c, True
        for u in range(n):
            for v in range(u + 1, n):
                if assign[u] == assign[v]:
                    continue
                trial = assign.copy()
                trial[u], trial[v] = assign[v], assign[u]
                if (c := cost(trial)) < current - _EPS:
                    assign, current, improved = trial, c, True
    return assign


def slide_assign(
    tiles: Sequence[Tile], groups: Sequence[list[int]], class_names: Sequence[str], seed: int
) -> list[str]:
    """Slide-disjoint split: whole slides go to one split, chosen to approach 68/16/16 per class.

    Slides linked by a duplicate group are merged into one unit. Slides are placed greedily (largest
    first, seed breaks ties) into the split that lowers the squared per-class deviation from the
    targets most, then single moves and pairwise swaps are applied while they help.
    """
    missing = [t.name for t in tiles if not t.slide]
    if missing:
        raise ValueError(
            f"--split_by slide needs a slide id (CRC-Prim-HE-NN) in every file name; {len(missing)} tile(s) have none, "
            f"e.g. {', '.join(missing[:5])}. Use --split_by stratified."
        )
    unit_of = _slide_units(tiles, groups)
    units = sorted(set(unit_of.values()))
    if len(units) < 3:
        raise ValueError(
            "--split_by slide needs at least 3 slides (or groups of slides sharing duplicate tiles); "
            f"found {len(units)}: {', '.join(sorted(unit_of))}. Use --split_by stratified."
        )
    unit_index = {u: k for k, u in enumerate(units)}
    class_index = {c: k for k, c in enumerate(class_names)}
    counts = np.zeros((len(units), len(class_names)))
    for t in tiles:
        counts[unit_index[unit_of[t.slide]], class_index[t.class_name]] += 1
    cost = _SlideCost(counts)
    tiebreak = np.random.default_rng(seed).permutation(len(units))
    order = sorted(range(len(units)), key=lambda u: (-counts[u].sum(), tiebreak[u]))
    assign = _improve(cost, _greedy(cost, order))
    return [SPLITS[assign[unit_index[unit_of[t.slide]]]] for t in tiles]


def given_assign(tiles: Sequence[Tile], groups: Sequence[list[int]], report: BuildReport) -> list[str | None]:
    """Keep the source's split; a duplicate also found in an earlier split (train < validation < test) is dropped."""
    assignment: list[str | None] = [t.split for t in tiles]
    rank = {s: k for k, s in enumerate(SPLITS)}
    for group in groups:
        first = min(rank[tiles[i].split] for i in group)
        for i in group:
            if rank[tiles[i].split] > first:
                assignment[i] = None
                report.removed_cross_split_duplicates.append(tiles[i].name)
    if report.removed_cross_split_duplicates:
        logger.warning(
            "removed %d tile(s) whose pixels also appear in an earlier split (leakage): %s",
            len(report.removed_cross_split_duplicates), ", ".join(report.removed_cross_split_duplicates[:10]),
        )
    return assignment
