"""Tests for hf_tissue_vit.transforms (batched tile augmentation and eval preprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hf_tissue_vit.transforms import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    AugmentationConfig,
    TileTransform,
    dihedral_views,
    make_image_processor,
)

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
OFF = {"dihedral": False, "random_resized_crop": False, "stain_jitter": 0.0, "brightness": 0.0, "contrast": 0.0}


def tiles(batch: int = 4, size: int = 35, seed: int = 0) -> torch.Tensor:
    """Smooth-ish H&E-like uint8 tiles [B,H,W,3] (random noise upsampled, so resizing is meaningful)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 250, (batch, 9, 9, 3), dtype=np.uint8)
    big = [np.asarray(Image.fromarray(s).resize((size, size), Image.BILINEAR)) for s in small]
    return torch.from_numpy(np.stack(big))


def denormalize(pixel_values: torch.Tensor) -> torch.Tensor:
    return pixel_values * 0.5 + 0.5


def test_dihedral_views_are_the_8_distinct_symmetries():
    image = torch.arange(35 * 35, dtype=torch.float32).view(1, 35, 35) ** 1.5  # no symmetry at all
    views = dihedral_views(image)
    assert len(views) == 8
    assert torch.equal(views[0], image)
    keys = {tuple(v.flatten().tolist()) for v in views}
    assert len(keys) == 8
    # Each view is a rotation of the image or of its mirror, and the set is closed under rot90.
    for view in views:
        assert any(torch.equal(torch.rot90(view, 1, (-2, -1)), other) for other in views)


def test_random_dihedral_gives_only_symmetries_and_all_of_them():
    image = (torch.arange(35 * 35).view(35, 35) % 251).to(torch.uint8)
    batch = image.expand(64, 3, 35, 35).contiguous()
    transform = TileTransform(35, (0, 0, 0), (1, 1, 1), AugmentationConfig(**{**OFF, "dihedral": True}))
    out = transform(batch, generator=torch.Generator().manual_seed(0))
    expected = {tuple(v.flatten().tolist()): i for i, v in enumerate(dihedral_views(image))}
    seen = set()
    for sample in (out * 255).round().to(torch.uint8):
        assert torch.equal(sample[0], sample[1])
        key = tuple(sample[0].flatten().tolist())
        assert key in expected
        seen.add(expected[key])
    assert seen == set(range(8))


@pytest.mark.parametrize("size", [33, 35, 64])
def test_random_crop_output_shape_odd_sizes(size):
    transform = TileTransform(size, MEAN, STD, AugmentationConfig(**{**OFF, "random_resized_crop": True}))
    for images in (tiles(3, 35), tiles(3, 150)[:, :149]):  # square and non-square input
        out = transform(images, generator=torch.Generator().manual_seed(1))
        assert out.shape == (3, 3, size, size) and out.dtype == torch.float32
        assert out.is_contiguous()
        assert torch.isfinite(out).all()


def test_random_crop_full_scale_is_resize():
    # Scale 1 and ratio 1 is the whole tile: grid_sample must reproduce the image (no shift/flip).
    images = tiles(2, 35)
    crop = AugmentationConfig(**{**OFF, "random_resized_crop": True, "crop_scale": (1, 1), "crop_ratio": (1, 1)})
    out = TileTransform(35, MEAN, STD, crop)(images)
    reference = TileTransform(35, MEAN, STD)(images)
    assert torch.allclose(out, reference, atol=1e-4)


def test_crop_covers_a_sub_region():
    # A crop of at most 30% of the area from a left-black/right-white tile is mostly one colour.
    images = torch.zeros(16, 36, 36, 3, dtype=torch.uint8)
    images[:, :, 18:] = 255
    config = AugmentationConfig(**{**OFF, "random_resized_crop": True, "crop_scale": (0.1, 0.3)})
    out = denormalize(TileTransform(32, MEAN, STD, config)(images, torch.Generator().manual_seed(0)))
    means = out.mean(dim=(1, 2, 3))
    assert ((means < 0.3) | (means > 0.7)).float().mean() > 0.5


