"""Training-only levers of issue 26: a CNN teacher's stored maps guiding the ViT (soft labels of each crop, patch
features matched at a few depths), and the structured initialisations (impulse attention, sin-cos positions).
The saved model stays a plain ViT whose pipeline() output equals predict.py's; a killed guided run resumes to the
same result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_pipeline_matches_predict, kill_when_exists, tiny_vit
from safetensors.torch import load_file

from hf_tissue_vit.modeling import add_patch_dropout, patch_dropout_of
from hf_tissue_vit.training.guidance import GuidanceLoss, GuidanceTargets, default_layers
from hf_tissue_vit.training.initialisation import apply_structured_init, check_init, sincos_position_embeddings
from hf_tissue_vit.training.teacher import SmallCNN, TeacherMaps, compute_maps, map_size
from hf_tissue_vit.transforms import AugmentationConfig, TileTransform

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "finetune.py"
GEOMETRY_ONLY = AugmentationConfig(stain_jitter=0, brightness=0, contrast=0)  # crops and symmetries, no colour


def _ramp_tiles(batch: int, size: int) -> torch.Tensor:
    """uint8 [B,size,size,3]: red grows along x, green along y (4 grey levels a pixel), blue differs per tile."""
    ramp = torch.arange(size) * 4
    tiles = torch.zeros(batch, size, size, 3, dtype=torch.uint8)
    tiles[..., 0] = ramp.view(1, 1, -1)
    tiles[..., 1] = ramp.view(1, -1, 1)
    tiles[..., 2] = torch.arange(batch).view(-1, 1, 1) * 20
    return tiles


def test_targets_follow_the_crop_and_the_symmetry_of_the_pixels():
    """The teacher's maps, pooled over each crop and turned like the pixels, land on the tokens the ViT sees there:
    maps made of the tiles' own red/green ramps equal the augmented pixels averaged per patch."""
    size, cell, patch = 48, 8, 8
    tiles = _ramp_tiles(16, size)
    transform = TileTransform(32, [0.0] * 3, [1.0] * 3, GEOMETRY_ONLY)  # pixel_values = pixels / 255
    pixel_values, geometry = transform(tiles, generator=torch.Generator().manual_seed(0), return_geometry=True)
    assert geometry.dihedral.unique().numel() > 2 and (geometry.boxes[2] < size).any()  # crops and turns drawn
    cells = F.avg_pool2d(tiles.permute(0, 3, 1, 2).float(), cell)  # [B,3,6,6]: the maps over the whole tile
    maps = TeacherMaps(class_map=torch.zeros(16, 4, 6, 6), features=[cells[:, :2]])
    targets = GuidanceTargets(maps, grid=32 // patch)(torch.arange(16), geometry)
    seen = F.avg_pool2d(pixel_values[:, :2] * 255, patch).flatten(2).transpose(1, 2)  # [B, 16 tokens, 2]
    assert targets["teacher_features_0"].shape == (16, 16, 2)
    torch.testing.assert_close(targets["teacher_features_0"], seen, atol=3.0, rtol=0)  # grey levels, after resizes
    # without the symmetry the targets would not match (the test can fail)
    unturned = cells[:, :2]
    plain = GuidanceTargets(TeacherMaps(maps.class_map, [unturned]), 4)
    flat = type(geometry)(geometry.boxes, torch.zeros_like(geometry.dihedral), geometry.tile_size)
    assert (plain(torch.arange(16), flat)["teacher_features_0"] - seen).abs().max() > 20


def test_soft_labels_are_the_class_map_averaged_over_the_crop():
    tiles = _ramp_tiles(4, 48)
    transform = TileTransform(32, [0.5] * 3, [0.5] * 3, GEOMETRY_ONLY)
    _, geometry = transform(tiles, generator=torch.Generator().manual_seed(1), return_geometry=True)
    class_map = torch.zeros(4, 3, 6, 6)
    class_map[:, 1] = torch.arange(6.0).view(1, 1, 6)  # class 1's logit grows to the right
    targets = GuidanceTargets(TeacherMaps(class_map, []), 4)(torch.arange(4), geometry)
    left, _, width, _ = geometry.boxes
    centre = (left + width / 2) / 8 - 0.5  # the crop's centre in map cells
    torch.testing.assert_close(targets["teacher_logits"][:, 1], centre.float(), atol=0.05, rtol=0)
    assert torch.equal(targets["teacher_logits"][:, 0], torch.zeros(4))


def test_guidance_loss_parts_and_the_kept_patches():
    hidden, dim, tokens = 8, 8, 9
    loss = GuidanceLoss(hidden, [dim], layers=[1], prefix=1, alpha=0.5, temperature=2.0, weight=1.0)
    with torch.no_grad():
        loss.heads[0].weight.copy_(torch.eye(dim))
        loss.heads[0].bias.zero_()
    features = torch.randn(2, tokens, dim)
    kept = torch.tensor([[4, 0, 7], [1, 8, 2]])
    normalised = F.layer_norm(features, (dim,))
    student = normalised.gather(1, kept.unsqueeze(-1).expand(-1, -1, dim))  # the tokens PatchDropout kept
    logits = torch.randn(2, 5)
    outputs = SimpleNamespace(logits=logits, hidden_states=[None, torch.cat([torch.zeros(2, 1, dim), student], 1)])
    targets = {"teacher_logits": logits.clone(), "teacher_features_0": features}
    ce = torch.tensor(1.5)
    total, parts = loss.combine(ce, outputs, targets, kept)
    assert parts["distill"] == pytest.approx(0, abs=1e-6) and parts["guidance"] == pytest.approx(0, abs=1e-6)
    assert float(total.detach()) == pytest.approx(0.75)  # (1 - alpha) * CE
    _, wrong = loss.combine(ce, outputs, targets, kept.flip(1))  # other patches: the guidance loss sees it
    assert wrong["guidance"] > 0.1
    with pytest.raises(ValueError, match="--guidance_layers"):
        GuidanceLoss(hidden, [dim, dim], layers=[1], prefix=1, alpha=0.5, temperature=2.0, weight=1.0)
    assert default_layers(6, 2) == [3, 6] and default_layers(2, 2) == [1, 2]


def test_patch_dropout_records_the_patches_it_kept():
    model = tiny_vit(image_size=32, patch_size=8)
    add_patch_dropout(model, 0.5)
    dropout = patch_dropout_of(model)
    pixels = torch.randn(3, 3, 32, 32)
    full = model.eval().vit.embeddings(pixels)  # every token
    assert dropout.kept is None
    hidden = model.train()(pixel_values=pixels, output_hidden_states=True).hidden_states[0]
    assert dropout.kept.shape == (3, 8)
    torch.testing.assert_close(hidden[:, 1:], full.gather(1, (dropout.kept + 1).unsqueeze(-1).expand(-1, -1, 32)))


def test_teacher_maps_cover_the_tile_on_the_token_grid():
    model = SmallCNN(num_labels=3).eval()
    tiles = torch.randint(0, 255, (5, 50, 50, 3), dtype=torch.uint8)
    transform = TileTransform(32, [0.5] * 3, [0.5] * 3)
    maps = compute_maps(model, tiles, transform, map_size(50))
    assert map_size(50) == 48 and maps.class_map.shape == (5, 3, 3, 3)
    assert [tuple(f.shape) for f in maps.features] == [(5, 128, 3, 3), (5, 256, 3, 3)]
    assert maps.features[0].dtype == torch.float16  # stored compactly
    logits = model(TileTransform(48, [0.5] * 3, [0.5] * 3)(tiles))["logits"]
    torch.testing.assert_close(maps.class_map.mean(dim=(2, 3)), logits)  # the logits are the class map's mean


def test_impulse_attention_points_every_head_at_a_neighbour():
    from transformers import ViTConfig, ViTForImageClassification

    # head width 32 >= 25 patches: the impulses are exact on the positions (narrower heads get a rank-limited fit)
    config = ViTConfig(image_size=40, patch_size=8, hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=64, num_labels=2, attn_implementation="eager")
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.vit.embeddings.patch_embeddings.projection.weight.zero_()  # tokens are their positions only
    apply_structured_init(model, "random", "impulse", seed=0)
    with torch.no_grad():
        attentions = model(pixel_values=torch.zeros(1, 3, 40, 40), output_attentions=True).attentions
    centre = 1 + 12  # patch (2, 2) of the 5x5 grid, after CLS
    for layer in attentions:
        targets = [int(head[centre].argmax()) - centre for head in layer[0]]
        assert targets[0] == 0  # each layer keeps a head on the patch itself
        assert all(t in (-6, -5, -4, -1, 0, 1, 4, 5, 6) for t in targets)  # a 3x3 neighbour
        assert len(set(targets)) == 3  # a different one per head
        assert all(float(head[centre].max()) > 0.6 for head in layer[0])  # e^4 / (e^4 + 25)
    random_model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        flat = random_model(pixel_values=torch.zeros(1, 3, 40, 40), output_attentions=True).attentions[0]
    assert float(flat[0, :, centre].max()) < 0.1  # the default init attends everywhere


def test_sincos_positions_and_init_checks():
    table = sincos_position_embeddings(3, 8)
    assert table.shape == (9, 8)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))  # sin 0, cos 0 per axis
    torch.testing.assert_close(table[1, 4], torch.sin(torch.tensor(1.0)))  # column 1 at the first frequency
    model = tiny_vit(image_size=32, patch_size=8)
    apply_structured_init(model, "sincos", "random")
    torch.testing.assert_close(model.vit.embeddings.position_embeddings[0, 1:].detach(),
                               sincos_position_embeddings(4, 32))
    for args, message in [(("sincos", "impulse", True), "own"), (("grid", "random", True), "--position_init"),
                          (("random", "impulse", False), "from_scratch")]:
        with pytest.raises(ValueError, match=message):
            check_init(*args)


