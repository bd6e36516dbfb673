"""Backbone families (hf_tissue_vit.backbones): tiny random checkpoints of a plain ViT, a DINOv2 with registers and
a timm ViT (TimmWrapper), saved locally as the Hub publishes them (headless, with their own image processor), each
fine-tuned (full and --freeze_backbone), saved, used by pipeline(), predict.py, evaluate_model.py and tissue_map.py;
partial unfreezing; what is refused, in one line, before any work.

The timm tests need ``timm`` (and so torchvision, which imports only beside PyPI's torch of its release): they are
marked ``timm``, skip here without it, and run in CI's second virtual environment (see .ci/run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import readme_commands, tile_pixels
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from hf_tissue_vit import backbones
from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.modeling import check_model, load_model, resize_position_embeddings
from hf_tissue_vit.transforms import make_image_processor

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FAST = ["--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--report_to", "none",
        "--use_cpu", "true", "--bf16", "false", "--disable_tqdm", "true", "--seed", "0",
        "--n_bootstrap", "10"]  # fmt: skip
# Odd sizes: width 24 with 3 heads, 2 blocks, 8 px patches.
TINY = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3)
FAMILIES = ["vit", "dinov2_registers", pytest.param("timm", marks=pytest.mark.timm)]


def _vit(folder: Path) -> Path:
    """A headless ViTModel (as owkin/phikon is published) with a ViT processor at 32 px."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    ViTModel(ViTConfig(image_size=32, patch_size=8, intermediate_size=40, **TINY)).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=IMAGENET_MEAN,
                         image_std=IMAGENET_STD).save_pretrained(folder)  # fmt: skip
    return folder


def _dinov2(folder: Path, registers: int = 2) -> Path:
    """A headless DINOv2 (with ``registers`` register tokens; 0: plain DINOv2) whose config says 56 px (as DINOv2
    configs say 518) and whose processor, like DINOv2's, resizes the shortest edge and centre-crops 32 px."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig
    from transformers import Dinov2WithRegistersModel as WithRegisters

    if registers:
        WithRegisters(Dinov2WithRegistersConfig(image_size=56, patch_size=8, mlp_ratio=2, num_register_tokens=registers,
                                                **TINY)).save_pretrained(folder)  # fmt: skip
    else:
        Dinov2Model(Dinov2Config(image_size=56, patch_size=8, mlp_ratio=2, **TINY)).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                         image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(folder)  # fmt: skip
    return folder


def _timm(folder: Path) -> Path:
    """A headless timm ViT (num_classes 0, as UNI is published) in transformers' TimmWrapper format."""
    pytest.importorskip("timm", reason="timm not installed: the timm tests run in CI's timm environment (.ci/run)")
    from transformers import TimmWrapperConfig, TimmWrapperModel

    pretrained_cfg = {"input_size": [3, 32, 32], "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 1.0,
                      "interpolation": "bicubic"}  # fmt: skip
    model_args = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0)
    config = TimmWrapperConfig(architecture="vit_tiny_patch16_224", model_args=model_args, num_labels=0,
                               pretrained_cfg=pretrained_cfg)  # fmt: skip
    TimmWrapperModel(config).save_pretrained(folder)
    return folder


MAKERS = {"vit": _vit, "dinov2_registers": _dinov2, "timm": _timm}


def _checkpoint(family: str, folder: Path) -> Path:
    torch.manual_seed(0)
    return MAKERS[family](folder)


def _finetune(script, checkpoint: Path, dataset: Path, out: Path, *extra: str) -> dict:
    code = script("finetune").main(["--model_name_or_path", str(checkpoint), "--dataset_dir", str(dataset),
                                    "--output_dir", str(out), *FAST, *extra])  # fmt: skip
    assert code == 0
    return json.loads((out / "all_results.json").read_text())


