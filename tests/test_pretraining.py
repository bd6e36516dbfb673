"""Self-supervised pretraining (scripts/pretrain.py, a ViTMAE on unlabelled tiles) and fine-tuning from it, from
headless ViTModel backbones and on frozen backbones (--freeze_backbone, cached features)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import kill_after_first_epoch, kill_when_exists, readme_commands
from safetensors.torch import load_file
from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification, ViTMAEForPreTraining, ViTModel

from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.modeling import MAE, check_model, load_model
from hf_tissue_vit.transforms import make_image_processor

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "scripts" / "recipes"
# Odd sizes on purpose: 30 px tiles, 6 px patches (25 patches), width 24 with 3 heads, MLP 40; decoder 16 / 2 heads.
TINY_MAE = [
    "--image_size", "30", "--patch_size", "6", "--hidden_size", "24", "--num_hidden_layers", "2",
    "--num_attention_heads", "3", "--intermediate_size", "40", "--decoder_hidden_size", "16",
    "--decoder_num_hidden_layers", "1", "--decoder_num_attention_heads", "2", "--decoder_intermediate_size", "32",
]  # fmt: skip
FAST = ["--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--report_to", "none",
        "--use_cpu", "true", "--bf16", "false", "--disable_tqdm", "true", "--seed", "0"]  # fmt: skip
TINY_ENCODER = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def mae_dir(tiny_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrain.py output: 3 steps on the tiny dataset's train split plus a folder of 12 unlabelled 40 px tiles."""
    from conftest import load_script, make_tiles  # the functions behind the tile_factory and script fixtures

    root = tmp_path_factory.mktemp("mae")
    make_tiles(root / "unlabelled", 2, size=40, fmt="png", seed=7)
    out = root / "run"
    code = load_script("pretrain").main([*TINY_MAE, *FAST, "--dataset_dir", str(tiny_dataset_dir), "--inputs",
                                    str(root / "unlabelled"), "--output_dir", str(out), "--max_steps", "3",
                                    "--mask_ratio", "0.6", "--decode_cache_dir", str(root / "cache")])  # fmt: skip
    assert code == 0
    return out


def test_pretraining_reads_only_the_train_split_and_the_inputs(mae_dir: Path):
    record = json.loads((mae_dir / "pretraining.json").read_text())
    # the tiny dataset has 48 train, 12 validation and 12 test tiles; the folder 12 tiles
    assert record["data"]["split"] == "train" and record["data"]["dataset_tiles"] == 48
    assert (record["data"]["input_files"], record["data"]["tiles"], record["data"]["tile_size"]) == (12, 60, [48, 48])
    assert (record["steps"], record["mask_ratio"], record["norm_pix_loss"]) == (3, 0.6, True)
    assert record["image_size"] == 30 and record["decoder"]["hidden_size"] == 16
    config = json.loads((mae_dir / "config.json").read_text())
    assert config["model_type"] == "vit_mae" and config["mask_ratio"] == 0.6
    assert AutoImageProcessor.from_pretrained(mae_dir).size == {"height": 30, "width": 30}


def test_encoder_weights_arrive_exactly(mae_dir: Path):
    spec = check_model(str(mae_dir))
    assert spec.kind == MAE and spec.config.model_type == "vit" and spec.image_size == 30
    assert not hasattr(spec.config, "mask_ratio")  # the MAE-only settings stay behind
    model = load_model(str(mae_dir), id2label=["a", "b", "c"])
    encoder = ViTMAEForPreTraining.from_pretrained(mae_dir, use_safetensors=True).vit.state_dict()
    loaded = model.vit.state_dict()
    assert set(loaded) == set(encoder)
    for name, tensor in encoder.items():
        assert torch.equal(loaded[name], tensor), name
    assert model.vit.embeddings.position_embeddings.requires_grad  # the sin-cos embeddings are ordinary now
    assert model.classifier.out_features == 3


