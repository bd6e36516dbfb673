"""Push a training output dir (model, processor, card, figures) or a dataset to the Hugging Face Hub.

The token is never handled here: ``huggingface_hub`` finds it in its usual places (``HF_TOKEN``,
then the ``hf auth login`` cache) unless a caller passes one explicitly. It is never logged or written.
"""

from __future__ import annotations

import importlib
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from .cards.build import write_model_card
from .cards.model_card import EVALUATIONS_FILE
from .data.card import dataset_card
from .fileio import atomic_write_json, check_writable_dir
from .modelfolder import (
    CARD_FILE,
    CONFIG_FILE,
    PROCESSOR_FILE,
    RESULTS_FILE,
    WEIGHT_FILES,
    check_model_folder,
    check_repo_id,
)

if TYPE_CHECKING:
    from datasets import DatasetDict
    from huggingface_hub import DatasetCard

logger = logging.getLogger(__name__)

# What a model repo gets: the model, its processor and config, the card and the evaluation outputs.
# Checkpoints, optimizer states, pickles (*.bin, *.pt, *.pth, *.pkl), logs and anything else stay local.
SPACE_FILE = "hf_tissue_vit_space.json"  # the demo Space of the model, linked from its card
MODEL_FILES = [WEIGHT_FILES[0], CONFIG_FILE, PROCESSOR_FILE, CARD_FILE, RESULTS_FILE, EVALUATIONS_FILE, SPACE_FILE,
               "test_predictions.csv", "trainer_state.json", "*.png"]
REQUIRED_MODEL_FILES = [WEIGHT_FILES[0], CONFIG_FILE, PROCESSOR_FILE]

AUTH_HELP = ("Set a valid write token in the HF_TOKEN environment variable or run `hf auth login` "
             "(HF_TOKEN takes precedence over the login cache).")


class HubAuthError(PermissionError):
    """The Hub refused the token (missing, invalid, or without rights on the repo)."""


def auth_error(err: HfHubHTTPError, repo_id: str, action: str) -> Exception:
    """A clearer error for 401/403 answers; other errors are returned unchanged."""
    status = err.response.status_code if err.response is not None else None
    if status == 401:
        return HubAuthError(f"The Hub refused the token while {action} {repo_id} (401: missing or invalid "
                            f"token). {AUTH_HELP}")
    if status == 403:
        return HubAuthError(f"The token has no write access to {repo_id} (403) while {action} it. "
                            f"Use a token of the repo owner with the 'write' role. {AUTH_HELP}")
    return err


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a client raises when the Hub does not answer (huggingface_hub's HTTP client, or requests')."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            errors += [getattr(importlib.import_module(module), name) for name in names]
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


@contextmanager
def reaching_hub(action: str) -> Iterator[None]:
    """Within the block (or the decorated function), a Hub that does not answer (no network, a wrong
    HF_ENDPOINT) is one ConnectionError naming the endpoint, not a client traceback; the Hub's own
    answers (HfHubHTTPError) pass through."""
    from huggingface_hub import constants

    try:
        yield
    except (HfHubHTTPError, HubAuthError):
        raise
    except _transport_errors() as err:
        raise ConnectionError(f"cannot reach the Hub at {constants.ENDPOINT} while {action} ({err}): check the "
                              "network connection (and HF_ENDPOINT, if set), then run the command again") from err


def check_hub_access(repo_id: str, flag: str = "--hub_model_id", token: str | None = None) -> str:
    """Before long work that ends in a push: the repo id is USER/NAME, a token is there, the Hub answers and
    accepts it (``whoami``), it may write, and its user (or one of their organisations) owns the namespace.
    Returns the user name; HubAuthError, ConnectionError or ValueError (one line) otherwise."""
    from huggingface_hub import get_token

    check_repo_id(repo_id, flag)
    token = token or get_token()
    if not token:
        raise HubAuthError(f"{flag} {repo_id}: no Hub token found, so nothing could be pushed. {AUTH_HELP}")
    with reaching_hub(f"checking the token for {flag} {repo_id}"):
        try:
            me = HfApi(token=token).whoami()
        except HfHubHTTPError as err:
            raise auth_error(err, f"{flag} {repo_id}", "checking the token for") from err
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubAuthError(f"{flag} {repo_id}: the token is read-only; pushing needs a 'write' token. {AUTH_HELP}")
    owners = {me.get("name")} | {org.get("name") for org in me.get("orgs") or []}
    namespace = repo_id.split("/", 1)[0]
    if namespace not in owners:
        raise HubAuthError(f"{flag} {repo_id}: the token is {me.get('name')!r}'s, who may not create repos under "
                           f"{namespace!r} (theirs: {', '.join(sorted(str(o) for o in owners))}). {AUTH_HELP}")
    return str(me.get("name"))


def _create_repo(api: HfApi, repo_id: str, repo_type: str, private: bool, revision: str | None) -> None:
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    except HfHubHTTPError as err:
        raise auth_error(err, repo_id, "creating") from err


