"""Apply a trained tile classifier: streaming batch prediction to CSV, and tissue maps of large images.

* :mod:`.inputs`: which files a run reads (:func:`iter_input_files`, :func:`check_inputs`).
* :mod:`.predictor`: :class:`TilePredictor` (batches, decode threads, bf16, the saved processor
  reproduced exactly); :mod:`.table`: the CSV it writes.
* :mod:`.large_image`, :mod:`.maps`, :mod:`.map_figure`: reading a large image, classifying it window by
  window (:func:`tissue_map` -> :class:`TissueMap`), saving the map (:func:`save_tissue_map`).

Example::

    predictor = TilePredictor.from_pretrained("outputs/vit-tiny", batch_size=64)
    predictor.predict_to_csv(iter_input_files(["tiles/"]), "predictions.csv")
    result = tissue_map(predictor, "slide_5000px.tif", tile=150, stride=150)
    save_tissue_map(result, "slide_5000px.tif", "tissue_map_out/")
"""

from .inputs import check_inputs, iter_input_files
from .large_image import open_large_image, read_large_image
from .map_figure import class_colours, save_tissue_map
from .maps import BACKGROUND, TissueMap, background_fraction, tissue_map
from .predictor import TilePredictor, label_names_of, use_attention
from .table import (
    CSV_FIXED_COLUMNS,
    PredictionRow,
    csv_columns,
    csv_row,
    probability_columns,
    write_predictions_csv,
)

__all__ = [
    "BACKGROUND",
    "CSV_FIXED_COLUMNS",
    "PredictionRow",
    "TilePredictor",
    "TissueMap",
    "background_fraction",
    "check_inputs",
    "class_colours",
    "csv_columns",
    "csv_row",
    "iter_input_files",
    "label_names_of",
    "open_large_image",
    "probability_columns",
    "read_large_image",
    "save_tissue_map",
    "tissue_map",
    "use_attention",
    "write_predictions_csv",
]
