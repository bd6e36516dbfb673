"""``run_finetune``: one training run as a sequence of phases, validate -> load data -> build model ->
build trainer -> train (resume) -> evaluate test -> write outputs.

The argument dataclasses are only read; what a run resolves from them (model spec, dataset folder,
resume checkpoint, attention kernel, resolution) lives in a :class:`RunPlan` and :class:`TrainingData`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback, set_seed

from .. import hardware
from ..backbones import num_prefix_tokens
from ..modeling import ModelSpec, add_patch_dropout, build_model, check_model, checkpoint_preprocessing
from ..transforms.processor import ProcessorTransform, make_image_processor
from ..transforms.tile_transform import TileTransform
from .arguments import DataArguments, ModelArguments, TissueTrainingArguments
from .backbone import backbone_description, freeze_model_parts
from .evaluation import TestPredictions, evaluate_test
from .guidance import GuidanceLoss, GuidanceTargets, default_layers
from .initialisation import apply_structured_init
from .outputs import RESULTS_FILE, dataset_info, run_description, write_outputs
from .probe import linear_probe, probe_field
from .rundir import check_output_dir, claim_output_dir, finished_run, run_signature
from .schedule import check_progressive, epoch_schedule
from .speed import SPEED_KEY, SpeedCallback
from .teacher import TEACHER_DIR, TeacherSettings, map_size, teacher_for_run
from .tiles import EpochCallback, TileCollator, TileDataset, split_fingerprint, tile_dataset
from .trainer import TissueTrainer, make_compute_metrics

logger = logging.getLogger(__name__)

NO_DOWNLOAD_HINT = (
    "To train without a download, build the dataset from a local copy of the Kather 2016 release first "
    "(python scripts/prepare_dataset.py --source /path/to/Kather_texture_2016_image_tiles_5000 --output_dir DIR) "
    "and pass --dataset_dir DIR, or pass a Hub dataset with --dataset_name user/name"
)
_DECODED_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class RunPlan:
    """What a run resolved from its arguments before reading any data."""

    model: ModelSpec
    attn_implementation: str  # "auto" resolved for this device and precision
    dataset_dir: str | None  # the folder read: --dataset_dir, or the default dataset's
    dataset_name: str | None
    build_default_dataset: bool  # no --dataset_dir/--dataset_name: build the default dataset if missing
    signature: dict
    resume: str | None  # checkpoint to resume from
    finished: bool = False  # the output dir holds this run, finished: nothing to train or write


@dataclass(frozen=True)
class TrainingData:
    """The loaded dataset, its labels and resolution, and its splits decoded for training."""

    dataset: Any  # datasets.DatasetDict
    label_names: list[str]
    mpp: float | None  # micrometres per pixel: --mpp, else the dataset folder's metadata, else unknown
    info: dict[str, Any]  # all_results.json's "dataset" section
    tiles: dict[str, TileDataset]


def default_dataset_dir() -> Path:
    """Where the default dataset (Kather release, stratified split) is built on first use."""
    from ..data.download import default_cache_dir

    return default_cache_dir().parent / "kather2016_stratified"


def _warn_single_cpu_process() -> None:
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "WORLD_SIZE" not in os.environ:
        # accelerate 1.x's `launch --cpu --num_processes N` starts ONE process (N CPU processes need
        # mpirun); torchrun-based `accelerate launch --multi_gpu --num_processes N` works on CPU too.
        logger.warning(
            "accelerate launch --cpu started a single process; for N CPU processes use "
            "`accelerate launch --config_file accelerate_config.yaml --num_processes N scripts/finetune.py "
            "--use_cpu true ...` (or --multi_gpu instead of --config_file)"
        )


def validate_run(
    model_args: ModelArguments, data_args: DataArguments, training_args: TissueTrainingArguments
) -> RunPlan:
    """Check everything that can be checked before the data is read (model, output dir, resume)."""
    from ..modelfolder import check_model_folder

    _warn_single_cpu_process()
    if training_args.push_after_training:  # the token, the repo id and the Hub: checked before any work
        from ..hub import check_hub_access

        check_hub_access(training_args.hub_model_id, "--hub_model_id")
    checkpoint = None if model_args.from_scratch else model_args.model_name_or_path
    if checkpoint and not Path(checkpoint, "config.json").is_file():
        check_model_folder(checkpoint, "--model_name_or_path")  # a dataset folder, a missing folder: said first
    spec = check_model(
        model_args.model_name_or_path,
        from_scratch=model_args.from_scratch,
        preset=model_args.model_preset,
        image_size=model_args.image_size,
        patch_size=model_args.patch_size,
        overrides=model_args.overrides(),
    )
    if model_args.patch_keep < 1 and not spec.family.token_sequence:
        raise ValueError(f"--patch_keep {model_args.patch_keep}: PatchDropout needs a ViT or DINOv2 backbone, not a "
                         f"{spec.family.name} model (leave --patch_keep at 1)")
    check_progressive(training_args.progressive_resolution, spec.image_size, getattr(spec.config, "patch_size", 1),
                      spec.family, fixed_grid=bool(training_args.teacher_epochs or model_args.freeze_backbone))
    if model_args.freeze_position_embeddings and not spec.family.token_sequence:
        raise ValueError(f"--freeze_position_embeddings: a {spec.family.name} model has no position embeddings the "
                         "package can reach; leave the flag out")
    layers = getattr(spec.config, "num_hidden_layers", None)
    if model_args.unfreeze_last_blocks is not None and layers is not None and model_args.unfreeze_last_blocks > layers:
        raise ValueError(f"--unfreeze_last_blocks {model_args.unfreeze_last_blocks}: the backbone has {layers} blocks; "
                         f"give 1 to {layers}")
    if checkpoint:
        check_model_folder(checkpoint, "--model_name_or_path")  # safetensors weights there; a run that finished
    build_default = not (data_args.dataset_dir or data_args.dataset_name)
    dataset_dir = str(default_dataset_dir()) if build_default else data_args.dataset_dir
    signature = run_signature(model_args, data_args, training_args, dataset_dir)
    attn_implementation = hardware.resolve_attn_implementation(
        model_args.attn_implementation, training_args.device, bool(training_args.bf16)
    )
    finished = finished_run(signature, training_args)
    return RunPlan(
        model=spec,
        attn_implementation=attn_implementation,
        dataset_dir=dataset_dir,
        dataset_name=data_args.dataset_name,
        build_default_dataset=build_default,
        signature=signature,
        resume=None if finished else check_output_dir(signature, training_args),
        finished=finished,
    )


def load_dataset_for_training(plan: RunPlan, label_names: list[str] | None = None) -> Any:
    """The plan's dataset folder or Hub dataset; the default dataset (the Kather release from Zenodo,
    ``data.build_dataset``'s default source) is built once into the HF cache and reused."""
    from ..data.build import build_dataset_with_report
    from ..data.download import DownloadError
    from ..data.storage import load_tissue_dataset, save_dataset

    if plan.build_default_dataset and not (Path(plan.dataset_dir) / "dataset_dict.json").is_file():
        logger.info("no --dataset_dir/--dataset_name: building the default dataset into %s", plan.dataset_dir)
        try:
            dataset, report = build_dataset_with_report(None)
            save_dataset(dataset, plan.dataset_dir, report=report)
        except DownloadError as err:  # its default hint names prepare_dataset.py's --source
            raise err.with_hint(NO_DOWNLOAD_HINT) from err
    return load_tissue_dataset(
        dataset_dir=plan.dataset_dir, dataset_name=plan.dataset_name, label_names=label_names,
        require_validation=False,
    )


