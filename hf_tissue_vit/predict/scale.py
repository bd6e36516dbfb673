"""Tiles at the model's scale: a tile of a known µm/px is resized to the model's µm/px before the image
processor's resize, as ``tissue_map.py`` reads slides at the model's µm/px.

A 224 px NCT-CRC-HE tile at 0.5 µm/px spans 112 µm; a model trained on 150 px Kather tiles at 0.495 µm/px
saw 74 µm fields. Squeezing the whole tile into the model's input would show it tissue a third smaller
than it learnt; :class:`TileScale` first resizes the tile by ``tile_mpp / model_mpp`` (bilinear, as the
slide reader), so that a micrometre covers as many pixels as in training, and, when the model's training
tile size is recorded, takes the centre of a larger tile at that size (the field the model learnt on; the
processor's resize would otherwise squeeze the whole tile into the model's input, undoing the rescale).
When either resolution is unknown the tiles go in as they are, with one warning per run.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from ..imaging import centre_box
from ..units import SAME_SCALE, same_scale

logger = logging.getLogger(__name__)


class TileScale:
    """Resizes tiles of ``tile_mpp`` µm/px to ``model_mpp`` µm/px (see the module docstring)."""

    def __init__(self, tile_mpp: float | None, model_mpp: float | None, tiles: str = "the tiles",
                 field: tuple[int, int] | None = None) -> None:
        """``field``: (height, width) of the model's training tiles, when recorded; larger tiles (at the
        model's scale) are centre-cropped to it."""
        self.tile_mpp, self.model_mpp, self.tiles = tile_mpp, model_mpp, tiles
        known = tile_mpp is not None and model_mpp is not None
        factor = tile_mpp / model_mpp if known else None
        self.factor = None if factor is None or same_scale(factor) else factor
        self.field = tuple(field) if known and field is not None else None
        self._told = False

    def describe(self) -> str:
        """One line: what is done to the tiles' scale."""
        if self.tile_mpp is None or self.model_mpp is None:
            missing = [name for name, v in ((f"{self.tiles}' µm/px (pass --mpp)", self.tile_mpp),
                                            ("the model's µm/px (config.mpp)", self.model_mpp)) if v is None]
            return (f"{' and '.join(missing)} unknown: {self.tiles} are given to the model as they are, so if "
                    "their scale differs from the training tiles' the model sees tissue at a scale it never learnt")
        crop = "" if self.field is None else (f", and the centre of a larger tile is taken at the model's "
                                              f"{self.field[1]}x{self.field[0]} px training field")
        if self.factor is None:
            return f"{self.tiles} are at the model's {self.model_mpp} µm/px{crop}"
        return (f"{self.tiles} at {self.tile_mpp} µm/px are resized by {self.factor:.3g} to the model's "
                f"{self.model_mpp} µm/px before its image processor{crop}")

    def _tell(self) -> None:
        if not self._told:
            self._told = True
            if self.tile_mpp is None or self.model_mpp is None:
                logger.warning("%s", self.describe())
            else:
                logger.info("%s", self.describe())

    def __call__(self, tile: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        """``tile`` at the model's µm/px (the same object when nothing is to change)."""
        self._tell()
        if self.factor is not None:
            image = tile if isinstance(tile, Image.Image) else Image.fromarray(np.asarray(tile, dtype=np.uint8))
            width, height = image.size
            tile = image.resize((max(1, round(width * self.factor)), max(1, round(height * self.factor))),
                                Image.BILINEAR)
        return tile if self.field is None else self._centre(tile)

    def _centre(self, tile: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        """The centre ``field`` of a tile larger than it (by more than SAME_SCALE); other tiles as they are."""
        width, height = tile.size if isinstance(tile, Image.Image) else (tile.shape[1], tile.shape[0])
        field_h, field_w = self.field
        if width <= field_w * (1 + SAME_SCALE) and height <= field_h * (1 + SAME_SCALE):
            return tile
        top, left, h, w = centre_box(height, width, field_h, field_w)
        if isinstance(tile, Image.Image):
            return tile.crop((left, top, left + w, top + h))
        return tile[top:top + h, left:left + w]
