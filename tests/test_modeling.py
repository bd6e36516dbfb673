"""Model presets, checkpoint loading (head swap, position-embedding resize), inference loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, ViTConfig, ViTForImageClassification

from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.modeling import (
    MODEL_PRESETS,
    PatchDropout,
    add_patch_dropout,
    build_model,
    check_model,
    load_for_inference,
    load_model,
    resize_position_embeddings,
    scratch_config,
)
from hf_tissue_vit.transforms import make_image_processor

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def make_pretrained_checkpoint(folder: Path, image_size: int = 224, patch_size: int = 16) -> Path:
    """A tiny random "ImageNet" ViT checkpoint: 1000 labels, 224 px, safetensors + processor."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_labels=1000,
        id2label={i: f"imagenet_class_{i}" for i in range(1000)},
        label2id={f"imagenet_class_{i}": i for i in range(1000)},
        **TINY,
    )
    config.architectures = ["ViTForImageClassification"]
    ViTForImageClassification(config).save_pretrained(folder)
    make_image_processor(image_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pretrained_checkpoint(tmp_path_factory.mktemp("pretrained") / "vit-imagenet")


def test_presets_and_overrides():
    assert set(MODEL_PRESETS) == {"tiny", "small", "base"}
    config = scratch_config("small", CLASS_NAMES, image_size=48, patch_size=8, num_hidden_layers=2)
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.patch_size) == (384, 2, 48, 8)
    assert config.id2label == dict(enumerate(CLASS_NAMES))
    assert config.label2id == {n: i for i, n in enumerate(CLASS_NAMES)}
    assert config.problem_type == "single_label_classification"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "huge"}, "unknown --model_preset"),
        ({"preset": "tiny", "image_size": 50, "patch_size": 8}, "not divisible by --patch_size"),
        ({"preset": "tiny", "hidden_size": 32}, "not divisible by --num_attention_heads"),
        ({"preset": "tiny", "depth": 3}, "unknown model overrides"),
    ],
)
def test_scratch_config_rejects_bad_values(kwargs, message):
    preset = kwargs.pop("preset")
    with pytest.raises(ValueError, match=message):
        scratch_config(preset, CLASS_NAMES, **kwargs)


def test_load_model_from_scratch_has_our_labels():
    model = load_model(
        None, from_scratch=True, preset="tiny", id2label=CLASS_NAMES, image_size=32, patch_size=8, overrides=TINY
    )
    assert model.config.num_labels == 6
    assert model.vit.embeddings.position_embeddings.shape == (1, 1 + 16, 32)
    out = model(pixel_values=torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 6)


def test_load_model_sets_the_attention_implementation(pretrained_dir: Path):
    common = {"id2label": CLASS_NAMES, "image_size": 32, "patch_size": 8, "overrides": TINY}
    eager = load_model(None, from_scratch=True, preset="tiny", attn_implementation="eager", **common)
    sdpa = load_model(None, from_scratch=True, preset="tiny", attn_implementation="sdpa", **common)
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    x = torch.randn(2, 3, 32, 32)
    sdpa.load_state_dict(eager.state_dict())
    with torch.no_grad():  # the same function, another kernel
        torch.testing.assert_close(eager(pixel_values=x).logits, sdpa(pixel_values=x).logits, atol=1e-5, rtol=1e-4)
    tuned = load_model(str(pretrained_dir), id2label=CLASS_NAMES, attn_implementation="eager")
    assert tuned.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        load_model(None, from_scratch=True, preset="tiny", attn_implementation="auto", **common)


def test_finetune_swaps_head_and_resizes_position_embeddings(pretrained_dir: Path, tmp_path: Path):
    original = ViTForImageClassification.from_pretrained(pretrained_dir)
    model = load_model(str(pretrained_dir), id2label=CLASS_NAMES, image_size=48)
    assert model.classifier.out_features == 6
    assert model.config.id2label == dict(enumerate(CLASS_NAMES))
    assert model.config.problem_type == "single_label_classification"
    assert model.config.image_size == 48
    pos = model.vit.embeddings.position_embeddings
    assert pos.shape == (1, 1 + 3 * 3, 32)  # 224/16=14x14 grid -> 48/16=3x3
    old_pos = original.vit.embeddings.position_embeddings
    torch.testing.assert_close(pos[:, :1], old_pos[:, :1])  # CLS position kept
    # the backbone weights are the checkpoint's (only the head and the positions are new)
    old_state, new_state = original.state_dict(), model.state_dict()
    backbone = [k for k in old_state if not k.startswith("classifier") and "position_embeddings" not in k]
    assert len(backbone) > 10
    for key in backbone:
        torch.testing.assert_close(new_state[key], old_state[key])
    assert model(pixel_values=torch.randn(1, 3, 48, 48)).logits.shape == (1, 6)
    # saved at the new size, it loads with no extra flags
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(reloaded.vit.embeddings.position_embeddings, pos)


