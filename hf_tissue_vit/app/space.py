"""A Hugging Face Space (Gradio SDK) that runs the app on a model from the Hub.

The Space folder holds ``app.py`` (three lines around :func:`hf_tissue_vit.app.ui.create_app`, loading
the model repo by id), ``requirements.txt`` (this package with its ``[app]`` extra from the wheel uploaded
with the Space in ``wheels/``, or a ``--package`` line such as a git URL; then the torch and transformers
versions the model was trained with), ``README.md`` (the Space metadata: ``sdk: gradio``, ``sdk_version``,
``app_file``, ``models``, ``license``, ``short_description``) and ``examples/`` (test tiles with their
attribution).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard, SpaceCardData
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from .. import __version__
from ..fileio import atomic_write_text
from .examples import ATTRIBUTION, MOSAIC_NAME, Example

logger = logging.getLogger(__name__)

PACKAGE = "hf_tissue_vit"
GIT_REQUIREMENT_EXAMPLE = f"{PACKAGE}[app] @ git+https://github.com/OWNER/{PACKAGE}@v{__version__}"
WHEELS_DIR = "wheels"  # this package's wheel, uploaded with the Space (no package index has it)
# Free Spaces run on CPU: the CPU build of torch installs much faster than the default CUDA one.
CPU_TORCH_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
SPACE_FILES = ["app.py", "requirements.txt", "README.md", "examples/*", f"{WHEELS_DIR}/*.whl"]
PINNED_PACKAGES = ("torch", "transformers")  # the Space runs the model with the versions it was trained with

APP_PY = '''"""Gradio Space: the hf_tissue_vit demo app for {model_id} (written by scripts/push_space.py)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from hf_tissue_vit.app.ui import create_app, launch  # noqa: E402

MODEL = {model_id!r}
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")

demo, allowed_paths = create_app(MODEL, examples_dir=EXAMPLES if os.path.isdir(EXAMPLES) else None)

if __name__ == "__main__":
    launch(demo, allowed_paths, server_name=None)  # Spaces set GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
