"""The demo app and its Space, as a user meets them.

* ``scripts/app.py`` is launched with the command README.md shows (tiny random ViT, synthetic tiles) and
  queried through ``gradio_client``: a tile's probabilities equal ``scripts/predict.py``'s for the same
  file; the tissue-map endpoint returns the overlay, the class areas and the CSV/GeoJSON files.
* Headless Chromium (Debian's ``chromium``, driven by Playwright) opens the page, uploads a tile, reads
  the predicted class from the page and compares it with predict.py's, then makes a tissue map.
  Where chromium or Playwright is missing the test skips locally and FAILS when ``CI=true``.
* The Space: ``scripts/push_space.py`` (README.md's command) pushes it to the Hub emulator; its
  ``app.py`` is downloaded into a fresh HF_HOME, launched against the emulator and queried once.
* ``HF_TISSUE_VIT_APP_SCREENSHOT_MODEL=OUTPUT_DIR`` (a real trained model) makes
  ``test_readme_screenshot`` write README.md's screenshot (``model_card/images/app_screenshot.png``, or
  the path in ``HF_TISSUE_VIT_APP_SCREENSHOT``) with the browser test's code.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_tissue_vit.constants import CLASS_DESCRIPTIONS, CLASS_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_emulator import start_hub

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
IN_CI = os.environ.get("CI", "").lower() == "true"
TRAIN_TILE = 48  # tiny_dataset_dir's tiles: the model's training tile size
ALICE = "hf_alice_token"
SCREENSHOT = REPO_ROOT / "model_card" / "images" / "app_screenshot.png"


def require(module: str, why: str) -> None:
    """Skip (locally) or fail (CI=true) when ``module`` cannot be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed ({why}): pip install -e '.[app]' playwright"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def require_browser() -> None:
    require("playwright", "drives the browser test")
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} not found: apt-get install -y chromium"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


