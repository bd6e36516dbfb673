"""The map of one slide (:class:`SlideMap`) and its files, each written atomically.

Per slide: ``labels.npy`` (int16 grid: class id, :data:`BACKGROUND` = -1 not tissue,
:data:`UNREADABLE` = -2 tissue that could not be read), ``probabilities.npy`` (float16
[rows, cols, classes], NaN where not classified), ``class_fractions.json`` / ``.csv`` (cells, area
in mm² and fraction of the classified tissue per class), ``tissue_map.png`` (class colours over the
slide's overview, with a legend) and ``tissue_map.geojson`` (one QuPath tile object per classified
cell, in level-0 pixel coordinates, with its class, colour and per-class probabilities as
measurements: File > Import objects in QuPath). Per run: ``summary.csv``, one row per slide.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write, atomic_write_json, save_figure_atomic
from .geometry import WindowGeometry

BACKGROUND = -1
UNREADABLE = -2
MAX_LISTED_ERRORS = 20
SLIDE_FILES = ("labels.npy", "probabilities.npy", "class_fractions.json", "class_fractions.csv", "tissue_map.png",
               "tissue_map.geojson")  # per slide, written in this order by save_slide_map


@dataclass
class SlideMap:
    """Classification of one slide's window grid (geometry: :class:`WindowGeometry`)."""

    path: str
    geometry: WindowGeometry
    labels: np.ndarray  # int16 [rows, cols]
    probs: np.ndarray  # float32 [rows, cols, K], NaN where not classified
    tissue_fraction: np.ndarray  # float32 [rows, cols], from the overview's tissue mask
    label_names: list[str]
    slide: dict[str, Any]  # SlideReader.describe()
    overview: np.ndarray  # RGB uint8 overview of the slide
    overview_downsample: float  # level-0 px per overview px
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        classified = int((self.labels >= 0).sum())
        unreadable = int((self.labels == UNREADABLE).sum())
        return {"windows": int(self.labels.size), "tissue_windows": classified + unreadable,
                "classified_windows": classified, "unreadable_windows": unreadable,
                "background_windows": int((self.labels == BACKGROUND).sum())}

    def fractions(self) -> dict[str, Any]:
        """JSON-ready summary: slide facts, geometry, counts, and per class cells, mm², fraction."""
        counts = self.counts()
        cell_mm2 = self.geometry.cell_area_mm2
        classified = counts["classified_windows"]
        classes = {}
        for k, name in enumerate(self.label_names):
            n = int((self.labels == k).sum())
            classes[name] = {"cells": n, "area_mm2": None if cell_mm2 is None else n * cell_mm2,
                             "fraction_of_tissue": n / classified if classified else 0.0}
        return {
            "slide": self.path, **self.slide, **self.geometry.to_dict(), **counts,
            "tissue_area_mm2": None if cell_mm2 is None else classified * cell_mm2,
            "seconds": round(self.seconds, 3),
            "windows_per_s": round(counts["tissue_windows"] / self.seconds, 2) if self.seconds > 0 else None,
            "errors": self.errors[:MAX_LISTED_ERRORS],
            "classes": classes,
        }


def class_colours(n: int) -> np.ndarray:
    """n distinct RGB colours in [0, 1], the colours of every map and legend, for any number of classes: tab10
    up to 10, tab20 up to 20, then hues spread by the golden angle (alternating lightness), all distinct."""
    import colorsys

    import matplotlib

    if n <= 20:
        cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
        return np.array([cmap(i)[:3] for i in range(n)]).reshape(n, 3)
    return np.array([colorsys.hls_to_rgb((i * 0.618033988749895) % 1.0, 0.45 if i % 2 else 0.6, 0.75)
                     for i in range(n)])


def colours_255(n: int) -> list[list[int]]:
    """The package's class colours as 0-255 RGB triples (QuPath's form)."""
    return [[round(255 * float(v)) for v in rgb] for rgb in class_colours(n)]


def _feature(box: tuple[float, float, float, float], name: str, colour: list[int],
             probs: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
    x0, y0, x1, y1 = (round(float(v), 3) for v in box)
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        "properties": {
            "objectType": "tile",
            "classification": {"name": name, "color": colour},
            "measurements": {f"{n} probability": round(float(p), 5) for n, p in zip(label_names, probs, strict=True)},
        },
    }


def write_geojson(result: SlideMap, path: str | os.PathLike) -> Path:
    """QuPath-readable FeatureCollection of the classified cells, written one feature at a time."""
    colours = colours_255(len(result.label_names))
    rows, cols = np.nonzero(result.labels >= 0)
    with atomic_write(path) as handle:
        handle.write('{"type": "FeatureCollection", "features": [\n')
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            k = int(result.labels[r, c])
            feature = _feature(result.geometry.cell_box(r, c), result.label_names[k], colours[k],
                               result.probs[r, c], result.label_names)
            handle.write((",\n" if i else "") + json.dumps(feature, ensure_ascii=False))
        handle.write("\n]}\n")
    return Path(path)


