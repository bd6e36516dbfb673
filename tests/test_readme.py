"""The commands README.md shows, run as a user would type them (tiny data, tiny settings where the
command takes flags)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_TILES = ROOT.parent / "shared" / "data" / "kather2016_6class"
TINY_MODEL = ["--image_size", "32", "--patch_size", "8", "--hidden_size", "32", "--num_hidden_layers", "2",
              "--num_attention_heads", "2", "--intermediate_size", "64", "--report_to", "none"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ACCELERATE_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture
def served_release_zip(release_zip: Path):
    """The synthetic release zip on a loopback HTTP server, standing in for Zenodo."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(release_zip.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{release_zip.name}"
    yield url, hashlib.md5(release_zip.read_bytes()).hexdigest()
    server.shutdown()
    server.server_close()


def test_main_job_on_its_defaults(served_release_zip, tmp_path: Path) -> None:
    """README setup step 2: ``python scripts/finetune.py`` with no arguments means the default recipe on
    the default source (the release zip, downloaded, checked and built into the HF cache). Run here with
    that recipe named and ``--max_steps 3`` (the recipe's 120 epochs are far too long for a test);
    that no arguments select this recipe is checked on the script itself."""
    import yaml
    from conftest import load_script

    from hf_tissue_vit.training import parse_args

    finetune = load_script("finetune")
    assert finetune.DEFAULT_RECIPE == ROOT / "scripts" / "recipes" / "scratch_cpu.yaml"
    model_args, data_args, _ = parse_args([], default_config=str(finetune.DEFAULT_RECIPE))
    assert model_args.from_scratch and not data_args.dataset_dir and not data_args.dataset_name

    url, md5 = served_release_zip
    env = _env(tmp_path, HF_TISSUE_VIT_KATHER_URL=url, HF_TISSUE_VIT_KATHER_MD5=md5)
    _run([sys.executable, str(ROOT / "scripts" / "finetune.py"), "--config", str(finetune.DEFAULT_RECIPE),
          "--max_steps", "3"], cwd=tmp_path, env=env)
    recipe = yaml.safe_load(finetune.DEFAULT_RECIPE.read_text())
    out = tmp_path / recipe["output_dir"]
    results = json.loads((out / "all_results.json").read_text())
    assert results["label_names"] == ["Tumor", "Stroma", "Complex", "Lympho", "Debris", "Mucosa"]
    assert results["model"]["image_size"] == recipe["image_size"]
    assert results["hyperparameters"]["learning_rate"] == recipe["learning_rate"]
    assert results["model"]["patch_keep"] == recipe["patch_keep"] < 1  # the recipe trains with PatchDropout
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "test_predictions.csv"):
        assert (out / name).is_file(), name


def test_accelerate_launch_with_the_shipped_config(tiny_dataset_dir: Path, tmp_path: Path) -> None:
    """README: ``accelerate launch --config_file accelerate_config.yaml scripts/finetune.py ...``, with the
    process count changed on the command line as README explains (CPU here: 2 processes)."""
    out = tmp_path / "out"
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
          "--num_processes", "2", "scripts/finetune.py", "--config", "scripts/recipes/scratch_cpu.yaml",
          "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(out), "--max_steps", "2",
          "--use_cpu", "true", *TINY_MODEL], cwd=ROOT, env=_env(tmp_path))
    results = json.loads((out / "all_results.json").read_text())
    assert results["hardware"]["num_processes"] == 2
    assert results["test_samples"] == 12  # every test tile counted once across the two processes


def test_accelerate_launch_cpu_flag_finishes(tiny_dataset_dir: Path, tmp_path: Path) -> None:
    """Issue 3's command ``accelerate launch --num_processes 2 --cpu scripts/finetune.py ...`` finishes.
    accelerate 1.x starts one process for ``--cpu`` (several CPU processes need MPI), and the script
    says so and names the two-process command that README shows."""
    out = tmp_path / "out"
    done = _run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                 "scripts/finetune.py", "--config", "scripts/recipes/scratch_cpu.yaml", "--dataset_dir",
                 str(tiny_dataset_dir), "--output_dir", str(out), "--max_steps", "2", *TINY_MODEL],
                cwd=ROOT, env=_env(tmp_path))
    results = json.loads((out / "all_results.json").read_text())
    assert results["test_samples"] == 12
    assert "--num_processes N" in done.stderr + done.stdout  # the warning that points at the working command