TINY_MODEL = ["--from_scratch", "--model_preset", "tiny", "--image_size", "32", "--patch_size", "8",
              "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
              "--intermediate_size", "64"]  # fmt: skip


def _guided_args(dataset_dir: Path, out: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), *TINY_MODEL, "--dataset_dir", str(dataset_dir), "--output_dir", str(out),
            "--num_train_epochs", "4", "--eval_strategy", "steps", "--save_strategy", "steps", "--eval_steps", "2",
            "--save_steps", "2", "--patch_keep", "0.5", "--teacher_epochs", "2", "--attention_init", "impulse",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--learning_rate", "2e-3",
            "--warmup_steps", "0", "--dataloader_num_workers", "0", "--use_cpu", "true", "--report_to", "none",
            "--n_bootstrap", "0", "--cache_decoded", "false", "--disable_tqdm", "true", "--seed", "0",
            "--bf16", "false"]  # fmt: skip


def _run(args: list[str]) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_guided_run_resumes_to_the_same_result_and_saves_a_plain_vit(tiny_dataset_dir: Path, tmp_path: Path):
    from transformers import ViTForImageClassification

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    done = _run(_guided_args(tiny_dataset_dir, reference))
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(_guided_args(tiny_dataset_dir, resumed), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(__import__("os").environ, OMP_NUM_THREADS="1"))
    kill_when_exists(proc, resumed / "checkpoint-4" / "trainer_state.json", whole_json=True)
    assert proc.returncode == -signal.SIGKILL and not (resumed / "all_results.json").exists()
    again = _run(_guided_args(tiny_dataset_dir, resumed))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: reusing" in again.stderr and "resuming from the last checkpoint" in again.stderr
    a, b = (json.loads((run / "all_results.json").read_text()) for run in (reference, resumed))
    for key in ("eval_loss", "eval_accuracy", "test_loss", "test_accuracy", "test_macro_f1"):
        assert a[key] == b[key], key  # the heads and the teacher came back with the checkpoint
    assert a["teacher"]["settings"]["epochs"] == 2 and 0 <= a["teacher"]["validation_accuracy"] <= 1
    checkpoints = list(resumed.glob("checkpoint-*"))
    assert checkpoints and all((c / "guidance_heads.safetensors").is_file() for c in checkpoints)
    # the saved model: a plain ViT, nothing of the teacher or the heads in it
    weights = load_file(reference / "model.safetensors")
    ViTForImageClassification.from_pretrained(reference, use_safetensors=True).save_pretrained(tmp_path / "plain")
    assert set(weights) == set(load_file(tmp_path / "plain" / "model.safetensors"))  # no other tensors in it
    config = json.loads((reference / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and "teacher_epochs" not in config
    # pipeline() gives predict.py's probabilities
    from datasets import load_from_disk

    images = [row["image"] for row in load_from_disk(str(tiny_dataset_dir))["test"].select(range(3))]
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"tile{i}.png")
        image.save(files[-1])
    assert_pipeline_matches_predict(reference, files, tmp_path)


@pytest.mark.slow
def test_guided_run_in_two_processes(tiny_dataset_dir: Path, tmp_path: Path):
    """Under ``accelerate launch`` the main process trains the teacher, the other reads it, and both train."""
    out = tmp_path / "ddp"
    args = _guided_args(tiny_dataset_dir, out)
    done = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args[1:],
                 "--max_steps", "3"])  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["hardware"]["num_processes"] == 2 and "teacher" in results
    assert done.stderr.count("teacher: training") == 1  # once, by the main process


