"""Scores of a trained tile classifier on labelled data: ``scripts/evaluate_model.py``'s library.

- :mod:`.labels`: class folders at any depth, the folder-name alias table (Kather 2016, NCT-CRC-HE),
  ``--label_map`` and the matching of the data's classes to the model's;
- :mod:`.sources`: a folder of class folders, a saved dataset or a Hub dataset, streamed through the model;
- :mod:`.scoring`: accuracy, balanced accuracy, macro-F1 with bootstrap intervals, per class (the
  package's one metric implementation, :mod:`hf_tissue_vit.metrics`);
- :mod:`.outputs`: eval_results.json, eval_predictions.csv, the confusion matrix, the Markdown summary;
- :mod:`.card`: the evaluation added to the model's card (model-index entry and section), pushed for a
  Hub model;
- :mod:`.run`: the arguments and one evaluation from start to end.

Example::

    args = EvaluationArguments(model="outputs/vit-scratch-cpu", inputs="CRC-VAL-HE-7K/", output_dir="eval/",
                               label_map='{"STR": "Stroma", "MUC": null, "MUS": null}')
    outcome = run_evaluation(args)
    print(markdown_summary(outcome.results))
"""

from .card import card_entry, push_card_update, update_model_card
from .labels import (
    AMBIGUOUS,
    NCT_ALIASES,
    ClassFolders,
    LabelMapping,
    find_class_folders,
    parse_label_map,
    resolve_labels,
    tissue_of,
)
from .outputs import CONFUSION_FILE, PREDICTIONS_FILE, RESULTS_FILE, markdown_summary
from .run import EvaluationArguments, EvaluationOutcome, model_label_names, open_data, run_evaluation
from .scoring import ScoreCollector, score
from .sources import DatasetData, FolderData, ScoredRow, load_dataset_dir, load_hub_dataset

__all__ = [
    "AMBIGUOUS", "CONFUSION_FILE", "NCT_ALIASES", "PREDICTIONS_FILE", "RESULTS_FILE", "ClassFolders", "DatasetData",
    "EvaluationArguments", "EvaluationOutcome", "FolderData", "LabelMapping", "ScoreCollector", "ScoredRow",
    "card_entry", "find_class_folders", "load_dataset_dir", "load_hub_dataset", "markdown_summary",
    "model_label_names", "open_data", "parse_label_map", "push_card_update", "resolve_labels", "run_evaluation",
    "score", "tissue_of", "update_model_card",
]