'''


def check_requirement(requirement: str) -> str:
    """Refuse a requirement line that does not install this package with its ``[app]`` extra."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        parsed = Requirement(requirement)
    except InvalidRequirement as err:
        raise ValueError(f"--package {requirement!r} is not a pip requirement ({err})") from err
    if parsed.name.replace("-", "_").lower() != PACKAGE or "app" not in parsed.extras:
        raise ValueError(f"--package {requirement!r} must install {PACKAGE}[app], e.g. '{GIT_REQUIREMENT_EXAMPLE}'")
    if not parsed.specifier and not parsed.url:
        raise ValueError(f"--package {requirement!r}: pin a release (=={__version__}) or give a git URL")
    return requirement


def trained_pins(versions: Mapping[str, str]) -> list[str]:
    """``torch==X`` / ``transformers==Y`` lines for the versions a model was trained with (a local build
    tag such as ``+cpu`` dropped: the CPU index serves it under the public version)."""
    return [f"{name}=={versions[name].split('+', 1)[0]}" for name in PINNED_PACKAGES if versions.get(name)]


def requirements_txt(requirement: str, cpu_torch: bool = True, pins: Sequence[str] = ()) -> str:
    """requirements.txt of the Space: this package with the [app] extra (a wheel path in the Space, or a
    ``--package`` requirement), then ``pins``."""
    lines = ["# Installed by the Space builder: hf_tissue_vit[app] (it brings gradio and the rest), with the",
             "# torch and transformers versions the model was trained with."]
    if cpu_torch:
        lines.append(CPU_TORCH_INDEX)
    lines.append(requirement if requirement.startswith(f"./{WHEELS_DIR}/") else check_requirement(requirement))
    return "\n".join(lines + list(pins)) + "\n"


def source_tree() -> Path | None:
    """The source tree this package runs from (a clone installed with ``pip install -e``), or None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").is_file() and (root / "model_card").is_dir() else None


def build_wheel(target: str | os.PathLike) -> Path:
    """Build this package's wheel into ``target`` from its source tree (a clean copy of the files the
    wheel holds, so the clone gets no build/ or egg-info); returns the wheel's path."""
    root = source_tree()
    if root is None:
        raise FileNotFoundError(f"cannot build {PACKAGE}'s wheel for the Space: no source tree (setup.py) beside "
                                f"the installed package; pass --package '{GIT_REQUIREMENT_EXAMPLE}' instead")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_tissue_vit_wheel_") as tmp:
        src = Path(tmp) / "src"
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", "templates", "images")
        shutil.copytree(root / PACKAGE, src / PACKAGE, ignore=skip)
        shutil.copytree(root / "model_card", src / "model_card", ignore=skip)
        for name in ("setup.py", "README.md"):
            shutil.copy2(root / name, src / name)
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "-w", str(Path(tmp) / "dist"), str(src)], capture_output=True, text=True)
        wheels = sorted((Path(tmp) / "dist").glob(f"{PACKAGE}-*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise ValueError(f"building {PACKAGE}'s wheel for the Space failed ({reason}); it needs setuptools "
                             f"(pip install setuptools), or pass --package '{GIT_REQUIREMENT_EXAMPLE}'")
        for old in target.glob(f"{PACKAGE}-*.whl"):
            old.unlink()  # one wheel: the requirement names it
        return Path(shutil.copy2(wheels[-1], target / wheels[-1].name))


def space_card(model_id: str, license: str | None, n_examples: int) -> SpaceCard:
    """README.md of the Space: Gradio metadata linking ``model_id``, and what the demo shows."""
    import gradio

    data = SpaceCardData(
        title=f"{model_id.split('/')[-1]} tissue classifier", sdk="gradio", sdk_version=gradio.__version__,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}", app_file="app.py",
        models=[model_id], license=license or "cc-by-4.0", tags=["histology", "pathology", "hf_tissue_vit"],
        short_description="H&E colorectal tissue tiles: classes, attention, maps", emoji="🔬",
        colorFrom="pink", colorTo="purple", pinned=False,
    )
    examples = (f"\n## Example tiles\n\nThe {n_examples} example tiles in `examples/` come from the model's "
                f"test split (the Kather 2016 tiles): {ATTRIBUTION}\n") if n_examples else ""
    body = f"""
# {data.title}

A demo of [`{model_id}`](https://huggingface.co/{model_id}), a Vision Transformer that sorts tiles of
H&E-stained colorectal tissue into tissue classes (Kather et al. 2016 data), made with `hf_tissue_vit`.

- **Tile**: upload, paste or pick an example tile: every class with its probability, the predicted
  class, the attention-rollout overlay and, on demand, the last layer's attention heads.
- **Larger image**: a tissue map of a larger H&E image, the class-area table, CSV and GeoJSON.
- **About**: the model, its test results with 95% confidence intervals, the classes and what they
  look like in H&E.

**For research and teaching only. Not a medical device: do not use it for diagnosis.**
{examples}"""
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_space(folder: str | os.PathLike, model_id: str, examples: Sequence[Example] = (),
                mosaic: str | None = None, requirement: str | None = None, license: str | None = None,
                cpu_torch: bool = True, versions: Mapping[str, str] | None = None) -> Path:
    """Write the Space's files into ``folder`` (created; files it already holds are replaced).

    ``requirement`` None: this package's wheel is built into ``folder/wheels`` and installed from there.
    ``versions`` (the model's training versions) pin torch and transformers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if requirement is None:
        wheel = build_wheel(folder / WHEELS_DIR)
        requirement = f"./{WHEELS_DIR}/{wheel.name}[app]"
    atomic_write_text(folder / "app.py", APP_PY.format(model_id=model_id))
    atomic_write_text(folder / "requirements.txt", requirements_txt(requirement, cpu_torch,
                                                                    trained_pins(versions or {})))
    atomic_write_text(folder / "README.md", str(space_card(model_id, license, len(examples))))
    target = folder / "examples"
    if examples or mosaic:
        target.mkdir(exist_ok=True)
    for example in examples:
        name = Path(example.path).name
        if example.label and not name.lower().startswith(example.label.lower() + "_"):
            name = f"{example.label}_{name}"  # the class travels in the name (see examples.example_label)
        shutil.copyfile(example.path, target / name)
    if mosaic:
        shutil.copyfile(mosaic, target / MOSAIC_NAME)
    logger.info("wrote Space files for %s into %s", model_id, folder)
    return folder


def _hub_error(err: HfHubHTTPError, repo_id: str, action: str) -> Exception:
    from ..hub import auth_error  # the package's one mapping of 401/403 to a clear HubAuthError

    return auth_error(err, repo_id, action)


def check_model_on_hub(model_id: str, token: str | None = None) -> None:
    """Raise FileNotFoundError when the Space's model is not on the Hub (push it first), ConnectionError
    naming the endpoint when the Hub does not answer."""
    from ..hub import reaching_hub

    try:
        with reaching_hub(f"looking up the model {model_id}"):
            HfApi(token=token).model_info(model_id)
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"--repo_id {model_id!r} is not on the Hub (or not visible with this token): "
                                "push the model first with scripts/push_to_hub.py") from err


def push_space(folder: str | os.PathLike, space_id: str, private: bool = False, token: str | None = None,
               commit_message: str | None = None) -> str:
    """Create (when missing) the Gradio Space ``space_id`` and upload ``folder`` to it; returns the commit URL."""
    from ..hub import reaching_hub

    api = HfApi(token=token)
    try:
        with reaching_hub(f"pushing the Space {space_id}"):
            api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            info = api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(folder),
                                     allow_patterns=SPACE_FILES,
                                     commit_message=commit_message or "Update the demo app (hf_tissue_vit)")
    except HfHubHTTPError as err:
        raise _hub_error(err, space_id, "pushing the Space") from err
    logger.info("pushed Space %s (%s)", space_id, info.commit_url)
    return info.commit_url
