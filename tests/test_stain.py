"""Stain colour (issue 26): per-tile optical-density statistics, the ``stain_stats`` training augmentation,
the re-stained test copies of benchmarks/restain.py and the study harness of benchmarks/stain_study.py
(training-only pieces: the saved model stays a plain ViT whose pipeline() output equals predict.py's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_pipeline_matches_predict, load_script, make_tiles

from hf_tissue_vit.transforms import AugmentationConfig, TileTransform
from hf_tissue_vit.transforms.augmentation import RGB_FROM_HED
from hf_tissue_vit.transforms.stain import match_od_statistics, od_statistics, random_od_statistics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import fixres, restain, stain_study  # noqa: E402

TINY = ["--model_preset", "tiny", "--image_size", "32", "--patch_size", "8", "--hidden_size", "32",
        "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "64",
        "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--use_cpu", "true",
        "--n_bootstrap", "0", "--cache_decoded", "false", "--tta", "false", "--bf16", "false"]


def _he_tiles(batch: int = 4, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Tiles mixed from the H and E stain vectors at random concentrations: H&E colours, no saturation."""
    rng = np.random.default_rng(seed)
    conc = rng.uniform(0.05, 0.6, (batch, size, size, 2))
    od = conc @ np.array(RGB_FROM_HED)[:2]
    pixels = 256 * np.exp(-od) - 1
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float()