def test_resize_position_embeddings_smooth_grid():
    """A linear ramp over the patch grid stays a ramp after resampling (not a scrambled copy)."""
    config = ViTConfig(image_size=64, patch_size=8, **TINY)
    model = ViTForImageClassification(config)
    grid = torch.linspace(-1, 1, 8).view(1, 8, 1, 1).expand(1, 8, 8, 32).reshape(1, 64, 32)
    model.vit.embeddings.position_embeddings.data[:, 1:] = grid
    resize_position_embeddings(model, 32)
    new = model.vit.embeddings.position_embeddings[0, 1:, 0].view(4, 4).detach()
    assert torch.all(new[1:] > new[:-1])  # increasing down the rows
    torch.testing.assert_close(new[:, 0], new[:, 3])  # constant along the columns
    assert model.vit.embeddings.patch_embeddings.image_size == (32, 32)


def test_finetune_refuses_other_checkpoints(tmp_path: Path, pretrained_dir: Path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ValueError, match="fine-tuning supports ViT, DINOv2, DINOv2 with registers, timm"):
        load_model(str(tmp_path / "bert"), id2label=CLASS_NAMES)
    with pytest.raises(FileNotFoundError, match="cannot read a model config"):
        load_model(str(tmp_path / "missing"), id2label=CLASS_NAMES)
    with pytest.raises(ValueError, match="differs from the checkpoint's patch size"):
        load_model(str(pretrained_dir), id2label=CLASS_NAMES, patch_size=8)
    with pytest.raises(ValueError, match="not divisible"):
        load_model(str(pretrained_dir), id2label=CLASS_NAMES, image_size=50)
    with pytest.raises(ValueError, match="only be set with --from_scratch"):
        load_model(str(pretrained_dir), id2label=CLASS_NAMES, overrides={"hidden_size": 64})


def test_check_model_reads_no_weights_and_build_model_makes_the_checked_model(pretrained_dir: Path, tmp_path: Path):
    """Bad values fail in check_model before any weights are read; build_model then only builds."""
    config_only = tmp_path / "config_only"
    ViTForImageClassification(ViTConfig(image_size=224, patch_size=16, **TINY)).config.save_pretrained(config_only)
    spec = check_model(str(config_only), image_size=48, overrides={"hidden_dropout_prob": 0.1})
    assert (spec.checkpoint, spec.image_size, spec.config.hidden_dropout_prob) == (str(config_only), 48, 0.1)
    with pytest.raises(ValueError, match="not divisible"):
        check_model(str(config_only), image_size=50)
    with pytest.raises(ValueError, match="only be set with --from_scratch"):
        check_model(str(config_only), overrides={"num_hidden_layers": 1})
    model = build_model(check_model(str(pretrained_dir), image_size=48), CLASS_NAMES)
    assert model.config.image_size == 48 and model.config.id2label == dict(enumerate(CLASS_NAMES))
    scratch = check_model(None, from_scratch=True, preset="tiny", image_size=32, patch_size=8, overrides=TINY)
    assert scratch.checkpoint is None and build_model(scratch, ["a", "b"]).classifier.out_features == 2


def test_load_for_inference(pretrained_dir: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_for_inference(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no config.json"):
        load_for_inference(str(tmp_path / "empty"))
    model, processor = load_for_inference(str(pretrained_dir), device="cpu")
    assert not model.training
    assert processor.size == {"height": 224, "width": 224}


def test_patch_dropout_trains_on_a_token_subset_and_evaluates_on_all(tmp_path: Path):
    model = load_model(
        None, from_scratch=True, preset="tiny", id2label=CLASS_NAMES, image_size=40, patch_size=8, overrides=TINY
    )  # 25 patches: an odd count makes rounding mistakes visible
    seen: list[int] = []
    model.vit.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    handle = add_patch_dropout(model, 0.36)
    pixels = torch.randn(3, 3, 40, 40)
    model.train()
    loss = model(pixel_values=pixels, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()  # gradients flow through the gathered tokens
    assert model.vit.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    assert seen == [1 + 9, 1 + 25]  # CLS + round(0.36 * 25) while training; every token in eval
    # the saved model is a plain ViT: no hook, the same eval outputs after reloading
    model.save_pretrained(tmp_path / "saved")
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "saved", use_safetensors=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, logits)
    handle.remove()
    model.train()
    model(pixel_values=pixels)
    assert seen[-1] == 1 + 25


def test_patch_dropout_keeps_cls_and_distinct_patches():
    hook = PatchDropout(0.5)
    module = torch.nn.Identity().train()
    tokens = torch.arange(2 * 11, dtype=torch.float32).view(2, 11, 1).expand(2, 11, 4).contiguous()
    out = hook(module, (), tokens)
    assert out.shape == (2, 1 + 5, 4)
    assert torch.equal(out[:, 0], tokens[:, 0])  # CLS first, untouched
    for row, full in zip(out, tokens):
        kept = row[1:, 0].tolist()
        assert len(set(kept)) == 5 and set(kept) <= set(full[1:, 0].tolist())
    assert add_patch_dropout(ViTForImageClassification(ViTConfig(**TINY, image_size=16, patch_size=8)), 1.0) is None
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="--patch_keep"):
            PatchDropout(bad)
