"""Model card, push and Hub round trips, over HTTP against the local Hub emulator (tests/hub_emulator.py).

Every client-side check runs the real huggingface_hub / transformers / datasets code in a
subprocess whose environment points HF_ENDPOINT at the emulator (read at import time), with
HF_HUB_DISABLE_XET=1 and a fresh HF_HOME.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import FINETUNE_TINY, load_script, make_tiles, tile_pixels
from hub_emulator import start_hub

from hf_tissue_vit.constants import CLASS_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]
ALICE, BOB = "hf_alice_token", "hf_bob_token"
IMAGE_SIZE = 32


# --------------------------------------------------------------------------- helpers
def client_env(url: str, hf_home: Path, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "HF_DATASETS_"))}
    env.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_UPDATE_DOWNLOAD_COUNTS="0", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def fresh_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf_home")


def run_python(url: str, hf_home: Path, code: str, token: str | None = None) -> dict:
    """Run ``code`` in a client subprocess; it must print one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=client_env(url, hf_home, token),
                          capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_push(url: str, hf_home: Path, args: list[str], token: str | None) -> subprocess.CompletedProcess:
    """``scripts/push_to_hub.py ARGS`` as a user would run it."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py"), *args],
                          env=client_env(url, hf_home, token), capture_output=True, text=True, timeout=240,
                          cwd=REPO_ROOT)


PUSH_STEPS = """
    import contextlib, io, json, os, runpy, sys
    script = runpy.run_path({script!r})
    out = []
    for argv, token, patch in json.loads({steps!r}):
        if patch:  # a new training result between two pushes
            path = os.path.join(argv[0], "all_results.json")
            results = json.load(open(path))
            results.update(patch)
            json.dump(results, open(path, "w"))
        os.environ.pop("HF_TOKEN", None)
        if token:
            os.environ["HF_TOKEN"] = token  # huggingface_hub reads HF_TOKEN at each call
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = script["main"](argv)
        out.append({{"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}})
    print(json.dumps(out))
"""


def run_pushes(url: str, hf_home: Path, steps: list[tuple[list[str], str | None, dict | None]]) -> list[dict]:
    """Several ``push_to_hub.py`` main() calls (argv, HF_TOKEN, all_results patch) in one client process.

    One process instead of one per push keeps the test file fast on a 2-core machine.
    """
    code = PUSH_STEPS.format(script=str(REPO_ROOT / "scripts" / "push_to_hub.py"), steps=json.dumps(steps))
    return run_python(url, hf_home, code, token=None)


def make_output_dir(path: Path) -> Path:
    """A realistic training output dir: tiny random ViT, processor, results, figures and local-only junk."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    id2label = dict(enumerate(CLASS_NAMES))
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, id2label=id2label,
                       label2id={v: k for k, v in id2label.items()},
                       problem_type="single_label_classification")
    ViTForImageClassification(config).save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=2,
                      image_mean=[0.7, 0.55, 0.7], image_std=[0.15, 0.2, 0.15]).save_pretrained(path)
    per_class = {n: {"precision": 0.5 + i / 20, "recall": 0.6, "f1": 0.55, "support": 10}
                 for i, n in enumerate(CLASS_NAMES)}
    results = {
        "train_samples_per_second": 123.4, "train_runtime": 3725.2, "train_loss": 0.42,
        "eval_accuracy": 0.81, "eval_macro_f1": 0.8, "test_accuracy": 0.8333, "test_macro_f1": 0.8121,
        "test_accuracy_ci95": [0.79, 0.87], "test_macro_f1_ci95": [0.77, 0.85],
        "test_accuracy_tta": 0.85, "test_macro_f1_tta": 0.84, "test_per_class": per_class,
        "test_confusion_matrix": np.eye(6, dtype=int).tolist(), "label_names": CLASS_NAMES,
        "hardware": {"device": "cpu", "num_processes": 1}, "seed": 42,
        "versions": {"transformers": "5.24.0", "hf_tissue_vit": "0.1.0"},
        "hyperparameters": {"learning_rate": 0.0005, "num_train_epochs": 30, "per_device_train_batch_size": 64},
        "dataset": {"dataset_dir": "data/kather", "hub_dataset_id": "alice/kather2016-tiles",
                    "split_by": "stratified", "splits": {"train": 2550, "validation": 600, "test": 600}},
        "model": {"from_scratch": True, "base_model": None, "preset": "tiny", "image_size": IMAGE_SIZE,
                  "patch_size": 8, "num_parameters": 30000},
    }
    (path / "all_results.json").write_text(json.dumps(results, indent=2))
    (path / "hf_tissue_vit_run.json").write_text("{}")  # the mark of a finetune.py output dir
    (path / "hf_tissue_vit_complete.json").write_text("{}")  # ... whose run has finished
    header = "filename,label,prediction," + ",".join(CLASS_NAMES)
    (path / "test_predictions.csv").write_text(header + "\na.tif,Tumor,Tumor," + ",".join(["0.1666"] * 6) + "\n")
    for name in ("confusion_matrix.png", "training_curves.png"):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path / name)
    (path / "trainer_state.json").write_text(json.dumps({"log_history": [], "global_step": 10}))
    # Local-only files that must never reach the Hub.
    (path / "checkpoint-10").mkdir()
    (path / "checkpoint-10" / "model.safetensors").write_bytes(b"x")
    (path / "training_args.bin").write_bytes(b"pickle")
    (path / "optimizer.pt").write_bytes(b"pickle")
    (path / "runs").mkdir()
    (path / "runs" / "events.out").write_bytes(b"log")
    return path