def test_match_od_statistics_gives_each_tile_the_target_statistics():
    x = _he_tiles()
    target_mean, target_std = torch.tensor([0.36, 0.92, 0.39]), torch.tensor([0.10, 0.20, 0.08])
    moved = match_od_statistics(x.double(), target_mean, target_std)
    mean, std = od_statistics(moved)
    torch.testing.assert_close(mean, target_mean.double().expand(4, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(std, target_std.double().expand(4, 3), atol=1e-6, rtol=0)
    own_mean, own_std = od_statistics(x.double())
    same = match_od_statistics(x.double(), own_mean, own_std)  # its own statistics: the identity
    torch.testing.assert_close(same, x.double(), atol=1e-6, rtol=0)


def test_random_od_statistics_moves_within_its_range_and_follows_the_generator():
    x = _he_tiles(batch=64, seed=1)
    own_mean, own_std = od_statistics(x)
    def restained(seed: int, p: float = 1.0) -> torch.Tensor:  # the step returns log(1 + x')
        return random_od_statistics(x.clone(), 0.4, torch.Generator().manual_seed(seed), p).exp() - 1

    out, again, other = restained(3), restained(3), restained(4)
    assert torch.equal(out, again) and not torch.allclose(out, other)
    torch.testing.assert_close(restained(3, p=0.0), x, atol=1e-3, rtol=0)  # p = 0: every tile keeps its colour
    half = restained(3, p=0.5)
    kept = [torch.allclose(half[i], x[i], atol=1e-3) for i in range(len(x))]
    assert 16 < sum(kept) < 48  # about half of the 64 tiles re-stained
    mean, std = od_statistics(out)
    # log t = (1 - w) log own + w log centre + g + h: within the batch's spread plus 0.4 + 0.2
    log_mean = own_mean.log()
    low, high = log_mean.min(dim=0).values - 0.6 - 1e-6, log_mean.max(dim=0).values + 0.6 + 1e-6
    assert ((mean.log() >= low) & (mean.log() <= high)).all()
    assert not torch.allclose(mean, own_mean, atol=1e-3) and not torch.allclose(std, own_std, atol=1e-3)


def test_stain_stats_off_draws_nothing_and_on_changes_colour_only():
    tiles = torch.randint(0, 256, (6, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = TileTransform(24, [0.5] * 3, [0.5] * 3, AugmentationConfig(stain_stats=0.0))
    default = TileTransform(24, [0.5] * 3, [0.5] * 3, AugmentationConfig())
    assert torch.equal(plain(tiles, torch.Generator().manual_seed(1)), default(tiles, torch.Generator().manual_seed(1)))
    colour_only = AugmentationConfig(dihedral=False, random_resized_crop=False, stain_jitter=0, brightness=0,
                                     contrast=0, stain_stats=0.5)
    out = TileTransform(40, [0.0] * 3, [1.0] * 3, colour_only)(tiles, torch.Generator().manual_seed(1))
    assert not torch.allclose(out, tiles.permute(0, 3, 1, 2).float() / 255, atol=0.02)
    with pytest.raises(ValueError, match="stain_stats"):
        AugmentationConfig(stain_stats=3.0)
    with pytest.raises(ValueError, match="stain_stats_p"):
        AugmentationConfig(stain_stats=0.5, stain_stats_p=1.5)


def test_finetune_refuses_a_bad_stain_stats_in_one_line(tiny_dataset_dir, tmp_path, capsys):
    code = load_script("finetune").main(["--from_scratch", *TINY, "--dataset_dir", str(tiny_dataset_dir),
                                         "--output_dir", str(tmp_path / "run"), "--stain_stats", "-1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stain_stats" in err[0]
    assert not (tmp_path / "run").exists()


def test_macenko_recolours_to_the_reference_stains():
    tile = _he_tiles(batch=1, size=48, seed=2)[0].permute(1, 2, 0).round().byte().numpy()
    out = restain.macenko(tile)
    assert out.shape == tile.shape and out.dtype == np.uint8 and not np.array_equal(out, tile)
    # the output is made of the reference H and E vectors: its tissue ODs lie in their plane
    od = -np.log((out.reshape(-1, 3).astype(np.float64) + 1) / 240)
    od = od[(od > 0.15).all(axis=1)]
    stains = restain.MACENKO_STAINS
    residual = od.T - stains @ np.linalg.lstsq(stains, od.T, rcond=None)[0]
    assert np.abs(residual).max() < 0.05  # up to 8-bit rounding
    blank = np.full((20, 20, 3), 250, np.uint8)
    assert np.array_equal(restain.macenko(blank), blank)  # no tissue: unchanged


def test_restain_writes_class_folders_with_the_other_centres_statistics(tiny_dataset_dir, tmp_path, monkeypatch):
    counts = restain.write_restained(tiny_dataset_dir, tmp_path / "copies")
    assert counts == {"original": 12, "other_centre": 12, "macenko": 12}  # 2 test tiles per class
    monkeypatch.setattr(restain, "decode_dataset_image", lambda value: pytest.fail("a finished copy was decoded"))
    assert restain.write_restained(tiny_dataset_dir, tmp_path / "copies") == counts  # a rerun: nothing to do
    monkeypatch.undo()
    files = sorted((tmp_path / "copies" / "other_centre").glob("*/*.png"))
    assert len(files) == 12 and {f.parent.name for f in files} == {"Tumor", "Stroma", "Complex", "Lympho", "Debris",
                                                                   "Mucosa"}
    from PIL import Image

    x = torch.stack([torch.tensor(np.asarray(Image.open(f))).permute(2, 0, 1) for f in files]).double()
    mean, std = od_statistics(x)
    # exact before the clamp to 0..255 and the 8-bit rounding; the synthetic tiles' bright pixels saturate a little
    torch.testing.assert_close(mean.mean(0), torch.tensor(restain.OTHER_CENTRE_OD_MEAN).double(), atol=0.06, rtol=0)
    torch.testing.assert_close(std.mean(0), torch.tensor(restain.OTHER_CENTRE_OD_STD).double(), atol=0.06, rtol=0)
    with pytest.raises(SystemExit) as exc:
        restain.main(["--dataset_dir", str(tiny_dataset_dir), "--out", str(tmp_path / "x"), "--targets", "sepia"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_stain_study_trains_scores_every_copy_and_saves_a_plain_vit(tmp_path, capsys):
    source = tmp_path / "tiles"
    make_tiles(source, 12, size=48, fmt="png")
    work = tmp_path / "study"
    argv = ["--work", str(work), "--source", str(source), "--seeds", "0", "--splits", "stratified",
            "--arms", "stain_stats", "--num_train_epochs", "1", *TINY]
    assert stain_study.main(argv) == 0
    results = json.loads((work / "results.json").read_text())["runs"]
    assert [(r["arm"], r["split"]) for r in results] == [("stain_stats", "stratified")]
    for record in results:
        assert set(record["scores"]) == set(restain.TARGETS) and record["wall_s"] > 0
        assert 0 <= record["scores"]["other_centre"]["accuracy"] <= 1
    table = capsys.readouterr().out
    assert "| stratified | stain_stats | 1 |" in table
    model = work / "runs" / "stratified" / "stain_stats" / "seed0" / "model"
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and "stain_stats" not in config
    # pipeline() gives predict.py's probabilities
    from transformers import pipeline

    tiles = sorted((work / "restain" / "stratified" / "macenko").glob("*/*.png"))[:4]
    assert_pipeline_matches_predict(model, tiles, tmp_path)
    # a rerun finds every run finished and trains nothing
    before = (model / "model.safetensors").stat().st_mtime_ns
    assert stain_study.main(argv) == 0
    assert (model / "model.safetensors").stat().st_mtime_ns == before
    # FixRes: the run's model at a larger test size, scored on every copy; a plain ViT at that size
    assert fixres.main(["--work", str(work), "--sizes", "48"]) == 0
    row = json.loads((work / "fixres.json").read_text())[0]
    assert set(row["scores"]) == {"trained size", "48 px"} and set(row["scores"]["48 px"]) == set(restain.TARGETS)
    larger = model.parent / "fixres_48" / "model"
    assert json.loads((larger / "config.json").read_text())["image_size"] == 48
    assert json.loads((larger / "preprocessor_config.json").read_text())["size"] == {"height": 48, "width": 48}
    assert len(pipeline("image-classification", model=str(larger), device="cpu")(str(tiles[0]), top_k=6)) == 6
    assert "| stratified | stain_stats | 1 | 48 px |" in capsys.readouterr().out


def test_the_stain_recipe_is_the_measured_arm():
    """scripts/recipes/scratch_cpu_stain.yaml is scratch_cpu.yaml plus the flags of the study's arm that won
    (``stain_study.RECIPE_ARM``), at the study's epochs: the numbers of RESULTS.md section 11 are this recipe's."""
    import yaml

    recipes = ROOT / "scripts" / "recipes"
    base, stain = (yaml.safe_load((recipes / f"{name}.yaml").read_text())
                   for name in ("scratch_cpu", "scratch_cpu_stain"))
    flags = stain_study.ARMS[stain_study.RECIPE_ARM]
    added = {flags[i].removeprefix("--"): yaml.safe_load(flags[i + 1]) for i in range(0, len(flags), 2)}
    augmentation = set(AugmentationConfig.__dataclass_fields__)  # these go in the recipe's augmentation block
    assert {k: (stain["augmentation"] if k in augmentation else stain).pop(k) for k in added} == added
    assert stain.pop("num_train_epochs") == stain_study.DEFAULT_EPOCHS and base.pop("num_train_epochs") == 120
    stain.pop("output_dir"), base.pop("output_dir")
    assert stain == base  # nothing else differs


def test_readme_trains_with_the_stain_recipe(tiny_dataset_dir, tmp_path):
    """README's scratch_cpu_stain.yaml command, on the tiny dataset with a tiny model for one step."""
    import shlex

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("python scripts/finetune.py")
               and "scratch_cpu_stain.yaml" in ln]
    argv = shlex.split(line)[2:]
    argv[argv.index("--dataset_dir") + 1] = str(tiny_dataset_dir)
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "run")
    assert load_script("finetune").main([*argv, *TINY, "--max_steps", "1", "--eval_strategy", "no",
                                         "--save_strategy", "no", "--load_best_model_at_end", "false"]) == 0
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and "test_accuracy" in results