# --------------------------------------------------------------------------------------------
# Helpers: the documented commands, processes, predict.py
# --------------------------------------------------------------------------------------------
def docs_command(script: str, **replace: str) -> list[str]:
    """The ``python scripts/<script>.py ...`` line of README's demo-app section, split, with text replaced."""
    section = README.read_text(encoding="utf-8").split("## 7. The demo app", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith(f"python scripts/{script}.py")]
    assert lines, f"README.md shows no `python scripts/{script}.py` command"
    text = lines[0]
    for old, new in replace.items():
        text = text.replace(old, new)
    argv = shlex.split(text)
    return [sys.executable, str(REPO_ROOT / argv[1]), *argv[2:]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_env(hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "GRADIO_"))}
    env.update(HF_HOME=str(hf_home), PYTHONPATH=str(REPO_ROOT), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@contextlib.contextmanager
def served(cmd: list[str], env: dict[str, str], cwd: Path, port: int, timeout: float = 240) -> Iterator[str]:
    """Run a Gradio app process; yield its URL once it answers; stop it (that process only) afterwards."""
    log = open(cwd / f"server_{port}.log", "w+")  # noqa: SIM115 - read back on failure
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log.read()[-5000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    break
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the app did not answer on {url}:\n{log.read()[-5000:]}")
            time.sleep(1.0)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def predict_py(model: Path, files: list[Path], env: dict[str, str], cwd: Path) -> dict[str, dict[str, float]]:
    """``scripts/predict.py`` on ``files``: file -> {class: probability, "label": predicted class}."""
    out = cwd / "predictions.csv"
    run([sys.executable, str(REPO_ROOT / "scripts" / "predict.py"), "--model", str(model), "--inputs",
         *map(str, files), "--output", str(out), "--no_progress"], env, cwd)
    with out.open(newline="") as handle:
        return {row["file"]: {**{n: float(row[n]) for n in CLASS_NAMES}, "label": row["label"]}
                for row in csv.DictReader(handle)}


# --------------------------------------------------------------------------------------------
# Fixtures: a trained-looking model, tiles to upload, the launched app
# --------------------------------------------------------------------------------------------
RESULTS = {
    "test_accuracy": 0.8333, "test_accuracy_ci95": [0.79, 0.87], "test_macro_f1": 0.8121,
    "test_macro_f1_ci95": [0.77, 0.85], "test_accuracy_tta": 0.85, "test_macro_f1_tta": 0.84,
    "label_names": CLASS_NAMES,
    "model": {"from_scratch": True, "base_model": None, "preset": "tiny", "image_size": 32, "patch_size": 8,
              "num_parameters": 30000},
}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tiny_dataset_dir: Path, tmp_path_factory) -> Path:
    """The tiny random ViT as a training output dir: results with CIs, a model card, config.mpp 0.495 and the
    dataset it was "trained" on (tiny_dataset_dir: 48 px tiles, 2 test tiles per class) in all_results.json."""
    from hf_tissue_vit.cards import write_model_card
    from hf_tissue_vit.modelfolder import mark_run_complete

    out = tmp_path_factory.mktemp("app_run") / "vit-scratch-cpu"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "mpp": 0.495}))  # finetune.py records the tiles' µm/px
    results = {**RESULTS, "dataset": {"dataset_dir": str(tiny_dataset_dir), "split_by": "stratified"}}
    (out / "all_results.json").write_text(json.dumps(results))
    (out / "hf_tissue_vit_run.json").write_text("{}")  # the mark of a finetune.py output dir
    write_model_card(out)
    mark_run_complete(out)
    return out


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, Path]:
    """Files a user uploads: synthetic tiles (PNG, TIFF, RGBA PNG, one of 150 px) and a mosaic with glass."""
    from conftest import make_tiles  # the synthetic-tile maker shared by the suite

    root = tmp_path_factory.mktemp("uploads")
    png = make_tiles(root / "png", 1, size=TRAIN_TILE, fmt="png", seed=1)
    tif = make_tiles(root / "tif", 1, size=TRAIN_TILE, fmt="tif", classes=["04_LYMPHO"], seed=2)
    big = make_tiles(root / "big", 1, size=150, fmt="png", classes=["02_STROMA"], seed=3)
    rgba_path = root / "tumor_rgba.png"
    rgba = np.asarray(Image.open(png["01_TUMOR"][0]).convert("RGBA")).copy()
    rgba[:10, :, 3] = 0  # a transparent band: composited onto white by imaging's rule
    Image.fromarray(rgba, "RGBA").save(rgba_path)
    tiles = [np.asarray(Image.open(paths[0]).convert("RGB")) for paths in png.values()]
    glass = np.full_like(tiles[0], 245)
    rows = [np.concatenate(tiles[:4], axis=1), np.concatenate([*tiles[4:], glass, glass], axis=1)]
    mosaic = root / "mosaic.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(mosaic)
    return {"tumor": png["01_TUMOR"][0], "mucosa": png["06_MUCOSA"][0], "lympho_tif": tif["04_LYMPHO"][0],
            "rgba": rgba_path, "big": big["02_STROMA"][0], "mosaic": mosaic}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app_work")


@pytest.fixture(scope="module")
def app_url(model_dir: Path, work: Path) -> Iterator[str]:
    """README.md's launch command on the tiny model, on a free port."""
    require("gradio", "the [app] extra")
    port = free_port()
    cmd = docs_command("app", **{"outputs/scratch": str(model_dir)}) + ["--port", str(port)]
    with served(cmd, client_env(work / "hf_home", HF_HUB_OFFLINE="1"), work, port) as url:
        yield url


@pytest.fixture(scope="module")
def expected(model_dir: Path, uploads: dict[str, Path], work: Path) -> dict[str, dict[str, float]]:
    """predict.py's probabilities for every upload (same environment as the app)."""
    files = [uploads[k] for k in ("tumor", "mucosa", "lympho_tif", "rgba", "big")]
    return predict_py(model_dir, files, client_env(work / "hf_home", HF_HUB_OFFLINE="1"), work)


