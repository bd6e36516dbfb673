"""One evaluation: check everything, stream the images through the model, score, write, update the card.

Every check that can fail on bad input (arguments, class folders, dataset columns, label mapping, the
model's config, the Hub token for ``--push``) runs before the first image is read.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import distributed
from ..hardware import parse_bf16_flag, versions
from ..metrics import BOOTSTRAP_SEED
from ..modelfacts import read_model_facts
from ..modelfolder import check_model_folder
from ..units import check_mpp
from .card import card_files, download_card_folder, owns_repo, push_card_update, update_model_card
from .labels import LabelMapping, parse_label_map, resolve_labels
from .outputs import (
    CONFUSION_FILE,
    PREDICTIONS_FILE,
    RESULTS_FILE,
    predictions_csv,
    write_confusion_matrices,
    write_results,
)
from .scoring import ScoreCollector
from .sources import FolderData, LabelledData, load_dataset_dir, load_hub_dataset

logger = logging.getLogger(__name__)

TRAINING_PRECISION = "training"  # --bf16 value: the precision of the model's own test evaluation


@dataclass
class EvaluationArguments:
    """scripts/evaluate_model.py's flags."""

    model: str = field(metadata={"help": "Model folder (a finetune.py output, or any saved image classifier with "
                                         "its image processor) or Hub model id."})
    output_dir: str = field(metadata={"help": "Folder for eval_results.json, eval_predictions.csv and "
                                              "eval_confusion_matrix.png."})
    inputs: str | None = field(default=None, metadata={"help": "Folder with one sub-folder per class (Kather "
                                                               "01_TUMOR..., NCT TUM/STR/..., imagefolder)."})
    dataset_dir: str | None = field(default=None, metadata={"help": "Dataset saved with save_to_disk (e.g. by "
                                                                    "prepare_dataset.py)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id."})
    split: str | None = field(default=None, metadata={"help": "Split of --dataset_dir/--dataset_name (default "
                                                              "test)."})
    tta: bool = field(default=False, metadata={"help": "Also score with softmax averaged over the 8 dihedral "
                                                       "views (results beside the plain ones, names + _tta)."})
    label_map: str | None = field(default=None, metadata={"help": "JSON object or .json file: data class -> model "
                                                                  "class, null to leave a class out."})
    batch_size: int = field(default=128, metadata={"help": "Tiles per forward pass."})
    mpp: float | None = field(default=None, metadata={
        "help": "Micrometres per pixel of the tiles (default: the --dataset_dir's recorded mpp). Tiles of another "
                "scale than the model's (config.mpp) are resized to it before its image processor."})
    update_card: bool = field(default=False, metadata={"help": "Add the result to the model's card (model-index "
                                                               "entry and an 'Evaluation on NAME' section)."})
    eval_name: str | None = field(default=None, metadata={"help": "Name of the evaluation on the card (default: "
                                                                  "the data's name and split)."})
    push: bool = field(default=False, metadata={"help": "With --update_card on a Hub model: push the card as a "
                                                        "commit, or a pull request when you do not own the repo."})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples of the 95%% intervals (0: none)."})
    seed: int = field(default=BOOTSTRAP_SEED, metadata={"help": "Seed of the bootstrap (the default is finetune.py's, "
                                                                "so the test split gets its card's intervals)."})
    bf16: str = field(default="training", metadata={
        "help": "Precision. training (default): as the model's own test evaluation in finetune.py (fp32, or "
                "bf16 autocast with the training's attention kernel, read from the run's results; fp32 when "
                "they are absent), so scores compare with the card's test score; auto / true / false: bf16 weights "
                "as predict.py (auto: where the CPU/GPU has native bf16).", "nargs": "?", "const": "true"})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda when available; under "
                                                                  "accelerate launch each process its own GPU)."})
    num_workers: int = field(default=4, metadata={"help": "Image decoding threads (0 = none)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def __post_init__(self) -> None:
        given = [flag for flag in ("inputs", "dataset_dir", "dataset_name") if getattr(self, flag)]
        if len(given) != 1:
            raise ValueError("give exactly one of --inputs FOLDER, --dataset_dir DIR or --dataset_name HUB_ID"
                             + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
        if self.inputs and self.split:
            raise ValueError("--split is for --dataset_dir / --dataset_name; --inputs takes a folder of class "
                             "folders (pass the split's folder itself)")
        if self.batch_size < 1 or self.n_bootstrap < 0 or self.num_workers < 0:
            raise ValueError("--batch_size must be >= 1, --n_bootstrap >= 0 and --num_workers >= 0")
        check_mpp(self.mpp, "--mpp")
        if self.eval_name is not None and not self.eval_name.strip():
            raise ValueError("--eval_name must not be empty")
        if self.push and not self.update_card:
            raise ValueError("--push pushes the updated card: add --update_card")
        if self.push and self.model_is_local:
            raise ValueError(f"--push is for a Hub model; push the folder {self.model!r} with scripts/push_to_hub.py "
                             "after --update_card")
        if self.bf16 != TRAINING_PRECISION:
            try:
                parse_bf16_flag(self.bf16)
            except ValueError:
                raise ValueError(f"--bf16 must be training, auto, true or false, got {self.bf16!r}") from None
        _check_model(self.model)
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ValueError(f"--output_dir {self.output_dir!r} is a file; give a folder")

    @property
    def model_is_local(self) -> bool:
        """True for a model folder, False for a Hub id."""
        return os.path.isdir(self.model)


def _check_model(model: str) -> None:
    """A folder, or something shaped like a Hub id (USER/NAME or NAME)."""
    if os.path.isdir(model):
        return
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    looks_like_path = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
    try:
        validate_repo_id(model)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise FileNotFoundError(f"--model {model!r}: no such model folder (and not a Hub model id)")


@dataclass
class EvaluationOutcome:
    """What an evaluation produced."""

    results: dict[str, Any]
    files: dict[str, Path]
    card: Path | None = None
    pushed: str | None = None


def open_data(args: EvaluationArguments) -> LabelledData:
    """The labelled data the arguments name (classes counted, nothing decoded yet)."""
    if args.inputs:
        return FolderData(args.inputs)
    if args.dataset_dir:
        return load_dataset_dir(args.dataset_dir, args.split or "test")
    return load_hub_dataset(args.dataset_name, args.split or "test")


def model_label_names(model: str) -> list[str]:
    """The model's class names in label-id order, from its config alone (no weights loaded)."""
    check_model_folder(model, "--model")
    try:
        names = read_model_facts(model).label_names
    except OSError as err:
        raise FileNotFoundError(f"--model {model!r}: no model config ({err}); give a model folder with "
                                "config.json or a Hub model id") from err
    if not names:
        raise ValueError(f"--model {model!r} has no id2label in its config: its class names are unknown")
    return names


@dataclass
class Precision:
    """How the model runs: bf16 weights (predict.py's path), or fp32 weights under bf16 autocast (how
    Trainer evaluates a bf16 run), with the attention kernel to use."""

    bf16_weights: bool | None = False  # None: where the hardware has native bf16
    autocast: bool = False
    attn_implementation: str = "auto"

    def context(self, device: Any) -> contextlib.AbstractContextManager:
        """The autocast block the forward passes run in (a no-op unless ``autocast``)."""
        import torch

        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def describe(self, predictor: Any) -> str:
        """``fp32``, ``bf16 weights`` or ``bf16 autocast``, with the attention kernel."""
        kind = "bf16 autocast" if self.autocast else ("bf16 weights" if predictor.bf16 else "fp32")
        return f"{kind}, {predictor.attn_implementation} attention"


def precision_of(args: EvaluationArguments) -> Precision:
    """The precision ``--bf16`` asks for (see :class:`EvaluationArguments`)."""
    if args.bf16 != TRAINING_PRECISION:
        return Precision(bf16_weights=parse_bf16_flag(args.bf16))
    results = read_model_facts(args.model).results
    attn = (results.get("model") or {}).get("attn_implementation") or "auto"
    bf16 = bool((results.get("hyperparameters") or {}).get("bf16"))
    return Precision(bf16_weights=False, autocast=bf16, attn_implementation=attn)


def data_mpp(args: EvaluationArguments) -> float | None:
    """µm/px of the evaluation tiles: --mpp, else what the --dataset_dir's metadata records, else None."""
    if args.mpp is not None or not args.dataset_dir:
        return args.mpp
    from ..data.storage import read_dataset_metadata

    try:
        return check_mpp(read_dataset_metadata(args.dataset_dir).get("mpp"), "the dataset's mpp")
    except (OSError, ValueError):
        return None


def _predictors(args: EvaluationArguments, precision: Precision, device: Any) -> list[Any]:
    from ..predict.predictor import TilePredictor

    predictor = TilePredictor.from_pretrained(args.model, device=device, batch_size=args.batch_size,
                                              num_workers=args.num_workers, bf16=precision.bf16_weights,
                                              attn_implementation=precision.attn_implementation,
                                              mpp=data_mpp(args))
    if not args.tta:
        return [predictor]
    with_tta = copy.copy(predictor)  # shares the model; only the TTA switch differs
    with_tta.tta = True
    return [predictor, with_tta]


def _describe(args: EvaluationArguments, data: LabelledData, mapping: LabelMapping, predictor: Any,
              precision: Precision, name: str) -> dict[str, Any]:
    """Everything in eval_results.json beside the scores."""
    left_out = {c: data.counts[c] for c in mapping.left_out}
    commit = getattr(getattr(predictor.model, "config", None), "_commit_hash", None)
    model = {"id": args.model, "path": str(Path(args.model).resolve())} if args.model_is_local else \
        {"id": args.model, "revision": commit}
    return {"name": name, "dataset_name": data.dataset_name(), "dataset_type": data.dataset_type(),
            "split": data.split, "label_names": list(mapping.model_labels), "label_map": mapping.as_json(),
            "label_map_text": mapping.describe(data.counts), "n_left_out": sum(left_out.values()),
            "left_out": left_out, "n_unlabelled": data.unlabelled, "model": model, "data": data.info(),
            "tta": args.tta, "precision": precision.describe(predictor), "device": str(predictor.device),
            "bootstrap": {"resamples": args.n_bootstrap, "seed": args.seed, "interval": "95% percentile"},
            "versions": versions()}


def _update_card(args: EvaluationArguments, results: dict[str, Any], out: Path) -> tuple[Path, str | None]:
    png = out / CONFUSION_FILE
    if args.model_is_local:
        return update_model_card(args.model, results, png), None
    folder = download_card_folder(args.model, out / "model_card")
    card = update_model_card(folder, results, png, repo_id=args.model)
    pushed = push_card_update(folder, args.model, card_files(results), results["name"]) if args.push else None
    return card, pushed


def run_evaluation(args: EvaluationArguments) -> EvaluationOutcome:
    """Evaluate ``args.model`` on the labelled data and write the outputs into ``args.output_dir``.

    Under ``accelerate launch`` each process scores a contiguous shard of the images on its own
    device; the main process joins the predictions in input order, scores all of them together and
    writes the files (see :mod:`hf_tissue_vit.distributed`)."""
    state = distributed.process_state(args.device)
    label_map = parse_label_map(args.label_map)
    data = open_data(args)
    model_labels = model_label_names(args.model)
    mapping = resolve_labels(data.class_names, model_labels, label_map, where=f"{data.dataset_name()!r}")
    if args.push:
        owns_repo(args.model)  # the token is checked before the long part
    precision = precision_of(args)
    predictors = _predictors(args, precision, distributed.process_device(state, args.device))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard = distributed.split(state, range(data.n_rows(mapping)))
    collector = ScoreCollector(len(predictors))
    with predictions_csv(state, out / PREDICTIONS_FILE, model_labels, args.tta) as writer, \
            precision.context(predictors[0].device):
        rows = data.rows(mapping, predictors, shard)
        for row in tqdm(rows, total=data.n_scored_in(mapping, shard), unit="tile",
                        desc=distributed.progress_name(state, "evaluate"), disable=args.no_progress):
            writer.write(row)
            collector.add(row)
    collector = ScoreCollector.merged(distributed.gather([collector]))
    name = args.eval_name or data.default_name()
    results = {**collector.results(model_labels, args.n_bootstrap, args.seed),
               **_describe(args, data, mapping, predictors[0], precision, name), "num_processes": state.num_processes}
    files = {"results": out / RESULTS_FILE, "predictions": out / PREDICTIONS_FILE}
    outcome = EvaluationOutcome(results, files)
    if state.is_main_process:
        write_results(out, results)
        for path in write_confusion_matrices(out, results):
            files[path.stem] = path
        if args.update_card:
            outcome.card, outcome.pushed = _update_card(args, results, out)
    state.wait_for_everyone()
    return outcome