PUSHED_FILES = {".gitattributes", "model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                "all_results.json", "test_predictions.csv", "confusion_matrix.png", "training_curves.png",
                "trainer_state.json"}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hub():
    url, server = start_hub()
    yield url, server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return make_output_dir(tmp_path_factory.mktemp("run") / "vit_tiny")


DOWNLOAD_CHECK = """
    import json, numpy as np, torch
    from PIL import Image
    from huggingface_hub import ModelCard
    from transformers import AutoModelForImageClassification, pipeline
    repo, local = {repo!r}, {local!r}
    CLASS_NAMES_ = {names!r}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 41, 3), dtype=np.uint8))
    preds = pipeline("image-classification", model=repo, top_k=len(CLASS_NAMES_))(image)
    x = torch.randn(2, 3, {size}, {size}, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hub_logits = AutoModelForImageClassification.from_pretrained(repo).eval()(pixel_values=x).logits
        local_logits = AutoModelForImageClassification.from_pretrained(local).eval()(pixel_values=x).logits
    card = ModelCard.load(repo)
    print(json.dumps({{"labels": [p["label"] for p in preds], "score_sum": sum(p["score"] for p in preds),
                      "max_abs_diff": float((hub_logits - local_logits).abs().max()),
                      "metadata": card.data.to_dict(), "text": card.text}}))
"""


