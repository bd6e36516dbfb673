"""Apply a trained tile classifier: streaming batch prediction to CSV, and tissue maps of large images.

* :mod:`.inputs`: which files a run reads (:func:`iter_input_files`, :func:`list_input_files`,
  :func:`check_inputs`; whole-slide images are skipped with a word).
* :mod:`.input_checks`: the warning on files far from the training tile size or greyscale.
* :mod:`.outputs`: checks that a run's output can be written, before the work.
* :mod:`.predictor`: :class:`TilePredictor` (batches, decode threads, bf16, the saved processor
  reproduced exactly); :mod:`.table`: the CSV it writes.
* :mod:`.large_image`, :mod:`.maps`, :mod:`.map_figure`: reading a large image (whole, or downscaled:
  :func:`read_downscaled`), classifying it window by window (:func:`tissue_map` -> :class:`TissueMap`),
  saving the map (:func:`save_tissue_map`).

Example::

    predictor = TilePredictor.from_pretrained("outputs/vit-tiny", batch_size=64)
    predictor.predict_to_csv(iter_input_files(["tiles/"]), "predictions.csv")
    result = tissue_map(predictor, "slide_5000px.tif", tile=150, stride=150)
    save_tissue_map(result, "slide_5000px.tif", "tissue_map_out/")
"""

from .input_checks import FAR_FACTOR, InputNotes, is_far, is_greyscale, training_tile_size
from .inputs import WHOLE_SLIDE_EXTENSIONS, check_inputs, iter_input_files, list_input_files
from .large_image import downscale, open_large_image, read_downscaled, read_large_image
from .map_figure import class_colours, save_tissue_map
from .maps import BACKGROUND, TissueMap, background_fraction, tissue_map
from .predictor import TilePredictor, error_text, label_names_of, use_attention
from .table import (
    CSV_FIXED_COLUMNS,
    PredictionRow,
    check_top_k,
    csv_columns,
    csv_row,
    probability_columns,
    write_prediction_rows,
    write_predictions_csv,
)

__all__ = [
    "BACKGROUND",
    "CSV_FIXED_COLUMNS",
    "FAR_FACTOR",
    "InputNotes",
    "PredictionRow",
    "TilePredictor",
    "TissueMap",
    "WHOLE_SLIDE_EXTENSIONS",
    "background_fraction",
    "check_inputs",
    "check_top_k",
    "class_colours",
    "csv_columns",
    "csv_row",
    "downscale",
    "error_text",
    "is_far",
    "is_greyscale",
    "iter_input_files",
    "label_names_of",
    "list_input_files",
    "open_large_image",
    "probability_columns",
    "read_downscaled",
    "read_large_image",
    "save_tissue_map",
    "tissue_map",
    "training_tile_size",
    "use_attention",
    "write_prediction_rows",
    "write_predictions_csv",
]