def push_output_dir(output_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
                    commit_message: str | None = None, token: str | None = None, *,
                    license: str | None = None, base_model: str | None = None, dataset_id: str | None = None,
                    replace_user_card: bool = False) -> str:
    """Push the model files of a model folder to the model repo ``repo_id``; returns the commit URL.

    The package's model card (README.md) is rendered again first, so it names ``repo_id``; a card the
    folder's author wrote is pushed as it is unless ``replace_user_card`` (see ``write_model_card``).
    The folder is checked first (:func:`hf_tissue_vit.modelfolder.check_model_folder`: an unfinished
    finetune.py run is refused) and must be writable. Only MODEL_FILES are uploaded; pushing again
    makes a new commit on the same repo (files that did not change are skipped). ``revision`` is a
    branch, created from main when missing.
    """
    output_dir = Path(output_dir)
    check_repo_id(repo_id)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"output dir {output_dir} does not exist: pass the --output_dir of a training run")
    check_model_folder(output_dir, "output_dir")  # an unfinished run is refused, naming what is missing
    missing = [name for name in REQUIRED_MODEL_FILES if not (output_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{output_dir} lacks {', '.join(missing)}: it is not a finished training output "
                                "dir (train first, or point at the run's --output_dir)")
    check_writable_dir(output_dir, "output_dir")  # the card is rendered into it before the upload

    write_model_card(output_dir, repo_id, replace_user_card=replace_user_card, license=license,
                     base_model=base_model, dataset_id=dataset_id)

    api = HfApi(token=token)
    with reaching_hub(f"pushing to {repo_id}"):
        _create_repo(api, repo_id, "model", private, revision)
        try:
            info = api.upload_folder(
                repo_id=repo_id, folder_path=output_dir, repo_type="model", revision=revision,
                allow_patterns=MODEL_FILES,
                commit_message=commit_message or f"Upload {output_dir.name} with hf_tissue_vit",
            )
        except HfHubHTTPError as err:
            raise auth_error(err, repo_id, "uploading to") from err
    logger.info("pushed %s to %s (%s)", output_dir, repo_id, info.commit_url)
    return info.commit_url


def push_dataset(dataset_dict: DatasetDict, repo_id: str, private: bool = False,
                 card: DatasetCard | str | None = None, token: str | None = None,
                 commit_message: str | None = None, *, metadata: dict[str, Any] | None = None) -> str:
    """Push a DatasetDict (parquet shards) and its dataset card to the dataset repo ``repo_id``.

    ``card``: the card, or None to render it from ``metadata`` (a saved dataset's
    :func:`~hf_tissue_vit.data.storage.read_dataset_metadata`; no card when both are None). The card
    goes first, so ``DatasetDict.push_to_hub`` then merges its ``dataset_info``/``configs`` metadata
    into it and keeps the body. Returns the URL of the last commit.
    """
    check_repo_id(repo_id)
    if card is None and metadata is not None:
        card = dataset_card({**metadata, "hub_dataset_id": repo_id})
    api = HfApi(token=token)
    with reaching_hub(f"pushing to {repo_id}"):
        return _push_dataset(api, dataset_dict, repo_id, private, card, token, commit_message)


def _push_dataset(api: HfApi, dataset_dict: DatasetDict, repo_id: str, private: bool,
                  card: DatasetCard | str | None, token: str | None, commit_message: str | None) -> str:
    _create_repo(api, repo_id, "dataset", private, None)
    try:
        if card is not None:
            api.upload_file(path_or_fileobj=str(card).encode("utf-8"), path_in_repo="README.md",
                            repo_id=repo_id, repo_type="dataset", commit_message="Add dataset card")
        info = dataset_dict.push_to_hub(repo_id, private=private, token=token,
                                        commit_message=commit_message or "Upload dataset with hf_tissue_vit")
    except HfHubHTTPError as err:
        raise auth_error(err, repo_id, "uploading to") from err
    logger.info("pushed dataset to %s (%s)", repo_id, info.commit_url)
    return info.commit_url


def link_space(output_dir: str | Path, repo_id: str, space_id: str, token: str | None = None) -> str | None:
    """Record the demo Space in the model folder, re-render its card (which then links the Space) and
    upload both to the model repo ``repo_id``; returns the commit URL (None when the folder's card is
    the user's own, which is left as it is)."""
    output_dir = Path(output_dir)
    atomic_write_json(output_dir / SPACE_FILE, {"space_id": check_repo_id(space_id, "--space")})
    card = write_model_card(output_dir, repo_id, space_id=space_id)
    if card is None:
        return None
    api = HfApi(token=token)
    try:
        with reaching_hub(f"linking the Space on {repo_id}"):
            info = api.upload_folder(repo_id=repo_id, folder_path=output_dir, repo_type="model",
                                     allow_patterns=["README.md", SPACE_FILE],
                                     commit_message=f"Link the demo Space {space_id}")
    except HfHubHTTPError as err:
        raise auth_error(err, repo_id, "linking the Space on") from err
    logger.info("the card of %s links the Space %s (%s)", repo_id, space_id, info.commit_url)
    return info.commit_url
