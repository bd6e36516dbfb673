"""Download of the Kather release zip (Zenodo) into the HF cache, checked by MD5.

The cache is keyed by URL: ``<cache>/<sha256(url)[:16]>/<file name>``, so two URLs with the same file
name never share a download. An expected MD5 is checked on every use of a cached file.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import datasets.config
from huggingface_hub import constants as hf_constants

from .. import __version__
from ..constants import ZENODO_MD5, ZENODO_URL
from ..fileio import remove_stale_temps, temp_name

logger = logging.getLogger(__name__)

DEFAULT_DOWNLOAD_TIMEOUT = 20.0
_CHUNK = 1 << 20
_OFFLINE_HINT = (
    "To build without a download, pass a local copy of the Kather 2016 release with "
    "--source /path/to/Kather_texture_2016_image_tiles_5000 (the folder with 01_TUMOR ... 08_EMPTY) "
    "or --source /path/to/Kather_texture_2016_image_tiles_5000.zip"
)


class DownloadError(ConnectionError):
    """The Kather zip could not be fetched (offline, server error, connection cut).

    The message is the reason followed by ``hint``, how to avoid the download; the default hint
    names prepare_dataset.py's ``--source``, callers with other flags swap it with :meth:`with_hint`.
    """

    def __init__(self, reason: str, hint: str = _OFFLINE_HINT) -> None:
        super().__init__(f"{reason}. {hint}")
        self.reason, self.hint = reason, hint

    def with_hint(self, hint: str) -> DownloadError:
        """The same failure with another hint (e.g. the flags of the script that hit it)."""
        return DownloadError(self.reason, hint)


def default_cache_dir() -> Path:
    """Where the Kather zip is cached: ``$HF_HOME/hf_tissue_vit/downloads``."""
    return Path(hf_constants.HF_HOME) / "hf_tissue_vit" / "downloads"


def check_md5(md5: str | None, where: str = "--md5") -> str | None:
    """``md5`` in lower case if it is 32 hex digits (None passes); ValueError naming ``where`` otherwise."""
    if md5 is None:
        return None
    text = str(md5).strip()
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        raise ValueError(f"{where} must be an MD5 checksum of 32 hex digits, got {md5!r}")
    return text.lower()


def cached_zip_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the download of ``url`` is cached (one folder per URL, the file keeps its name)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download.zip"
    return cache / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16] / name


def md5_of_file(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _offline() -> bool:
    """The Hub's or datasets' offline mode (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``), read as they read it."""
    return bool(hf_constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def _cached(final: Path, md5: str | None) -> bool:
    """Whether ``final`` is a complete cached download; a cached file with the wrong MD5 is deleted."""
    if not final.is_file():
        return False
    if md5 is None or md5_of_file(final) == md5:
        logger.info("using cached %s", final)
        return True
    logger.warning("cached %s has the wrong MD5; downloading it again", final)
    final.unlink()
    return False


def _fetch(url: str, part: Path, timeout: float) -> tuple[str, int]:
    """Stream ``url`` into ``part``; (MD5 hex, bytes received). Any failure deletes ``part``."""
    digest = hashlib.md5()
    received, expected = 0, None
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"hf_tissue_vit/{__version__}"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length else None
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        part.unlink(missing_ok=True)
        # URLError wraps the socket error (DNS, refused); HTTPError's own text carries the status code.
        plain_url_error = isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError)
        reason = exc.reason if plain_url_error else exc
        raise DownloadError(f"could not download {url}: {type(exc).__name__}: {reason}") from exc
    if expected is not None and received != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"download of {url} stopped after {received} of {expected} bytes (connection cut); "
            "nothing was cached, run again"
        )
    return digest.hexdigest(), received


def _adopt_unkeyed(final: Path, md5: str | None) -> None:
    """A zip cached by an older version as ``<cache>/<name>`` is moved to its URL's place when it has the
    expected MD5 (without one, it cannot be told apart from another URL's file and is left alone)."""
    legacy = final.parent.parent / final.name
    if md5 is not None and not final.exists() and legacy.is_file() and md5_of_file(legacy) == md5:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(legacy, final)
        logger.info("moved the cached %s to %s", legacy, final)


def download_kather_zip(
    url: str = ZENODO_URL, md5: str | None = ZENODO_MD5, cache_dir: str | os.PathLike | None = None,
    timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
) -> Path:
    """Download ``url`` into the cache (once per URL, see :func:`cached_zip_path`), check its MD5 (any
    case), and return the zip's path.

    The bytes go to a ``.part`` file and are renamed only after the checksum matched, so a cut
    connection or a wrong file never looks like a complete download; ``.part`` files of killed
    downloads are removed. A cached zip with the right checksum is reused without any request.
    """
    md5 = check_md5(md5, "md5")
    final = cached_zip_path(url, cache_dir)
    _adopt_unkeyed(final, md5)
    if _cached(final, md5):
        return final
    if _offline():
        raise DownloadError(f"offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) forbids downloading {url}")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent, f".{final.name}.", ".part")
    part = final.parent / temp_name(f".{final.name}.", ".part")
    logger.info("downloading %s to %s", url, final)
    actual, received = _fetch(url, part, timeout)
    if md5 is not None and actual != md5:
        part.unlink(missing_ok=True)
        raise ValueError(
            f"checksum mismatch for {url}: MD5 {actual} ({received} bytes), expected {md5}; "
            "the file was deleted. Check --url/--md5, or pass a verified local copy with --source."
        )
    os.replace(part, final)
    return final


def release_location(url: str = ZENODO_URL, md5: str | None = None) -> tuple[str, str | None]:
    """(URL, MD5) to download for ``url``: for the Zenodo URL, the release's MD5 is checked.

    ``HF_TISSUE_VIT_KATHER_URL`` / ``HF_TISSUE_VIT_KATHER_MD5`` replace the Zenodo URL, so a mirror
    of the release (or a test server) can stand in for Zenodo without changing code. An MD5 is checked
    to be 32 hex digits (in any case) before anything is downloaded.
    """
    md5 = check_md5(md5)
    if url == ZENODO_URL:
        url = os.environ.get("HF_TISSUE_VIT_KATHER_URL", url)
        md5 = md5 or check_md5(os.environ.get("HF_TISSUE_VIT_KATHER_MD5") or None, "HF_TISSUE_VIT_KATHER_MD5")
    if md5 is None and url == ZENODO_URL:
        md5 = ZENODO_MD5
    return url, md5