def resolve_mpp(flag: float | None, metadata: dict[str, Any], dataset_dir: str | None) -> float | None:
    """``--mpp`` when given (it wins over the dataset's), else the dataset folder's ``mpp``, else None."""
    saved = metadata.get("mpp")
    if flag is not None:
        if saved is not None and saved != flag:
            logger.warning("--mpp %s overrides the dataset's mpp %s", flag, saved)
        return float(flag)
    if saved is None:
        return None
    if isinstance(saved, bool) or not isinstance(saved, (int, float)) or not (math.isfinite(saved) and saved > 0):
        from ..data.storage import METADATA_FILE

        raise ValueError(f"{Path(dataset_dir) / METADATA_FILE}: mpp {saved!r} is not a positive number of "
                         "micrometres per pixel; rebuild the dataset or pass --mpp")
    return float(saved)


def load_training_data(
    plan: RunPlan, data_args: DataArguments, training_args: TissueTrainingArguments
) -> TrainingData:
    """Load the dataset (the main process first: it may build the default one) and decode its splits."""
    from ..data.storage import complete_splits, read_dataset_metadata

    with training_args.main_process_first(desc="dataset"):
        dataset = load_dataset_for_training(plan, training_args.expected_label_names)
    # Most Hub image datasets have only a train split: validation/test are made from it, seeded.
    dataset, made_splits = complete_splits(dataset, training_args.seed)
    metadata = read_dataset_metadata(plan.dataset_dir) if plan.dataset_dir else {}
    if made_splits:
        metadata = {**metadata, "split_by": made_splits["split_by"], "made_splits": made_splits}
    mpp = resolve_mpp(data_args.mpp, metadata, plan.dataset_dir)
    sizes = {name: len(split) for name, split in dataset.items()}
    tiles = {
        name: tile_dataset(dataset[name], name == "train", data_args.cache_decoded, data_args.decode_cache_dir)
        for name in _DECODED_SPLITS
        if name in dataset
    }
    return TrainingData(
        dataset=dataset,
        label_names=list(dataset["train"].features["label"].names),
        mpp=mpp,
        info=dataset_info(plan.dataset_dir, plan.dataset_name, sizes, metadata, mpp),
        tiles=tiles,
    )


