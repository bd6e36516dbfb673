"""hf_tissue_vit.fileio: atomic writes with the permissions open() would give, and nothing left behind on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_tissue_vit.fileio import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    check_writable_file,
    default_mode,
    fix_permissions,
    remove_stale_temps,
    save_figure_atomic,
    temp_name,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_written_files_get_umask_permissions(tmp_path: Path, umask_022) -> None:
    from matplotlib.figure import Figure

    assert default_mode() == 0o644 and default_mode(directory=True) == 0o755
    text = atomic_write_text(tmp_path / "sub" / "README.md", "# card\n")  # parent folder created
    data = atomic_write_json(tmp_path / "results.json", {"accuracy": 0.5})
    with atomic_write(tmp_path / "grid.npy", "wb") as handle:
        np.save(handle, np.arange(3))
    figure = Figure(figsize=(1, 1))
    figure.add_subplot().plot([0, 1])
    png = save_figure_atomic(figure, tmp_path / "plot.png")
    for path in (text, data, tmp_path / "grid.npy", png):
        assert _mode(path) == 0o644, path
    assert text.read_text() == "# card\n" and json.loads(data.read_text()) == {"accuracy": 0.5}
    assert np.load(tmp_path / "grid.npy").tolist() == [0, 1, 2]
    assert png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["README.md", "grid.npy", "plot.png", "results.json", "sub"]


def test_failure_mid_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "all_results.json"
    atomic_write_json(path, {"run": 1})
    with pytest.raises(RuntimeError, match="disk gone"), atomic_write(path) as handle:
        handle.write('{"run": 2, "trunc')
        raise RuntimeError("disk gone")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"run": object()})  # not serialisable: fails halfway through the dump
    assert json.loads(path.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["all_results.json"]


def test_atomic_write_rejects_append_and_read_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"), atomic_write(tmp_path / "x.txt", "a"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_fix_permissions_opens_private_weights(tmp_path: Path, umask_022) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    os.chmod(weights, 0o600)  # what safetensors' save_file leaves behind
    (tmp_path / "config.json").write_text("{}")
    assert fix_permissions(tmp_path) == [weights]
    assert _mode(weights) == 0o644 and fix_permissions(tmp_path) == []


def test_writable_checks_name_what_is_in_the_way_and_create_nothing(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    assert check_writable_dir(tmp_path / "new" / "deeper", "--output_dir") == tmp_path / "new" / "deeper"
    assert check_writable_file(tmp_path / "new" / "out.csv", "--output") == tmp_path / "new" / "out.csv"
    with pytest.raises(ValueError, match=r"--output_dir .*afile is a file, not a folder"):
        check_writable_dir(tmp_path / "afile", "--output_dir")
    with pytest.raises(ValueError, match=r"--output_dir .*/afile/run cannot be created: .*afile is a file"):
        check_writable_dir(tmp_path / "afile" / "run", "--output_dir")
    with pytest.raises(ValueError, match=r"--output .* is a folder; give a file path"):
        check_writable_file(tmp_path, "--output")
    with pytest.raises(ValueError, match=r"--output .*/afile/x.csv cannot be created: .*afile is a file"):
        check_writable_file(tmp_path / "afile" / "x.csv", "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the checks left nothing behind


def test_unwritable_folder_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A folder the process cannot write (read-only mount, permissions): the probe file cannot be made."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=r"--output_dir .*/out cannot be written \(its nearest existing folder "
                                         r".*\): Permission denied"):
        check_writable_dir(tmp_path / "out", "--output_dir")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    stale = tmp_path / f".x-tmp-{dead}-0a1b2c3d"
    (stale / "inside").mkdir(parents=True)
    (tmp_path / f".x-tmp-{dead}-ffff0000.part").write_text("half")
    mine = tmp_path / temp_name(".x-tmp-")
    mine.mkdir()
    other = tmp_path / f".y-tmp-{dead}-0a1b2c3d"
    other.mkdir()
    assert remove_stale_temps(tmp_path, ".x-tmp-") == [stale]
    assert remove_stale_temps(tmp_path, ".x-tmp-", ".part") == [tmp_path / f".x-tmp-{dead}-ffff0000.part"]
    assert mine.is_dir() and other.is_dir()  # a running process's temporary and another prefix stay


def test_scratch_folders_are_gone_when_the_process_exits(tmp_path: Path) -> None:
    """A build's shards, the app's example tiles and an unkept Space folder must not pile up in the temp dir."""
    code = ("import sys; from hf_tissue_vit.fileio import scratch_dir; d = scratch_dir('hf_tissue_vit_test_'); "
            "(d / 'x.txt').write_text('x'); print(d); sys.stdout.flush(); assert d.is_dir()")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    folder = Path(done.stdout.strip())
    assert folder.parent == tmp_path and folder.name.startswith("hf_tissue_vit_test_")
    assert not folder.exists()
