"""A Hugging Face Space (Gradio SDK) that runs the app on a model from the Hub.

The Space folder holds ``app.py`` (three lines around :func:`hf_tissue_vit.app.ui.create_app`, loading
the model repo by id), ``requirements.txt`` (this package with its ``[app]`` extra, pinned to a release
or a git URL), ``README.md`` (the Space metadata: ``sdk: gradio``, ``sdk_version``, ``app_file``,
``models``, ``license``, ``short_description``) and ``examples/`` (test tiles with their attribution).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard, SpaceCardData
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from .. import __version__
from ..fileio import atomic_write_text
from .examples import ATTRIBUTION, MOSAIC_NAME, Example

logger = logging.getLogger(__name__)

PACKAGE = "hf_tissue_vit"
DEFAULT_REQUIREMENT = f"{PACKAGE}[app]=={__version__}"
# Free Spaces run on CPU: the CPU build of torch installs much faster than the default CUDA one.
CPU_TORCH_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
SPACE_FILES = ["app.py", "requirements.txt", "README.md", "examples/*"]

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
        raise ValueError(f"--package {requirement!r} must install {PACKAGE}[app], e.g. {DEFAULT_REQUIREMENT!r} "
                         f"or '{PACKAGE}[app] @ git+https://github.com/OWNER/{PACKAGE}@v{__version__}'")
    if not parsed.specifier and not parsed.url:
        raise ValueError(f"--package {requirement!r}: pin a release (=={__version__}) or give a git URL")
    return requirement


def requirements_txt(requirement: str = DEFAULT_REQUIREMENT, cpu_torch: bool = True) -> str:
    """requirements.txt of the Space: this package with the [app] extra (its dependencies follow)."""
    lines = ["# Installed by the Space builder; hf_tissue_vit[app] brings torch, transformers and gradio."]
    if cpu_torch:
        lines.append(CPU_TORCH_INDEX)
    lines.append(check_requirement(requirement))
    return "\n".join(lines) + "\n"


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
                mosaic: str | None = None, requirement: str = DEFAULT_REQUIREMENT, license: str | None = None,
                cpu_torch: bool = True) -> Path:
    """Write the Space's files into ``folder`` (created; files it already holds are replaced)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "app.py", APP_PY.format(model_id=model_id))
    atomic_write_text(folder / "requirements.txt", requirements_txt(requirement, cpu_torch))
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
    """Raise FileNotFoundError when the Space's model is not on the Hub (push it first)."""
    try:
        HfApi(token=token).model_info(model_id)
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"--repo_id {model_id!r} is not on the Hub (or not visible with this token): "
                                "push the model first with scripts/push_to_hub.py") from err


def push_space(folder: str | os.PathLike, space_id: str, private: bool = False, token: str | None = None,
               commit_message: str | None = None) -> str:
    """Create (when missing) the Gradio Space ``space_id`` and upload ``folder`` to it; returns the commit URL."""
    api = HfApi(token=token)
    try:
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(folder),
                                 allow_patterns=SPACE_FILES,
                                 commit_message=commit_message or "Update the demo app (hf_tissue_vit)")
    except HfHubHTTPError as err:
        raise _hub_error(err, space_id, "pushing the Space") from err
    logger.info("pushed Space %s (%s)", space_id, info.commit_url)
    return info.commit_url