def processor_stats(source: ModelSpec | str | None) -> tuple[list[float], list[float]]:
    """Mean/std of the checkpoint's own image processor when fine-tuning or continuing from a checkpoint (the
    weights expect them): a checked :class:`ModelSpec` (read by :func:`~hf_tissue_vit.modeling.check_model`) or
    a checkpoint path; the package's default otherwise."""
    from ..transforms.processor import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD

    if isinstance(source, str):
        mean, std, _ = checkpoint_preprocessing(source, None)
    else:
        mean, std = (source.image_mean, source.image_std) if source is not None else (None, None)
        source = source.checkpoint if source is not None else None
    if source is not None and mean and std:
        return list(mean), list(std)
    if source is not None:
        logger.info("no image processor with the checkpoint; using mean/std %s/%s", DEFAULT_IMAGE_MEAN,
                    DEFAULT_IMAGE_STD)  # fmt: skip
    return list(DEFAULT_IMAGE_MEAN), list(DEFAULT_IMAGE_STD)


def _record_mpp(config: Any, mpp: float | None) -> None:
    """``config.mpp`` (saved in config.json) is the resolution of the tiles the model is trained on."""
    if mpp is not None:
        config.mpp = mpp
    elif getattr(config, "mpp", None) is not None:
        logger.info("the tiles' resolution is unknown: the checkpoint's mpp %s is not kept (pass --mpp)", config.mpp)
        del config.mpp


def build_model_and_processor(
    plan: RunPlan, data: TrainingData, model_args: ModelArguments, seed: int
) -> tuple[Any, Any]:
    """The model for the dataset's labels (seeded: the same init for the same seed) and its image processor."""
    set_seed(seed)
    model = build_model(plan.model, data.label_names, plan.attn_implementation)
    apply_structured_init(model, model_args.position_init, model_args.attention_init, seed)
    _record_mpp(model.config, data.mpp)
    add_patch_dropout(model, model_args.patch_keep)
    mean, std = processor_stats(plan.model)
    return model, make_image_processor(model.config.image_size, mean, std)