def _finetune_from(script, checkpoint: Path, dataset: Path, out: Path, *extra: str) -> dict:
    code = script("finetune").main(["--model_name_or_path", str(checkpoint), "--dataset_dir", str(dataset),
                                    "--output_dir", str(out), *FAST, "--n_bootstrap", "20", *extra])  # fmt: skip
    assert code == 0
    return json.loads((out / "all_results.json").read_text())


@pytest.mark.parametrize("freeze", [False, True])
def test_pretrain_then_finetune_gives_a_plain_vit(freeze: bool, mae_dir: Path, tiny_dataset_dir: Path,
                                                  tmp_path: Path, script):  # fmt: skip
    from transformers import pipeline

    extra = ["--freeze_position_embeddings", "true"] if freeze else []
    results = _finetune_from(script, mae_dir, tiny_dataset_dir, tmp_path / "ft", "--max_steps", "3",
                             "--learning_rate", "1e-2", *extra)  # fmt: skip
    out = tmp_path / "ft"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTForImageClassification"]
    assert "mask_ratio" not in config and list(config["id2label"].values()) == CLASS_NAMES
    sincos = load_file(mae_dir / "model.safetensors")["vit.embeddings.position_embeddings"]
    tuned = ViTForImageClassification.from_pretrained(out).vit.embeddings.position_embeddings.detach()
    assert torch.equal(tuned, sincos) == freeze  # trained unless frozen by the flag

    model = results["model"]
    assert model["checkpoint_kind"] == "mae" and model["freeze_position_embeddings"] is freeze
    assert model["pretraining"]["mask_ratio"] == 0.6 and model["pretraining"]["steps"] == 3
    card = (out / "README.md").read_text()
    assert "Self-supervised pretraining" in card and "| mask_ratio | 0.6 |" in card and "| epochs |" in card
    assert "| data.split | train |" in card

    classify = pipeline("image-classification", model=str(out), device="cpu")
    from PIL import Image

    predictions = classify(Image.new("RGB", (48, 48), (110, 40, 150)), top_k=6)
    assert sorted(p["label"] for p in predictions) == sorted(CLASS_NAMES)


def _headless_backbone(folder: Path) -> Path:
    """A tiny random ViTModel (no classifier, as pathology backbones are published) with an ImageNet processor."""
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, **TINY_ENCODER)).save_pretrained(folder)
    make_image_processor(32, IMAGENET_MEAN, IMAGENET_STD).save_pretrained(folder)
    return folder


def test_headless_backbone_gets_a_new_head_and_keeps_its_processor(tiny_dataset_dir: Path, tmp_path: Path, script):
    backbone = _headless_backbone(tmp_path / "backbone")
    assert check_model(str(backbone)).kind == "headless"
    results = _finetune_from(script, backbone, tiny_dataset_dir, tmp_path / "ft", "--max_steps", "2")
    out = tmp_path / "ft"
    model = ViTForImageClassification.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(CLASS_NAMES)) and model.classifier.out_features == 6
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == IMAGENET_MEAN and list(processor.image_std) == IMAGENET_STD
    assert processor.size == {"height": 32, "width": 32}
    assert results["model"]["checkpoint_kind"] == "headless" and "pretraining" not in results["model"]