@pytest.mark.real_data
def test_prepare_dataset_on_the_shared_tiles(tmp_path: Path) -> None:
    """README: ``python scripts/prepare_dataset.py --source ../shared/data/kather2016_6class --output_dir ...``."""
    if not SHARED_TILES.is_dir():
        pytest.skip(f"real Kather tiles not found at {SHARED_TILES}")
    from datasets import load_from_disk

    _run([sys.executable, "scripts/prepare_dataset.py", "--source", "../shared/data/kather2016_6class",
          "--output_dir", str(tmp_path / "kather6")], cwd=ROOT, env=_env(tmp_path))
    dataset = load_from_disk(str(tmp_path / "kather6"))
    assert {s: len(dataset[s]) for s in dataset} == {"train": 2142, "validation": 504, "test": 504}
    assert dataset["train"].features["label"].names == ["Tumor", "Stroma", "Complex", "Lympho", "Debris", "Mucosa"]


def test_benchmark_quick_command(tmp_path: Path) -> None:
    """README section 5: ``python scripts/benchmark.py --quick --synthetic --output_dir outputs/benchmark``
    (output folder moved to tmp; one repeat). The command without flags is the same script at full sizes."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python scripts/benchmark.py --quick --synthetic --output_dir outputs/benchmark" in readme
    out = tmp_path / "benchmark"
    done = _run([sys.executable, "scripts/benchmark.py", "--quick", "--synthetic", "--output_dir", str(out),
                 "--repeats", "1"], cwd=ROOT, env=_env(tmp_path))
    results = json.loads((out / "benchmark.json").read_text())
    assert set(results["sections"]) == {"data", "train", "infer"}
    assert (out / "benchmark.md").read_text() in done.stdout  # the tables are printed too


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    """.ci/run installs with README's install command and runs README's test command."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install = re.search(r'^pip install -e "([^"]+)"', readme, re.M).group(1)
    assert f'python -m pip install --quiet -e "{install}"' in ci
    assert "python -m pytest tests -q" in readme and "python -m pytest tests -q" in ci


def _readme_commands() -> list[str]:
    """README's ``python scripts/...`` commands, continuation lines joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("python scripts/")]


def test_readme_applies_the_model_its_training_command_writes() -> None:
    """Every model folder README applies (--model, push_to_hub.py / push_space.py OUTPUT_DIR) is the
    --output_dir of one of its training commands; section 6's sample output names the folders of its command."""
    import re
    import shlex

    commands = [shlex.split(c) for c in _readme_commands()]
    trained = {argv[argv.index("--output_dir") + 1] for argv in commands
               if argv[1] in ("scripts/finetune.py", "scripts/pretrain.py") and "--output_dir" in argv}
    used = set()
    for argv in commands:
        if "--model" in argv and argv[argv.index("--model") + 1].startswith("outputs/"):
            used.add(argv[argv.index("--model") + 1])
        if argv[1] in ("scripts/push_to_hub.py", "scripts/push_space.py"):
            used.add(argv[2])
    assert used and used <= trained, f"applied but never trained: {sorted(used - trained)}"
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## 6. ", 1)[1].split("\n## 7. ", 1)[0]
    printed = set(re.findall(r"^(?:wrote|updated the model card) (.+)$", section, re.MULTILINE))
    folders = {str(Path(p.strip()).parent) for line in printed for p in line.split(",")}
    assert folders == {"outputs/eval_tif_sample", "outputs/scratch"}, folders


def test_push_commands_document_the_folder_as_readme_shows_it() -> None:
    """README shows ``push_to_hub.py OUTPUT_DIR --repo_id ...``; --help documents that form."""
    for name in ("push_to_hub", "push_space"):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--help"], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"usage: {name}.py OUTPUT_DIR --repo_id" in done.stdout, done.stdout[:500]