def test_crop_is_an_integer_box_of_the_tile():
    # Like torchvision's RandomResizedCrop: a whole-pixel box, so a box of the output size is copied
    # exactly (no resampling blur), and every crop is some window of the input tile.
    images = tiles(8, 36, seed=3)
    config = AugmentationConfig(**{**OFF, "random_resized_crop": True, "crop_scale": (0.25, 0.25),
                                   "crop_ratio": (1, 1)})
    out = TileTransform(18, (0, 0, 0), (1, 1, 1), config)(images, torch.Generator().manual_seed(0))
    out = (out * 255).round().to(torch.uint8)
    corners = set()
    for tile, crop in zip(images.permute(0, 3, 1, 2), out):
        windows = [(y, x) for y in range(19) for x in range(19) if torch.equal(tile[:, y : y + 18, x : x + 18], crop)]
        assert windows, "crop is not an 18x18 window of its tile"
        corners.add(windows[0])
    assert len(corners) > 1  # positions are random


def test_hed_matrix():
    """The Ruifrok & Johnston stain matrices are inverse; haematoxylin-like purple has a larger H than E
    optical density, pink eosin the opposite."""
    assert np.allclose(np.array(HED_FROM_RGB) @ np.array(RGB_FROM_HED), np.eye(3), atol=1e-6)

    def hed(rgb: list[float]) -> np.ndarray:
        return (np.log(256) - np.log1p(np.array(rgb) * 255)) @ np.array(HED_FROM_RGB)

    assert hed([0.35, 0.2, 0.55])[0] > hed([0.35, 0.2, 0.55])[1]
    assert hed([0.95, 0.55, 0.75])[1] > hed([0.95, 0.55, 0.75])[0]


def test_stain_jitter_zero_is_identity_and_positive_changes_colours():
    images = tiles(8, 35)
    eval_out = TileTransform(35, MEAN, STD)(images)
    tiny = TileTransform(35, MEAN, STD, AugmentationConfig(**{**OFF, "stain_jitter": 1e-9}))
    assert torch.allclose(tiny(images, torch.Generator().manual_seed(0)), eval_out, atol=1e-4)
    jitter = TileTransform(35, MEAN, STD, AugmentationConfig(**{**OFF, "stain_jitter": 0.2}))
    out = jitter(images, torch.Generator().manual_seed(0))
    assert (out - eval_out).abs().amax(dim=(1, 2, 3)).min() > 0.02  # every sample changed
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6  # within [0, 1] before normalisation
    # Saturated pixels stay in range too.
    extreme = torch.zeros(4, 35, 35, 3, dtype=torch.uint8)
    extreme[:, :, 17:] = 255
    out = jitter(extreme, torch.Generator().manual_seed(0))
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6


def test_brightness_contrast():
    images = tiles(8, 35)
    eval_out = denormalize(TileTransform(35, MEAN, STD)(images))
    bright = TileTransform(35, MEAN, STD, AugmentationConfig(**{**OFF, "brightness": 0.5}))
    out = denormalize(bright(images, torch.Generator().manual_seed(0)))
    ratio = (out.mean(dim=(1, 2, 3)) / eval_out.mean(dim=(1, 2, 3)))
    assert ((ratio - 1).abs() > 0.01).any() and (ratio > 0.45).all() and (ratio < 1.55).all()
    contrast = TileTransform(35, MEAN, STD, AugmentationConfig(**{**OFF, "contrast": 0.5}))
    out = denormalize(contrast(images, torch.Generator().manual_seed(0)))
    std_ratio = out.std(dim=(1, 2, 3)) / eval_out.std(dim=(1, 2, 3))
    assert ((std_ratio - 1).abs() > 0.01).any()
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("field", ["dihedral", "random_resized_crop", "stain_jitter", "brightness", "contrast"])
def test_each_augmentation_switchable(field):
    images = tiles(6, 35)
    eval_out = TileTransform(32, MEAN, STD)(images)
    all_off = TileTransform(32, MEAN, STD, AugmentationConfig(**OFF))
    assert not all_off.is_training
    assert torch.equal(all_off(images, torch.Generator().manual_seed(0)), eval_out)
    value = True if field in ("dihedral", "random_resized_crop") else 0.3
    one_on = TileTransform(32, MEAN, STD, AugmentationConfig(**{**OFF, field: value}))
    assert one_on.is_training
    assert not torch.allclose(one_on(images, torch.Generator().manual_seed(0)), eval_out, atol=1e-3)