def build_trainer(
    model: Any, processor: Any, data: TrainingData, data_args: DataArguments, training_args: TissueTrainingArguments
) -> TissueTrainer:
    """A :class:`TissueTrainer` on the decoded train/validation tiles, augmenting in the collator (or, with
    ``--device_augmentation``, in the training step on the GPU)."""
    # Validation and test see exactly the saved processor's pixels, as predict.py and pipeline() do.
    eval_transform = ProcessorTransform(processor)
    train_transform = TileTransform.from_processor(processor, data_args.augmentation())
    on_device = hardware.resolve_device_augmentation(data_args.device_augmentation, training_args.device)
    schedule, schedule_callbacks = epoch_schedule(training_args, model, len(data.tiles["train"]))
    collator = TileCollator(train_transform, eval_transform, seed=training_args.data_seed or training_args.seed,
                            device_augmentation=on_device, schedule=schedule)
    callbacks: list[TrainerCallback] = [EpochCallback(data.tiles["train"]), SpeedCallback(), *schedule_callbacks]
    if training_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    trainer = TissueTrainer(
        model=model,
        args=training_args,
        train_dataset=data.tiles["train"],
        eval_dataset=data.tiles["validation"],
        data_collator=collator,
        compute_metrics=make_compute_metrics(data.label_names),
        processing_class=processor,
        callbacks=callbacks,
    )
    if on_device:
        trainer.device_augment = collator.augment_on_device
    if training_args.ema_decay:
        trainer.enable_ema(training_args.ema_decay)
    return trainer


def add_teacher(trainer: TissueTrainer, data: TrainingData, training_args: TissueTrainingArguments) -> dict[str, Any]:
    """Train the CNN teacher of ``--teacher_epochs`` (or reuse the one stored in the output dir, made with the same
    settings: the main process first, the others read it), give the collator its targets and the trainer its loss.
    Returns the teacher's record (all_results.json's ``teacher``)."""
    tiles, config = data.tiles["train"], trainer.model.config
    transform = trainer.data_collator.train_transform
    settings = TeacherSettings(
        epochs=float(training_args.teacher_epochs), seed=training_args.seed, num_labels=len(data.label_names),
        train_tiles=len(tiles), data=split_fingerprint(data.dataset["train"]) or "", augmentation=repr(transform),
        map_size=map_size(tiles.pixels.shape[1]),
    )
    validation = data.tiles.get("validation")
    with training_args.main_process_first(desc="teacher"):
        maps, record = teacher_for_run(
            Path(training_args.output_dir) / TEACHER_DIR, settings, tiles.pixels, tiles.labels, transform,
            (validation.pixels, validation.labels) if validation is not None else None, bool(training_args.bf16),
        )
    trainer.data_collator.targets = GuidanceTargets(maps, config.image_size // config.patch_size)
    dims = [features.shape[1] for features in maps.features]
    layers = training_args.guidance_layers or default_layers(config.num_hidden_layers, len(dims))
    trainer.enable_guidance(GuidanceLoss(
        config.hidden_size, dims, layers, num_prefix_tokens(config), training_args.distill_alpha,
        training_args.distill_temperature, training_args.guidance_weight,
    ))  # fmt: skip
    return record


def train(trainer: TissueTrainer, plan: RunPlan) -> dict[str, Any]:
    """Train (resuming the plan's checkpoint) in the claimed output dir, save the selected model; train and
    validation metrics."""
    train_result = trainer.train(resume_from_checkpoint=plan.resume)
    timers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SpeedCallback)]
    speed = {SPEED_KEY: timers[0].summary()} if timers else {}
    trainer.save_model()  # the selected (best) model + processor
    trainer.save_state()
    return {**train_result.metrics, **trainer.evaluate(metric_key_prefix="eval"), **speed}


