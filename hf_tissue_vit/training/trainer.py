"""``TissueTrainer``: ``transformers.Trainer`` with dihedral test-time augmentation, an optional weight
average (:mod:`.ema`), checkpoint loading that matches transformers 5's ViT key names, and results of
the whole run when it was resumed (:mod:`.progress`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from ..fileio import fix_permissions
from ..modeling import PatchDropout, patch_dropout_of
from ..transforms.augmentation import dihedral_views
from .ema import EMA_FILE, EMACallback, WeightEMA
from .guidance import HEADS_FILE, GuidanceCallback, GuidanceLoss, load_module, pop_targets, save_module
from .progress import TrainingProgress
from .tiles import loader_generator

logger = logging.getLogger(__name__)


def make_compute_metrics(label_names: Sequence[str]) -> Callable[[Any], dict[str, float]]:
    """Trainer's ``compute_metrics``: :func:`hf_tissue_vit.metrics.make_compute_metrics` plus ``n_samples``
    (which shows that each sample is counted once, also across processes)."""
    from .. import metrics

    base = metrics.make_compute_metrics(label_names)

    def compute_metrics(prediction: Any) -> dict[str, float]:
        return {**base(prediction), "n_samples": len(prediction.label_ids)}

    return compute_metrics


class _PieceClock(TrainerCallback):
    """When the training loop of the current ``train()`` call began (Trainer's own start, after set-up)."""

    start: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.time()


class TissueTrainer(Trainer):
    """Trainer whose prediction can average softmax over the 8 dihedral views (``self.tta``).

    It also loads checkpoints (resume, best model) through ``from_pretrained``: in transformers 5
    ViT's modules are renamed and ``save_pretrained`` writes the original key names, which the
    Trainer's raw ``load_state_dict(strict=False)`` silently fails to match (missing keys).
    Saved weights get the usual file permissions (safetensors leaves them 0600).
    """

    tta: bool = False
    ema: WeightEMA | None = None
    # Makes ``pixel_values`` of a uint8 training batch on the device (TileCollator.augment_on_device).
    device_augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # Teacher guidance (:mod:`.guidance`): its training-only heads and loss, and the model's PatchDropout (whose
    # kept patches the targets follow).
    guidance: GuidanceLoss | None = None
    patch_dropout: PatchDropout | None = None
    _guidance_log: dict[str, float] = {}
    _progress: TrainingProgress | None = None  # the run up to the checkpoint this train() call resumed
    _clock: _PieceClock | None = None
    _schedule_samples: float | None = None

    def enable_ema(self, decay: float) -> None:
        """Average the weights during training (see :class:`WeightEMA`): evaluation and checkpoint
        selection use the average, each checkpoint stores it (``ema.safetensors``) so a resumed run
        continues it, and after training the model holds the (best) average."""
        self.ema = WeightEMA(self.accelerator.unwrap_model(self.model), decay)
        self.add_callback(EMACallback(self))

    def enable_guidance(self, loss: GuidanceLoss) -> None:
        """Add the teacher's losses to training batches that carry its targets (:mod:`.guidance`): the heads are
        optimised with the model, averaged over the processes of a launch and stored in every checkpoint."""
        self.guidance = loss.to(self.args.device)
        self._guidance_log = {}
        self.patch_dropout = patch_dropout_of(self.model)
        self.add_callback(GuidanceCallback(self.guidance))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        heads = list(self.guidance.parameters()) if self.guidance is not None else []
        if heads and not any(p is heads[0] for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group({"params": heads, "weight_decay": self.args.weight_decay})
        return optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """Trainer's ``train``; its metrics describe the whole run, also when resumed (see :mod:`.progress`)."""
        self._progress = None if isinstance(resume_from_checkpoint, bool) else (
            TrainingProgress.from_checkpoint(resume_from_checkpoint))
        if self._clock is None:
            self._clock = _PieceClock()
            self.add_callback(self._clock)
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.ema is not None:
            if not (self.args.load_best_model_at_end and self.state.best_model_checkpoint):
                self.ema.copy_to_model()
            self.ema = None  # the model now holds the averaged weights: no more swapping
        if self._progress is None:
            return result
        whole = self._progress.extended(self._progress.step, self.state.global_step, result.metrics["train_runtime"],
                                        self._total_loss_scalar)
        metrics = whole.whole_run_metrics(result.metrics, self._schedule_samples, self.state.max_steps)
        return TrainOutput(result.global_step, metrics["train_loss"], metrics)

    def _get_dataloader(self, *args: Any, **kwargs: Any) -> torch.utils.data.DataLoader:
        loader = super()._get_dataloader(*args, **kwargs)
        # worker base seeds from the loader's own generator: a resumed run must not draw them from the
        # global RNG at other times than an uninterrupted one (see training.tiles' seeding rules)
        getattr(loader, "base_dataloader", loader).generator = loader_generator(self.args.seed)  # accelerate wraps it
        return loader

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        if 0 < self.state.max_steps <= self.state.global_step:
            # Resumed from the checkpoint at the end of a --max_steps schedule (killed before the results):
            # transformers would run one step past the schedule before checking it; there is nothing to train.
            logger.info("the checkpoint is at the end of the schedule (step %d): nothing left to train",
                        self.state.global_step)
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def _finalize_training(self, trial, num_train_samples, start_time):
        self._schedule_samples = num_train_samples  # the whole schedule's samples, for the whole run's speed
        return super()._finalize_training(trial, num_train_samples, start_time)

    def _save_progress(self, folder: Path) -> None:
        """The run's record up to this checkpoint (every process joins the gather of the unlogged loss)."""
        pending = nested_gather(self._tr_loss, self.args.parallel_mode).mean().item()
        if self._progress is None or not self.args.should_save:
            return
        start = self._clock.start if self._clock is not None and self._clock.start is not None else time.time()
        record = self._progress.extended(self._progress.step, self.state.global_step, time.time() - start,
                                         self._total_loss_scalar + pending)
        folder.mkdir(parents=True, exist_ok=True)
        record.save(folder)

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        if "pixels" in inputs:  # a uint8 training batch, already on the device: augment it there
            if self.device_augment is None:
                raise ValueError("a training batch of uint8 'pixels' needs TissueTrainer.device_augment")
            inputs = self.device_augment(inputs)
        targets = pop_targets(inputs)
        if self.guidance is None or not targets:
            return super().compute_loss(model, inputs, *args, **kwargs)
        return_outputs = kwargs.pop("return_outputs", args[0] if args else False)
        kwargs.update(zip(("num_items_in_batch",), args[1:]))
        classification, outputs = super().compute_loss(model, {**inputs, "output_hidden_states": True},
                                                       return_outputs=True, **kwargs)
        kept = self.patch_dropout.kept if self.patch_dropout is not None else None
        loss, parts = self.guidance.combine(classification, outputs, targets, kept)
        for name, value in parts.items():  # logged with the loss (averaged since the last log)
            self._guidance_log[name] = self._guidance_log.get(name, 0.0) + value
        self._guidance_log["steps"] = self._guidance_log.get("steps", 0) + 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._guidance_log.get("steps"):
            steps = self._guidance_log.pop("steps")
            logs.update({f"{name}_loss": round(total / steps, 4) for name, total in self._guidance_log.items()})
            self._guidance_log = {}
        super().log(logs, *args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        if self.ema is None:
            return super().evaluate(*args, **kwargs)
        self.ema.swap()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.ema.swap()

    def _save_checkpoint(self, model, trial):
        # Written before Trainer's trainer_state.json, which marks a checkpoint complete.
        folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.ema is not None and self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            self.ema.save(folder / EMA_FILE)
        if self.guidance is not None and self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            save_module(self.guidance, folder / HEADS_FILE)
        self._save_progress(folder)
        super()._save_checkpoint(model, trial)

    def _load_weights_from(self, folder: str, model: torch.nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        loaded = type(target).from_pretrained(folder, use_safetensors=True)
        target.load_state_dict(loaded.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("loading weights from %s", resume_from_checkpoint)
        self._load_weights_from(resume_from_checkpoint, model)
        if self.ema is not None:
            path = Path(resume_from_checkpoint) / EMA_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{resume_from_checkpoint} has no {EMA_FILE}: it was not saved by an "
                                        "--ema_decay run; resume it without --ema_decay")
            self.ema.load(path)
        if self.guidance is not None:
            path = Path(resume_from_checkpoint) / HEADS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{resume_from_checkpoint} has no {HEADS_FILE}: it was not saved by a "
                                        "--teacher_epochs run; resume it with the run's own settings")
            load_module(self.guidance, path)

    def _load_best_model(self):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        logger.info("loading the best model %s (%s)", self.state.best_model_checkpoint, self.state.best_metric)
        if self.ema is None:
            self._load_weights_from(self.state.best_model_checkpoint)
            return
        # the selection was made on the averaged weights: load those
        self.ema.load(Path(self.state.best_model_checkpoint) / EMA_FILE)
        self.ema.copy_to_model()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            fix_permissions(output_dir if output_dir is not None else self.args.output_dir)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self.tta:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            probs = sum(
                model(pixel_values=view).logits.float().softmax(-1) for view in dihedral_views(inputs["pixel_values"])
            ) / 8
        # log of the mean probability: argmax and softmax of it give the TTA prediction and probabilities
        return None, probs.clamp_min(1e-12).log(), inputs.get("labels")