def test_freeze_backbone_trains_only_the_head_on_cached_features(tiny_dataset_dir: Path, tmp_path: Path, script,
                                                                 monkeypatch):  # fmt: skip
    backbone = _headless_backbone(tmp_path / "backbone")
    cache = tmp_path / "cache"
    probe = ["--freeze_backbone", "--probe_views", "2", "--learning_rate", "0.05", "--warmup_steps", "0",
             "--label_smoothing_factor", "0", "--decode_cache_dir", str(cache)]  # fmt: skip
    results = _finetune_from(script, backbone, tiny_dataset_dir, tmp_path / "probe", *probe,
                             "--num_train_epochs", "20", "--save_strategy", "no", "--load_best_model_at_end", "false")
    out = tmp_path / "probe"
    before = ViTModel.from_pretrained(backbone).state_dict()
    trained = ViTForImageClassification.from_pretrained(out)
    after = trained.vit.state_dict()
    assert set(after) <= set(before)  # the headless checkpoint also holds a pooler, which the classifier drops
    assert all(torch.equal(after[name], before[name]) for name in after)
    # The head learns the synthetic classes (one colour and texture each) from the frozen random features, and
    # the saved model (full forward on the tiles) agrees on the unseen test tiles.
    assert results["eval_accuracy"] >= 0.9 and results["test_accuracy"] >= 0.75
    assert results["model"]["freeze_backbone"] is True and results["model"]["probe_views"] == 2
    assert len(list(cache.glob("*features-*.npy"))) == 3  # 2 views of train + validation

    # The cached features are the backbone's CLS output (as the full model computes it) ...
    from hf_tissue_vit.data import load_tissue_dataset
    from hf_tissue_vit.training import decode_tiles
    from hf_tissue_vit.transforms import TileTransform

    validation = decode_tiles(load_tissue_dataset(str(tiny_dataset_dir))["validation"], cache=False)
    with torch.no_grad():
        pixel_values = TileTransform.from_processor(AutoImageProcessor.from_pretrained(out))(validation)
        cls = trained.vit(pixel_values).last_hidden_state[:, 0].numpy()
    cached = [np.load(path) for path in cache.glob("*features-*_12.npy")]
    assert len(cached) == 1 and np.allclose(cached[0], cls, atol=1e-5)

    # ... and a second run reads them instead of running the backbone again.
    def no_backbone(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr("hf_tissue_vit.training.probe.compute_features", no_backbone)
    _finetune_from(script, backbone, tiny_dataset_dir, tmp_path / "again", *probe, "--max_steps", "1")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _pretrain_command(dataset: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "pretrain.py"), *TINY_MAE, *FAST, "--dataset_dir", str(dataset),
            "--output_dir", str(out), "--num_train_epochs", "4", "--save_strategy", "steps", "--save_steps", "3",
            "--logging_strategy", "steps", "--logging_steps", "1", "--cache_decoded", "false"]  # fmt: skip