@pytest.fixture(scope="module")
def pushed_model(hub, output_dir, tmp_path_factory):
    """Push with the package's command as alice, then pull in a fresh cache with no token."""
    url, _server = hub
    proc = run_push(url, fresh_home(tmp_path_factory), [str(output_dir), "--repo_id", "alice/tiny"], ALICE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = DOWNLOAD_CHECK.format(repo="alice/tiny", local=str(output_dir), size=IMAGE_SIZE, names=CLASS_NAMES)
    return run_python(url, fresh_home(tmp_path_factory), code, token=None), proc


# --------------------------------------------------------------------------- model push round trip
def test_push_uploads_only_model_files(hub, pushed_model):
    _url, server = hub
    files = server.state.main_files("model", "alice/tiny")
    assert set(files) == PUSHED_FILES
    repo = server.state.repos[("model", "alice/tiny")]
    assert repo.commits[repo.branches["main"]].files["model.safetensors"].lfs_sha256  # stored via LFS
    assert ALICE not in "".join(f.decode("utf-8", "ignore") for f in files.values())
    assert ALICE not in pushed_model[1].stdout + pushed_model[1].stderr


def test_pipeline_and_from_pretrained_from_hub(pushed_model):
    result, _ = pushed_model
    assert sorted(result["labels"]) == sorted(CLASS_NAMES)
    assert result["score_sum"] == pytest.approx(1.0, abs=1e-5)
    assert result["max_abs_diff"] == 0.0


def test_pushed_card_metadata_and_model_index(pushed_model, output_dir):
    meta = pushed_model[0]["metadata"]
    results = json.loads((output_dir / "all_results.json").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "cc-by-4.0" and meta["datasets"] == ["alice/kather2016-tiles"]
    assert set(meta["metrics"]) == {"accuracy", "f1"}
    assert {"histology", "pathology", "vision-transformer"} <= set(meta["tags"])
    (entry,) = meta["model-index"]
    assert entry["name"] == "alice/tiny"
    (res,) = entry["results"]
    assert res["dataset"]["split"] == "test" and res["task"]["type"] == "image-classification"
    metrics = {m["type"]: m["value"] for m in res["metrics"]}
    assert metrics == {"accuracy": results["test_accuracy"], "f1": results["test_macro_f1"]}


def test_push_twice_makes_two_commits_and_latest_files(hub, output_dir, tmp_path, tmp_path_factory):
    import shutil

    url, server = hub
    run = tmp_path / "run"
    shutil.copytree(output_dir, run)
    first, second, dev = run_pushes(url, fresh_home(tmp_path_factory), [
        ([str(run), "--repo_id", "alice/twice", "--commit_message", "first"], ALICE, None),
        ([str(run), "--repo_id", "alice/twice", "--commit_message", "second"], ALICE, {"test_accuracy": 0.9111}),
        # --revision pushes to a branch and leaves main alone.
        ([str(run), "--repo_id", "alice/twice", "--revision", "dev"], ALICE, {"test_accuracy": 0.95}),
    ])
    assert first["rc"] == second["rc"] == dev["rc"] == 0, (first, second, dev)
    repo = server.state.repos[("model", "alice/twice")]
    assert [c.title for c in repo.history(repo.branches["main"])] == ["second", "first", "initial commit"]
    files = server.state.main_files("model", "alice/twice")
    assert json.loads(files["all_results.json"])["test_accuracy"] == 0.9111
    assert "value: 0.9111" in files["README.md"].decode()
    assert json.loads(server.state.main_files("model", "alice/twice", "dev")["all_results.json"])[
        "test_accuracy"] == 0.95
    assert len(repo.history(repo.branches["dev"])) == 4


def test_push_keeps_a_users_own_card(hub, tmp_path, tmp_path_factory):
    """A folder from plain Trainer: its README.md goes to the Hub unchanged and stays unchanged locally."""
    import shutil

    url, server = hub
    folder = tmp_path / "plain"
    shutil.copytree(make_output_dir(tmp_path / "base"), folder)
    for name in ("hf_tissue_vit_run.json", "hf_tissue_vit_complete.json"):
        (folder / name).unlink()
    (folder / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.7, "epoch": 3.0}))
    own = "---\nbase_model: google/vit-base-patch16-224\nlicense: apache-2.0\n---\n\n# mine\n\nMy words.\n"
    (folder / "README.md").write_text(own)
    proc = run_push(url, fresh_home(tmp_path_factory), [str(folder), "--repo_id", "alice/plain"], ALICE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (folder / "README.md").read_text() == own
    assert server.state.main_files("model", "alice/plain")["README.md"].decode() == own


# --------------------------------------------------------------------------- auth
PRIVATE_CHECK = """
    import json
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError
    out = {}
    for who, token in (("anonymous", False), ("bob", "hf_bob_token"), ("alice", "hf_alice_token")):
        try:
            hf_hub_download("alice/secret", "config.json", token=token)
            out[who] = "read"
        except RepositoryNotFoundError:
            out[who] = "not found"
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def auth_pushes(hub, pushed_model, output_dir, tmp_path_factory):
    """Alice pushes a private repo; a wrong token and bob's token try to push."""
    url, _ = hub
    return run_pushes(url, fresh_home(tmp_path_factory), [
        ([str(output_dir), "--repo_id", "alice/secret", "--private"], ALICE, None),
        ([str(output_dir), "--repo_id", "alice/wrong"], "hf_not_a_real_token", None),
        ([str(output_dir), "--repo_id", "alice/tiny"], BOB, None),
    ])


def test_private_repo_needs_the_owner_token(hub, auth_pushes, tmp_path_factory):
    url, server = hub
    assert auth_pushes[0]["rc"] == 0, auth_pushes[0]
    assert server.state.repos[("model", "alice/secret")].private
    out = run_python(url, fresh_home(tmp_path_factory), PRIVATE_CHECK, token=None)
    assert out == {"anonymous": "not found", "bob": "not found", "alice": "read"}


def test_wrong_token_is_refused_with_a_clear_message(hub, auth_pushes):
    _url, server = hub
    result = auth_pushes[1]
    assert result["rc"] == 1
    assert "401" in result["stderr"] and "HF_TOKEN" in result["stderr"] and "hf auth login" in result["stderr"]
    assert result["stderr"].startswith("error: ") and "Traceback" not in result["stderr"]
    assert "hf_not_a_real_token" not in result["stderr"] + result["stdout"]
    assert ("model", "alice/wrong") not in server.state.repos


def test_other_users_repo_is_refused(hub, pushed_model, auth_pushes):
    _url, server = hub
    result = auth_pushes[2]
    assert result["rc"] == 1 and "403" in result["stderr"] and "write access" in result["stderr"]
    repo = server.state.repos[("model", "alice/tiny")]
    assert [c.author for c in repo.history(repo.branches["main"])] == ["alice", "alice"]


# --------------------------------------------------------------------------- dataset round trip
def make_dataset_dict(path: Path) -> Path:
    import numpy as np
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    features = Features({"image": Image(), "label": ClassLabel(names=CLASS_NAMES), "slide": Value("string"),
                         "filename": Value("string")})
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 12), ("validation", 6), ("test", 6)):
        rows = {"image": [], "label": [], "slide": [], "filename": []}
        for i in range(n):
            from PIL import Image as PILImage

            rows["image"].append(PILImage.fromarray(rng.integers(0, 255, (35, 35, 3), dtype=np.uint8)))
            rows["label"].append(i % 6)
            rows["slide"].append(f"CRC-Prim-HE-0{i % 3}")
            rows["filename"].append(f"{split}_{i}.tif")
        splits[split] = Dataset.from_dict(rows, features=features)
    DatasetDict(splits).save_to_disk(path)
    return path