@pytest.fixture(scope="module")
def client(app_url: str):
    require("gradio_client", "queries the app")
    from gradio_client import Client

    return Client(app_url, verbose=False)


# --------------------------------------------------------------------------------------------
# gradio_client against the launched app
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tumor", "mucosa", "lympho_tif", "rgba"])
def test_tile_probabilities_equal_predict_py(client, uploads, expected, name):
    """Every class (not the pipeline's top 5) with the probability predict.py writes for the same file."""
    from gradio_client import handle_file

    path = uploads[name]
    label, verdict, warnings, tile, overlay = client.predict(handle_file(str(path)), 0.0, api_name="/classify_tile")
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    want = expected[str(path)]
    assert sorted(got) == sorted(CLASS_NAMES)
    for cls in CLASS_NAMES:
        assert got[cls] == pytest.approx(want[cls], abs=1e-6), cls  # the CSV keeps 6 decimals
    assert label["label"] == want["label"]
    assert f"Predicted: {want['label']}" in verdict and CLASS_DESCRIPTIONS[want["label"]] in verdict
    assert warnings["visible"] is False  # a 48 px tile, like the training tiles
    with Image.open(path) as original, Image.open(tile) as shown, Image.open(overlay) as heat:
        assert shown.size == heat.size == original.size
        decoded = np.asarray(shown.convert("RGB"))
    if name == "rgba":  # the page shows the tile as the model reads it: transparency on white
        assert (decoded[:10] == 255).all()


@pytest.mark.slow
def test_tile_far_from_training_size_or_resolution_is_warned(client, uploads, expected):
    from gradio_client import handle_file

    path = uploads["big"]
    label, _, warnings, _, _ = client.predict(handle_file(str(path)), 0.0, api_name="/classify_tile")
    assert warnings["visible"] is True
    assert "150 × 150 px" in warnings["value"] and f"trained on {TRAIN_TILE} × {TRAIN_TILE} px" in warnings["value"]
    assert label["label"] == expected[str(path)]["label"]  # still classified
    _, _, warnings, _, _ = client.predict(handle_file(str(uploads["tumor"])), 0.25, api_name="/classify_tile")
    assert warnings["visible"] is True and "0.25 µm/px" in warnings["value"] and "40×" in warnings["value"]


@pytest.mark.slow
def test_last_layer_heads_on_demand(client, uploads):
    from gradio_client import handle_file

    heads = client.predict(handle_file(str(uploads["tumor"])), api_name="/attention_heads")
    assert [h["caption"] for h in heads] == [f"last layer, head {i}" for i in range(1, 5)]  # TINY_VIT: 4 heads
    with Image.open(heads[0]["image"]["path"] if isinstance(heads[0]["image"], dict) else heads[0]["image"]) as im:
        assert im.size == (TRAIN_TILE, TRAIN_TILE)


@pytest.mark.slow
def test_tile_tab_on_an_image_over_1024_px(client, uploads, tmp_path):
    """A 1200 x 1100 px upload: classified, its overlay and heads drawn at the explained size (at most
    1024 px a side), as attention_maps.py does, instead of failing on the size mismatch."""
    from gradio_client import handle_file

    with Image.open(uploads["tumor"]) as tile:
        big = tmp_path / "big_1200.png"
        tile.convert("RGB").resize((1200, 1100)).save(big)
    label, _, warnings, shown, overlay = client.predict(handle_file(str(big)), 0.0, api_name="/classify_tile")
    assert label["label"] in CLASS_NAMES and warnings["visible"] is True  # far from the training size: warned
    with Image.open(shown) as picture, Image.open(overlay) as heat:
        assert picture.size == heat.size and max(picture.size) == 1024
    heads = client.predict(handle_file(str(big)), api_name="/attention_heads")
    assert len(heads) == 4


