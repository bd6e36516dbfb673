"""hf_tissue_vit.fileio: atomic writes with the permissions open() would give, and nothing left behind on failure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from hf_tissue_vit.fileio import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    default_mode,
    fix_permissions,
    save_figure_atomic,
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
