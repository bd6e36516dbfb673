"""The wheel built from the repository carries what the installed package needs (card templates)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

RENDER = """
import json, pathlib, sys
import hf_tissue_vit
from hf_tissue_vit.cards import build_model_card, template_path
from hf_tissue_vit.constants import KATHER_FOLDERS
from hf_tissue_vit.data import build_dataset_with_report, save_dataset
import numpy as np
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification
out = pathlib.Path(sys.argv[1])
config = ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=12, id2label={0: "Tumor", 1: "Stroma"}, label2id={"Tumor": 0, "Stroma": 1})
ViTForImageClassification(config).save_pretrained(out)
model_card = build_model_card(out, "alice/x")
rng = np.random.default_rng(0)
for folder in list(KATHER_FOLDERS)[:6]:
    (out / "tiles" / folder).mkdir(parents=True)
    for i in range(5):
        pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(out / "tiles" / folder / f"t{i}_CRC-Prim-HE-0{i + 1}_001.png")
dataset, report = build_dataset_with_report(out / "tiles")
save_dataset(dataset, out / "dataset", report=report)
data_card = (out / "dataset" / "README.md").read_text()
print(json.dumps({"package": hf_tissue_vit.__file__, "template": str(template_path("model_card.md")),
                  "model": len(str(model_card)), "dataset": len(str(data_card))}))
"""


@pytest.mark.slow
def test_wheel_installed_non_editable_renders_cards(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = wheels.glob("hf_tissue_vit-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    # The dependencies come from this environment's site-packages as a plain path: its .pth files (and so
    # the editable install of the checkout) are not read there.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([str(python), "-c", RENDER, str(tmp_path / "model")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["package"].startswith(str(site)) and result["template"].startswith(str(site))
    assert result["model"] > 500 and result["dataset"] > 200