def _mosaic(tile: int = 32) -> np.ndarray:
    """A 2 x 3 mosaic of synthetic tiles of the first six classes."""
    rng = np.random.default_rng(0)
    rows = [np.concatenate([tile_pixels(CLASS_NAMES[r * 3 + c], tile, rng) for c in range(3)], axis=1)
            for r in range(2)]  # fmt: skip
    return np.concatenate(rows, axis=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family: str, tiny_dataset_dir: Path, tmp_path: Path, script, capsys):
    """finetune.py (full) -> the saved folder works in pipeline() with no custom code, in predict.py, evaluate_model.py
    and tissue_map.py; its card names the base model, the architecture and the parameters."""
    checkpoint = _checkpoint(family, tmp_path / "backbone")
    spec = check_model(str(checkpoint))
    assert spec.kind == "headless" and spec.image_size == 32 and spec.image_mean == IMAGENET_MEAN
    out = tmp_path / "ft"
    results = _finetune(script, checkpoint, tiny_dataset_dir, out, "--max_steps", "2")
    assert results["model"]["family"] == spec.family.name and "test_accuracy" in results

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(CLASS_NAMES)) and model.config.image_size == 32
    processor = AutoImageProcessor.from_pretrained(out)  # a timm model's is built from its config.json
    tile = Image.fromarray(tile_pixels("Tumor", 48, np.random.default_rng(1)))
    trained_on = make_image_processor(32, IMAGENET_MEAN, IMAGENET_STD)  # what finetune.py trained and saved
    np.testing.assert_allclose(processor(tile, return_tensors="pt")["pixel_values"].numpy(),
                               trained_on(tile, return_tensors="pt")["pixel_values"].numpy(), atol=1e-5)

    from hf_tissue_vit.modelfacts import read_model_facts
    from hf_tissue_vit.modelfolder import lacks_label_names

    assert read_model_facts(out).label_names == list(CLASS_NAMES) and not lacks_label_names(out)
    classify = pipeline("image-classification", model=str(out), device="cpu")
    assert sorted(p["label"] for p in classify(tile, top_k=6)) == sorted(CLASS_NAMES)

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i, name in enumerate(CLASS_NAMES):
        Image.fromarray(tile_pixels(name, 48, np.random.default_rng(i))).save(tiles / f"{name}.png")
    assert script("predict").main(["--model", str(out), "--inputs", str(tiles), "--output", str(tmp_path / "p.csv"),
                                   "--num_workers", "0", "--bf16", "false"]) == 0  # fmt: skip
    assert len((tmp_path / "p.csv").read_text().strip().splitlines()) == 1 + len(CLASS_NAMES)
    assert script("evaluate_model").main(["--model", str(out), "--dataset_dir", str(tiny_dataset_dir), "--split",
                                          "test", "--output_dir", str(tmp_path / "eval"), "--n_bootstrap", "10"]) == 0
    scored = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert scored["accuracy"] == pytest.approx(results["test_accuracy"])  # the same model, the same tiles
    Image.fromarray(_mosaic()).save(tmp_path / "mosaic.png")
    assert script("tissue_map").main(["--model", str(out), "--image", str(tmp_path / "mosaic.png"),
                                      "--output_dir", str(tmp_path / "map"), "--tile", "32", "--stride", "32"]) == 0
    assert np.load(tmp_path / "map" / "labels.npy").shape == (2, 3)

    attention = ["--model", str(out), "--dataset_dir", str(tiny_dataset_dir), "--split", "test", "--n_per_class", "1",
                 "--output_dir", str(tmp_path / "attention")]  # fmt: skip
    if family == "timm":  # timm models return no attention weights: one line, before any work
        assert script("attention_maps").main(attention) == 2
        assert "'timm_wrapper' model; attention maps need a ViT or DINOv2" in capsys.readouterr().err
    else:
        assert script("attention_maps").main(attention) == 0
        assert (tmp_path / "attention" / "attention_grid.png").is_file()
    from hf_tissue_vit.app.handlers import AppModel

    app = AppModel(str(out), device="cpu", bf16=False)
    shown = app.classify_tile(tiles / "Tumor.png")
    assert sorted(shown.probabilities) == sorted(CLASS_NAMES)
    assert any("no attention map" in w for w in shown.warnings) == (family == "timm")
    assert app.map_image(tmp_path / "mosaic.png", window=32).fractions
    from hf_tissue_vit.app.model_info import about_markdown

    about = about_markdown(app.info)
    assert ("a Vision Transformer (ViT)" in about) == (family == "vit")
    assert family == "vit" or f"image model, `{type(model).__name__}`" in about
    capsys.readouterr()
    assert script("count_parameters").main(["--model", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(model.num_parameters())

    card = (out / "README.md").read_text()
    assert f"base_model: {checkpoint}" in card and type(model).__name__ in card
    assert f"{model.num_parameters():,}" in card
    if family == "timm":
        assert "needs the `timm` package" in card


@pytest.mark.parametrize("family", FAMILIES)
def test_family_linear_probe(family: str, tiny_dataset_dir: Path, tmp_path: Path, script):
    """--freeze_backbone: the saved backbone is the checkpoint's, untouched; the cached features are exactly what
    the saved model's classifier reads (the backbone's pooled output); the head learns the synthetic classes."""
    checkpoint = _checkpoint(family, tmp_path / "backbone")
    cache = tmp_path / "cache"
    out = tmp_path / "probe"
    results = _finetune(script, checkpoint, tiny_dataset_dir, out, "--freeze_backbone", "--learning_rate", "0.05",
                        "--warmup_steps", "0", "--label_smoothing_factor", "0", "--decode_cache_dir", str(cache),
                        "--num_train_epochs", "15", "--save_strategy", "no", "--load_best_model_at_end", "false")
    assert results["model"]["freeze_backbone"] is True and results["eval_accuracy"] >= 0.8

    trained = AutoModelForImageClassification.from_pretrained(out).eval()
    reference = AutoModelForImageClassification.from_pretrained(checkpoint, num_labels=6).eval()
    before = backbones.backbone_parameters(reference)
    after = backbones.backbone_parameters(trained)
    resized = {"dinov2_with_registers.embeddings.position_embeddings"}  # 56 px config -> the processor's 32 px
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in after if n not in resized)

    from hf_tissue_vit.data import load_tissue_dataset
    from hf_tissue_vit.training import decode_tiles
    from hf_tissue_vit.transforms import TileTransform

    validation = decode_tiles(load_tissue_dataset(str(tiny_dataset_dir))["validation"], cache=False)
    from transformers import ViTImageProcessorPil

    pixel_values = TileTransform.from_processor(ViTImageProcessorPil.from_pretrained(out))(validation)
    with torch.no_grad():  # the backbone's pooled output, computed here without the package's hook
        if family == "vit":
            pooled = trained.vit(pixel_values).last_hidden_state[:, 0]
        elif family == "timm":
            timm_model = trained.timm_model
            pooled = timm_model.forward_head(timm_model.forward_features(pixel_values), pre_logits=True)
        else:
            hidden = trained.dinov2_with_registers(pixel_values).last_hidden_state
            pooled = torch.cat([hidden[:, 0], hidden[:, 1 + 2:].mean(dim=1)], dim=1)  # CLS, mean patch (no registers)
    torch.testing.assert_close(backbones.pooled_features(trained, pixel_values), pooled)
    pooled = pooled.numpy()
    cached = [np.load(path) for path in cache.glob("*features-*_12.npy")]
    assert len(cached) == 1 and np.allclose(cached[0], pooled, atol=1e-5)
    expected_dim = {"vit": 24, "dinov2_registers": 48, "timm": 24}[family]  # DINOv2: CLS beside mean patch
    assert cached[0].shape == (12, expected_dim)


def test_dinov2_probe_features_equal_the_checkpoint_at_the_new_size(tmp_path: Path):
    """Resizing DINOv2's position embeddings uses DINOv2's own interpolation: the resized model computes exactly
    what the checkpoint computes at that size (so frozen features are the checkpoint's)."""
    for registers in (0, 2):
        checkpoint = _checkpoint("dinov2_registers", tmp_path / f"dinov2_{registers}") if registers else \
            _dinov2(tmp_path / "dinov2_0", registers=0)  # fmt: skip
        model = load_model(str(checkpoint), id2label=CLASS_NAMES).eval()
        assert model.config.image_size == 32  # the processor's crop, not the config's 56
        original = AutoModelForImageClassification.from_pretrained(checkpoint, num_labels=6).eval()
        pixels = torch.randn(2, 3, 32, 32)
        name = "dinov2_with_registers" if registers else "dinov2"
        with torch.no_grad():
            expected = getattr(original, name)(pixels).last_hidden_state
            got = getattr(model, name)(pixels).last_hidden_state
        torch.testing.assert_close(got, expected)


def test_partial_unfreezing_trains_only_the_last_blocks(tiny_dataset_dir: Path, tmp_path: Path, script):
    checkpoint = _checkpoint("dinov2_registers", tmp_path / "backbone")
    out = tmp_path / "partial"
    results = _finetune(script, checkpoint, tiny_dataset_dir, out, "--unfreeze_last_blocks", "1", "--max_steps", "2",
                        "--learning_rate", "0.01", "--warmup_steps", "0")  # fmt: skip
    assert results["model"]["unfreeze_last_blocks"] == 1
    trained = backbones.backbone_parameters(AutoModelForImageClassification.from_pretrained(out))
    original = backbones.backbone_parameters(AutoModelForImageClassification.from_pretrained(checkpoint, num_labels=6))
    resized = "dinov2_with_registers.embeddings.position_embeddings"  # 56 px config -> the processor's 32 px
    changed = {n for n in trained if n != resized and not torch.equal(trained[n], original[n])}
    assert changed and all(n.startswith(("dinov2_with_registers.encoder.layer.1.", "dinov2_with_registers.layernorm"))
                           for n in changed), changed  # fmt: skip


def test_partial_unfreezing_timm_blocks(tmp_path: Path):
    pytest.importorskip("timm", reason="timm not installed: the timm tests run in CI's timm environment (.ci/run)")
    from hf_tissue_vit.training.backbone import freeze_model_parts

    model = load_model(str(_checkpoint("timm", tmp_path / "timm")), id2label=CLASS_NAMES)
    freeze_model_parts(model, unfreeze_last_blocks=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("timm_model.blocks.1.", "timm_model.norm", "timm_model.fc_norm",
                                           "timm_model.head")) for n in trainable), trainable  # fmt: skip
    assert "timm_model.head.weight" in trainable and "timm_model.norm.weight" in trainable