@pytest.mark.slow
def test_tissue_map_endpoint_returns_overlay_and_fractions(client, uploads):
    """A 4 x 2 mosaic of 48 px tiles (two of them glass): 8 windows, 6 classified, 2 background."""
    from gradio_client import handle_file

    picture, legend, warnings, table, files = client.predict(
        handle_file(str(uploads["mosaic"])), TRAIN_TILE, False, 0.8, 0.0, api_name="/tissue_map")
    with Image.open(picture) as overlay:
        assert overlay.width > 100 and overlay.height > 50
    rows = {row[0]: row for row in table["data"]}
    assert table["headers"] == ["class", "windows", "% of tissue", "area (mm²)"]
    assert [r for r in rows if r in CLASS_NAMES] == CLASS_NAMES
    assert sum(rows[c][1] for c in CLASS_NAMES) == 6 and rows["Background (not classified)"][1] == 2
    assert sum(rows[c][2] for c in CLASS_NAMES) == pytest.approx(100, abs=0.5)
    # neither the PNG nor the model records a µm/px: windows of 48 image px, no areas, and a warning saying so
    assert all(row[3] in (None, "") for row in rows.values())
    assert all(name in legend for name in CLASS_NAMES) and warnings["visible"] is True
    assert "records no µm/px" in warnings["value"]
    by_name = {Path(f).name: f for f in files}
    assert sorted(by_name) == ["class_fractions.csv", "tissue_map.geojson"]
    geojson = json.loads(Path(by_name["tissue_map.geojson"]).read_text())  # scripts/tissue_map.py's: a tile each
    assert len(geojson["features"]) == 6 and {f["properties"]["objectType"] for f in geojson["features"]} == {"tile"}
    assert {f["properties"]["classification"]["name"] for f in geojson["features"]} <= set(CLASS_NAMES)
    with open(by_name["class_fractions.csv"], newline="") as handle:
        assert [row["class"] for row in csv.DictReader(handle)] == [*CLASS_NAMES, "Background", "Unreadable"]


def test_about_tab_shows_test_results_with_cis_and_the_limits(model_dir):
    from hf_tissue_vit.app.model_info import about_markdown, load_model_info

    text = about_markdown(load_model_info(str(model_dir)))
    assert "| accuracy | 0.833 | [0.790, 0.870] | 0.850 |" in text
    assert "| macro-F1 | 0.812 | [0.770, 0.850] | 0.840 |" in text
    for name in CLASS_NAMES:
        assert f"| **{name}** | {CLASS_DESCRIPTIONS[name]} |" in text
    assert "not a medical device" in text.lower() and "diagnosis" in text
    assert "resized to 32 × 32 px (bilinear)" in text and f"{TRAIN_TILE} × {TRAIN_TILE} px tiles" in text