def evaluate_test_split(
    trainer: TissueTrainer, data: TrainingData, training_args: TissueTrainingArguments
) -> tuple[dict[str, Any], TestPredictions | None]:
    """Test metrics and predictions, or nothing when the dataset has no test split."""
    if "test" not in data.tiles:
        logger.warning("the dataset has no 'test' split: no test metrics")
        return {}, None
    return evaluate_test(
        trainer, data.dataset["test"], data.tiles["test"], data.label_names,
        tta=training_args.tta, n_bootstrap=training_args.n_bootstrap,  # evaluate.py's bootstrap seed, not --seed
    )


def finished_results(training_args: TissueTrainingArguments) -> dict[str, Any]:
    """The all_results.json of a finished run in the output dir, pushed when ``--push_to_hub`` asks for it."""
    import json

    out = Path(training_args.output_dir)
    logger.warning("%s already holds this run, finished: nothing is trained or written (pass "
                   "--overwrite_output_dir true to train it again)", out)
    if training_args.push_after_training and training_args.process_index == 0:
        from .. import hub

        hub.push_output_dir(str(out), training_args.hub_model_id, private=bool(training_args.hub_private_repo),
                            revision=training_args.hub_revision)
    return json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))


def _show_tiles_at_backbone_scale(trainer: TissueTrainer, data: TrainingData, backbone_mpp: float | None,
                                  input_size: int) -> None:
    """The linear probe's field (:func:`probe_field`): the collator crops every tile to it, and the run records it
    as the training tile size, so that prediction takes the same field of a larger tile."""
    pixels = data.tiles["train"].pixels
    field = probe_field((pixels.shape[1], pixels.shape[2]), data.mpp, backbone_mpp, input_size)
    if field is not None:
        trainer.data_collator.field = field
        data.info["tile_size"] = [field, field]


def run_finetune(
    model_args: ModelArguments, data_args: DataArguments, training_args: TissueTrainingArguments
) -> dict[str, Any]:
    """Train, select the best checkpoint on validation, evaluate test once, write the output dir.

    Returns the all_results.json dictionary. The arguments are not changed. A run whose output dir
    already holds it, finished, is not trained again: its results are returned as they are (and, with
    ``--push_to_hub``, its folder is pushed).
    """
    plan = validate_run(model_args, data_args, training_args)
    if plan.finished:
        return finished_results(training_args)
    data = load_training_data(plan, data_args, training_args)
    # read before the model records the tiles' mpp in its config
    backbone_mpp = model_args.backbone_mpp or getattr(plan.model.config, "mpp", None)
    model, processor = build_model_and_processor(plan, data, model_args, training_args.seed)
    freeze_model_parts(model, model_args.freeze_backbone, model_args.freeze_position_embeddings,
                       model_args.unfreeze_last_blocks)
    trainer = build_trainer(model, processor, data, data_args, training_args)
    if model_args.freeze_backbone:
        _show_tiles_at_backbone_scale(trainer, data, backbone_mpp, model.config.image_size)
    claim_output_dir(plan.signature, training_args, plan.resume)
    teacher = add_teacher(trainer, data, training_args) if training_args.teacher_epochs else None
    with (linear_probe(trainer, data, model_args.probe_views, data_args.cache_decoded, data_args.decode_cache_dir)
          if model_args.freeze_backbone else contextlib.nullcontext()):  # fmt: skip
        results = train(trainer, plan)
    test_results, predictions = evaluate_test_split(trainer, data, training_args)
    results.update(test_results)
    results.update(run_description(
        model_args, data_args, training_args, model=trainer.model, attn_implementation=plan.attn_implementation,
        label_names=data.label_names, dataset=data.info,
    ))  # fmt: skip
    results["model"].update(backbone_description(model_args, plan.model))
    if teacher is not None:
        results["teacher"] = teacher
    if trainer.is_world_process_zero():
        write_outputs(trainer, results, predictions, training_args.push_after_training)
    return results