def write_fractions(result: SlideMap, json_path: Path, csv_path: Path) -> dict[str, Any]:
    fractions = result.fractions()
    atomic_write_json(json_path, fractions)

    def area(value: float | None) -> str:
        return "" if value is None else f"{value:.6f}"

    cell_mm2 = result.geometry.cell_area_mm2
    with atomic_write(csv_path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "cells", "area_mm2", "fraction_of_tissue"])
        for name, v in fractions["classes"].items():
            writer.writerow([name, v["cells"], area(v["area_mm2"]), f"{v['fraction_of_tissue']:.6f}"])
        for name, key in (("Background", "background_windows"), ("Unreadable", "unreadable_windows")):
            n = fractions[key]
            writer.writerow([name, n, area(None if cell_mm2 is None else n * cell_mm2), ""])
    return fractions


def write_picture(result: SlideMap, fractions: dict[str, Any], path: Path, max_side: int = 1024,
                  alpha: float = 0.45) -> Path:
    """Class colours over the overview, with a legend of each class's share of the tissue."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from PIL import Image

    width, height = result.slide["width"], result.slide["height"]
    overview = Image.fromarray(result.overview)
    overview.thumbnail((max_side, max_side))
    colours = class_colours(len(result.label_names))
    g = result.geometry
    x0, y0, _, _ = g.cell_box(0, 0)
    masked = np.ma.masked_less(result.labels.astype(np.int32), 0)
    fig = Figure(figsize=(10, max(3.0, 10 * height / width)))  # no pyplot: no global figure state
    ax = fig.add_subplot()
    ax.imshow(np.asarray(overview), extent=(0, width, height, 0))
    ax.imshow(masked, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(colours) - 0.5, alpha=alpha,
              interpolation="nearest", extent=(x0, x0 + g.cols * g.stride0, y0 + g.rows * g.stride0, y0))
    if fractions["unreadable_windows"]:
        bad = np.ma.masked_not_equal(result.labels.astype(np.int32), UNREADABLE)
        ax.imshow(bad, cmap=ListedColormap([(0, 0, 0)]), alpha=0.8, interpolation="nearest",
                  extent=(x0, x0 + g.cols * g.stride0, y0 + g.rows * g.stride0, y0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    handles = []
    for k, name in enumerate(result.label_names):
        v = fractions["classes"][name]
        area = "" if v["area_mm2"] is None else f", {v['area_mm2']:.2f} mm²"
        handles.append(Patch(color=colours[k], label=f"{name} ({v['fraction_of_tissue']:.1%}{area})"))
    handles.append(Patch(facecolor="none", edgecolor="grey",
                         label=f"background ({fractions['background_windows']} windows)"))
    if fractions["unreadable_windows"]:
        handles.append(Patch(color="black", label=f"unreadable ({fractions['unreadable_windows']} windows)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    scale = f" at {g.target_mpp:g} µm/px" if g.target_mpp else ""
    ax.set_title(f"{Path(result.path).name}: {g.tile} px windows{scale}, stride {g.stride} px")
    return save_figure_atomic(fig, path, format="png")


def save_slide_map(result: SlideMap, output_dir: str | os.PathLike, max_side: int = 1024) -> dict[str, str]:
    """Write every per-slide file (see the module docstring) into ``output_dir``; name -> path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in SLIDE_FILES}
    with atomic_write(paths["labels.npy"], "wb") as handle:
        np.save(handle, result.labels)
    with atomic_write(paths["probabilities.npy"], "wb") as handle:
        np.save(handle, result.probs.astype(np.float16))
    fractions = write_fractions(result, paths["class_fractions.json"], paths["class_fractions.csv"])
    write_picture(result, fractions, paths["tissue_map.png"], max_side=max_side)
    write_geojson(result, paths["tissue_map.geojson"])
    return {name: str(path) for name, path in paths.items()}


SUMMARY_COLUMNS = ("slide", "output_dir", "error", "width", "height", "slide_mpp", "target_mpp", "read_level",
                   "tissue_area_mm2", "tissue_windows", "background_windows", "unreadable_windows", "seconds",
                   "windows_per_s")


def summary_row(fractions: dict[str, Any] | None, slide: str, output_dir: str, error: str = "") -> dict[str, Any]:
    """One summary.csv row: slide facts, tissue area, time, and each class's fraction of the tissue."""
    row: dict[str, Any] = {"slide": slide, "output_dir": output_dir, "error": error}
    if fractions:
        row.update({key: fractions.get(key) for key in SUMMARY_COLUMNS[3:] if key != "read_level"})
        row["read_level"] = fractions.get("level")
        row.update({f"{name} fraction": v["fraction_of_tissue"] for name, v in fractions["classes"].items()})
    return row


def write_summary(rows: Sequence[dict[str, Any]], label_names: Sequence[str], path: str | os.PathLike) -> Path:
    """``summary.csv``: :data:`SUMMARY_COLUMNS`, then ``<class> fraction`` per class (empty on failed slides)."""
    columns = [*SUMMARY_COLUMNS, *(f"{name} fraction" for name in label_names)]

    def text(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([text(row.get(column)) for column in columns])
    return Path(path)
