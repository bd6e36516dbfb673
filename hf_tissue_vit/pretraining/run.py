"""``run_pretrain``: masked-autoencoder pretraining (transformers' ``ViTMAEForPreTraining``) on unlabelled tiles,
as phases validate -> load tiles -> build model -> train (resume) -> write the output dir.

The output dir holds the MAE (encoder + decoder), its image processor and ``pretraining.json`` (what it was
pretrained on and how); ``finetune.py --model_name_or_path OUTPUT_DIR`` fine-tunes its encoder as a plain
``ViTForImageClassification`` and copies the record into all_results.json (and so the model card).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, ViTMAEConfig, ViTMAEForPreTraining, set_seed

from .. import hardware
from ..modelfolder import PRETRAINING_FILE, mark_run_complete
from ..predict.inputs import check_inputs
from ..training.outputs import write_json_atomic
from ..training.run import processor_stats, resolve_mpp
from ..training.rundir import check_output_dir, claim_output_dir, run_signature
from ..training.tiles import EpochCallback
from ..training.trainer import TissueTrainer
from ..transforms.processor import make_image_processor
from ..transforms.tile_transform import TileTransform
from .arguments import DECODER_FLAGS, MAEModelArguments, PretrainingArguments, UnlabelledDataArguments
from .data import PixelCollator, UnlabelledTiles, load_unlabelled_tiles, unlabelled_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainPlan:
    """What a pretraining run resolved from its arguments before reading any tiles."""

    config: ViTMAEConfig
    checkpoint: str | None  # a ViTMAE checkpoint to continue from, or None for a new model
    attn_implementation: str
    signature: dict
    resume: str | None  # the checkpoint of this run to resume from
    mpp: float | None  # the tiles' resolution: --mpp, else the dataset folder's, else unknown


def checkpoint_mae_config(model_args: MAEModelArguments) -> ViTMAEConfig:
    """The config of the ViTMAE checkpoint to continue from, with this run's mask ratio and loss."""
    path = model_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"--model_name_or_path {path!r}: cannot read a model config ({err})") from err
    if config.model_type != "vit_mae":
        raise ValueError(f"--model_name_or_path {path!r} is a {config.model_type!r} checkpoint, not a ViTMAE one; "
                         "pretraining continues only ViTMAE checkpoints (leave the flag out for a new model)")
    config.mask_ratio, config.norm_pix_loss = model_args.mask_ratio, model_args.norm_pix_loss
    return config


def validate_pretraining(
    model_args: MAEModelArguments, data_args: UnlabelledDataArguments, training_args: PretrainingArguments
) -> PretrainPlan:
    """Check the model, inputs and output dir (resume) before any tile is read."""
    config = checkpoint_mae_config(model_args) if model_args.model_name_or_path else model_args.mae_config()
    if data_args.inputs:
        check_inputs(data_args.inputs)
    signature = run_signature(model_args, data_args, training_args)
    return PretrainPlan(
        config=config,
        checkpoint=model_args.model_name_or_path,
        attn_implementation=hardware.resolve_attn_implementation(
            model_args.attn_implementation, training_args.device, bool(training_args.bf16)
        ),
        signature=signature,
        resume=check_output_dir(signature, training_args),
        mpp=_dataset_mpp(data_args),
    )


def build_mae(plan: PretrainPlan, seed: int) -> ViTMAEForPreTraining:
    """A new MAE of the plan's config (seeded), or the checkpoint's."""
    set_seed(seed)
    if plan.checkpoint:
        model = ViTMAEForPreTraining.from_pretrained(plan.checkpoint, config=plan.config, use_safetensors=True)
    else:
        model = ViTMAEForPreTraining(plan.config)
    model.set_attn_implementation(plan.attn_implementation)
    logger.info("MAE: %d parameters, %d in the encoder", model.num_parameters(), model.vit.num_parameters())
    return model


def build_pretrainer(
    model: ViTMAEForPreTraining, processor: Any, tiles: UnlabelledTiles, data_args: UnlabelledDataArguments,
    training_args: PretrainingArguments,
) -> TissueTrainer:
    """A :class:`TissueTrainer` on the unlabelled tiles, augmenting whole batches in the collator."""
    dataset = unlabelled_dataset(tiles)
    collator = PixelCollator(
        TileTransform.from_processor(processor, data_args.augmentation()), TileTransform.from_processor(processor),
        seed=training_args.data_seed or training_args.seed,
    )
    trainer = TissueTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                            processing_class=processor, callbacks=[EpochCallback(dataset)])  # fmt: skip
    if training_args.ema_decay:
        trainer.enable_ema(training_args.ema_decay)
    return trainer


def _dataset_mpp(data_args: UnlabelledDataArguments) -> float | None:
    """finetune.py's rule (:func:`~hf_tissue_vit.training.run.resolve_mpp`): --mpp, else the dataset folder's."""
    from ..data.storage import read_dataset_metadata

    metadata = read_dataset_metadata(data_args.dataset_dir) if data_args.dataset_dir else {}
    return resolve_mpp(data_args.mpp, metadata, data_args.dataset_dir)


def pretraining_record(
    trainer: TissueTrainer, metrics: dict[str, Any], tiles: UnlabelledTiles, plan: PretrainPlan,
    data_args: UnlabelledDataArguments,
) -> dict[str, Any]:
    """``pretraining.json``: the data, schedule and MAE settings (the fine-tuned model's card shows it)."""
    args, config = trainer.args, plan.config
    return {
        "method": "masked autoencoder (ViTMAEForPreTraining)",
        "data": {**tiles.info, "mpp": plan.mpp},
        "epochs": round(float(trainer.state.epoch or 0), 3),
        "steps": trainer.state.global_step,
        "mask_ratio": config.mask_ratio,
        "norm_pix_loss": bool(config.norm_pix_loss),
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "decoder": {name.removeprefix("decoder_"): getattr(config, name) for name in DECODER_FLAGS},
        "total_batch_size": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "augmentation": dataclasses.asdict(data_args.augmentation()),
        "train_loss": metrics.get("train_loss"),
        "train_runtime": metrics.get("train_runtime"),
        "hardware": hardware.hardware_info(args),
        "seed": args.seed,
        "continued_from": plan.checkpoint,
        "recipe": data_args.config,
    }


def run_pretrain(
    model_args: MAEModelArguments, data_args: UnlabelledDataArguments, training_args: PretrainingArguments
) -> dict[str, Any]:
    """Pretrain, save the last model with its processor, write ``pretraining.json``, then mark the folder a finished
    run. Returns the record. The arguments are not changed."""
    plan = validate_pretraining(model_args, data_args, training_args)
    with training_args.main_process_first(desc="tiles"):
        tiles = load_unlabelled_tiles(data_args, training_args.seed)
    logger.info("pretraining on %d unlabelled tiles", len(tiles.pixels))
    model = build_mae(plan, training_args.seed)
    processor = make_image_processor(plan.config.image_size, *processor_stats(plan.checkpoint))
    trainer = build_pretrainer(model, processor, tiles, data_args, training_args)
    claim_output_dir(plan.signature, training_args, plan.resume)
    metrics = trainer.train(resume_from_checkpoint=plan.resume).metrics
    trainer.save_model()
    trainer.save_state()
    record = pretraining_record(trainer, metrics, tiles, plan, data_args)
    if trainer.is_world_process_zero():
        write_json_atomic(Path(training_args.output_dir) / PRETRAINING_FILE, record)
        mark_run_complete(training_args.output_dir)  # last: the folder is now a finished run
    return record
