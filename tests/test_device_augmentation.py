"""Augmentation on the GPU: the device path of TileTransform (batched crop + resize, dihedral, stain,
brightness/contrast on the tensors' device) gives the CPU path's pixels from the same draws; the collator
then only stacks uint8 and the Trainer step augments. Run here on CPU tensors (no GPU in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script

from hf_tissue_vit import hardware
from hf_tissue_vit.training.tiles import TileCollator, TileDataset, augmentation_seed
from hf_tissue_vit.transforms import AugmentationConfig, TileTransform
from hf_tissue_vit.transforms.augmentation import antialias_weights, crop_box_pixels, crop_resize

main = load_script("finetune").main


def _tiles(batch: int = 6, height: int = 41, width: int = 41, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8, generator=generator)


AUGMENTATIONS = {
    "all": AugmentationConfig(),
    "no_crop": AugmentationConfig(random_resized_crop=False),
    "geometry_only": AugmentationConfig(stain_jitter=0, brightness=0, contrast=0),
    "colour_only": AugmentationConfig(dihedral=False, random_resized_crop=False),
    "stain_stats": AugmentationConfig(stain_stats=0.7),
    "stain_stats_only": AugmentationConfig(stain_stats=0.7, stain_stats_p=0.5, stain_jitter=0),
    "grey": AugmentationConfig(stain_stats=0.35, grey_p=0.5),
    "grey_only": AugmentationConfig(dihedral=False, random_resized_crop=False, stain_jitter=0, grey_p=0.5),
    "weakened": AugmentationConfig(stain_stats=0.35, grey_p=0.5).scaled(0.25),
    "strong": AugmentationConfig(crop_scale=(0.08, 1.0), crop_ratio=(0.5, 2.0), stain_jitter=0.2, brightness=0.4,
                                 contrast=0.4),
}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
@pytest.mark.parametrize("size", [19, 41, 64])  # down, same, up
def test_device_path_gives_the_cpu_paths_pixels(name: str, size: int) -> None:
    transform = TileTransform(size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], AUGMENTATIONS[name])
    tiles = _tiles()
    cpu = transform(tiles, generator=torch.Generator().manual_seed(7))
    device = transform(tiles, generator=torch.Generator().manual_seed(7), device_path=True)
    assert device.shape == cpu.shape == (6, 3, size, size) and device.dtype == torch.float32
    torch.testing.assert_close(device, cpu, rtol=1e-5, atol=1e-5)
    other = transform(tiles, generator=torch.Generator().manual_seed(8), device_path=True)
    assert not torch.allclose(other, cpu)  # the draws matter: a different seed gives other pixels


def test_crop_resize_is_torchs_uint8_kernel_and_weights_its_float_filter() -> None:
    x = _tiles(8, 37, 45, seed=1).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(3)
    for size in (16, 37, 90):
        boxes = crop_box_pixels(8, 37, 45, AugmentationConfig(crop_scale=(0.1, 1.0)), generator)
        out = crop_resize(x, boxes, size)
        for i, (x0, y0, w, h) in enumerate(zip(*(b.tolist() for b in boxes))):
            tile = x[i : i + 1, :, y0 : y0 + h, x0 : x0 + w].contiguous(memory_format=torch.channels_last)
            ref = F.interpolate(tile, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            assert torch.equal(out[i].to(torch.uint8), ref[0]), (size, i)
            rows = antialias_weights(boxes[1][i : i + 1], boxes[3][i : i + 1], 37, size)[0]
            cols = antialias_weights(boxes[0][i : i + 1], boxes[2][i : i + 1], 45, size)[0]
            smooth = rows @ x[i].double() @ cols.T
            float_ref = F.interpolate(tile.double(), size=(size, size), mode="bilinear", antialias=True)[0]
            torch.testing.assert_close(smooth, float_ref, rtol=0, atol=1e-6)


def test_device_path_by_default_only_off_the_cpu() -> None:
    transform = TileTransform(24, [0.5] * 3, [0.5] * 3, AugmentationConfig())
    calls = []
    transform._geometry_batched = lambda *a: calls.append(a) or torch.zeros(2, 3, 24, 24)
    transform(_tiles(2), generator=torch.Generator().manual_seed(0))
    assert not calls  # CPU tensors: the CPU path
    transform(_tiles(2), generator=torch.Generator().manual_seed(0), device_path=True)
    assert len(calls) == 1


def test_collator_stacks_uint8_and_the_device_step_augments_like_the_cpu_collator() -> None:
    tiles = _tiles(10, 35, 35)
    dataset = TileDataset(tiles, torch.arange(10) % 3, train=True)
    dataset.set_epoch(2)
    items = [dataset[i] for i in (4, 1, 7, 0)]
    transform = TileTransform(32, [0.5] * 3, [0.5] * 3, AugmentationConfig())
    eval_transform = TileTransform(32, [0.5] * 3, [0.5] * 3)
    on_cpu = TileCollator(transform, eval_transform, seed=5)(items)
    lazy = TileCollator(transform, eval_transform, seed=5, device_augmentation=True)
    batch = lazy(items)
    assert set(batch) == {"pixels", "augment_seed", "augment_epoch", "labels"} and batch["pixels"].dtype == torch.uint8
    assert torch.equal(batch["pixels"], tiles[[4, 1, 7, 0]])  # stacked, nothing else
    assert batch["augment_seed"] == augmentation_seed(5, 2, [4, 1, 7, 0])
    done = lazy.augment_on_device(batch)
    assert set(done) == {"pixel_values", "labels"} and "pixels" in batch  # the input batch is left as it was
    torch.testing.assert_close(done["pixel_values"], on_cpu["pixel_values"], rtol=1e-5, atol=1e-5)
    assert torch.equal(done["labels"], on_cpu["labels"])
    # evaluation batches are made in the collator either way
    dataset.train = False
    eval_items = [dataset[i] for i in range(3)]
    assert torch.equal(lazy(eval_items)["pixel_values"], eval_transform(tiles[:3]))


@pytest.mark.parametrize(("requested", "device", "expected"), [
    (None, "cuda", True), (None, torch.device("cuda", 1), True), (None, "cpu", False), (None, "mps", False),
    (False, "cuda", False), (True, "cpu", True),
])  # fmt: skip
def test_device_augmentation_default_is_on_for_cuda_only(requested, device, expected) -> None:
    assert hardware.resolve_device_augmentation(requested, device) is expected


def test_finetune_device_augmentation_trains_the_same_run(
    tiny_dataset_dir: Path, finetune_tiny_args: list[str], tmp_path: Path
) -> None:
    """--device_augmentation true on the CPU runs the device path in the Trainer step: same losses and metrics
    as the collator's augmentation (the CPU default, recorded in all_results.json)."""
    results = {}
    for flag in ("default", "true"):
        out = tmp_path / flag
        extra = [] if flag == "default" else ["--device_augmentation", "true"]
        args = [*finetune_tiny_args, "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(out),
                "--max_steps", "3", "--n_bootstrap", "0", "--seed", "1", *extra]  # fmt: skip
        assert main(args) == 0
        results[flag] = json.loads((out / "all_results.json").read_text())
    assert results["default"]["hyperparameters"]["device_augmentation"] is False
    assert results["true"]["hyperparameters"]["device_augmentation"] is True
    for key in ("train_loss", "eval_loss", "test_accuracy", "test_macro_f1"):
        assert results["true"][key] == pytest.approx(results["default"][key], rel=1e-5, abs=1e-6), key


def test_linear_probe_features_of_augmented_views_on_the_device_path() -> None:
    from conftest import tiny_vit

    from hf_tissue_vit.training.probe import compute_features

    model = tiny_vit(image_size=32)
    dataset = TileDataset(_tiles(5, 35, 35), torch.zeros(5, dtype=torch.long), train=True)
    transform = TileTransform(32, [0.5] * 3, [0.5] * 3, AugmentationConfig())
    collators = [TileCollator(transform, transform, seed=3, device_augmentation=lazy) for lazy in (False, True)]
    features = [compute_features(model, dataset, collator, 2) for collator in collators]
    torch.testing.assert_close(features[1], features[0], rtol=1e-4, atol=1e-5)