def test_pretraining_resumes_after_sigkill_to_the_same_model(tiny_dataset_dir: Path, tmp_path: Path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    proc = subprocess.Popen(_pretrain_command(tiny_dataset_dir, resumed), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    uninterrupted = subprocess.Popen(_pretrain_command(tiny_dataset_dir, reference), cwd=REPO, env=_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        kill_when_exists(proc, resumed / "checkpoint-6" / "trainer_state.json")
    finally:
        _, stderr = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, stderr[-3000:]
    assert proc.returncode == -signal.SIGKILL and not (resumed / "pretraining.json").exists()

    again = subprocess.run(_pretrain_command(tiny_dataset_dir, resumed), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=300, check=False)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from the last checkpoint" in again.stderr
    a, b = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "pretraining.json").read_text())["steps"] == 12


def _recipe_command(dataset: Path, out: Path) -> list[str]:
    """The shipped pretraining recipe (its augmentation, epoch checkpoints and dataloader workers: the default
    count, persistent) at tiny sizes, for three epochs."""
    return [sys.executable, str(REPO / "scripts" / "pretrain.py"), "--config",
            str(REPO / "scripts" / "recipes" / "pretrain_mae_cpu.yaml"), *TINY_MAE, "--dataset_dir", str(dataset),
            "--output_dir", str(out), "--num_train_epochs", "3", "--per_device_train_batch_size", "16",
            "--report_to", "none", "--use_cpu", "true", "--bf16", "false", "--disable_tqdm", "true",
            "--cache_decoded", "false"]  # fmt: skip


def test_pretraining_with_the_recipes_dataloader_workers_resumes_to_the_same_model(tiny_dataset_dir: Path,
                                                                                  tmp_path: Path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    kill_after_first_epoch(_recipe_command(tiny_dataset_dir, resumed), resumed, _env())
    assert not (resumed / "pretraining.json").exists()
    for out in (reference, resumed):
        done = subprocess.run(_recipe_command(tiny_dataset_dir, out), cwd=REPO, env=_env(), capture_output=True,
                              text=True, timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from the last checkpoint" in done.stderr  # checkpoint-3 was whole when killed
    history = [json.loads((run / "trainer_state.json").read_text())["log_history"] for run in (reference, resumed)]
    assert [e.get("loss") for e in history[0]] == [e.get("loss") for e in history[1]]
    a, b = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_under_accelerate_launch_with_two_processes(tiny_dataset_dir: Path, tmp_path: Path):
    """pretrain.py's usage: ``accelerate launch --config_file accelerate_config.yaml --num_processes 2
    scripts/pretrain.py --use_cpu true ...``; the record and the finished-run mark are written once."""
    out = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
         "--num_processes", "2", "scripts/pretrain.py", *TINY_MAE, *FAST, "--dataset_dir", str(tiny_dataset_dir),
         "--output_dir", str(out), "--max_steps", "2", "--cache_decoded", "false"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((out / "pretraining.json").read_text())
    assert record["hardware"]["num_processes"] == 2 and record["steps"] == 2
    assert record["total_batch_size"] == 32  # 16 per process
    assert (out / "hf_tissue_vit_complete.json").is_file()
    assert isinstance(ViTMAEForPreTraining.from_pretrained(out), ViTMAEForPreTraining)


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "give the tiles to pretrain on"),
        (["--mask_ratio", "1.0"], "--mask_ratio must be in (0, 1)"),
        (["--inputs", str(REPO), "--tta", "true"], "--tta is a finetune.py option"),
        (["--inputs", str(REPO), "--label_names", "A", "B"], "--label_names is a finetune.py option"),
        (["--inputs", "/nonexistent/tiles"], "no such file or folder"),
        (["--image_size", "32", "--patch_size", "6"], "not divisible by --patch_size"),
        (["--decoder_hidden_size", "10", "--decoder_num_attention_heads", "4"], "not divisible"),
    ],
)
def test_bad_input_fails_before_pretraining(flags, message, tmp_path: Path, script, capsys):
    assert script("pretrain").main([*FAST, *flags, "--output_dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pretrain_refuses_a_checkpoint_that_is_not_vit_mae(tiny_model_dir: Path, tiny_dataset_dir: Path,
                                                           tmp_path: Path, script, capsys):  # fmt: skip
    args = [*FAST, "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(tmp_path / "out")]
    assert script("pretrain").main([*args, "--model_name_or_path", str(tiny_model_dir)]) == 2
    assert "not a ViTMAE one" in capsys.readouterr().err
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("num_train_epochs: 1\npatch_keep: 0.5\n")
    assert script("pretrain").main([*args, "--config", str(recipe)]) == 2
    assert "keys must be pretrain.py flag names" in capsys.readouterr().err


def test_recipes_parse_and_pair_up(tmp_path: Path):
    from hf_tissue_vit.pretraining import parse_pretrain_args
    from hf_tissue_vit.training import parse_args

    model_args, data_args, training_args = parse_pretrain_args(
        ["--config", str(RECIPES / "pretrain_mae_cpu.yaml"), "--dataset_dir", str(tmp_path)]
    )
    assert model_args.mae_config().mask_ratio == 0.75 and data_args.crop_scale == [0.2, 1.0]
    finetune = yaml.safe_load((RECIPES / "finetune_mae_cpu.yaml").read_text())
    assert finetune["model_name_or_path"] == training_args.output_dir  # the fine-tuning recipe reads its output
    for recipe in ("finetune_mae_cpu.yaml", "finetune_phikon.yaml"):
        model_args, _, _ = parse_args(["--config", str(RECIPES / recipe), "--output_dir", str(tmp_path / "o")])
        assert not model_args.from_scratch
    assert parse_args(["--config", str(RECIPES / "finetune_phikon.yaml")])[0].model_name_or_path == "owkin/phikon"


def test_readme_commands_run(tiny_dataset_dir: Path, tmp_path: Path, script):
    """README's pretrain -> finetune pair and the linear probe, as written, on the tiny dataset with tiny
    sizes (owkin/phikon is replaced by a local headless backbone: the Hub is not reachable here)."""
    commands = readme_commands("## 8. Self-supervised pretraining")
    assert [c[1] for c in commands] == ["scripts/prepare_dataset.py", "scripts/pretrain.py", "scripts/finetune.py",
                                        "scripts/finetune.py"]
    backbone = str(_headless_backbone(tmp_path / "phikon"))
    replace = {"data/kather6": str(tiny_dataset_dir), "owkin/phikon": backbone}
    tiny_finetune = ["--max_steps", "2", "--n_bootstrap", "20", *FAST]
    extra = {"scripts/pretrain.py": ["--max_steps", "2", *TINY_MAE, *FAST],
             "scripts/finetune.py": tiny_finetune}
    for command in commands[1:]:  # the dataset is the fixture's
        argv = [replace.get(a, str(tmp_path / a) if a.startswith("outputs/") else a) for a in command[2:]]
        if "--image_size" in argv:  # the probe resizes the backbone's position embeddings: keep it tiny
            argv[argv.index("--image_size") + 1] = "48"
        assert script(Path(command[1]).stem).main([*argv, *extra[command[1]]]) == 0, command
    results = json.loads((tmp_path / "outputs" / "vit-mae-finetuned" / "all_results.json").read_text())
    assert results["model"]["pretraining"]["mask_ratio"] == 0.75


def test_the_probe_shows_the_backbone_tiles_at_its_scale(tiny_dataset_dir: Path, tmp_path: Path, script, caplog):
    """A frozen backbone pretrained at 0.25 µm/px with a 32 px input sees 8 µm; the tiny dataset's 48 px tiles at
    0.495 µm/px (--mpp) are 24 µm: the probe takes each tile's centre 16 px (32 x 0.25 / 0.495), records that as the
    training tile size, and prediction then takes the same field of a tile."""
    from hf_tissue_vit.predict import TilePredictor
    from hf_tissue_vit.training.probe import probe_field

    assert probe_field((48, 48), 0.495, 0.25, 32) == 16
    assert probe_field((48, 48), 0.5, 0.5, 48) is None  # the same field: the whole tile
    with caplog.at_level("WARNING"):
        assert probe_field((48, 48), 0.5, 1.0, 32) is None  # 24 µm of tile, 32 µm of input: enlarged
        assert probe_field((48, 48), None, 0.5, 32) is None
    assert "enlarged" in caplog.text and "the tiles' µm/px (--mpp) unknown" in caplog.text

    backbone = _headless_backbone(tmp_path / "backbone")
    out = tmp_path / "probe"
    results = _finetune_from(script, backbone, tiny_dataset_dir, out, "--freeze_backbone", "--backbone_mpp", "0.25",
                             "--mpp", "0.495",
                             "--max_steps", "2", "--save_strategy", "no", "--load_best_model_at_end", "false",
                             "--cache_decoded", "false")  # fmt: skip
    assert results["dataset"]["tile_size"] == [16, 16] and results["dataset"]["mpp"] == pytest.approx(0.495)
    assert json.loads((out / "config.json").read_text())["mpp"] == pytest.approx(0.495)
    predictor = TilePredictor.from_pretrained(str(out), device="cpu", bf16=False, num_workers=0, mpp=0.495)
    tile = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    assert predictor.scale.field == (16, 16)
    assert torch.equal(predictor.pixel_values([tile]), predictor.pixel_values([tile[16:32, 16:32]]))
