"""Add an evaluation to a model's card: a further model-index entry and an "Evaluation on NAME" section.

The evaluation is recorded in the model folder's :data:`~hf_tissue_vit.cards.EVALUATIONS_FILE` (an entry
of the same name is replaced) with its confusion matrix beside it, then:

- a card this package wrote (or no card) is rendered again by :func:`cards.write_model_card`, which turns
  every recorded evaluation into model-index entries and a section; the training results stay;
- a card the user wrote (e.g. by transformers' Trainer) keeps its text and metadata: the model-index
  entries are merged into its metadata (:func:`cards.merged_card_data`) and the section, rendered by the
  same template (:func:`cards.evaluation_section`), is added between two HTML comments, or replaces the
  one a previous run added.

For a Hub model the card's files (no weights) are downloaded into a local folder first, and
:func:`push_card_update` uploads the changed files as one commit, or as a pull request when the token's
user does not own the repo.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from ..cards.build import existing_card, is_package_card, write_model_card
from ..cards.model_card import EVALUATIONS_FILE, ModelCardInfo, evaluation_section, merged_card_data
from ..fileio import atomic_write, atomic_write_json, atomic_write_text
from .scoring import HEADLINE_METRICS, classes_in_play
from .sources import slug

logger = logging.getLogger(__name__)

CARD_FILES = ["README.md", "*.json", "*.png"]  # what a Hub model's card is built from (no weights)
_SECTION_START = "<!-- hf_tissue_vit evaluation: {name} -->"
_SECTION_END = "<!-- /hf_tissue_vit evaluation: {name} -->"


def confusion_file_name(name: str) -> str:
    """File name of an evaluation's confusion matrix in the model folder."""
    return f"eval_{slug(name)}_confusion_matrix.png"


def card_entry(results: dict[str, Any]) -> dict[str, Any]:
    """The EVALUATIONS_FILE entry of an evaluation's results."""
    keys = [f"{m}{s}" for m in HEADLINE_METRICS for s in ("", "_ci95", "_tta")]
    return {"name": results["name"], "dataset_name": results["dataset_name"],
            "dataset_type": results["dataset_type"], "split": results["split"], "n_scored": results["n_scored"],
            "metrics": {k: results[k] for k in keys if results.get(k) is not None},
            "per_class": classes_in_play(results), "confusion_matrix_file": confusion_file_name(results["name"]),
            "label_map_text": results.get("label_map_text") or None}


def record_evaluation(model_dir: str | Path, entry: dict[str, Any], confusion_png: str | Path) -> Path:
    """Add (or replace, by name) ``entry`` in the folder's EVALUATIONS_FILE and copy the confusion matrix."""
    model_dir = Path(model_dir)
    path = model_dir / EVALUATIONS_FILE
    current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    evaluations = [ev for ev in current.get("evaluations", []) if ev.get("name") != entry["name"]]
    with atomic_write(model_dir / entry["confusion_matrix_file"], "wb") as handle, open(confusion_png, "rb") as src:
        shutil.copyfileobj(src, handle)
    return atomic_write_json(path, {**current, "evaluations": [*evaluations, entry]})


def _with_section(text: str, name: str, section: str) -> str:
    """``text`` with the marked section of ``name`` replaced, or appended when it has none."""
    start, end = _SECTION_START.format(name=name), _SECTION_END.format(name=name)
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text.split(start, 1)[1]:
        before, rest = text.split(start, 1)
        return before + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def _update_users_card(model_dir: Path, entry: dict[str, Any]) -> Path:
    """Merge the evaluation into a card the user wrote: metadata merged, text kept, the section added."""
    path = model_dir / "README.md"
    card = ModelCard.load(path)
    existing = card.data.to_dict()
    model_name = getattr(card.data, "model_name", None) or model_dir.resolve().name
    results = ModelCardInfo(model_id=model_name, label_names=[], evaluations=[entry]).eval_results()
    card.data = merged_card_data({"model_name": model_name}, results, existing)
    card.text = _with_section(card.text, entry["name"], evaluation_section(entry))
    return atomic_write_text(path, str(card))


def update_model_card(model_dir: str | Path, results: dict[str, Any], confusion_png: str | Path,
                      repo_id: str | None = None) -> Path:
    """Record the evaluation in ``model_dir`` and update its README.md (see the module docstring)."""
    model_dir = Path(model_dir)
    entry = card_entry(results)
    record_evaluation(model_dir, entry, confusion_png)
    card = existing_card(model_dir)
    if card is not None and not is_package_card(card):
        path = _update_users_card(model_dir, entry)
    else:
        repo_id = repo_id or (card.data.model_name if card is not None else None)
        path = write_model_card(model_dir, repo_id)
    logger.info("added the evaluation %r to %s", entry["name"], path)
    return path


def card_files(results: dict[str, Any]) -> list[str]:
    """The files of the model folder that an evaluation changes (what a push uploads)."""
    return ["README.md", EVALUATIONS_FILE, confusion_file_name(results["name"])]


def download_card_folder(repo_id: str, folder: str | Path, token: str | None = None) -> Path:
    """The card's files of a Hub model (README.md, JSON files, figures; no weights) in ``folder``."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, local_dir=str(folder), allow_patterns=CARD_FILES, token=token))


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def owns_repo(repo_id: str, token: str | None = None) -> bool:
    """Whether the token's user (or one of their organisations) owns ``repo_id``; HubAuthError when the
    Hub refuses the token (checked before any image is scored)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub import AUTH_HELP, HubAuthError

    try:
        me = HfApi(token=token).whoami()
    except (HfHubHTTPError, OSError) as err:
        raise HubAuthError(f"--push needs a Hub token that the Hub accepts ({err}). {AUTH_HELP}") from err
    names = {me.get("name")} | {org.get("name") for org in me.get("orgs") or []}
    return repo_id.split("/", 1)[0] in names


def push_card_update(folder: str | Path, repo_id: str, files: list[str], name: str,
                     token: str | None = None) -> str:
    """Upload ``files`` of ``folder`` to the model repo ``repo_id`` in one commit; a pull request
    (``create_pr=True``) when the user does not own the repo or may not write to it. Returns its URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub import AUTH_HELP, HubAuthError

    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(Path(folder) / f)) for f in files]
    message = f"Add the evaluation on {name} (hf_tissue_vit)"
    create_pr = not owns_repo(repo_id, token)
    try:
        try:
            info = api.create_commit(repo_id, operations, commit_message=message, create_pr=create_pr)
        except HfHubHTTPError as err:
            if create_pr or _status(err) != 403:
                raise
            logger.info("no write access to %s: opening a pull request instead", repo_id)
            info = api.create_commit(repo_id, operations, commit_message=message, create_pr=True)
    except HfHubHTTPError as err:
        if _status(err) in (401, 403):
            raise HubAuthError(f"The Hub refused the change to {repo_id} ({_status(err)}). {AUTH_HELP}") from err
        raise
    url = info.pr_url or info.commit_url
    logger.info("pushed the card of %s: %s", repo_id, url)
    return url
