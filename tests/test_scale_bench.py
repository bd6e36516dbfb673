"""benchmarks/nct_tiles.py and benchmarks/scale_bench.py (issue 21's 100,000-tile benchmark) at toy size, so that
the commands the results document shows cannot rot: an NCT-shaped set is written (nine class folders in the
release's proportions, no two tiles equal, a rerun keeps what is there) and measured, the caches removed."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from conftest import make_tiles

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import nct_tiles, scale_bench  # noqa: E402


@pytest.mark.slow
def test_nct_tiles_then_scale_bench_at_toy_size(tmp_path: Path) -> None:
    source = tmp_path / "kather"
    make_tiles(source, 4, size=150, fmt="png")
    tiles = tmp_path / "nct"
    assert nct_tiles.main(["--out", str(tiles), "--num_tiles", "45", "--source", str(source), "--workers", "1"]) == 0
    files = sorted(tiles.glob("*/*.png"))
    assert len(files) == 45 and {f.parent.name for f in files} == set(nct_tiles.NCT_COUNTS)
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 45  # no two equal
    before = {f: f.stat().st_mtime_ns for f in files}
    nct_tiles.main(["--out", str(tiles), "--num_tiles", "45", "--source", str(source), "--workers", "1"])
    assert {f: f.stat().st_mtime_ns for f in files} == before  # a rerun keeps the tiles

    out = tmp_path / "scale.json"
    assert scale_bench.main(["--tiles", str(tiles), "--num_tiles", "36", "--work", str(tmp_path / "work"),
                             "--out", str(out), "--max_steps", "1", "--steps", "build,train1,predict"]) == 0
    results = json.loads(out.read_text())
    assert [r["name"] for r in results["runs"]] == ["build", "finetune_1proc", "predict"]
    assert all(r["rc"] == 0 and r["processes"] and r["processes"][0]["anon_mb"] > 0 for r in results["runs"])
    assert all(r["cpu_s"] > 0 and r["cores_busy"] > 0 for r in results["runs"])
    train = results["runs"][1]
    assert train["cache_mb"] > 0 and not (tmp_path / "work" / "cache_36_1").exists()  # measured, then removed
    assert results["runs"][2]["tiles_per_s"] > 0
