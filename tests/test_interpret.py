"""Parameter table, attention rollout and attention figures (interpret.py and its two scripts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_VIT as TINY
from conftest import load_script, tiny_vit
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification

from hf_tissue_vit import interpret
from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.transforms import make_image_processor


# --- parameter count ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"num_labels": 1000}, 86_567_656),  # ViT-B/16, ImageNet head
        ({"num_labels": 6}, 85_803_270),  # ViT-B/16 with the six Kather classes
        (dict(**TINY, image_size=35, patch_size=8, num_labels=6, qkv_bias=False), None),
        (dict(**TINY, image_size=(32, 48), patch_size=16, num_labels=3, num_channels=4), None),
        ({"hidden_size": 192, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 768,
          "image_size": 64, "patch_size": 8, "num_labels": 6}, None),
    ],
)
def test_parameter_table_matches_model(kwargs, expected):
    config = ViTConfig(**kwargs)
    with torch.device("meta"):
        model = ViTForImageClassification(config)
    total = sum(p.numel() for p in model.parameters())
    rows = interpret.parameter_report(config, model)
    assert rows[-1].component == "total"
    assert rows[-1].expected == rows[-1].counted == total
    if expected is not None:
        assert total == expected
    for row in rows:
        assert row.counted == row.expected, row
    counts = interpret.count_parameters(model)
    assert "other" not in counts and sum(counts.values()) == total
    table = interpret.format_parameter_table(rows)
    assert "4·(D·D + D)" in table or "A = " in table


def test_closed_form_without_model_vit_b16():
    rows = {r.component: r for r in interpret.parameter_table(ViTConfig(num_labels=1000))}
    assert rows["patch embedding (conv P×P, stride P)"].expected == 3 * 16 * 16 * 768 + 768
    assert rows["position embeddings"].expected == 197 * 768
    assert rows["attention Q/K/V/output, per block"].expected == 4 * (768 * 768 + 768)
    assert rows["total"].expected == 86_567_656


def test_count_parameters_script(tmp_path, capsys, tiny_model_dir):
    script = load_script("count_parameters")
    ViTConfig().save_pretrained(tmp_path / "b16")  # config only: the script builds on the meta device
    assert script.main(["--model", str(tmp_path / "b16"), "--num_labels", "1000"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "86567656" and "| total |" in "\n".join(lines)
    assert script.main(["--model", str(tiny_model_dir)]) == 0
    assert int(capsys.readouterr().out.strip().splitlines()[-1]) == sum(p.numel() for p in tiny_vit().parameters())
    assert script.main(["--model", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


# --- rollout ------------------------------------------------------------------------------------
def random_attentions(layers=3, batch=2, heads=4, tokens=17, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, tokens, generator=g).softmax(-1) for _ in range(layers)]


@pytest.mark.parametrize("fusion", ["mean", "max"])
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rollout_rows_sum_to_one(fusion, discard):
    matrix = interpret.rollout_matrix(random_attentions(), fusion, discard)
    assert matrix.shape == (2, 17, 17)
    torch.testing.assert_close(matrix.sum(-1), torch.ones(2, 17))
    assert (matrix >= 0).all()


def test_rollout_one_layer_is_half_attention_plus_half_identity():
    att = random_attentions(layers=1)
    expected = 0.5 * att[0].mean(1) + 0.5 * torch.eye(17)
    torch.testing.assert_close(interpret.rollout_matrix(att), expected)
    # two layers: product in layer order (later layer on the left)
    att2 = random_attentions(layers=2, seed=1)
    a1, a2 = (0.5 * a.mean(1) + 0.5 * torch.eye(17) for a in att2)
    torch.testing.assert_close(interpret.rollout_matrix(att2), a2 @ a1)


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_rollout_peaks_on_attended_patch(fusion):
    tokens, target = 17, 11  # patch index 10 in the 4x4 grid → row 2, col 2
    att = torch.full((2, 1, 4, tokens, tokens), 0.01)
    att[..., target] = 1.0
    att = att / att.sum(-1, keepdim=True)
    grid = interpret.attention_rollout(list(att), fusion)
    assert grid.shape == (1, 4, 4)
    assert divmod(int(grid[0].argmax()), 4) == divmod(target - 1, 4)
    heads = interpret.cls_attention(list(att))
    assert heads.shape == (1, 4, 4, 4) and int(heads[0, 3].flatten().argmax()) == target - 1


def test_rollout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="head_fusion"):
        interpret.rollout_matrix(random_attentions(), "min")
    with pytest.raises(ValueError, match="square"):
        interpret.attention_rollout(random_attentions(tokens=13))
    with pytest.raises(ValueError, match="shape"):
        interpret.rollout_matrix([torch.rand(2, 17, 17)])


def test_upsample_and_overlay_have_tile_size():
    maps = torch.rand(3, 4, 4)
    up = interpret.upsample_map(maps, (35, 37))
    assert up.shape == (3, 35, 37) and float(up.min()) == 0.0 and float(up.max()) == pytest.approx(1.0)
    tile = np.full((35, 37, 3), 128, np.uint8)
    over = interpret.overlay_heatmap(tile, up[0].numpy())
    assert over.shape == tile.shape and over.dtype == np.uint8
    with pytest.raises(ValueError, match="size"):
        interpret.overlay_heatmap(tile, np.zeros((4, 4)))


def forced_attention_model(target_patch: int) -> ViTForImageClassification:
    """Every query is the same bias vector that matches only the key of ``target_patch``, whose
    position embedding is huge: all tokens, CLS included, attend to that patch in every layer."""
    model = tiny_vit()
    hidden = model.config.hidden_size
    # ±1 alternating: zero mean, unit variance (LayerNorm leaves it unchanged), equal weight in every head
    direction = torch.tensor([1.0, -1.0]).repeat(hidden // 2)
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.zero_()
        model.vit.embeddings.position_embeddings[0, 1 + target_patch] = 100 * direction
        for layer in model.vit.layers:
            layer.attention.q_proj.weight.zero_()
            layer.attention.q_proj.bias.copy_(20 * direction)
            layer.attention.k_proj.weight.copy_(torch.eye(hidden))
            layer.attention.k_proj.bias.zero_()
    return model


def test_forced_model_attention_map_peaks_on_patch():
    target = 6  # 4x4 grid: row 1, col 2
    model = forced_attention_model(target)
    before = model.config._attn_implementation
    pixels = torch.randn(2, 3, 32, 32)
    maps = interpret.compute_attention_maps(model, pixels)
    assert model.config._attn_implementation == before  # eager only for the call
    assert maps.rollout.shape == (2, 4, 4) and maps.heads.shape == (2, 4, 4, 4)
    for b in range(2):
        assert int(maps.rollout[b].flatten().argmax()) == target
        assert all(int(h.flatten().argmax()) == target for h in maps.heads[b])
    tile = np.random.default_rng(0).integers(0, 255, (35, 35, 3), dtype=np.uint8)
    (item,) = interpret.explain_tiles(model, make_image_processor(32), [tile], ["t"], ["Tumor"])
    assert item.rollout.shape == (35, 35) and item.heads.shape == (4, 35, 35)
    # patch (1, 2) of the 4x4 grid covers rows 8.75-17.5 and cols 17.5-26.25 of the 35 px tile
    y, x = np.unravel_index(item.rollout.argmax(), item.rollout.shape)
    assert 8 <= y <= 18 and 17 <= x <= 27


def test_attention_maps_script_images(tmp_path, capsys, tiny_model_dir):
    script = load_script("attention_maps")
    rng = np.random.default_rng(0)
    for folder, n in (("01_TUMOR", 2), ("04_LYMPHO", 1)):
        (tmp_path / "tiles" / folder).mkdir(parents=True)
        for i in range(n):
            tile = rng.integers(0, 255, (35, 35, 3), dtype=np.uint8)
            Image.fromarray(tile).save(tmp_path / "tiles" / folder / f"{i}.png")
    out = tmp_path / "att"
    assert script.main(["--model", str(tiny_model_dir), "--images", str(tmp_path / "tiles"), "--output_dir", str(out),
                        "--n_per_class", "1", "--head_fusion", "max"]) == 0
    assert (out / "attention_grid.png").is_file()
    names = sorted(p.name for p in (out / "tiles").glob("*.png"))
    assert len(names) == 3 and names[0].startswith("Lympho_001") and names[1].startswith("Tumor_001")
    with Image.open(out / "attention_grid.png") as im:
        assert im.size[0] > 100
    assert script.main(["--model", str(tiny_model_dir), "--output_dir", str(out)]) == 2  # neither input
    missing = str(tmp_path / "nope.png")
    assert script.main(["--model", str(tiny_model_dir), "--images", missing, "--output_dir", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


def test_attention_maps_script_dataset(tmp_path, tiny_dataset_dir, tiny_model_dir):
    script = load_script("attention_maps")
    out = tmp_path / "att"
    assert script.main(["--model", str(tiny_model_dir), "--dataset_dir", str(tiny_dataset_dir), "--split", "test",
                        "--output_dir", str(out), "--n_per_class", "1"]) == 0
    assert len(list((out / "tiles").glob("*.png"))) == len(CLASS_NAMES)
    assert script.main(["--model", str(tiny_model_dir), "--dataset_dir", str(tiny_dataset_dir), "--split", "nope",
                        "--output_dir", str(out)]) == 2


# --- non-ViT models are refused with one line, before any work -------------------------------------
@pytest.fixture(scope="module")
def convnext_dir(tmp_path_factory):
    """A tiny random ConvNeXT classifier saved with a ConvNeXT processor (a model without attention)."""
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ConvNextImageProcessorPil,
    )

    path = tmp_path_factory.mktemp("convnext") / "model"
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=len(CLASS_NAMES))
    ConvNextForImageClassification(config).save_pretrained(path)
    ConvNextImageProcessorPil(size={"shortest_edge": 32}).save_pretrained(path)
    return path


def test_attention_maps_script_refuses_a_non_vit_model(convnext_dir, tmp_path, tiny_dataset_dir, capsys, monkeypatch):
    import hf_tissue_vit.data
    import hf_tissue_vit.modeling

    def no_work(*args, **kwargs):
        raise AssertionError("a non-ViT model must be refused before loading data or the model")

    monkeypatch.setattr(hf_tissue_vit.modeling, "load_for_inference", no_work)
    monkeypatch.setattr(hf_tissue_vit.data, "load_tissue_dataset", no_work)
    monkeypatch.setattr(hf_tissue_vit.data.storage, "load_tissue_dataset", no_work)
    (tmp_path / "tiles").mkdir()
    Image.fromarray(np.zeros((35, 35, 3), np.uint8)).save(tmp_path / "tiles" / "a.png")
    script = load_script("attention_maps")
    out = tmp_path / "att"
    for source in (["--images", str(tmp_path / "tiles")], ["--dataset_dir", str(tiny_dataset_dir)]):
        assert script.main(["--model", str(convnext_dir), *source, "--output_dir", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: --model")
        assert "'convnext'" in err and "ViT" in err
    assert not out.exists()
    count = load_script("count_parameters")  # the same refusal
    assert count.main(["--model", str(convnext_dir)]) == 2
    assert "'convnext'" in capsys.readouterr().err


def test_library_refuses_a_non_vit_model(convnext_dir):
    from transformers import AutoImageProcessor, ConvNextForImageClassification

    model = ConvNextForImageClassification.from_pretrained(convnext_dir)
    processor = AutoImageProcessor.from_pretrained(convnext_dir)
    tile = np.zeros((35, 35, 3), np.uint8)
    with pytest.raises(ValueError, match="'convnext' model; attention maps need a ViT or DINOv2"):
        interpret.explain_tiles(model, processor, [tile])
    with pytest.raises(ValueError, match="ViT"):
        interpret.compute_attention_maps(model, torch.zeros(1, 3, 32, 32))


def test_maps_are_drawn_on_the_tile_the_model_saw():
    """With a center-cropping processor the overlay is the resized, cropped tile (the model's view);
    without one, the tile itself at its own size."""
    from transformers import BitImageProcessorPil

    model = tiny_vit()
    tile = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    cropping = BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    (item,) = interpret.explain_tiles(model, cropping, [tile])
    resized = np.asarray(Image.fromarray(tile).resize((44, 32), Image.BICUBIC))  # shortest edge 40 -> 32
    np.testing.assert_array_equal(item.tile, resized[:, 6:38])
    assert item.rollout.shape == (32, 32)
    (plain,) = interpret.explain_tiles(model, make_image_processor(32), [tile])
    assert plain.tile is tile and plain.rollout.shape == (40, 56)
