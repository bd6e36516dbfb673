"""Issue 26's schedule and colour levers, training only: grey tiles (``--grey_p``), a clean ending
(``--clean_end``: augmentation and PatchDropout ramped down to none over the last epochs) and progressive
resolution (``--progressive_resolution``: smaller images early, grown by whole patches), all set by epoch, so a
resumed run trains what an uninterrupted one trains. The saved model stays a plain ViT at its size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SIX_FOLDERS, assert_pipeline_matches_predict, kill_after_first_epoch, load_script, make_tiles
from safetensors.torch import load_file

from hf_tissue_vit.modeling import PatchDropout
from hf_tissue_vit.training.schedule import CleanEndCallback, EpochSchedule, planned_epochs
from hf_tissue_vit.training.tiles import TileCollator
from hf_tissue_vit.transforms import AugmentationConfig, TileTransform

TINY = ["--model_preset", "tiny", "--image_size", "32", "--patch_size", "8", "--hidden_size", "32",
        "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "64",
        "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--use_cpu", "true",
        "--n_bootstrap", "0", "--cache_decoded", "false", "--tta", "false", "--bf16", "false"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
ROOT = Path(__file__).resolve().parents[1]


def _tiles(batch: int = 8, size: int = 40, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)


def _unnormalised(pixel_values: torch.Tensor) -> torch.Tensor:
    return pixel_values * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_grey_p_turns_that_share_of_tiles_grey_and_off_draws_nothing():
    tiles = _tiles(64)
    every = TileTransform(24, MEAN, STD, AugmentationConfig(grey_p=1.0, stain_stats=0.35))(
        tiles, torch.Generator().manual_seed(1))
    channels = _unnormalised(every)
    assert torch.allclose(channels[:, 0], channels[:, 1], atol=1e-5)
    assert torch.allclose(channels[:, 1], channels[:, 2], atol=1e-5)
    half = _unnormalised(TileTransform(24, MEAN, STD, AugmentationConfig(grey_p=0.5))(
        tiles, torch.Generator().manual_seed(1)))
    grey = [torch.allclose(half[i, 0], half[i, 2], atol=1e-5) for i in range(len(tiles))]
    assert 16 < sum(grey) < 48
    off = TileTransform(24, MEAN, STD, AugmentationConfig(grey_p=0.0))
    default = TileTransform(24, MEAN, STD, AugmentationConfig())
    assert torch.equal(off(tiles, torch.Generator().manual_seed(2)), default(tiles, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="grey_p"):
        AugmentationConfig(grey_p=1.5)


def test_scaled_augmentation_shrinks_every_strength_and_at_zero_is_the_eval_resize():
    aug = AugmentationConfig(crop_scale=(0.6, 1.0), stain_jitter=0.05, stain_stats=0.35, grey_p=0.2)
    assert aug.scaled(1.0) == aug
    half = aug.scaled(0.5)
    assert half.crop_scale == pytest.approx((0.8, 1.0)) and half.stain_stats == pytest.approx(0.175)
    assert half.crop_ratio[0] == pytest.approx((3 / 4) ** 0.5) and half.grey_p == pytest.approx(0.1)
    assert half.dihedral and half.stain_stats_p == aug.stain_stats_p
    clean = AugmentationConfig(**{**vars(aug), "dihedral": False}).scaled(0.0)
    tiles = _tiles()
    trained = TileTransform(24, MEAN, STD, clean)(tiles, torch.Generator().manual_seed(3))
    assert torch.equal(trained, TileTransform(24, MEAN, STD)(tiles))
    with pytest.raises(ValueError, match="strength"):
        aug.scaled(1.5)


def test_a_clean_ending_that_keeps_colour_ramps_the_crop_only():
    aug = AugmentationConfig(crop_scale=(0.6, 1.0), stain_jitter=0.05, stain_stats=0.35, brightness=0.1,
                             contrast=0.1, grey_p=0.2)
    kept = aug.scaled(0.0, colour=False)
    assert kept.crop_scale == (1.0, 1.0) and kept.crop_ratio == (1.0, 1.0)
    colour = ("stain_jitter", "stain_stats", "brightness", "contrast", "grey_p")
    assert [getattr(kept, name) for name in colour] == [getattr(aug, name) for name in colour]
    assert [getattr(aug.scaled(0.0), name) for name in colour] == [0.0] * 5

    schedule = EpochSchedule(4, clean_end=0.5, keep_colour=True)
    collator = TileCollator(TileTransform(24, MEAN, STD, aug), TileTransform(24, MEAN, STD), seed=5,
                            schedule=schedule)
    assert collator.transform_at(3).augmentation == kept
    tiles = _tiles()
    items = [{"pixels": tiles[i], "labels": 0, "index": i, "train": True, "epoch": 3} for i in range(len(tiles))]
    assert not torch.allclose(collator(items)["pixel_values"], TileTransform(24, MEAN, STD)(tiles))


def test_clean_end_ramps_linearly_to_none_in_the_last_epoch():
    schedule = EpochSchedule(40, clean_end=0.15)
    assert schedule.ramp_epochs == 6
    strengths = [schedule.strength(e) for e in range(40)]
    assert strengths[:34] == [1.0] * 34
    assert strengths[34:] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    assert [schedule.patch_keep(0.5, e) for e in (0, 36, 39)] == pytest.approx([0.5, 0.75, 1.0])
    short = EpochSchedule(10, clean_end=0.01)
    assert short.strength(9) == 0.0 and short.strength(8) == 1.0  # at least one epoch
    assert EpochSchedule(10).strength(9) == 1.0 and EpochSchedule(10).size(0) is None

    dropout = PatchDropout(0.5)
    callback = CleanEndCallback(schedule, dropout)
    for epoch, keep in ((38.0, 1 - 0.5 / 6), (0.0, 0.5), (39.0, 1.0), (None, 0.5)):
        callback.on_epoch_begin(None, SimpleNamespace(epoch=epoch), None)
        assert dropout.keep == pytest.approx(keep)


def test_progressive_resolution_grows_by_whole_patches_over_the_first_half():
    schedule = EpochSchedule(40, start_size=64, image_size=112, patch_size=16)
    sizes = [schedule.size(e) for e in range(40)]
    assert sizes[:7] == [64] * 7 and sizes[7:14] == [80] * 7 and sizes[14:20] == [96] * 6
    assert sizes[20:] == [None] * 20  # the model's own size from half-way on


def test_the_schedule_counts_the_epochs_a_max_steps_run_takes():
    def args(**kw):
        return SimpleNamespace(**{"max_steps": -1, "num_train_epochs": 2.5, "world_size": 1,
                                  "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1,
                                  "dataloader_drop_last": False, **kw})

    assert planned_epochs(args(), 48) == 3
    assert planned_epochs(args(max_steps=5), 48) == 2  # 3 steps an epoch
    assert planned_epochs(args(max_steps=5), 50) == 2 and planned_epochs(args(max_steps=5, dataloader_drop_last=True),
                                                                         50) == 2
    assert planned_epochs(args(max_steps=5, world_size=2), 48) == 3  # 2 steps an epoch in each process
    # 3 batches in rounds of 2: 2 updates an epoch (the Trainer counts the last, partial round)
    assert planned_epochs(args(max_steps=5, gradient_accumulation_steps=2), 48) == 3


def test_the_collator_augments_each_epoch_at_its_strength_on_either_path():
    schedule = EpochSchedule(4, clean_end=0.5)  # epochs 0, 1 full; 2 at half; 3 clean
    aug = AugmentationConfig(dihedral=False, stain_stats=0.35, grey_p=0.3)
    collator = TileCollator(TileTransform(24, MEAN, STD, aug), TileTransform(24, MEAN, STD), seed=5,
                            schedule=schedule)
    tiles = _tiles()
    items = [{"pixels": tiles[i], "labels": 0, "index": i, "train": True} for i in range(len(tiles))]

    def batch(epoch: int, device: bool = False) -> torch.Tensor:
        collator.device_augmentation = device
        out = collator([{**item, "epoch": epoch} for item in items])
        return collator.augment_on_device(out)["pixel_values"] if device else out["pixel_values"]

    assert torch.equal(batch(3), TileTransform(24, MEAN, STD)(tiles))  # the last epoch: the eval resize
    assert not torch.allclose(batch(0), batch(3)) and not torch.allclose(batch(2), batch(0))
    assert collator.transform_at(1) is collator.train_transform
    assert collator.transform_at(2).augmentation == aug.scaled(0.5)
    for epoch in (0, 2, 3):
        torch.testing.assert_close(batch(epoch, device=True), batch(epoch), rtol=1e-5, atol=1e-5)


def test_the_collator_shrinks_early_batches_and_asks_the_model_to_interpolate():
    schedule = EpochSchedule(4, start_size=16, image_size=32, patch_size=8)  # 16 px, 24 px, then 32 px
    collator = TileCollator(TileTransform(32, MEAN, STD, AugmentationConfig()), TileTransform(32, MEAN, STD), seed=1,
                            schedule=schedule)
    tiles = _tiles(4)
    items = [{"pixels": tiles[i], "labels": 0, "index": i, "train": True} for i in range(len(tiles))]
    for epoch, size in ((0, 16), (1, 24), (2, 32), (3, 32)):
        for device in (False, True):
            collator.device_augmentation = device
            batch = collator([{**item, "epoch": epoch} for item in items])
            batch = collator.augment_on_device(batch) if device else batch
            assert batch["pixel_values"].shape == (4, 3, size, size)
            assert batch.get("interpolate_pos_encoding", False) == (size != 32)


def test_finetune_trains_with_a_clean_end_and_grey_tiles_and_records_them(tiny_dataset_dir, tmp_path):
    out = tmp_path / "run"
    code = load_script("finetune").main(["--from_scratch", *TINY, "--dataset_dir", str(tiny_dataset_dir),
                                         "--output_dir", str(out), "--num_train_epochs", "3", "--patch_keep", "0.5",
                                         "--clean_end", "0.5", "--grey_p", "0.2", "--report_to", "none"])
    assert code == 0
    short = tmp_path / "short"  # --max_steps: the epochs the steps take (5 steps of 3 an epoch: 2)
    assert load_script("finetune").main(["--from_scratch", *TINY, "--dataset_dir", str(tiny_dataset_dir),
                                         "--output_dir", str(short), "--max_steps", "5", "--clean_end", "0.5",
                                         "--clean_end_keep_colour", "true", "--report_to", "none"]) == 0
    assert math.ceil(json.loads((short / "trainer_state.json").read_text())["epoch"]) == 2
    rounds = tmp_path / "rounds"  # with accumulation: 3 batches an epoch in rounds of 2 are 2 updates, so 3 epochs
    assert load_script("finetune").main(["--from_scratch", *TINY, "--dataset_dir", str(tiny_dataset_dir),
                                         "--output_dir", str(rounds), "--max_steps", "5", "--clean_end", "0.5",
                                         "--gradient_accumulation_steps", "2", "--eval_strategy", "no",
                                         "--save_strategy", "no", "--load_best_model_at_end", "false",
                                         "--report_to", "none"]) == 0
    assert math.ceil(json.loads((rounds / "trainer_state.json").read_text())["epoch"]) == 3
    assert json.loads((short / "hf_tissue_vit_run.json").read_text())["training"]["clean_end_keep_colour"] is True
    results = json.loads((out / "all_results.json").read_text())
    assert results["hyperparameters"]["clean_end"] == 0.5
    assert results["hyperparameters"]["augmentation"]["grey_p"] == 0.2
    signed = json.loads((out / "hf_tissue_vit_run.json").read_text())
    assert signed["training"]["clean_end"] == 0.5 and signed["data"]["grey_p"] == 0.2  # a resume must match them
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]


def test_finetune_trains_with_progressive_resolution_and_saves_the_model_at_its_size(tiny_dataset_dir, tmp_path):
    out = tmp_path / "run"
    code = load_script("finetune").main(["--from_scratch", *TINY, "--dataset_dir", str(tiny_dataset_dir),
                                         "--output_dir", str(out), "--num_train_epochs", "4", "--patch_keep", "0.5",
                                         "--progressive_resolution", "16", "--clean_end", "0.25",
                                         "--clean_end_keep_colour", "true", "--report_to", "none"])
    assert code == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["hyperparameters"]["progressive_resolution"] == 16
    assert results["hyperparameters"]["clean_end_keep_colour"] is True
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 32 and config["architectures"] == ["ViTForImageClassification"]
    files = make_tiles(tmp_path / "tiles", 1, size=48, classes=SIX_FOLDERS[:2], fmt="png")
    assert_pipeline_matches_predict(out, [f for paths in files.values() for f in paths], tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--progressive_resolution", "20"], "multiple of the patch size 8"),
    (["--progressive_resolution", "32"], "below the image size 32"),
    (["--progressive_resolution", "16", "--teacher_epochs", "1"], "--teacher_epochs"),
    (["--clean_end", "1.0"], "--clean_end"),
    (["--clean_end_keep_colour", "true"], "give --clean_end too"),
    (["--grey_p", "-0.1"], "grey_p"),
])  # fmt: skip
def test_finetune_refuses_a_bad_clean_end_or_grey_p_in_one_line(tiny_dataset_dir, tmp_path, capsys, flags, message):
    code = load_script("finetune").main(["--from_scratch", *TINY, "--dataset_dir", str(tiny_dataset_dir),
                                         "--output_dir", str(tmp_path / "run"), *flags])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()


def test_a_killed_run_with_the_whole_schedule_resumes_to_the_same_model(tiny_dataset_dir, tmp_path):
    """The stain recipe (persistent DataLoader workers) with grey tiles, progressive resolution and a clean ending
    over 3 epochs (16, 24, 32 px; strength 1, 1/2, 0), SIGKILLed after its first epoch's checkpoint and run again
    with the same command, ends bit-identical to an uninterrupted run."""
    def command(out):
        return [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--config",
                str(ROOT / "scripts" / "recipes" / "scratch_cpu_stain.yaml"), "--from_scratch", *TINY[:12],
                "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(out), "--num_train_epochs", "3",
                "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--use_cpu", "true",
                "--report_to", "none", "--cache_decoded", "false", "--disable_tqdm", "true", "--n_bootstrap", "0",
                "--grey_p", "0.3", "--progressive_resolution", "16", "--clean_end", "0.5"]

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    kill_after_first_epoch(command(resumed), resumed, env)
    for out in (reference, resumed):
        done = subprocess.run(command(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from the last checkpoint" in done.stderr
    a, b = (json.loads((run / "all_results.json").read_text()) for run in (reference, resumed))
    assert b["train_pieces"][0]["to_step"] == 3
    for key in ("eval_loss", "eval_accuracy", "test_loss", "test_accuracy", "test_macro_f1"):
        assert a[key] == b[key], key
    wa, wb = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