test_partial_unfreezing_timm_blocks = pytest.mark.timm(test_partial_unfreezing_timm_blocks)


def test_patch_dropout_keeps_dinov2_registers(tmp_path: Path):
    from hf_tissue_vit.modeling import add_patch_dropout

    model = load_model(str(_checkpoint("dinov2_registers", tmp_path / "d")), id2label=CLASS_NAMES)
    seen = []
    model.dinov2_with_registers.encoder.layer[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    add_patch_dropout(model, 0.5)
    model.train()
    model(pixel_values=torch.randn(2, 3, 32, 32))
    assert seen == [1 + 2 + 8]  # CLS + 2 registers + 8 of the 16 patches
    model.eval()
    model(pixel_values=torch.randn(2, 3, 32, 32))
    assert seen[-1] == 1 + 2 + 16


def _swin(folder: Path) -> Path:
    from transformers import SwinConfig, SwinModel

    SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=12, depths=[1, 1], num_heads=[1, 2],
                         window_size=2)).save_pretrained(folder)  # fmt: skip
    return folder


def test_swin_is_refused_in_one_line_before_any_work(tiny_dataset_dir: Path, tmp_path: Path, script, capsys):
    swin = _swin(tmp_path / "swin")
    code = script("finetune").main(["--model_name_or_path", str(swin), "--dataset_dir", str(tiny_dataset_dir),
                                    "--output_dir", str(tmp_path / "out"), *FAST])  # fmt: skip
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("is a 'swin' model" in line and "supports ViT, DINOv2, DINOv2 with registers, timm" in line
               for line in err), err  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing claimed, no data read