@pytest.mark.parametrize("size,tile", [(32, 35), (35, 35), (64, 150), (224, 150)])
def test_eval_transform_matches_processor(size, tile):
    images = tiles(3, tile, seed=size)
    processor = make_image_processor(size, image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
    expected = processor(images=[Image.fromarray(im) for im in images.numpy()], return_tensors="pt")["pixel_values"]
    transform = TileTransform.from_processor(processor)
    assert transform.image_size == size and transform.augmentation is None
    for layout in (images, images.permute(0, 3, 1, 2)):
        out = transform(layout)
        assert out.shape == expected.shape
        assert (out - expected).abs().max() < 0.02


def test_processor_config():
    processor = make_image_processor(48)
    assert processor.size == {"height": 48, "width": 48}
    assert int(processor.resample) == int(Image.BILINEAR)
    assert processor.do_rescale and processor.do_normalize
    assert processor.to_dict()["image_processor_type"] == "ViTImageProcessor"


def test_generator_reproducible():
    images = tiles(5, 35)
    transform = TileTransform(33, MEAN, STD, AugmentationConfig())
    a = transform(images, torch.Generator().manual_seed(7))
    b = transform(images, torch.Generator().manual_seed(7))
    c = transform(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6


def test_inputs_are_not_modified_and_layouts_agree():
    images = tiles(3, 35)
    copy = images.clone()
    transform = TileTransform(35, MEAN, STD, AugmentationConfig())
    a = transform(images, torch.Generator().manual_seed(0))
    b = transform(images.permute(0, 3, 1, 2), torch.Generator().manual_seed(0))
    c = transform(images.numpy(), torch.Generator().manual_seed(0))
    floats = images.float()
    d = transform(floats, torch.Generator().manual_seed(0))
    assert torch.equal(images, copy) and torch.equal(floats, copy.float())
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    # torch's uint8 and float antialiased resize kernels round differently: within ~1 grey level
    assert torch.allclose(a, d, atol=1.5 / 127.5)
    single = TileTransform(35, MEAN, STD)(images[0])
    assert single.shape == (1, 3, 35, 35)


def test_bad_inputs():
    transform = TileTransform(32, MEAN, STD)
    with pytest.raises(ValueError, match="3 RGB channels"):
        transform(torch.zeros(2, 35, 35, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        transform(torch.zeros(2, 35, 35, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentationConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="stain_jitter"):
        AugmentationConfig(stain_jitter=-0.1)
    with pytest.raises(ValueError, match="image_size"):
        TileTransform(0, MEAN, STD)


def test_augmentation_config_accepts_yaml_lists():
    config = AugmentationConfig(crop_scale=[0.5, 1], crop_ratio=[1, 1])
    assert config.crop_scale == (0.5, 1.0) and config.crop_ratio == (1.0, 1.0)


# --- exact reproduction of a saved image processor (ProcessorTransform) ------------------------
def _processor(kind: str):
    from transformers import (
        BitImageProcessorPil,
        CLIPImageProcessorPil,
        ConvNextImageProcessorPil,
        ViTImageProcessorPil,
    )

    imagenet = {"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225)}
    return {
        "package_32": lambda: make_image_processor(32),
        "package_224_imagenet": lambda: make_image_processor(224, **imagenet),
        "vit_bicubic": lambda: ViTImageProcessorPil(resample=Image.BICUBIC, size={"height": 64, "width": 64}),
        "vit_bilinear_20x30": lambda: ViTImageProcessorPil(size={"height": 20, "width": 30}, **imagenet),
        "convnext_224_crop_pct": lambda: ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875),
        "convnext_48_crop_pct": lambda: ConvNextImageProcessorPil(size={"shortest_edge": 48}, crop_pct=0.9),
        "convnext_384_warp": lambda: ConvNextImageProcessorPil(size={"shortest_edge": 384}),
        "bit_shortest_edge_crop": lambda: BitImageProcessorPil(size={"shortest_edge": 40},
                                                               crop_size={"height": 36, "width": 36}),
        "clip_default": lambda: CLIPImageProcessorPil(),
        "no_rescale": lambda: ViTImageProcessorPil(do_rescale=False, size={"height": 20, "width": 20}),
        "no_normalize": lambda: ViTImageProcessorPil(do_normalize=False, resample=Image.NEAREST,
                                                     size={"height": 20, "width": 20}),
        "scalar_mean_std": lambda: ViTImageProcessorPil(image_mean=0.3, image_std=0.2,
                                                        size={"height": 20, "width": 20}),
    }[kind]()


def _saved(processor, tmp_path):
    """``processor`` saved and loaded back with AutoImageProcessor, as pipeline() and the predictor load it."""
    from transformers import AutoImageProcessor

    processor.save_pretrained(tmp_path)
    return AutoImageProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", ["package_32", "package_224_imagenet", "vit_bicubic", "vit_bilinear_20x30",
                                  "convnext_224_crop_pct", "convnext_48_crop_pct", "convnext_384_warp",
                                  "bit_shortest_edge_crop", "clip_default", "no_rescale", "no_normalize",
                                  "scalar_mean_std"])
def test_processor_transform_equals_saved_processor(kind, tmp_path):
    """Bit-equal pixel_values (values and dtype) to the saved processor's, on square and non-square tiles."""
    from hf_tissue_vit.transforms import ProcessorTransform

    processor = _saved(_processor(kind), tmp_path)
    transform = ProcessorTransform(processor)
    assert transform.fast, transform.slow_reason
    rng = np.random.default_rng(0)
    for shape in [(35, 35), (150, 150), (30, 40), (57, 41), (224, 224)]:
        tiles = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(3)]
        expected = processor([Image.fromarray(t) for t in tiles], return_tensors="pt")["pixel_values"]
        for given in (tiles, [Image.fromarray(t) for t in tiles], torch.from_numpy(np.stack(tiles))):
            out = transform(given)
            assert out.dtype == expected.dtype and out.shape == expected.shape, (shape, out.shape)
            assert torch.equal(out, expected), (kind, shape, (out.float() - expected.float()).abs().max())


def test_tile_transform_eval_path_is_not_the_exact_processor():
    """Why prediction does not use TileTransform: a bicubic processor gives other pixels, and says so."""
    from transformers import ViTImageProcessorPil

    from hf_tissue_vit.transforms import ProcessorTransform

    images = tiles(3, 150)
    processor = ViTImageProcessorPil(resample=Image.BICUBIC, size={"height": 64, "width": 64})
    expected = processor([Image.fromarray(t) for t in images.numpy()], return_tensors="pt")["pixel_values"]
    assert torch.equal(ProcessorTransform(processor)(images), expected)
    assert not torch.equal(TileTransform.from_processor(processor)(images), expected)


def test_tile_transform_warns_when_the_processor_resizes_otherwise(caplog):
    from transformers import ConvNextImageProcessorPil, ViTImageProcessorPil

    with caplog.at_level("WARNING", logger="hf_tissue_vit.transforms.tile_transform"):
        TileTransform.from_processor(make_image_processor(32))
        assert not caplog.records
        TileTransform.from_processor(ViTImageProcessorPil(resample=Image.BICUBIC, size={"height": 32, "width": 32}))
        TileTransform.from_processor(ConvNextImageProcessorPil(size={"shortest_edge": 32}))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "PIL filter 3" in messages[0] and "crops" in messages[1]


def inverting_processor():
    """A PIL-backend ViT processor subclass with its own ``_preprocess`` (it inverts the pixels)."""
    from transformers import ViTImageProcessorPil

    class InvertingProcessor(ViTImageProcessorPil):
        def _preprocess(self, images, *args, **kwargs):
            return super()._preprocess([255 - image for image in images], *args, **kwargs)

    return InvertingProcessor(size={"height": 24, "width": 24})


def test_unknown_processor_steps_take_the_slow_path(caplog):
    """A processor whose steps the fast path does not know is called itself, with a warning saying so."""
    from transformers import EfficientNetImageProcessorPil

    from hf_tissue_vit.transforms import ProcessorTransform

    images = [t.numpy() for t in tiles(3, 35)]
    for processor in (inverting_processor(), EfficientNetImageProcessorPil(size={"height": 24, "width": 24})):
        with caplog.at_level("WARNING", logger="hf_tissue_vit.transforms.processor"):
            transform = ProcessorTransform(processor)
        assert not transform.fast and "slow path" in caplog.records[-1].getMessage()
        expected = processor([Image.fromarray(t) for t in images], return_tensors="pt")["pixel_values"]
        assert torch.equal(transform(images), expected)


def test_processor_transform_rejects_non_rgb_tiles():
    from hf_tissue_vit.transforms import ProcessorTransform

    transform = ProcessorTransform(make_image_processor(32))
    with pytest.raises(ValueError, match="uint8"):
        transform([np.zeros((35, 35, 4), np.uint8)])
    with pytest.raises(ValueError, match="RGB"):
        transform([Image.new("RGBA", (35, 35))])
