"""Attention figures: heatmaps blended onto tiles, one figure per tile and a grid per class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..fileio import save_figure_atomic
from .attention import TileAttention


def overlay_heatmap(tile: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heatmap (H×W, same size as the tile) coloured with ``cmap`` onto an RGB uint8 tile."""
    import matplotlib

    if tile.shape[:2] != heatmap.shape:
        raise ValueError(f"heatmap {heatmap.shape} and tile {tile.shape[:2]} differ in size; upsample first")
    colours = matplotlib.colormaps[cmap](np.clip(heatmap, 0.0, 1.0))[..., :3]
    blended = (1 - alpha) * tile.astype(np.float32) / 255.0 + alpha * colours
    return (np.clip(blended, 0.0, 1.0) * 255).round().astype(np.uint8)


def _title(item: TileAttention) -> str:
    true = item.true_label if item.true_label is not None else "?"
    return f"true {true}\npred {item.pred_label} ({item.score:.2f})"


def save_tile_figure(item: TileAttention, path: str | Path, alpha: float = 0.5) -> None:
    """PNG: the tile, its rollout overlay, and one overlay per last-layer head."""
    from matplotlib.figure import Figure

    panels = [("tile", item.tile), ("rollout", overlay_heatmap(item.tile, item.rollout, alpha))]
    panels += [(f"last layer, head {h}", overlay_heatmap(item.tile, m, alpha)) for h, m in enumerate(item.heads)]
    fig = Figure(figsize=(2.2 * len(panels), 2.8))
    for i, (label, picture) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(picture)
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(_title(item).replace("\n", " · "), fontsize=9)
    save_figure_atomic(fig, path, format="png")


def save_attention_grid(
    items: Sequence[TileAttention], path: str | Path, class_order: Sequence[str], alpha: float = 0.5
) -> None:
    """Grid PNG of rollout overlays: one row per class (by true label, or predicted when unknown)."""
    from matplotlib.figure import Figure

    rows: dict[str, list[TileAttention]] = {name: [] for name in class_order}
    for item in items:
        rows.setdefault(item.true_label or item.pred_label, []).append(item)
    rows = {name: group for name, group in rows.items() if group}
    if not rows:
        raise ValueError("no tiles to draw")
    n_cols = max(len(group) for group in rows.values())
    fig = Figure(figsize=(2.0 * n_cols + 0.8, 2.3 * len(rows)))
    for r, (name, group) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = fig.add_subplot(len(rows), n_cols, r * n_cols + c + 1)
            ax.set_axis_off()
            if c < len(group):
                item = group[c]
                ax.imshow(overlay_heatmap(item.tile, item.rollout, alpha))
                ax.set_title(_title(item), fontsize=7, color="black" if item.true_label in (None, item.pred_label)
                             else "red")
            if c == 0:
                ax.text(-0.08, 0.5, name, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=10)
    fig.suptitle("attention rollout (Abnar & Zuidema 2020)", fontsize=11)
    save_figure_atomic(fig, path, format="png")
