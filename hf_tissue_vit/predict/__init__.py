"""Apply a trained tile classifier: streaming batch prediction to CSV.

* :mod:`.inputs`: which files a run reads (:func:`iter_input_files`, :func:`list_input_files`,
  :func:`check_inputs`; whole-slide images are skipped with a word).
* :mod:`.input_checks`: the warning on files far from the training tile size or greyscale.
* :mod:`.predictor`: :class:`TilePredictor` (batches, decode threads, bf16, the saved processor
  reproduced exactly); :mod:`.table`: the CSV it writes.
* :mod:`.large_image`: reading a large image downscaled (:func:`read_downscaled`).

Tissue maps of slides and large images are :mod:`hf_tissue_vit.slides`' (the one map path).

Example::

    predictor = TilePredictor.from_pretrained("outputs/vit-tiny", batch_size=64)
    predictor.predict_to_csv(iter_input_files(["tiles/"]), "predictions.csv")
"""

from .input_checks import InputNotes, is_greyscale
from .inputs import WHOLE_SLIDE_EXTENSIONS, check_inputs, iter_input_files, list_input_files
from .large_image import downscale, read_downscaled
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
    "CSV_FIXED_COLUMNS",
    "InputNotes",
    "PredictionRow",
    "TilePredictor",
    "WHOLE_SLIDE_EXTENSIONS",
    "check_inputs",
    "check_top_k",
    "csv_columns",
    "csv_row",
    "downscale",
    "error_text",
    "is_greyscale",
    "iter_input_files",
    "label_names_of",
    "list_input_files",
    "probability_columns",
    "read_downscaled",
    "use_attention",
    "write_prediction_rows",
    "write_predictions_csv",
]