# --------------------------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------------------------
def browse(url: str, tile: Path | None, mosaic: Path | None, screenshot: Path, example: int | None = None,
           timeout_ms: int = 180_000) -> dict[str, str]:
    """Open the app, classify a tile (upload, or click example number ``example``), read the verdict,
    screenshot the Tile tab; then, with ``mosaic``, make a tissue map on the Larger image tab."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, str] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, timeout=timeout_ms)
            page.wait_for_selector("#tile-input", timeout=timeout_ms)
            if example is not None:
                page.locator(".gallery-item").nth(example).click()
            else:
                page.set_input_files("#tile-input input[type=file]", str(tile))
            page.wait_for_selector("#tile-verdict h2", timeout=timeout_ms)
            page.wait_for_selector("#tile-rollout img", timeout=timeout_ms)
            seen["verdict"] = page.inner_text("#tile-verdict h2")
            page.wait_for_timeout(1000)  # let the images finish drawing
            page.screenshot(path=str(screenshot), full_page=True)
            if mosaic is not None:
                page.get_by_role("tab", name="Larger image").click()
                page.set_input_files("#map-input input[type=file]", str(mosaic))
                page.wait_for_selector("#map-output img", timeout=timeout_ms)
                page.wait_for_selector("#map-legend p", timeout=timeout_ms)
                seen["legend"] = page.inner_text("#map-legend")
                page.screenshot(path=str(screenshot.with_name(screenshot.stem + "_map.png")), full_page=True)
        finally:
            browser.close()
    return seen


@pytest.mark.slow
def test_browser_tile_and_tissue_map(app_url, uploads, expected, tmp_path):
    require_browser()
    shot = tmp_path / "app.png"
    seen = browse(app_url, uploads["tumor"], uploads["mosaic"], shot)
    top = re.match(r"Predicted: (\S+) \(", seen["verdict"])
    assert top and top.group(1) == expected[str(uploads["tumor"])]["label"]
    assert all(name in seen["legend"] for name in CLASS_NAMES)
    with Image.open(shot) as image:
        assert image.width >= 1000 and image.height >= 600
    assert shot.with_name("app_map.png").is_file()


@pytest.mark.slow
def test_readme_screenshot(tmp_path):
    """Writes README.md's screenshot: the app on a real trained model, an example test tile clicked."""
    model = os.environ.get("HF_TISSUE_VIT_APP_SCREENSHOT_MODEL")
    if not model:
        pytest.skip("set HF_TISSUE_VIT_APP_SCREENSHOT_MODEL=OUTPUT_DIR (a real trained model) to write the screenshot")
    require("gradio", "the [app] extra")
    require_browser()
    target = Path(os.environ.get("HF_TISSUE_VIT_APP_SCREENSHOT", SCREENSHOT))
    port = free_port()
    cmd = docs_command("app", **{"outputs/scratch": model}) + ["--port", str(port)]
    raw = tmp_path / "screenshot.png"
    with served(cmd, client_env(tmp_path / "hf_home", HF_HUB_OFFLINE="1"), tmp_path, port) as url:
        seen = browse(url, None, None, raw, example=int(os.environ.get("HF_TISSUE_VIT_APP_SCREENSHOT_EXAMPLE", "0")))
    assert seen["verdict"].startswith("Predicted: ")
    with Image.open(raw) as image:  # 256 colours keep the PNG small enough for the README
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    assert target.stat().st_size < 300_000