def test_family_specific_flags_are_refused_for_timm(tiny_dataset_dir: Path, tmp_path: Path, script, capsys):
    pytest.importorskip("timm", reason="timm not installed: the timm tests run in CI's timm environment (.ci/run)")
    checkpoint = _checkpoint("timm", tmp_path / "timm")
    for flags, message in ((["--patch_keep", "0.5"], "PatchDropout needs a ViT or DINOv2"),
                           (["--image_size", "64"], "timm models run at their pretrained input size"),
                           (["--freeze_position_embeddings"], "no position embeddings")):  # fmt: skip
        out = tmp_path / "out"
        code = script("finetune").main(["--model_name_or_path", str(checkpoint), "--dataset_dir", str(tiny_dataset_dir),
                                        "--output_dir", str(out), *FAST, *flags])  # fmt: skip
        assert code != 0 and message in capsys.readouterr().err and not out.exists()


test_family_specific_flags_are_refused_for_timm = pytest.mark.timm(test_family_specific_flags_are_refused_for_timm)


def test_resize_position_embeddings_refuses_timm(tmp_path: Path):
    pytest.importorskip("timm", reason="timm not installed: the timm tests run in CI's timm environment (.ci/run)")
    model = load_model(str(_checkpoint("timm", tmp_path / "timm")), id2label=CLASS_NAMES)
    with pytest.raises(ValueError, match="expose no token embeddings"):
        resize_position_embeddings(model, 64)


