"""Training's decoded-tile cache: a memory-mapped file written batch by batch, decoded once per machine and
mapped by every process of a launch; memory flat in the number of tiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from test_data_classes import PEAK_SAMPLER

REPO_ROOT = Path(__file__).resolve().parents[1]


def _noisy_dataset(path: Path, n: int, size: int = 224) -> int:
    """A saved split of ``n`` incompressible tiles; returns their decoded bytes."""
    from datasets import ClassLabel, Dataset, Features, Image, Value

    rng = np.random.default_rng(n)

    def rows():
        for i in range(n):
            yield {"image": {"bytes": _png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "path": None},
                   "label": i % 2, "filename": f"{i}.png"}

    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"]), "filename": Value("string")})
    Dataset.from_generator(rows, features=features, cache_dir=str(path.parent / "gen_cache"),
                           writer_batch_size=32).save_to_disk(str(path))
    return n * size * size * 3


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


_DECODE_PEAK = PEAK_SAMPLER + textwrap.dedent("""
    from datasets import load_from_disk
    from hf_tissue_vit.training import decode_tiles
    pixels = decode_tiles(load_from_disk(sys.argv[1]), cache=True, cache_dir=sys.argv[2])
    time.sleep(0.05)
    print(json.dumps({"peak_kb": peak[0], "shape": list(pixels.shape)}))
""")


def test_decode_cache_memory_does_not_grow_with_the_number_of_tiles(tmp_path: Path) -> None:
    n = 80  # more than a decode batch (64 tiles) in both
    small = _noisy_dataset(tmp_path / "small", n)
    added = _noisy_dataset(tmp_path / "large", 4 * n) - small
    peaks = []
    for name in ("small", "large"):
        result = subprocess.run([sys.executable, "-c", _DECODE_PEAK, str(tmp_path / name), str(tmp_path / "cache")],
                                capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks.append(json.loads(result.stdout.strip().splitlines()[-1])["peak_kb"] * 1024)
    growth = peaks[1] - peaks[0]
    # np.stack of a list of decoded tiles (the old cache) grows the peak by twice the added pixels.
    assert growth < added / 2, f"peak anonymous RSS grew by {growth / 1e6:.1f} MB for {added / 1e6:.1f} MB more pixels"
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_decode_tiles_maps_a_file_and_reuses_it(tmp_path: Path) -> None:
    from datasets import load_from_disk

    from hf_tissue_vit.training import decode_tiles

    _noisy_dataset(tmp_path / "ds", 5, size=16)
    split = load_from_disk(str(tmp_path / "ds"))
    pixels = decode_tiles(split, cache=True, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("*.npy")
    assert any(str(cached) in line for line in Path("/proc/self/maps").read_text().splitlines())
    assert torch.equal(decode_tiles(split, cache=True, cache_dir=tmp_path / "cache"), pixels)
    uncached = decode_tiles(split, cache=False, cache_dir=tmp_path / "nocache")  # mapped, its file already gone
    assert torch.equal(uncached, pixels) and not [p for p in (tmp_path / "nocache").rglob("*") if p.is_file()]


_LAUNCHED = textwrap.dedent("""
    import json, logging, os, sys
    logging.basicConfig(level=logging.INFO)
    from accelerate import PartialState
    from datasets import load_from_disk
    from hf_tissue_vit.training import decode_tiles
    state = PartialState(cpu=True)
    pixels = decode_tiles(load_from_disk(sys.argv[1]), cache=True, cache_dir=sys.argv[2])
    total = int(pixels.sum())  # every page read
    maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith(".npy")})
    state.wait_for_everyone()
    result = {"rank": state.process_index, "maps": maps, "total": total}
    with open(os.path.join(sys.argv[3], f"result-{state.process_index}.json"), "w") as handle:
        json.dump(result, handle)  # a file each: the processes' stdout lines may interleave
    state.wait_for_everyone()
    state.destroy_process_group()  # a gloo group left to interpreter teardown can abort the process
""")


def test_two_processes_of_a_launch_map_one_cache_file(tmp_path: Path) -> None:
    _noisy_dataset(tmp_path / "ds", 12, size=24)
    script = tmp_path / "launched.py"
    script.write_text(_LAUNCHED)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
         "--num_processes", "2", str(script), str(tmp_path / "ds"), str(tmp_path / "cache"), str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("result-*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1]
    (cached,) = (tmp_path / "cache").glob("*.npy")
    assert all(r["maps"] == [str(cached)] for r in results)  # both map the one file
    assert results[0]["total"] == results[1]["total"]
    assert done.stderr.count("decoded 12 tiles into") == 1  # decoded once, by the first to take the lock