DATASET_PUSH = """
    import json
    from datasets import load_from_disk
    from huggingface_hub import DatasetCard
    from hf_tissue_vit.hub import push_dataset
    card = DatasetCard("---\\nlicense: cc-by-4.0\\ntags:\\n- histology\\n---\\n# Tiny tiles\\n\\nSynthetic tiles.\\n")
    url = push_dataset(load_from_disk({path!r}), "alice/ds", card=card)
    print(json.dumps({{"url": url}}))
"""

DATASET_LOAD = """
    import json
    from datasets import load_dataset
    ds = load_dataset("alice/ds")
    print(json.dumps({"splits": {k: v.num_rows for k, v in ds.items()},
                      "features": {k: repr(v) for k, v in ds["train"].features.items()},
                      "names": ds["train"].features["label"].names,
                      "first": [ds["test"][0]["filename"], ds["test"][0]["slide"], ds["test"][0]["label"],
                                list(ds["test"][0]["image"].size)]}))
"""


def test_dataset_push_and_load_dataset(hub, tmp_path, tmp_path_factory):
    from datasets import load_from_disk

    url, server = hub
    local = load_from_disk(make_dataset_dict(tmp_path / "ds"))
    run_python(url, fresh_home(tmp_path_factory), DATASET_PUSH.format(path=str(tmp_path / "ds")), token=ALICE)
    readme = server.state.main_files("dataset", "alice/ds")["README.md"].decode()
    assert "# Tiny tiles" in readme and "license: cc-by-4.0" in readme and "dataset_info:" in readme

    out = run_python(url, fresh_home(tmp_path_factory), DATASET_LOAD, token=None)
    assert out["splits"] == {k: v.num_rows for k, v in local.items()}
    assert out["features"] == {k: repr(v) for k, v in local["train"].features.items()}
    assert out["names"] == CLASS_NAMES
    row = local["test"][0]
    assert out["first"] == [row["filename"], row["slide"], row["label"], [35, 35]]


TRAIN_ONLY_PUSH = """
    import json
    from datasets import DatasetDict, concatenate_datasets, load_from_disk
    local = load_from_disk({path!r})
    DatasetDict({{"train": concatenate_datasets([local[s] for s in local])}}).push_to_hub("alice/train-only")
    print(json.dumps({{"ok": True}}))
"""