test_resize_position_embeddings_refuses_timm = pytest.mark.timm(test_resize_position_embeddings_refuses_timm)


RECIPES = Path(__file__).resolve().parents[1] / "scripts" / "recipes"


def test_backbone_recipes_load():
    from hf_tissue_vit.training import parse_args

    model_args, data_args, training_args = parse_args(["--config", str(RECIPES / "finetune_phikon_v2.yaml")])
    assert model_args.model_name_or_path == "owkin/phikon-v2" and model_args.image_size == 160
    assert not model_args.freeze_backbone and training_args.learning_rate == 1e-5
    model_args, data_args, training_args = parse_args(["--config", str(RECIPES / "probe_uni.yaml")])
    assert model_args.model_name_or_path == "MahmoodLab/UNI" and model_args.freeze_backbone
    assert model_args.image_size is None  # timm models run at their pretrained input size
    assert training_args.learning_rate == 1e-3 and training_args.label_smoothing_factor == 0


@pytest.mark.parametrize("recipe, family", [("finetune_phikon_v2.yaml", "dinov2_registers"),
                                            pytest.param("probe_uni.yaml", "timm", marks=pytest.mark.timm)])
def test_backbone_recipe_runs_on_a_local_stand_in(recipe: str, family: str, tiny_dataset_dir: Path, tmp_path: Path,
                                                  script):  # fmt: skip
    """The recipe as shipped, with its Hub checkpoint swapped for a tiny local one of the same family (no Hub here)."""
    checkpoint = _checkpoint(family, tmp_path / "backbone")
    size = ["--image_size", "32"] if family != "timm" else []  # the recipe's 160 px, at tiny scale
    results = _finetune(script, checkpoint, tiny_dataset_dir, tmp_path / "out", "--config", str(RECIPES / recipe),
                        *size, "--max_steps", "2", "--per_device_eval_batch_size", "16")  # fmt: skip
    assert results["model"]["family"] == backbones.family_of(check_model(str(checkpoint)).config).name
    assert results["recipe"] == str(RECIPES / recipe)


@pytest.mark.parametrize("index, family", [(0, "vit"), (1, "dinov2"), (2, "dinov2"),
                                           pytest.param(3, "timm", marks=pytest.mark.timm)])
def test_readme_backbone_commands_run(index: int, family: str, tiny_dataset_dir: Path, tmp_path: Path, script):
    """README's command per family, as written, with the Hub checkpoint replaced by a tiny local one of its family
    (plain DINOv2 for Phikon-v2) and tiny sizes."""
    commands = readme_commands("## 9. Pathology backbones")
    assert len(commands) == 4 and all(c[1] == "scripts/finetune.py" for c in commands)
    if family == "dinov2":
        checkpoint = _dinov2(tmp_path / "backbone", registers=0)
    else:
        checkpoint = _checkpoint(family, tmp_path / "backbone")
    argv = [str(tiny_dataset_dir) if a == "data/kather6" else str(tmp_path / a) if a.startswith("outputs/") else a
            for a in commands[index][2:]]  # fmt: skip
    if "--model_name_or_path" in argv:
        argv[argv.index("--model_name_or_path") + 1] = str(checkpoint)
    else:  # the recipe names the Hub checkpoint
        argv += ["--model_name_or_path", str(checkpoint)]
    if "--image_size" in argv or family == "dinov2":
        argv += ["--image_size", "32"]
    argv += ["--unfreeze_last_blocks", "1"] if "--unfreeze_last_blocks" in argv else []  # tiny: 2 blocks
    assert script("finetune").main([*argv, *FAST, "--max_steps", "2", "--per_device_eval_batch_size", "16"]) == 0
    out = Path(argv[argv.index("--output_dir") + 1])
    assert json.loads((out / "all_results.json").read_text())["model"]["base_model"] == str(checkpoint)