def test_guidance_flags_are_checked_before_any_work(tmp_path: Path):
    from hf_tissue_vit.training import parse_args

    for flags, message in [(["--teacher_epochs", "-1"], "--teacher_epochs"), (["--distill_alpha", "2"], "alpha"),
                           (["--distill_temperature", "0"], "temperature"), (["--guidance_weight", "-1"], "weight")]:
        with pytest.raises(ValueError, match=message):
            parse_args(["--output_dir", str(tmp_path / "x"), *flags])


def test_teacher_targets_are_the_same_on_the_device_path():
    """With --device_augmentation the collator passes the tile indices and the training step makes the targets
    from the geometry it draws: the same as the CPU collator's."""
    from hf_tissue_vit.training.tiles import TileCollator, TileDataset

    tiles = _ramp_tiles(6, 48)
    dataset = TileDataset(tiles, torch.arange(6) % 3, train=True)
    items = [dataset[i] for i in (5, 2, 0, 3)]
    maps = TeacherMaps(torch.randn(6, 3, 6, 6), [torch.randn(6, 4, 6, 6).half()])
    transform = TileTransform(32, [0.5] * 3, [0.5] * 3, AugmentationConfig())
    eval_transform = TileTransform(32, [0.5] * 3, [0.5] * 3)
    on_cpu = TileCollator(transform, eval_transform, seed=1, targets=GuidanceTargets(maps, 4))(items)
    lazy = TileCollator(transform, eval_transform, seed=1, device_augmentation=True, targets=GuidanceTargets(maps, 4))
    batch = lazy(items)
    assert torch.equal(batch["tile_index"], torch.tensor([5, 2, 0, 3]))
    done = lazy.augment_on_device(batch)
    assert set(done) == set(on_cpu) == {"pixel_values", "labels", "teacher_logits", "teacher_features_0"}
    for key in ("teacher_logits", "teacher_features_0"):
        assert torch.equal(done[key], on_cpu[key]), key