def test_finetune_on_a_hub_dataset_with_only_a_train_split(hub, tiny_dataset_dir, tmp_path, tmp_path_factory):
    """Most Hub image datasets have one split: validation and test are made from it (stratified, seeded)."""
    url, _server = hub
    home = fresh_home(tmp_path_factory)
    run_python(url, home, TRAIN_ONLY_PUSH.format(path=str(tiny_dataset_dir)), token=ALICE)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "finetune.py"), "--dataset_name", "alice/train-only",
         "--output_dir", str(out), *FINETUNE_TINY, "--seed", "3"],
        env=client_env(url, home, ALICE), capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    dataset = json.loads((out / "all_results.json").read_text())["dataset"]
    assert dataset["splits"] == {"train": 48, "validation": 12, "test": 12}  # 8/2/2 of 12 tiles per class
    assert dataset["made_splits"] == {"made_from": "train", "split_by": "stratified", "seed": 3,
                                      "made": {"validation": 12, "test": 12}}
    assert "validation and test were made from it" in (out / "README.md").read_text()


# --------------------------------------------------------------------------- real training output


@pytest.fixture(scope="module")
def finetune_pushed(hub, tiny_dataset_dir, tmp_path_factory):
    """``finetune.py --push_to_hub`` as alice into the private repo alice/pushed, run as a user would.

    The one real training run of this file; the tests below share its output dir (read-only but for
    README.md, which ``push_to_hub.py`` re-renders for another repo id).
    """
    url, _server = hub
    out = tmp_path_factory.mktemp("finetune") / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "finetune.py"), "--dataset_dir", str(tiny_dataset_dir),
         "--output_dir", str(out), *FINETUNE_TINY,
         "--push_to_hub", "--hub_model_id", "alice/pushed", "--hub_private_repo", "true"],
        env=client_env(url, fresh_home(tmp_path_factory), ALICE), capture_output=True, text=True, timeout=300,
        check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, f"finetune failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out, proc


def test_finetune_push_to_hub(hub, finetune_pushed):
    """--push_to_hub --hub_model_id --hub_private_repo: model + card pushed at the end, private, no token leak."""
    import urllib.error
    import urllib.request

    from huggingface_hub import ModelCard

    url, server = hub
    out, proc = finetune_pushed
    repo = server.state.repos[("model", "alice/pushed")]
    assert repo.private and repo.owner == "alice"
    files = server.state.main_files("model", "alice/pushed")
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json"} <= set(
        files)
    assert not [f for f in files if f.startswith("checkpoint-") or f.endswith((".bin", ".pt", ".pth"))], sorted(files)
    # the run really had local-only files to leave out
    assert list(out.glob("checkpoint-*")) and (out / "training_args.bin").is_file()
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()

    def status(token: str | None) -> int:
        request = urllib.request.Request(f"{url}/api/models/alice/pushed")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    assert (status(None), status(BOB), status(ALICE)) == (401, 404, 200)

    card = ModelCard(files["README.md"].decode())
    (entry,) = card.data.to_dict()["model-index"]
    assert entry["name"] == "alice/pushed"
    results = json.loads((out / "all_results.json").read_text())
    metrics = {m["type"]: m["value"] for m in entry["results"][0]["metrics"]}
    assert metrics == {"accuracy": results["test_accuracy"], "f1": results["test_macro_f1"]}

    assert ALICE not in proc.stdout + proc.stderr
    assert "alice/pushed" in proc.stderr  # the push was logged (without the token)
    leaks = [p for p in out.rglob("*") if p.is_file() and ALICE.encode() in p.read_bytes()]
    assert not leaks and not any(ALICE.encode() in f for f in files.values())