UPLOAD = """
    import json
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo("alice/backbone", private=True)  # private: only a token opens it, as for a gated model
    api.upload_folder(repo_id="alice/backbone", folder_path={folder!r})
    print(json.dumps({{"ok": True}}))
"""
DOWNLOAD = """
    import json, numpy as np
    from PIL import Image
    from transformers import pipeline
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    print(json.dumps([p["label"] for p in pipeline("image-classification", model="alice/ft", top_k=6)(image)]))
"""


@pytest.mark.parametrize("family", ["dinov2_registers", pytest.param("timm", marks=pytest.mark.timm)])
def test_hub_backbone_to_pushed_classifier(family: str, tiny_dataset_dir: Path, tmp_path: Path,
                                           tmp_path_factory: pytest.TempPathFactory):  # fmt: skip
    """On the Hub emulator: a private backbone (standing in for a gated one) is refused without a token in one
    line naming HF_TOKEN, fine-tuned with HF_TOKEN and pushed (--push_to_hub); a fresh client then runs it with
    pipeline() from the Hub, with no code from this package."""
    import subprocess
    import sys

    from hub_emulator import start_hub
    from test_hub import ALICE, client_env, fresh_home, run_python

    url, server = start_hub()
    try:
        run_python(url, fresh_home(tmp_path_factory), UPLOAD.format(folder=str(_checkpoint(family, tmp_path / "b"))),
                   token=ALICE)  # fmt: skip
        finetune = [sys.executable, str(RECIPES.parent.parent / "scripts" / "finetune.py"), "--model_name_or_path",
                    "alice/backbone", "--dataset_dir", str(tiny_dataset_dir), *FAST, "--max_steps", "2"]  # fmt: skip
        refused = subprocess.run([*finetune, "--output_dir", str(tmp_path / "refused")], capture_output=True,
                                 text=True, env=client_env(url, fresh_home(tmp_path_factory), None), timeout=300)
        assert refused.returncode != 0 and "HF_TOKEN" in refused.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "refused").exists()
        done = subprocess.run([*finetune, "--output_dir", str(tmp_path / "ft"), "--push_to_hub", "--hub_model_id",
                               "alice/ft"], capture_output=True, text=True, timeout=300,
                              env=client_env(url, fresh_home(tmp_path_factory), ALICE))  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        assert "model.safetensors" in server.state.main_files("model", "alice/ft")
        labels = run_python(url, fresh_home(tmp_path_factory), DOWNLOAD, token=None)
        assert sorted(labels) == sorted(CLASS_NAMES)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("extra", [[], ["--unfreeze_last_blocks", "1"]])
def test_dinov2_under_accelerate_launch_with_two_processes(extra: list[str], tiny_dataset_dir: Path, tmp_path: Path):
    """The many-GPU path (DDP; gloo on the CPU here) with a DINOv2 checkpoint, whose mask token is unused when
    classifying: DDP without find_unused_parameters must not stop on it."""
    import os
    import subprocess
    import sys

    root = RECIPES.parent.parent
    checkpoint = _checkpoint("dinov2_registers", tmp_path / "backbone")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ACCELERATE_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
              "--num_processes", "2"]  # fmt: skip
    done = subprocess.run([*launch, "scripts/finetune.py", "--model_name_or_path", str(checkpoint),
                           "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(out), *FAST, "--max_steps", "2",
                           *extra], cwd=root, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["hardware"]["num_processes"] == 2 and results["test_samples"] == 12


def test_ci_runs_the_timm_tests_in_their_own_environment():
    """.ci/run: the `timm` tests in a second venv (PyPI's torch 2.14.1 + torchvision 0.29.1 + the [timm] extra),
    the main suite on the CPU torch 2.13.0; setup.py has the extra."""
    root = RECIPES.parent.parent
    ci = (root / ".ci" / "run").read_text(encoding="utf-8")
    timm_steps = ["-m pip install --quiet torch==2.14.1 torchvision==0.29.1",
                  '-m pip install --quiet -e ".[test,timm]"', "-m pytest tests/test_backbones.py -q -ra -m timm"]
    positions = [ci.index(step) for step in timm_steps]
    assert positions == sorted(positions) and "python -m pip install --quiet torch==2.13.0" in ci
    assert '"timm": ["timm' in (root / "setup.py").read_text(encoding="utf-8")