# --------------------------------------------------------------------------------------------
# The Space, through the Hub emulator
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_space_pushed_to_the_emulator_runs(model_dir, uploads, tmp_path):
    require("gradio", "the [app] extra")
    require("gradio_client", "queries the Space's app")
    from gradio_client import Client, handle_file
    from packaging.requirements import Requirement

    import hf_tissue_vit

    hub_url, server = start_hub()
    try:
        hub = {"HF_ENDPOINT": hub_url, "HF_HUB_DISABLE_XET": "1"}
        model = shutil.copytree(model_dir, tmp_path / "model")  # the push writes the Space link into it
        names = {"outputs/scratch": str(model), "USER/": "alice/"}
        env = client_env(tmp_path / "push_home", HF_TOKEN=ALICE, **hub)
        run(docs_command("push_to_hub", **names), env, tmp_path)
        run(docs_command("push_space", **names), env, tmp_path)
        model_card = server.state.main_files("model", "alice/vit-kather")["README.md"].decode()
        assert "(https://huggingface.co/spaces/alice/vit-kather-demo)" in model_card  # the card links the Space
        assert "alice/vit-kather-demo" in (model / "README.md").read_text()

        files = server.state.main_files("space", "alice/vit-kather-demo")
        assert server.state.repos[("space", "alice/vit-kather-demo")].sdk == "gradio"
        examples = sorted(p for p in files if p.startswith("examples/"))
        assert len(examples) == 2 * len(CLASS_NAMES) + 1 and "examples/mosaic.png" in examples  # test split: 2/class
        assert {"app.py", "requirements.txt", "README.md"} <= set(files)
        lines = [line for line in files["requirements.txt"].decode().splitlines()
                 if line and not line.startswith(("#", "--"))]
        wheel = f"wheels/hf_tissue_vit-{hf_tissue_vit.__version__}-py3-none-any.whl"
        assert lines[0] == f"./{wheel}[app]" and wheel in files  # the package comes with the Space
        assert {Requirement(line).name for line in lines[1:]} <= {"torch", "transformers"}  # the versions recorded

        # A visitor's machine: fresh HF_HOME, no token, only the emulator.
        fresh = client_env(tmp_path / "space_home", **hub)
        code = ("import json\nfrom huggingface_hub import HfApi, SpaceCard, snapshot_download\n"
                "folder = snapshot_download('alice/vit-kather-demo', repo_type='space')\n"
                "card = SpaceCard.load('alice/vit-kather-demo', repo_type='space').data.to_dict()\n"
                "linked = [s.id for s in HfApi().list_spaces(models='alice/vit-kather')]\n"
                "print(json.dumps({'folder': folder, 'card': card, 'linked': linked}))")
        got = json.loads(run([sys.executable, "-c", code], fresh, tmp_path).stdout.strip().splitlines()[-1])
        import gradio

        card = got["card"]
        assert (card["sdk"], card["sdk_version"], card["app_file"]) == ("gradio", gradio.__version__, "app.py")
        assert card["models"] == ["alice/vit-kather"] and card["license"] == "cc-by-4.0"
        assert card["short_description"] and len(card["short_description"]) <= 60
        assert got["linked"] == ["alice/vit-kather-demo"]  # the Hub links the model to its Space

        space = Path(got["folder"])
        port = free_port()
        env = dict(fresh, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
        with served([sys.executable, str(space / "app.py")], env, tmp_path, port) as url:
            example = next((space / "examples").glob("Tumor_*.png"))
            label, verdict, *_ = Client(url, verbose=False).predict(handle_file(str(example)), 0.0,
                                                                    api_name="/classify_tile")
        confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
        assert sorted(confidences) == sorted(CLASS_NAMES) and sum(confidences.values()) == pytest.approx(1, abs=1e-4)
        assert "True class of this example tile: **Tumor**" in verdict
    finally:
        server.shutdown()
        server.server_close()


def test_emulator_refuses_a_space_without_sdk():
    """The real Hub needs an SDK for a Space; so does the emulator (huggingface_hub checks first too)."""
    hub_url, server = start_hub()
    try:
        request = urllib.request.Request(f"{hub_url}/api/repos/create", method="POST",
                                         data=json.dumps({"name": "x", "type": "space"}).encode(),
                                         headers={"Authorization": f"Bearer {ALICE}",
                                                  "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 400
        assert ("space", "alice/x") not in server.state.repos
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------
# The library parts, without a server
# --------------------------------------------------------------------------------------------
def test_model_info_without_results_reads_the_card(model_dir, tmp_path):
    from hf_tissue_vit.app.model_info import about_markdown, load_model_info

    bare = tmp_path / "model"
    shutil.copytree(model_dir, bare)
    (bare / "all_results.json").unlink()
    info = load_model_info(str(bare))
    assert [(m.name, round(m.value, 4), m.ci95) for m in info.test_metrics] == [
        ("Accuracy", 0.8333, None), ("Macro F1", 0.8121, None)]
    # nothing records the training tile size: the one fallback rule (ModelFacts) gives the input size
    assert "not in the card" in about_markdown(info) and info.train_tile_px == 32
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_info(str(tmp_path))


def test_tile_warnings_size_shape_and_resolution(model_dir):
    from hf_tissue_vit.app.model_info import load_model_info, tile_warnings

    info = load_model_info(str(model_dir))
    assert tile_warnings(info, TRAIN_TILE, TRAIN_TILE) == []
    assert tile_warnings(info, 52, 46, mpp=0.55) == []  # within 1.5x and 30%, nearly square
    assert len(tile_warnings(info, 400, 400)) == 1
    assert any("not square" in w for w in tile_warnings(info, 48, 30))
    (warning,) = tile_warnings(info, 48, 48, mpp=1.0)
    assert "1 µm/px" in warning and "10×" in warning


def test_a_files_resolution_is_read_by_the_slides_rule(tmp_path):
    """The app reads a tile's µm/px with the slides' reader: TIFF centimetre tags only (DPI is no scale)."""
    from hf_tissue_vit.slides.reader import image_mpp

    pixels = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "dpi72.tif", dpi=(72, 72))  # what most software writes
    Image.fromarray(pixels).save(tmp_path / "scan.tif", tiffinfo={282: 40000.0, 283: 40000.0, 296: 3})  # px/cm
    Image.fromarray(pixels).save(tmp_path / "scan.png", dpi=(50800, 50800))
    Image.fromarray(pixels).save(tmp_path / "none.png")
    assert image_mpp(tmp_path / "dpi72.tif") is None and image_mpp(tmp_path / "none.png") is None
    assert image_mpp(tmp_path / "scan.tif") == pytest.approx(0.25)
    assert image_mpp(tmp_path / "scan.png") is None


def test_area_table_from_the_maps_fractions():
    from hf_tissue_vit.app.handlers import area_table

    classes = {"A": {"cells": 2, "fraction_of_tissue": 2 / 7, "area_mm2": 2.5e-5}, "B": {
        "cells": 5, "fraction_of_tissue": 5 / 7, "area_mm2": 6.25e-5}}
    rows = area_table({"classes": classes, "background_windows": 1, "cell_area_mm2": 1.25e-5})
    assert rows == [["A", 2, 28.6, 2.5e-5], ["B", 5, 71.4, 6.25e-5], ["Background (not classified)", 1, None, 1.25e-5]]
    unscaled = area_table({"classes": {k: {**v, "area_mm2": None} for k, v in classes.items()},
                           "background_windows": 1, "cell_area_mm2": None})
    assert [row[3] for row in unscaled] == [None, None, None]


def test_examples_come_from_the_test_split(tiny_dataset_dir, tmp_path):
    from hf_tissue_vit.app.examples import examples_from_folder, make_mosaic, pick_test_examples

    picked = pick_test_examples(tiny_dataset_dir, tmp_path / "ex", CLASS_NAMES, n_per_class=1)
    assert [e.label for e in picked] == CLASS_NAMES
    assert all(Path(e.path).name.startswith(f"{e.label}_01_") for e in picked)
    assert [e.label for e in examples_from_folder(tmp_path / "ex", CLASS_NAMES)] == sorted(CLASS_NAMES)
    with Image.open(make_mosaic(picked, tmp_path / "mosaic.png")) as mosaic:  # 6 tiles: 3 columns, 2 rows
        assert mosaic.size == (3 * TRAIN_TILE, 2 * TRAIN_TILE)


def test_space_requirement_must_pin_the_app_extra():
    from hf_tissue_vit.app.space import check_requirement, requirements_txt

    assert requirements_txt("hf_tissue_vit[app]==0.1.0").endswith("hf_tissue_vit[app]==0.1.0\n")
    assert requirements_txt("./wheels/x.whl[app]", pins=["torch==2.13.0"]).endswith("x.whl[app]\ntorch==2.13.0\n")
    check_requirement("hf_tissue_vit[app] @ git+https://github.com/o/hf_tissue_vit@v0.1.0")
    for bad in ("hf_tissue_vit==0.1.0", "hf_tissue_vit[app]", "other[app]==1", "not a requirement"):
        with pytest.raises(ValueError, match="--package"):
            check_requirement(bad)


def test_scripts_refuse_bad_input(model_dir, tmp_path, capsys):
    import runpy

    app = runpy.run_path(str(REPO_ROOT / "scripts" / "app.py"))["main"]
    assert app(["--model", str(model_dir), "--examples", str(tmp_path / "nope")]) == 2
    assert "--examples" in capsys.readouterr().err
    space = runpy.run_path(str(REPO_ROOT / "scripts" / "push_space.py"))["main"]
    assert space([str(model_dir), "--repo_id", "alice/m", "--space", "no-namespace"]) == 2
    assert "--space must look like USER/NAME" in capsys.readouterr().err
    assert space([str(tmp_path), "--repo_id", "alice/m", "--space", "alice/s"]) == 2
    assert "config.json" in capsys.readouterr().err
