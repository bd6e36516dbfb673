"""Reliability of the Hub paths (issue 27, case 5), through the real scripts in subprocesses whose
HF_ENDPOINT is the emulator (tests/hub_emulator.py) or a closed local port (a Hub that does not answer).

* ``finetune.py --push_to_hub`` checks the token, the repo id and that the Hub answers (whoami) before
  the first step: offline, without a token, or with another user's token it refuses in one line and
  trains nothing;
* ``push_to_hub.py`` and ``push_space.py`` offline end in one line naming the endpoint;
* the Space's requirements.txt installs (case 6): the package from a wheel uploaded with the Space,
  torch and transformers at the model's training versions; checked with ``pip install --dry-run --no-index``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FINETUNE_TINY
from hub_emulator import start_hub

REPO = Path(__file__).resolve().parents[1]
OFFLINE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


def _env(endpoint: str, home: Path, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", PYTHONPATH=str(REPO),
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    if token:
        env["HF_TOKEN"] = token
    return env


def _script(name: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *argv], capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)


def _one_line(done: subprocess.CompletedProcess) -> str:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0]


def test_finetune_push_checks_the_hub_before_the_first_step(tiny_dataset_dir, tmp_path):
    url, server = start_hub()
    try:
        _refused_pushes(url, server, tiny_dataset_dir, tmp_path)
    finally:
        server.shutdown()
        server.server_close()


def _refused_pushes(url: str, server, tiny_dataset_dir: Path, tmp_path: Path) -> None:
    cases = [  # (endpoint, token, hub_model_id, exit status, what the line says)
        (OFFLINE, "hf_alice_token", "alice/run", 2, f"cannot reach the Hub at {OFFLINE}"),
        (url, None, "alice/run", 1, "no Hub token found"),
        (url, "hf_bob_token", "alice/run", 1, "'bob'"),
    ]
    for k, (endpoint, token, repo_id, code, says) in enumerate(cases):
        out = tmp_path / f"run{k}"
        done = _script("finetune", ["--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(out), *FINETUNE_TINY,
                                    "--push_to_hub", "--hub_model_id", repo_id],
                       _env(endpoint, tmp_path / f"home{k}", token))
        assert done.returncode == code, done.stderr[-3000:]
        line = _one_line(done)
        assert says in line and "--hub_model_id" in line, line
        assert not out.exists(), sorted(p.name for p in out.iterdir())  # nothing trained, the folder not claimed
        assert "hf_alice_token" not in done.stderr + done.stdout
    assert ("model", "alice/run") not in server.state.repos


def test_push_scripts_offline_are_one_line_naming_the_endpoint(trained_run_dir, tmp_path):
    model = shutil.copytree(trained_run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*"))
    env = _env(OFFLINE, tmp_path / "home", "hf_alice_token")
    for name, argv in (("push_to_hub", [str(model), "--repo_id", "alice/m"]),
                       ("push_space", [str(model), "--repo_id", "alice/m", "--space", "alice/s"])):
        done = _script(name, argv, env)
        assert done.returncode == 2, done.stderr[-3000:]
        line = _one_line(done)
        assert f"cannot reach the Hub at {OFFLINE}" in line and "alice/" in line, line


def _pip(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_space_requirements_install_from_what_the_space_holds(trained_run_dir, tmp_path, script):
    """push_space.py's requirements.txt resolves offline from the Space folder: the package from the wheel
    uploaded with it (no index needed), torch and transformers at the versions the model was trained with."""
    import zipfile

    model = shutil.copytree(trained_run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*"))
    space = tmp_path / "space"
    assert script("push_space").main([str(model), "--repo_id", "alice/m", "--space", "alice/s", "--no_push",
                                      "--space_dir", str(space)]) == 0
    lines = [line for line in (space / "requirements.txt").read_text().splitlines()
             if line and not line.startswith(("#", "--"))]
    (wheel,) = space.glob("wheels/hf_tissue_vit-*.whl")
    versions = json.loads((model / "all_results.json").read_text())["versions"]
    assert lines == [f"./wheels/{wheel.name}[app]", f"torch=={versions['torch'].split('+')[0]}",
                     f"transformers=={versions['transformers']}"]
    with zipfile.ZipFile(wheel) as archive:  # the card templates travel in the wheel
        assert "hf_tissue_vit/templates/model_card.md" in archive.namelist()
    # the package line alone, as on a machine without it installed and without an index
    report = tmp_path / "package.json"
    done = _pip(["--no-deps", "--ignore-installed", "--report", str(report), lines[0]], space)
    assert done.returncode == 0, done.stderr[-2000:]
    (installed,) = json.loads(report.read_text())["install"]
    assert installed["metadata"]["name"] == "hf_tissue_vit" and installed["download_info"]["url"].endswith(wheel.name)
    assert "app" in installed["requested_extras"]
    # the whole file: the pins and the [app] extra's dependencies resolve against this environment
    done = _pip(["-r", "requirements.txt"], space)
    assert done.returncode == 0, done.stderr[-2000:]
