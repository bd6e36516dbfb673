"""scripts/finetune.py end to end on tiny synthetic tiles: outputs, fine-tuning, resume, 2 processes, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_after_first_epoch, kill_when_exists, load_script, save_model_dir, tiny_vit
from safetensors.torch import load_file

from hf_tissue_vit import hardware
from hf_tissue_vit.constants import CLASS_NAMES
from hf_tissue_vit.data import METADATA_FILE
from hf_tissue_vit.fileio import default_mode
from hf_tissue_vit.training import parse_args, run_finetune, run_signature

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "finetune.py"

# hidden 32, 2 layers, 32 px, patch 8: a few ms per step on CPU
TINY_MODEL = [
    "--from_scratch", "--model_preset", "tiny", "--image_size", "32", "--patch_size", "8", "--hidden_size", "32",
    "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "64",
]  # fmt: skip
FAST = [
    "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--learning_rate", "2e-3",
    "--warmup_steps", "0", "--dataloader_num_workers", "0", "--use_cpu", "true", "--report_to", "none",
    "--n_bootstrap", "50", "--cache_decoded", "false", "--disable_tqdm", "true", "--seed", "0",
]  # fmt: skip
SHORT = ["--max_steps", "2", "--n_bootstrap", "0"]  # a run that only has to finish


main = load_script("finetune").main


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _run(args: list[str], timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, check=False,
                          **kwargs)


@pytest.fixture(scope="module")
def scratch_run(tiny_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("scratch") / "run"
    code = main([*TINY_MODEL, *FAST, "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(out),
                 "--num_train_epochs", "6", "--tta", "true", "--label_names", *CLASS_NAMES, "--learning_rate", "5e-3",
                 "--per_device_train_batch_size", "8", "--label_smoothing_factor", "0"])  # fmt: skip
    return out, code


def test_scratch_run_writes_every_output(scratch_run):
    out, code = scratch_run
    assert code == 0
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "all_results.json",
                 "test_predictions.csv", "confusion_matrix.png", "training_curves.png",
                 "trainer_state.json"):  # fmt: skip
        assert (out / name).is_file(), name
    for name in ("model.safetensors", "README.md", "all_results.json", "test_predictions.csv", "confusion_matrix.png"):
        assert (out / name).stat().st_mode & 0o777 == default_mode(), f"{name} has private (mkstemp) permissions"
    results = json.loads((out / "all_results.json").read_text())
    for key in ("train_samples_per_second", "train_runtime", "train_loss", "eval_accuracy", "eval_macro_f1",
                "test_accuracy", "test_macro_f1", "test_accuracy_tta", "test_macro_f1_tta", "test_per_class",
                "test_confusion_matrix", "label_names", "hardware", "seed", "versions", "hyperparameters",
                "dataset", "model"):  # fmt: skip
        assert key in results, key
    low, high = results["test_accuracy_ci95"]
    assert 0 <= low <= results["test_accuracy"] <= high <= 1
    assert len(results["test_macro_f1_ci95"]) == 2
    assert results["label_names"] == CLASS_NAMES
    assert sum(map(sum, results["test_confusion_matrix"])) == results["test_samples"] == 12
    assert results["eval_n_samples"] == 12
    assert results["model"]["image_size"] == 32 and results["model"]["from_scratch"] is True
    # --bf16 and --attn_implementation left to auto: the resolved values are recorded
    bf16 = results["hyperparameters"]["bf16"]
    assert bf16 is hardware.cpu_supports_bf16() and results["hardware"]["mixed_precision"] == ("bf16" if bf16 else "no")
    assert results["model"]["attn_implementation"] == hardware.default_attn_implementation("cpu", bf16)
    assert results["hardware"]["cpu"] == hardware.cpu_info()["model"]
    with open(out / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["filename", "label", "prediction", *CLASS_NAMES]
    assert len(rows) == 12 and {r["label"] for r in rows} == set(CLASS_NAMES)
    assert all(abs(sum(float(r[c]) for c in CLASS_NAMES) - 1) < 1e-3 for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(CLASS_NAMES)}
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32}


def test_scratch_run_learns(scratch_run):
    """Parameters move away from their seeded init; the loss goes down; the easy task is learnt."""
    from transformers import ViTForImageClassification, set_seed

    from hf_tissue_vit.modeling import load_model

    out, _ = scratch_run
    set_seed(0)  # the run seeds the same way before building the model
    init = load_model(None, from_scratch=True, preset="tiny", id2label=CLASS_NAMES, image_size=32, patch_size=8,
                      overrides={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                 "intermediate_size": 64})  # fmt: skip
    trained = ViTForImageClassification.from_pretrained(out).state_dict()
    changed = [k for k, v in init.state_dict().items() if not torch.equal(v, trained[k])]
    assert len(changed) == len(trained)
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_accuracy"] >= 0.5  # chance is 1/6


def test_saved_model_works_in_pipeline(scratch_run, tiny_dataset_dir: Path):
    from datasets import load_from_disk
    from transformers import pipeline

    out, _ = scratch_run
    classifier = pipeline("image-classification", model=str(out), device="cpu")
    image = load_from_disk(str(tiny_dataset_dir))["test"][0]["image"]
    scores = classifier(image, top_k=6)
    assert sorted(s["label"] for s in scores) == sorted(CLASS_NAMES)
    assert abs(sum(s["score"] for s in scores) - 1) < 1e-4


def test_rerun_same_output_dir_refuses_a_different_run(scratch_run, tiny_dataset_dir: Path, capsys):
    out, _ = scratch_run
    code = main([*TINY_MODEL, *FAST, "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(out),
                 "--num_train_epochs", "6", "--learning_rate", "1e-3"])  # fmt: skip
    assert code == 2
    assert "holds a different run" in capsys.readouterr().err


def test_a_run_signed_before_a_new_option_existed_is_the_same_run_at_its_default(tmp_path: Path):
    """An upgrade that adds an option must not orphan a run in progress: a signature without the option matches
    while the option is at its default, and not once it is set."""
    from hf_tissue_vit.modelfolder import RUN_FILE
    from hf_tissue_vit.training.rundir import _check_owner

    args = [*TINY_MODEL, "--dataset_dir", str(tmp_path / "d"), "--output_dir", str(tmp_path / "out")]
    signature = run_signature(*parse_args(args))
    older = json.loads(json.dumps(signature))
    del older["data"]["stain_stats_p"], older["model"]["backbone_mpp"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / RUN_FILE).write_text(json.dumps(older))
    _check_owner(tmp_path / "out", signature)  # the same run
    with pytest.raises(ValueError, match="stain_stats_p: None -> 0.5"):
        _check_owner(tmp_path / "out", run_signature(*parse_args([*args, "--stain_stats", "0.5",
                                                                   "--stain_stats_p", "0.5"])))


def test_finetune_pretrained_checkpoint(tiny_dataset_dir: Path, tmp_path: Path):
    """A 1000-class 224 px checkpoint, fine-tuned at 48 px: new head, our labels, resized positions."""
    from transformers import pipeline

    imagenet = [f"imagenet_class_{i}" for i in range(1000)]
    ckpt = save_model_dir(tiny_vit(image_size=224, patch_size=16, label_names=imagenet), tmp_path / "imagenet-vit")
    out = tmp_path / "finetuned"
    code = main(["--model_name_or_path", str(ckpt), "--image_size", "48", *FAST, "--dataset_dir",
                 str(tiny_dataset_dir), "--output_dir", str(out), "--max_steps", "2",
                 "--n_bootstrap", "0"])  # fmt: skip
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 48 and config["patch_size"] == 16
    assert config["id2label"] == {str(i): n for i, n in enumerate(CLASS_NAMES)}
    weights = load_file(out / "model.safetensors")
    assert weights["classifier.weight"].shape == (6, 32)
    assert weights["vit.embeddings.position_embeddings"].shape == (1, 1 + 9, 32)
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 48, "width": 48}
    from datasets import load_from_disk

    image = load_from_disk(str(tiny_dataset_dir))["test"][0]["image"]
    labels = {s["label"] for s in pipeline("image-classification", model=str(out), device="cpu")(image, top_k=6)}
    assert labels == set(CLASS_NAMES)


def test_recipe_values_are_defaults_that_flags_override(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("from_scratch: true\nimage_size: 40\nlearning_rate: 1e-3\naugmentation:\n  stain_jitter: 0.02\n")
    model_args, data_args, training_args = parse_args(["--config", str(recipe), "--image_size", "48"])
    assert model_args.from_scratch and model_args.image_size == 48
    assert training_args.learning_rate == 1e-3 and data_args.stain_jitter == 0.02
    assert training_args.metric_for_best_model == "macro_f1" and training_args.label_names == ["labels"]
    # no arguments at all: the default recipe
    model_args, _, training_args = parse_args([], default_config=str(REPO / "scripts/recipes/scratch_cpu.yaml"))
    assert model_args.from_scratch and training_args.learning_rate == 1e-3
    for recipe_name in ("scratch_cpu.yaml", "scratch_cpu_stain.yaml", "finetune_vit_base.yaml"):
        parse_args(["--config", str(REPO / "scripts/recipes" / recipe_name)])
    # the recipe's persistent DataLoader workers do not stop a run without workers
    _, _, training_args = parse_args(["--config", str(REPO / "scripts/recipes/scratch_cpu.yaml"),
                                      "--dataloader_num_workers", "0"])
    assert training_args.dataloader_num_workers == 0 and not training_args.dataloader_persistent_workers


@pytest.mark.parametrize(
    "cpu_bf16, flags, expected",
    [
        (True, ["--use_cpu", "true"], True),
        (False, ["--use_cpu", "true"], False),
        (True, ["--use_cpu", "true", "--bf16", "false"], False),
        (False, ["--use_cpu", "true", "--bf16", "true"], True),
        (True, [], True),  # no --use_cpu, but no GPU here either: still a CPU run
    ],
)
def test_bf16_default_follows_the_cpu_and_the_flag_wins(cpu_bf16, flags, expected, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: cpu_bf16)
    if not flags and hardware.has_accelerator():
        pytest.skip("this machine has an accelerator: a run without --use_cpu is not a CPU run")
    _, _, training_args = parse_args(["--output_dir", str(tmp_path), *flags])
    assert training_args.bf16 is expected and training_args.device.type == "cpu"


def test_attn_implementation_flag_and_run_signature(tmp_path: Path, monkeypatch):
    args = [*TINY_MODEL, "--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "true"]
    auto = parse_args(args)
    eager = parse_args([*args, "--attn_implementation", "eager"])
    assert auto[0].attn_implementation == "auto" and eager[0].attn_implementation == "eager"
    assert hardware.resolve_attn_implementation("auto", auto[2].device, auto[2].bf16) == "eager"  # CPU + bf16
    assert hardware.resolve_attn_implementation("auto", "cpu", False) == "sdpa"
    # the kernel changes speed, not the run: output dirs written with either resume under the other
    assert run_signature(*auto) == run_signature(*eager)
    assert "attn_implementation" not in run_signature(*auto)["model"]
    with pytest.raises(SystemExit):  # argparse choices
        parse_args([*args, "--attn_implementation", "flash"])
    with pytest.raises(ValueError, match="--attn_implementation"):
        type(auto[0])(attn_implementation="flash")


def _no_label_dataset(folder: Path) -> Path:
    from datasets import Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage

    images = [PILImage.new("RGB", (8, 8))] * 2
    features = Features({"image": Image(), "kind": Value("string")})
    split = Dataset.from_dict({"image": images, "kind": ["a", "b"]}, features=features)
    DatasetDict(train=split, validation=split).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_dataset", "does not exist"),
        ("no_label_column", "label"),
        ("label_names", "label names"),
        ("image_size", "not divisible by --patch_size"),
        ("preset", "unknown --model_preset"),
        ("not_vit", "fine-tuning supports ViT, DINOv2, DINOv2 with registers, timm"),
        ("foreign_output_dir", "not a finetune.py run"),
        ("recipe_key", "unknown keys"),
        ("hub_token", "HF_TOKEN"),
        ("mpp", "--mpp must be a positive number"),
        ("metadata_mpp", "not a positive number of micrometres per pixel"),
    ],
)
def test_bad_input_fails_before_training(case, message, tiny_dataset_dir: Path, tmp_path: Path, capsys):
    from transformers import BertConfig

    dataset = ["--dataset_dir", str(tiny_dataset_dir)]
    out = ["--output_dir", str(tmp_path / "out")]
    args = {
        "missing_dataset": [*TINY_MODEL, "--dataset_dir", str(tmp_path / "nope"), *out],
        "no_label_column": [*TINY_MODEL, "--dataset_dir", str(_no_label_dataset(tmp_path / "nolabel")), *out],
        "label_names": [*TINY_MODEL, *dataset, *out, "--label_names", "A", "B"],
        "image_size": [*TINY_MODEL, *dataset, *out, "--image_size", "36"],
        "preset": [*TINY_MODEL, *dataset, *out, "--model_preset", "giant"],
        "not_vit": [*dataset, *out, "--model_name_or_path", str(tmp_path / "bert")],
        "foreign_output_dir": [*TINY_MODEL, *dataset, "--output_dir", str(tmp_path / "foreign")],
        "recipe_key": [*TINY_MODEL, *dataset, *out, "--config", str(tmp_path / "bad.yaml")],
        "hub_token": [*TINY_MODEL, *dataset, *out, "--hub_token", "hf_not_saved_anywhere"],
        "mpp": [*TINY_MODEL, *dataset, *out, "--mpp", "0"],
        "metadata_mpp": [*TINY_MODEL, "--dataset_dir", str(tmp_path / "bad_mpp"), *out],
    }[case]
    if case == "metadata_mpp":
        _dataset_copy(tiny_dataset_dir, tmp_path / "bad_mpp", mpp="0.5 um")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert"
    )
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    assert main([*args, *FAST]) == 2
    assert message in capsys.readouterr().err
    # refused before the folder was claimed or anything trained (no wall-clock assert: see the files)
    assert not (tmp_path / "out" / "hf_tissue_vit_run.json").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"


def _dataset_copy(source: Path, target: Path, mpp: object) -> Path:
    """A copy of the saved dataset ``source`` whose folder metadata has ``mpp`` (None: no mpp)."""
    shutil.copytree(source, target)
    path = target / METADATA_FILE
    metadata = json.loads(path.read_text()) if path.is_file() else {}
    metadata.pop("mpp", None)
    if mpp is not None:
        metadata["mpp"] = mpp
    path.write_text(json.dumps(metadata))
    return target


def _snapshot(args: object) -> dict:
    """The values of a parsed argument dataclass, with what __post_init__ derives beside the fields."""
    extra = {k: getattr(args, k) for k in ("expected_label_names", "push_after_training") if hasattr(args, k)}
    return {**dataclasses.asdict(args), **extra}


def test_run_finetune_does_not_change_its_arguments(tiny_dataset_dir: Path, tmp_path: Path, monkeypatch):
    """What a run resolves (the default dataset's folder, resume, kernel) goes into its plan, not its arguments."""
    from hf_tissue_vit.training import run

    default = _dataset_copy(tiny_dataset_dir, tmp_path / "default_dataset", mpp=0.5)
    monkeypatch.setattr(run, "default_dataset_dir", lambda: default)  # no --dataset_dir: the default dataset
    args = parse_args([*TINY_MODEL, *FAST, *SHORT, "--output_dir", str(tmp_path / "out"),
                       "--label_names", *CLASS_NAMES])  # fmt: skip
    before = [_snapshot(a) for a in args]
    results = run_finetune(*args)
    assert [_snapshot(a) for a in args] == before
    assert args[1].dataset_dir is None and results["dataset"]["dataset_dir"] == str(default)
    assert args[2].expected_label_names == CLASS_NAMES and results["label_names"] == CLASS_NAMES


@pytest.mark.parametrize(
    "saved, flag, checkpoint_mpp, expected",
    [
        (0.495, None, None, 0.495),  # the dataset folder's resolution
        (0.495, "0.25", None, 0.25),  # --mpp wins (and is how a Hub dataset gets one)
        (None, None, 1.0, None),  # unknown: not the resolution of the checkpoint's training data
    ],
)
def test_mpp_goes_from_the_dataset_into_config_and_results(
    saved, flag, checkpoint_mpp, expected, tiny_dataset_dir: Path, tmp_path: Path
):
    from transformers import AutoConfig

    dataset = _dataset_copy(tiny_dataset_dir, tmp_path / "dataset", mpp=saved)
    model = TINY_MODEL
    if checkpoint_mpp is not None:
        pretrained = tiny_vit()
        pretrained.config.mpp = checkpoint_mpp
        model = ["--model_name_or_path", str(save_model_dir(pretrained, tmp_path / "pretrained"))]
    out = tmp_path / "out"
    mpp_flag = ["--mpp", flag] if flag else []
    assert main([*model, *FAST, *SHORT, "--dataset_dir", str(dataset), "--output_dir", str(out), *mpp_flag]) == 0
    assert json.loads((out / "config.json").read_text()).get("mpp") == expected
    assert getattr(AutoConfig.from_pretrained(out), "mpp", None) == expected
    assert json.loads((out / "all_results.json").read_text())["dataset"]["mpp"] == expected


def _resume_args(dataset_dir: Path, out: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), *TINY_MODEL, *FAST, "--dataset_dir", str(dataset_dir), "--output_dir",
            str(out), "--num_train_epochs", "5", "--eval_strategy", "steps", "--save_strategy", "steps",
            "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--logging_strategy", "steps",
            "--hidden_dropout_prob", "0.1", "--data_seed", "3", "--patch_keep", "0.6",
            "--ema_decay", "0.8"]  # fmt: skip