def test_push_real_finetune_output(hub, finetune_pushed, tmp_path_factory):
    """A real finetune.py output pushed with push_to_hub.py and pulled back: same weights, labels, metrics."""
    out, _ = finetune_pushed
    url, _server = hub
    proc = run_push(url, fresh_home(tmp_path_factory), [str(out), "--repo_id", "alice/real"], ALICE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = run_python(
        url,
        fresh_home(tmp_path_factory),
        DOWNLOAD_CHECK.format(repo="alice/real", local=str(out), size=32, names=CLASS_NAMES),
        token=None,
    )
    assert sorted(result["labels"]) == sorted(CLASS_NAMES) and result["max_abs_diff"] == 0.0
    results = json.loads((out / "all_results.json").read_text())
    metrics = {m["type"]: m["value"] for m in result["metadata"]["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"accuracy": results["test_accuracy"], "f1": results["test_macro_f1"]}


# --------------------------------------------------------------------------- the four apply scripts
SCRIPT_RUNS = """
    import contextlib, io, json, sys
    sys.path.insert(0, {tests!r})
    from conftest import load_script
    out = []
    for name, argv in json.loads({runs!r}):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = load_script(name).main(argv)
        out.append({{"name": name, "model": argv[1], "rc": rc, "stdout": stdout.getvalue(),
                    "stderr": stderr.getvalue()[-3000:]}})
    print(json.dumps(out))
"""


def test_scripts_on_trained_and_hub_model(hub, finetune_pushed, tmp_path, tmp_path_factory):
    """count_parameters, predict, attention_maps (--images) and tissue_map with --model set to the
    trained output dir and to its private Hub copy (alice's token, fresh cache): same results."""
    import csv

    import numpy as np
    from PIL import Image
    from transformers import ViTForImageClassification

    url, _server = hub
    out, _ = finetune_pushed
    tiles = tmp_path / "tiles"
    make_tiles(tiles, 1, size=35, fmt="png")  # odd size: resizing happens in every script
    rng = np.random.default_rng(1)
    layout = [["Tumor", "Stroma", "Lympho"], ["Mucosa", "Debris", "Complex"]]
    mosaic = np.concatenate([np.concatenate([tile_pixels(n, 40, rng) for n in row], axis=1) for row in layout])
    Image.fromarray(mosaic).save(tmp_path / "slide.png")

    runs = []
    for tag, model in (("local", str(out)), ("hub", "alice/pushed")):
        d = tmp_path / tag
        runs += [
            ("count_parameters", ["--model", model]),
            ("predict", ["--model", model, "--inputs", str(tiles), "--output", str(d / "pred.csv"),
                         "--batch_size", "4", "--num_workers", "0", "--no_progress", "--bf16", "false"]),
            ("attention_maps", ["--model", model, "--images", str(tiles), "--output_dir", str(d / "attention"),
                                "--n_per_class", "1", "--device", "cpu"]),
            ("tissue_map", ["--model", model, "--image", str(tmp_path / "slide.png"), "--output_dir",
                            str(d / "map"), "--tile", "40", "--stride", "40", "--bf16", "false", "--device", "cpu"]),
        ]  # fmt: skip
    code = SCRIPT_RUNS.format(tests=str(REPO_ROOT / "tests"), runs=json.dumps(runs))
    results = run_python(url, fresh_home(tmp_path_factory), code, token=ALICE)
    assert [r["rc"] for r in results] == [0] * len(runs), results

    total = sum(p.numel() for p in ViTForImageClassification.from_pretrained(out).parameters())
    counts = [r["stdout"].strip().splitlines()[-1] for r in results if r["name"] == "count_parameters"]
    assert counts == [str(total), str(total)]

    tables = {}
    for tag in ("local", "hub"):
        with open(tmp_path / tag / "pred.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 6 and all(row["error"] == "" for row in rows)
        assert list(rows[0])[:4] == ["file", "label", "score", "error"] and set(CLASS_NAMES) <= set(rows[0])
        for row in rows:
            assert sum(float(row[name]) for name in CLASS_NAMES) == pytest.approx(1.0, abs=1e-4)
            assert row["label"] in CLASS_NAMES
        tables[tag] = rows
        assert (tmp_path / tag / "attention" / "attention_grid.png").stat().st_size > 0
        assert len(list((tmp_path / tag / "attention" / "tiles").glob("*.png"))) == 6
        for name in ("tissue_map.png", "class_fractions.csv", "class_fractions.json", "labels.npy",
                     "probabilities.npy"):
            assert (tmp_path / tag / "map" / name).stat().st_size > 0, name
        assert np.load(tmp_path / tag / "map" / "labels.npy").shape == (2, 3)
    assert tables["local"] == tables["hub"]  # the downloaded model is the trained one
    np.testing.assert_array_equal(np.load(tmp_path / "local" / "map" / "labels.npy"),
                                  np.load(tmp_path / "hub" / "map" / "labels.npy"))


def test_finetune_push_needs_hub_model_id_before_training(tiny_dataset_dir, tmp_path, capsys):
    """A missing or malformed --hub_model_id is refused at parse time, not after hours of training."""
    finetune = load_script("finetune")
    for extra in ([], ["--hub_model_id", "no-namespace"]):
        rc = finetune.main(["--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(tmp_path / "run"),
                            *FINETUNE_TINY, "--push_to_hub", *extra])
        assert rc == 2 and "--push_to_hub needs --hub_model_id USER/NAME" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
