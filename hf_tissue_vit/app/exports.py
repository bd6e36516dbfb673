"""Tissue-map exports a pathologist can open elsewhere: GeoJSON (QuPath, GIS tools) and the area table.

GeoJSON coordinates are pixels of the analysed image, x to the right and y **down** (QuPath's
convention). Neighbouring cells of one class in a grid row are merged into one rectangle, so a
5000 px image gives hundreds of features, not thousands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_json
from ..predict.map_figure import class_colours
from ..predict.maps import TissueMap

BACKGROUND = -1


def _runs(row: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, label) of each run of equal labels in one grid row, background runs left out."""
    edges = np.flatnonzero(np.diff(row)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(row)]])
    return [(int(a), int(b), int(row[a])) for a, b in zip(starts, stops) if row[a] != BACKGROUND]


def tissue_map_geojson(result: TissueMap) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the map: one rectangle per run of same-class cells in a row.

    Each feature's properties hold QuPath's ``objectType``/``classification`` (name and RGB colour),
    the number of grid cells it covers and their mean probability for the class.
    """
    colours = (class_colours(len(result.label_names)) * 255).round().astype(int)
    y0, x0 = result.cell_origin()
    step = result.stride
    features = []
    for r, row in enumerate(result.labels):
        for start, stop, k in _runs(np.asarray(row)):
            left, right = x0 + start * step, x0 + stop * step
            top, bottom = y0 + r * step, y0 + (r + 1) * step
            ring = [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]
            name = result.label_names[k]
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in ring]]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": [int(c) for c in colours[k]]},
                    "class": name,
                    "cells": stop - start,
                    "mean_probability": float(np.nanmean(result.probs[r, start:stop, k])),
                },
            })
    return {"type": "FeatureCollection", "features": features,
            "properties": {"tile": result.tile, "stride": result.stride,
                           "image_height": result.image_size[0], "image_width": result.image_size[1],
                           "coordinates": "pixels of the analysed image, origin top-left, y down"}}


def write_geojson(result: TissueMap, path: str | os.PathLike) -> Path:
    """Write :func:`tissue_map_geojson` to ``path`` atomically; returns the path."""
    return atomic_write_json(path, tissue_map_geojson(result))


def area_table(result: TissueMap, mpp: float) -> list[list[Any]]:
    """Rows ``[class, windows, % of tissue, area mm²]`` (and a background row) for the app's table.

    A grid cell covers ``stride × stride`` px; the area assumes ``mpp`` µm per pixel.
    """
    fractions = result.area_fractions()
    cell_mm2 = (result.stride * mpp / 1000.0) ** 2

    def area(cells: int) -> float:
        return float(f"{cells * cell_mm2:.4g}")  # 4 significant digits: a window is a small area

    rows = [[name, v["cells"], round(100 * v["fraction_of_tissue"], 1), area(v["cells"])]
            for name, v in fractions["classes"].items()]
    n_bg = fractions["background_cells"]
    rows.append(["Background (not classified)", n_bg, None, area(n_bg)])
    return rows


AREA_COLUMNS = ["class", "windows", "% of tissue", "area (mm²)"]