def test_offline_without_dataset_names_finetune_flags(tmp_path: Path, monkeypatch, capsys):
    """No --dataset_dir/--dataset_name and no download allowed: the error says what finetune.py accepts."""
    from hf_tissue_vit import data

    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)  # datasets reads the variable at import only
    nothing_cached = lambda: tmp_path / "hf_home" / "downloads"  # noqa: E731
    monkeypatch.setattr(data, "default_cache_dir", nothing_cached)
    monkeypatch.setattr(data.download, "default_cache_dir", nothing_cached)
    assert main([*TINY_MODEL, *FAST, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "offline mode" in err and "--dataset_dir DIR" in err and "--dataset_name" in err
    assert "prepare_dataset.py --source" in err  # --source only as part of the prepare_dataset.py command



def test_sigkill_and_resume_gives_the_same_result(tiny_dataset_dir: Path, tmp_path: Path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    done = _run(_resume_args(tiny_dataset_dir, reference))
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(_resume_args(tiny_dataset_dir, resumed), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    kill_when_exists(proc, resumed / "checkpoint-4" / "trainer_state.json")
    assert proc.returncode == -signal.SIGKILL
    assert not (resumed / "all_results.json").exists()  # really killed mid-run

    again = _run(_resume_args(tiny_dataset_dir, resumed))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming training from checkpoint" in again.stderr or "resuming from the last checkpoint" in again.stderr
    a = json.loads((reference / "all_results.json").read_text())
    b = json.loads((resumed / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_macro_f1", "eval_loss", "test_accuracy", "test_macro_f1", "test_loss",
                "test_accuracy_ci95", "test_confusion_matrix"):  # fmt: skip
        assert a[key] == b[key], key
    assert (reference / "test_predictions.csv").read_text() == (resumed / "test_predictions.csv").read_text()
    wa, wb = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the results describe the whole run, not only the part after the resume
    first, second = b["train_pieces"]
    last = json.loads((resumed / "trainer_state.json").read_text())["global_step"]
    assert first["from_step"] == 0 and first["to_step"] == second["from_step"] >= 4 and second["to_step"] == last
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    assert b["train_runtime"] == pytest.approx(first["runtime"] + second["runtime"], abs=1e-3)


def _recipe_args(dataset_dir: Path, out: Path) -> list[str]:
    """The shipped CPU recipe (its augmentation, PatchDropout, epoch checkpoints and dataloader workers:
    the default count, persistent) at tiny sizes, for three epochs."""
    return [sys.executable, str(SCRIPT), "--config", str(REPO / "scripts" / "recipes" / "scratch_cpu.yaml"),
            *TINY_MODEL[1:], "--dataset_dir", str(dataset_dir), "--output_dir", str(out), "--num_train_epochs", "3",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--n_bootstrap", "50",
            "--use_cpu", "true", "--report_to", "none", "--cache_decoded", "false", "--disable_tqdm", "true"]


def test_sigkill_and_resume_with_the_recipes_dataloader_workers_gives_the_same_result(tiny_dataset_dir: Path,
                                                                                     tmp_path: Path):
    """Killed after the first epoch's checkpoint and resumed with the same command, a run of the shipped recipe
    (one or more persistent DataLoader workers) ends bit-identical to an uninterrupted one."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    kill_after_first_epoch(_recipe_args(tiny_dataset_dir, resumed), resumed, _env())
    assert not (resumed / "all_results.json").exists()
    done = _run(_recipe_args(tiny_dataset_dir, reference))
    assert done.returncode == 0, done.stderr[-3000:]
    again = _run(_recipe_args(tiny_dataset_dir, resumed))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from the last checkpoint" in again.stderr  # checkpoint-3 was whole when killed
    a = json.loads((reference / "all_results.json").read_text())
    b = json.loads((resumed / "all_results.json").read_text())
    assert a["hyperparameters"]["augmentation"]["random_resized_crop"] and b["train_pieces"][0]["to_step"] == 3
    for key in ("eval_loss", "eval_accuracy", "test_loss", "test_accuracy", "test_macro_f1", "test_accuracy_tta",
                "test_confusion_matrix"):  # fmt: skip
        assert a[key] == b[key], key
    history = [json.loads((run / "trainer_state.json").read_text())["log_history"] for run in (reference, resumed)]
    losses = [[(e["epoch"], e["eval_loss"]) for e in h if "eval_loss" in e] for h in history]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    wa, wb = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_persistent_workers_augment_with_the_current_epoch():
    """A persistent DataLoader worker keeps the dataset copy it started with; the epoch still reaches it."""
    from hf_tissue_vit.training.tiles import TileDataset

    dataset = TileDataset(torch.zeros(4, 8, 8, 3, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True,
                                         collate_fn=lambda items: [item["epoch"] for item in items])
    seen = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        seen += [epochs for epochs in loader]
    assert seen == [[0] * 4, [1] * 4, [2] * 4]


def test_ema_run_selects_and_saves_the_weight_average(tiny_dataset_dir: Path, tmp_path: Path):
    from transformers import ViTForImageClassification

    from hf_tissue_vit.training import EMA_FILE

    out = tmp_path / "ema"
    code = main([*TINY_MODEL, *FAST, "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(out),
                 "--num_train_epochs", "3", "--ema_decay", "0.7", "--save_total_limit", "3"])  # fmt: skip
    assert code == 0
    best = Path(json.loads((out / "trainer_state.json").read_text())["best_model_checkpoint"])
    average = load_file(best / EMA_FILE)
    final = dict(ViTForImageClassification.from_pretrained(out, use_safetensors=True).named_parameters())
    raw = dict(ViTForImageClassification.from_pretrained(best, use_safetensors=True).named_parameters())
    assert set(average) == set(final)
    assert all(torch.equal(final[k].detach(), average[k]) for k in average)  # the saved model is the average
    assert not all(torch.equal(raw[k], final[k]) for k in final)  # ... not the raw weights of that step
    results = json.loads((out / "all_results.json").read_text())
    assert results["hyperparameters"]["ema_decay"] == 0.7
    with pytest.raises(ValueError, match="--ema_decay"):
        parse_args(["--output_dir", str(tmp_path / "x"), "--ema_decay", "1.0"])


def test_two_process_data_parallel_counts_each_sample_once(tiny_dataset_dir: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    # 12 validation/test tiles in eval batches of 5 per process: the last batch is padded by
    # accelerate and the padding must not be counted.
    # accelerate 1.x's `launch --cpu --num_processes 2` starts a single process; the torchrun-based
    # --multi_gpu launcher runs 2 real (gloo) processes on CPU.
    done = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
                 *TINY_MODEL, *FAST, "--per_device_eval_batch_size", "5", "--dataset_dir", str(tiny_dataset_dir),
                 "--output_dir", str(out), "--num_train_epochs", "2"])  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["hardware"]["num_processes"] == 2
    assert results["eval_n_samples"] == 12
    assert results["test_samples"] == 12 == sum(map(sum, results["test_confusion_matrix"]))
    with open(out / "test_predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 12


def test_decode_tiles_once_with_cache_and_mixed_sizes(tmp_path: Path):
    from datasets import ClassLabel, Dataset, Features, Image, Value
    from PIL import Image as PILImage

    from hf_tissue_vit.training import TileCollator, TileDataset, decode_tiles
    from hf_tissue_vit.transforms import AugmentationConfig, TileTransform

    tiles = [PILImage.new("RGB", (35, 35), (i * 40, 10, 200)) for i in range(3)] + [PILImage.new("RGB", (20, 20))]
    features = Features({"image": Image(), "label": ClassLabel(names=CLASS_NAMES), "filename": Value("string")})
    Dataset.from_dict(
        {"image": tiles, "label": [0, 1, 2, 3], "filename": list("abcd")}, features=features
    ).save_to_disk(str(tmp_path / "ds"))
    from datasets import load_from_disk

    split = load_from_disk(str(tmp_path / "ds"))
    pixels = decode_tiles(split, cache=True, cache_dir=tmp_path / "cache")
    assert pixels.shape == (4, 35, 35, 3) and pixels.dtype == torch.uint8  # the 20 px tile resized to the mode
    assert pixels[1, 0, 0].tolist() == [40, 10, 200]
    (_cached,) = list((tmp_path / "cache").glob("*.npy"))
    assert torch.equal(decode_tiles(split, cache=True, cache_dir=tmp_path / "cache"), pixels)
    # collator: eval deterministic, train seeded by (seed, epoch, indices)
    train_tf = TileTransform(32, [0.5] * 3, [0.5] * 3, AugmentationConfig())
    collate = TileCollator(train_tf, TileTransform(32, [0.5] * 3, [0.5] * 3), seed=1)
    labels = torch.arange(4)
    train, evaluation = TileDataset(pixels, labels, train=True), TileDataset(pixels, labels)
    batch = collate([train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].tolist() == [0, 1, 2, 3]
    assert torch.equal(collate([train[i] for i in range(4)])["pixel_values"], batch["pixel_values"])
    train.set_epoch(1)
    assert not torch.equal(collate([train[i] for i in range(4)])["pixel_values"], batch["pixel_values"])
    assert torch.equal(
        collate([evaluation[i] for i in range(4)])["pixel_values"],
        collate([evaluation[i] for i in range(4)])["pixel_values"],
    )
