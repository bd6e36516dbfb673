"""Tile pixels for the model: exact reproduction of a saved image processor for prediction, and the
batched uint8 tile transform with its augmentations for training.

* :mod:`.processor`: :func:`make_image_processor` (the package's own ViT processor) and
  :class:`ProcessorTransform` (tiles -> exactly the processor's ``pixel_values``, batched).
* :mod:`.tile_transform`: :class:`TileTransform` (batch of uint8 tiles -> ``pixel_values``, with or
  without augmentation), the DataLoader collator's transform.
* :mod:`.augmentation`: :class:`AugmentationConfig` and the batched augmentations (dihedral, random
  resized crop, HED stain jitter, brightness/contrast).
* :mod:`.stain`: per-tile optical-density statistics and moving a tile to other statistics (the
  ``stain_stats`` augmentation, and re-staining a test set to another centre's colour).

Image modes are :mod:`hf_tissue_vit.imaging`'s concern; ``image_to_rgb8``/``image_to_uint8`` are its
``to_rgb8``/``to_uint8`` under their older names.
"""

from ..imaging import to_rgb8 as image_to_rgb8
from ..imaging import to_uint8 as image_to_uint8
from .augmentation import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    AugmentationConfig,
    dihedral_views,
)
from .processor import (
    DEFAULT_IMAGE_MEAN,
    DEFAULT_IMAGE_STD,
    Geometry,
    ProcessorTransform,
    SlowPath,
    make_image_processor,
    processor_geometry,
)
from .tile_transform import TileTransform

__all__ = [
    "DEFAULT_IMAGE_MEAN",
    "DEFAULT_IMAGE_STD",
    "HED_FROM_RGB",
    "RGB_FROM_HED",
    "AugmentationConfig",
    "Geometry",
    "ProcessorTransform",
    "SlowPath",
    "TileTransform",
    "dihedral_views",
    "image_to_rgb8",
    "image_to_uint8",
    "make_image_processor",
    "processor_geometry",
]
