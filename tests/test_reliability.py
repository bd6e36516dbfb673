"""Failure cases a new user runs into (issue 12): a folder is complete or it is not used, bad paths fail
first in one line, downloads are keyed by URL, nothing of the user's is lost, clear words.

Kills are real SIGKILLs at a chosen point: the script runs in a subprocess whose chosen function is
replaced by one that kills the process (:data:`KILL_AT`). Read-only places and mount points are made
with a bind mount in a private mount namespace (``unshare -m``), only where the machine allows it.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from conftest import FINETUNE_TINY, load_script, tiny_vit

REPO = Path(__file__).resolve().parents[1]
COMPLETE = "hf_tissue_vit_complete.json"
RUN_FILE = "hf_tissue_vit_run.json"

# Runs a script with one function replaced by a SIGKILL of the process (before or after the real call).
KILL_AT = """
import importlib, os, runpy, signal, sys
module_name, attr, when, script, *argv = sys.argv[1:]
owner = importlib.import_module(module_name)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
def killed(*args, **kwargs):
    if when == "after":
        original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(owner, name, killed)
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _script(name: str) -> str:
    return str(REPO / "scripts" / f"{name}.py")


def killed_run(module: str, attr: str, when: str, script: str, args: list[str]) -> None:
    """Run ``scripts/<script>.py ARGS`` and SIGKILL it when ``module.attr`` is called (``when``: before/after)."""
    proc = subprocess.run([sys.executable, "-c", KILL_AT, module, attr, when, _script(script), *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_run(trained_run_dir: Path, target: Path) -> Path:
    shutil.copytree(trained_run_dir, target)
    return target


def _finetune_args(dataset_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset_dir", str(dataset_dir), "--output_dir", str(out), *FINETUNE_TINY, *extra]


# --------------------------------------------------------------------------- read-only places, mount points
def _namespace_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"hf_tissue_vit_ro_probe_{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {probe} {probe} && mount -o "
                               f"remount,bind,ro {probe} && ! touch {probe}/x"], capture_output=True, timeout=30)
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


NAMESPACE = _namespace_works()
needs_mounts = pytest.mark.skipif(not NAMESPACE, reason="needs `unshare -m` and bind mounts (root or user "
                                  "namespaces); a read-only place cannot be made otherwise (root ignores chmod)")


def in_namespace(mounts: list[tuple[Path, bool]], argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` in a private mount namespace where each folder is bind-mounted on itself (read-only
    when asked): a mount point, or a read-only place even for root."""
    steps = []
    for folder, read_only in mounts:
        steps.append(f"mount --bind '{folder}' '{folder}'")
        if read_only:
            steps.append(f"mount -o remount,bind,ro '{folder}'")
    command = " && ".join([*steps, 'exec "$@"'])
    return subprocess.run(["unshare", "-m", "sh", "-c", command, "sh", *argv], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300, check=False)


# =========================================================================== 2, 3: complete or not used
@pytest.fixture(scope="module")
def killed_before_results(tiny_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finetune.py run SIGKILLed after model.safetensors was saved, before its results. Read-only."""
    out = tmp_path_factory.mktemp("killed") / "run"
    killed_run("hf_tissue_vit.training.run", "evaluate_test_split", "before", "finetune",
               _finetune_args(tiny_dataset_dir, out))
    assert (out / "model.safetensors").is_file() and not (out / "all_results.json").exists()
    return out


def test_push_refuses_a_run_killed_before_its_results(killed_before_results: Path, capsys):
    before = _files(killed_before_results)
    assert load_script("push_to_hub").main([str(killed_before_results), "--repo_id", "alice/half"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "unfinished finetune.py run" in line and "all_results.json" in line and COMPLETE in line
    assert "same command" in line  # what to do
    assert _files(killed_before_results) == before  # no card was written


def test_model_check_names_what_an_unfinished_run_lacks(killed_before_results: Path):
    from hf_tissue_vit.modelfolder import check_model_folder

    with pytest.raises(ValueError, match=r"--model .* unfinished finetune.py run \(all_results.json, "
                                         rf"{COMPLETE} missing.*checkpoint-2"):
        check_model_folder(killed_before_results)


def test_restarted_run_removes_the_old_runs_final_files(trained_run_dir: Path, tiny_dataset_dir: Path, tmp_path):
    """--overwrite_output_dir with another seed, killed as training starts: nothing of the old run looks current."""
    from hf_tissue_vit.modelfolder import check_model_folder

    out = _copy_run(trained_run_dir, tmp_path / "run")
    (out / "NOTES.md").write_text("mine")
    killed_run("hf_tissue_vit.training.trainer", "TissueTrainer.train", "before", "finetune",
               _finetune_args(tiny_dataset_dir, out, "--overwrite_output_dir", "true", "--seed", "7"))
    assert json.loads((out / RUN_FILE).read_text())["training"]["seed"] == 7
    for name in (COMPLETE, "model.safetensors", "config.json", "all_results.json", "README.md",
                 "test_predictions.csv", "confusion_matrix.png", "trainer_state.json"):
        assert not (out / name).exists(), name
    assert not list(out.glob("checkpoint-*"))
    assert (out / "NOTES.md").read_text() == "mine"  # the user's file stays
    with pytest.raises(ValueError, match="unfinished finetune.py run.*model.safetensors"):
        check_model_folder(out, "--model")


def test_model_folder_kinds(trained_run_dir: Path, tiny_model_dir: Path, tiny_dataset_dir: Path, tmp_path,
                            monkeypatch):
    from hf_tissue_vit.modelfolder import check_model_folder

    assert check_model_folder(trained_run_dir) == "run"
    assert check_model_folder(tiny_model_dir) == "model"  # plain save_pretrained: config + safetensors
    assert check_model_folder(trained_run_dir / "checkpoint-2") == "model"
    assert check_model_folder("google/vit-base-patch16-224") == "hub"
    import torch

    pickled = tmp_path / "pickled"  # what older transformers wrote by default
    model = tiny_vit()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only as pytorch_model.bin: this package loads safetensors only"):
        check_model_folder(pickled)
    tiny_vit().config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(ValueError, match="has config.json but no weights"):
        check_model_folder(tmp_path / "config_only")
    with pytest.raises(ValueError, match="--model_path .* is a dataset folder, not a model"):
        check_model_folder(tiny_dataset_dir, "--model_path")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_model_folder(tmp_path / "nowhere")
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):  # outputs/ is here: not a Hub namespace
        check_model_folder("outputs/vit-tisue")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_model_folder(tmp_path / "file.txt")
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        check_model_folder("user/bad name!")


# =========================================================================== 4: finished and resumed runs
def test_rerun_of_a_finished_run_changes_nothing(trained_run_dir: Path, tiny_dataset_dir: Path, tmp_path, caplog):
    out = _copy_run(trained_run_dir, tmp_path / "run")
    before = _files(out)
    assert load_script("finetune").main(_finetune_args(tiny_dataset_dir, out)) == 0
    assert "already holds this run, finished" in caplog.text
    assert _files(out) == before


class Crash(BaseException):
    """A stop that no handler catches, like a kill: nothing runs after it."""


def test_resumed_run_reports_the_whole_training(trained_run_dir: Path, tiny_dataset_dir: Path, tmp_path,
                                                monkeypatch):
    """Stopped after the last checkpoint (before the results): the rerun's results cover both pieces."""
    import torch

    from hf_tissue_vit.training import run

    out = tmp_path / "run"
    main = load_script("finetune").main

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(run, "evaluate_test_split", crash)
    with pytest.raises(Crash):
        main(_finetune_args(tiny_dataset_dir, out))
    monkeypatch.undo()
    assert main(_finetune_args(tiny_dataset_dir, out)) == 0
    reference = json.loads((trained_run_dir / "all_results.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    first, second = results["train_pieces"]
    assert (first["from_step"], first["to_step"], second["from_step"], second["to_step"]) == (0, 2, 2, 2)
    assert results["train_runtime"] == pytest.approx(first["runtime"] + second["runtime"], abs=1e-3)
    assert results["train_runtime"] > second["runtime"]
    assert results["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6) and results["train_loss"] > 0
    for key in ("eval_loss", "test_accuracy", "test_loss", "test_confusion_matrix"):
        assert results[key] == reference[key], key
    from safetensors.torch import load_file

    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(trained_run_dir / "model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # no step past the schedule
    assert (out / COMPLETE).is_file()


# =========================================================================== 5, 12: checked before anything is written
@pytest.mark.parametrize(
    "case, flags, message",
    [
        ("no_weights", None, "has config.json but no weights"),
        ("train_batch_0", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be"),
        ("eval_batch_0", ["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be"),
        ("negative_lr", ["--learning_rate=-1e-3"], "--learning_rate must be a positive number"),
        ("zero_lr", ["--learning_rate", "0"], "--learning_rate must be a positive number"),
        ("zero_epochs", ["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs must be > 0"),
        ("dataset_as_model", None, "is a dataset folder, not a model"),
    ],
)
def test_bad_run_is_refused_before_the_output_dir_is_claimed(case, flags, message, tiny_dataset_dir: Path, tmp_path,
                                                             capsys):
    if case == "no_weights":
        tiny_vit().config.save_pretrained(tmp_path / "vit")
        flags = ["--model_name_or_path", str(tmp_path / "vit")]
    if case == "dataset_as_model":
        flags = ["--model_name_or_path", str(tiny_dataset_dir)]
    args = _finetune_args(tiny_dataset_dir, tmp_path / "out", *flags)
    if case in ("no_weights", "dataset_as_model"):  # fine-tuning: no scratch model flags
        args = [*args[:4], *FINETUNE_TINY[FINETUNE_TINY.index("--max_steps"):], *flags]
    assert load_script("finetune").main(args) == 2
    assert message in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_corrected_rerun_after_a_refused_run_trains(tiny_dataset_dir: Path, tmp_path, capsys):
    main = load_script("finetune").main
    out = tmp_path / "out"
    assert main(_finetune_args(tiny_dataset_dir, out, "--learning_rate=-1e-3")) == 2
    assert main(_finetune_args(tiny_dataset_dir, out, "--learning_rate", "1e-3")) == 0
    assert (out / COMPLETE).is_file()


# =========================================================================== 6: bad paths fail first, in one line
def test_finetune_output_behind_a_file_fails_before_the_data_is_read(tiny_dataset_dir: Path, tmp_path, monkeypatch,
                                                                     capsys):
    from hf_tissue_vit.training import run

    monkeypatch.setattr(run, "load_training_data", lambda *a, **k: pytest.fail("the data was read"))
    (tmp_path / "afile").write_text("x")
    assert load_script("finetune").main(_finetune_args(tiny_dataset_dir, tmp_path / "afile" / "run")) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"--output_dir {tmp_path / 'afile' / 'run'} cannot be created: {tmp_path / 'afile'} is a file" in line


def test_prepare_dataset_output_behind_a_file_fails_before_the_build(release_dir: Path, tmp_path, monkeypatch,
                                                                     capsys):
    module = load_script("prepare_dataset")
    monkeypatch.setattr(module, "build_dataset_with_report", lambda *a, **k: pytest.fail("the tiles were read"))
    (tmp_path / "afile").write_text("x")
    assert module.main(["--source", str(release_dir), "--output_dir", str(tmp_path / "afile" / "ds")]) == 2
    assert "is a file" in _one_line_error(capsys.readouterr().err)


def test_os_error_after_the_checks_is_one_line(release_dir: Path, tmp_path, monkeypatch, capsys):
    module = load_script("prepare_dataset")
    busy = str(tmp_path / "ds")

    def fail(*args, **kwargs):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), busy)

    monkeypatch.setattr(module, "save_dataset", fail)
    assert module.main(["--source", str(release_dir), "--output_dir", busy]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert busy in line and "EBUSY" in line


def test_run_main_turns_os_errors_into_one_line(capsys):
    from hf_tissue_vit.cli import run_main
    from hf_tissue_vit.hub import HubAuthError

    def read_only(argv):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/out/x.csv")

    assert run_main(read_only) == 2
    assert _one_line_error(capsys.readouterr().err).startswith("error: /data/out/x.csv: Read-only file system (EROFS)")

    def refused(argv):
        raise HubAuthError("The Hub refused the token")

    assert run_main(refused, exit_codes={HubAuthError: 1}) == 1  # still its own status, though an OSError
    assert run_main(lambda argv: 0) == 0


def test_prepare_dataset_push_with_a_refused_token_is_one_line(release_dir: Path, tmp_path, monkeypatch, capsys):
    from hf_tissue_vit.hub import HubAuthError

    module = load_script("prepare_dataset")

    def refuse(*args, **kwargs):
        raise HubAuthError("The Hub refused the token while creating lab/k6 (401: missing or invalid token).")

    monkeypatch.setattr(module, "push_dataset", refuse)
    out = tmp_path / "ds"
    assert module.main(["--source", str(release_dir), "--output_dir", str(out), "--push_to_hub",
                        "--hub_dataset_id", "lab/k6"]) == 1
    assert "401" in _one_line_error(capsys.readouterr().err)
    assert (out / "dataset_dict.json").is_file()  # saved before the push


@needs_mounts
def test_prepare_dataset_into_a_read_only_place_fails_first(release_dir: Path, tmp_path):
    (tmp_path / "ro").mkdir()
    done = in_namespace([(tmp_path / "ro", True)], [sys.executable, _script("prepare_dataset"), "--source",
                                                     str(release_dir), "--output_dir", str(tmp_path / "ro" / "ds")])
    assert done.returncode == 2
    line = _one_line_error(done.stderr)
    assert f"--output_dir {tmp_path / 'ro' / 'ds'} cannot be written" in line and "Read-only" in line


@needs_mounts
def test_prepare_dataset_onto_a_mount_point_builds_and_rebuilds(release_dir: Path, tmp_path):
    """A mount point cannot be renamed (EBUSY): the dataset is written inside it."""
    from datasets import load_from_disk

    out = tmp_path / "mnt"
    out.mkdir()
    build = [sys.executable, _script("prepare_dataset"), "--source", str(release_dir), "--output_dir", str(out)]
    for seed in ("1", "2"):
        done = in_namespace([(out, False)], [*build, "--seed", seed])
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "hf_tissue_vit_dataset.json").read_text())["seed"] == 2
    assert load_from_disk(str(out))["train"].num_rows == 36
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@needs_mounts
def test_finetune_into_a_read_only_folder_fails_first(tiny_dataset_dir: Path, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    done = in_namespace([(out, True)], [sys.executable, _script("finetune"), *_finetune_args(tiny_dataset_dir, out)])
    assert done.returncode == 2
    assert f"--output_dir {out} cannot be written" in _one_line_error(done.stderr)


@needs_mounts
def test_push_from_a_read_only_folder_fails_first(trained_run_dir: Path, tmp_path):
    out = _copy_run(trained_run_dir, tmp_path / "run")
    done = in_namespace([(out, True)], [sys.executable, _script("push_to_hub"), str(out), "--repo_id", "alice/ro"])
    assert done.returncode == 2
    assert f"output_dir {out} cannot be written" in _one_line_error(done.stderr)


# =========================================================================== 7, 8: downloads
@pytest.fixture
def file_server(release_zip: Path):
    """Loopback HTTP server: /a/kather.zip is the release zip, /b/kather.zip other bytes (same file name)."""
    payloads = {"/a/kather.zip": release_zip.read_bytes(), "/b/kather.zip": b"PK another file of the same name"}
    requests: Counter[str] = Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # the name is http.server API
            requests[self.path] += 1
            if self.path not in payloads:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payloads[self.path])))
            self.end_headers()
            self.wfile.write(payloads[self.path])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", payloads, requests
    server.shutdown()
    server.server_close()


def test_download_cache_is_keyed_by_url(file_server, tmp_path):
    from hf_tissue_vit.data import download_kather_zip

    base, payloads, requests = file_server
    cache = tmp_path / "cache"
    first = download_kather_zip(f"{base}/a/kather.zip", md5=None, cache_dir=cache)
    second = download_kather_zip(f"{base}/b/kather.zip", md5=None, cache_dir=cache)
    assert first.read_bytes() == payloads["/a/kather.zip"] and second.read_bytes() == payloads["/b/kather.zip"]
    assert first.name == second.name == "kather.zip"
    assert download_kather_zip(f"{base}/a/kather.zip", md5=None, cache_dir=cache) == first
    assert requests == {"/a/kather.zip": 1, "/b/kather.zip": 1}


def test_kather_md5_from_the_environment_in_any_case_checked_before_download(file_server, tmp_path, monkeypatch):
    from hf_tissue_vit.data import build_dataset_with_report

    base, payloads, requests = file_server
    monkeypatch.setenv("HF_TISSUE_VIT_KATHER_URL", f"{base}/a/kather.zip")
    monkeypatch.setenv("HF_TISSUE_VIT_KATHER_MD5", "not-an-md5")
    with pytest.raises(ValueError, match="HF_TISSUE_VIT_KATHER_MD5 must be an MD5 checksum of 32 hex digits"):
        build_dataset_with_report(None, cache_dir=tmp_path / "cache")
    assert sum(requests.values()) == 0
    monkeypatch.setenv("HF_TISSUE_VIT_KATHER_MD5", hashlib.md5(payloads["/a/kather.zip"]).hexdigest().upper())
    dataset, _ = build_dataset_with_report(None, cache_dir=tmp_path / "cache")
    assert dataset["train"].num_rows == 36 and requests["/a/kather.zip"] == 1


# =========================================================================== 9, 10: nothing of the user's is lost
def test_rebuild_keeps_the_users_other_files(release_dir: Path, tmp_path):
    main = load_script("prepare_dataset").main
    out = tmp_path / "ds"
    assert main(["--source", str(release_dir), "--output_dir", str(out), "--seed", "1"]) == 0
    (out / "NOTES.md").write_text("my notes")
    (out / "mine").mkdir()
    (out / "mine" / "plot.png").write_bytes(b"png")
    assert main(["--source", str(release_dir), "--output_dir", str(out), "--seed", "2"]) == 0
    assert (out / "NOTES.md").read_text() == "my notes" and (out / "mine" / "plot.png").read_bytes() == b"png"
    assert json.loads((out / "hf_tissue_vit_dataset.json").read_text())["seed"] == 2


def test_killed_build_leaves_no_temporary_after_the_next_run(release_dir: Path, tmp_path):
    out = tmp_path / "data" / "ds"
    killed_run("datasets", "DatasetDict.save_to_disk", "after", "prepare_dataset",
               ["--source", str(release_dir), "--output_dir", str(out)])
    hidden = [p for p in [*out.parent.iterdir(), *(out.iterdir() if out.is_dir() else [])] if p.name.startswith(".")]
    assert hidden  # the kill left the half-written dataset
    assert load_script("prepare_dataset").main(["--source", str(release_dir), "--output_dir", str(out)]) == 0
    assert not [p for p in [*out.parent.iterdir(), *out.iterdir()] if p.name.startswith(".")]


# =========================================================================== 11: clear words
@pytest.mark.parametrize(
    "recipe, key",
    [("learning_rate: abc\n", "learning_rate"), ("per_device_train_batch_size: 1.5\n", "per_device_train_batch_size"),
     ("from_scratch: maybe\n", "from_scratch"), ("num_train_epochs: [1, 2]\n", "num_train_epochs")],
)
def test_bad_type_in_a_recipe_names_the_recipe_key(recipe, key, tiny_dataset_dir: Path, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    assert load_script("finetune").main(["--config", str(path), *_finetune_args(tiny_dataset_dir, tmp_path / "o")]) == 2
    assert f"--config {path}: key {key}:" in _one_line_error(capsys.readouterr().err)


def test_empty_class_folder_is_called_empty(release_dir: Path, tmp_path, capsys):
    for tile in (release_dir / "03_COMPLEX").iterdir():
        tile.unlink()
    main = load_script("prepare_dataset").main
    assert main(["--source", str(release_dir), "--output_dir", str(tmp_path / "ds")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "03_COMPLEX is empty" in line and "missing" not in line
    from conftest import zip_folder

    archive = zip_folder(release_dir, tmp_path / "release.zip")  # the empty folder is an entry of the zip
    assert main(["--source", str(archive), "--output_dir", str(tmp_path / "ds")]) == 2
    assert "03_COMPLEX is empty" in _one_line_error(capsys.readouterr().err)

