"""A small in-memory Hugging Face Hub emulator for offline tests (stdlib only).

It speaks the parts of the Hub HTTP API that ``huggingface_hub`` 2.x (with
``HF_HUB_DISABLE_XET=1``), ``transformers`` 5.x and ``datasets`` 5.x use to push and
pull models, datasets and Spaces:

* ``GET  /api/whoami-v2``
* ``POST /api/validate-yaml``
* ``POST /api/repos/create``                      (409 when the repo exists, ``visibility`` private/public;
  a Space needs ``sdk``: gradio, streamlit, docker or static, else 400)
* ``GET  /api/{models,datasets,spaces}``           (``?author=``, ``?search=``, ``?models=``: the Spaces whose
  README lists that model, as the Hub links them)
* ``GET  /api/{models,datasets,spaces}/NS/NAME[/revision/REV]``   (``?blobs=1`` adds sizes and LFS info;
  a Space also reports its ``sdk``, ``cardData``, ``models`` and a ``runtime``)
* ``GET  /api/{t}s/NS/NAME/tree/REV[/PATH]``       (``?recursive=1``, ``?expand=1``)
* ``POST /api/{t}s/NS/NAME/paths-info/REV``        (form data ``paths=...``)
* ``POST /api/{t}s/NS/NAME/preupload/REV``         (``lfs`` for binary/large files, else ``regular``)
* ``POST /[datasets/]NS/NAME.git/info/lfs/objects/batch`` + ``PUT /__lfs/OID`` (basic transfer)
* ``POST /api/{t}s/NS/NAME/commit/REV``            (NDJSON: header, file, lfsFile, deletedFile, deletedFolder;
  ``parentCommit`` checked, 412 when stale; ``?create_pr=1`` opens a pull request, see below)
* ``GET  /api/{t}s/NS/NAME/commits/REV``, ``GET /api/{t}s/NS/NAME/refs``
* ``POST /api/{t}s/NS/NAME/branch/BRANCH``         (``startingPoint``; 409 when it exists)
* ``HEAD/GET /[datasets/]NS/NAME/resolve/REV/PATH`` (ETag, X-Repo-Commit, Content-Length, Range)

Errors carry the headers the client maps to exceptions: ``X-Error-Code: RepoNotFound``,
``RevisionNotFound`` or ``EntryNotFound``; an unknown token gets 401 with
``X-Error-Message: Invalid credentials in Authorization header`` (as on the real Hub); a private
repo is invisible (401 anonymous, 404 for another user); writing to someone else's repo is 403.

Pull requests (``create_commit(..., create_pr=True)``): any signed-in user who can see the repo may open
one (preupload and LFS upload included, as on the Hub); it is the branch ``refs/pr/N`` made from the
target's head, holding the commit; the answer's ``pullRequestUrl`` ends in ``/discussions/N``; ``refs``
lists it under ``pullRequests`` with ``?include_prs=1``, and ``resolve/refs%2Fpr%2FN/...`` reads it.

Use ``start_hub()`` to run it on a free loopback port in a background thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USERS = {"hf_alice_token": "alice", "hf_bob_token": "bob"}
# Files the real Hub stores in LFS by .gitattributes, whatever their size.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".parquet", ".arrow", ".png", ".jpg", ".tif", ".tiff",
                ".h5", ".msgpack", ".onnx", ".pkl", ".zip", ".gz")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
SPACE_SDKS = ("gradio", "streamlit", "docker", "static")
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)
INVALID_TOKEN = "Invalid credentials in Authorization header"


def git_blob_sha1(content: bytes) -> str:
    """Git object id of a blob (what the Hub reports as ``oid`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class StoredFile:
    content: bytes
    lfs_sha256: str | None = None  # set when committed as an LFS pointer

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.lfs_sha256}\nsize {self.size}\n".encode()

    @property
    def oid(self) -> str:
        return git_blob_sha1(self.pointer if self.lfs_sha256 else self.content)

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or self.oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    owner: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    sdk: str | None = None  # Spaces only

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            return self.commits.get(revision)
        return None

    def history(self, sha: str) -> list[Commit]:
        out = []
        commit: Commit | None = self.commits[sha]
        while commit is not None:
            out.append(commit)
            commit = self.commits[commit.parent] if commit.parent else None
        return out


class HubState:
    """Everything the emulator knows; tests may read it (under ``lock``)."""

    def __init__(self, users: dict[str, str] | None = None):
        self.users = dict(users or DEFAULT_USERS)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) for debugging

    def new_commit(self, repo: Repo, branch: str, files: dict[str, StoredFile], title: str, message: str,
                   author: str) -> Commit:
        parent = repo.branches.get(branch)
        sha = hashlib.sha1(f"{repo.repo_id}{parent}{title}{uuid.uuid4()}".encode()).hexdigest()
        commit = Commit(sha, parent, title, message, author, _now(), files)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    def main_files(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Contents of the files at ``revision`` (a helper for tests)."""
        with self.lock:
            commit = self.repos[(repo_type, repo_id)].resolve(revision)
            return {path: f.content for path, f in commit.files.items()}


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, header_message: bool = False):
        super().__init__(message)
        self.status, self.message, self.code, self.header_message = status, message, code, header_message


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # ----------------------------------------------------------------- plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        with self.state.lock:
            self.state.requests.append((self.command, self.path, status))

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        try:
            body = self._read_body() if self.command in ("POST", "PUT") else b""
            self._route(body)
        except HubError as e:
            headers = {"X-Error-Message" if e.header_message else "X-Error-Info": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message}, e.status, headers)
        except Exception as e:  # a bug in the emulator: report it instead of hanging the client
            self._json({"error": f"emulator error: {e!r}"}, 500)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    # ----------------------------------------------------------------- auth
    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.state.users.get(token)
        if user is None:
            raise HubError(401, INVALID_TOKEN, header_message=True)
        return user

    def _repo(self, repo_type: str, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        if write and user != repo.owner:
            if user is None:
                raise HubError(401, "You must be authenticated to write to this repository", "RepoNotFound")
            raise HubError(403, f"You don't have the rights to write to {repo_type}s/{repo_id}", header_message=True)
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ----------------------------------------------------------------- routing
    def _route(self, body: bytes) -> None:
        parts = urlsplit(self.path)
        raw = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        segs = [unquote(s) for s in raw.strip("/").split("/")]
        user = self._user()
        method = self.command
        with self.state.lock:
            if raw == "/api/whoami-v2" and method == "GET":
                if user is None:
                    raise HubError(401, "Invalid username or password.", header_message=True)
                return self._json({"type": "user", "name": user, "fullname": user.title(), "orgs": [],
                                   "auth": {"type": "access_token",
                                            "accessToken": {"displayName": "test", "role": "write"}}})
            if raw == "/api/validate-yaml" and method == "POST":
                return self._validate_yaml(json.loads(body or b"{}"))
            if raw == "/api/repos/create" and method == "POST":
                return self._create_repo(json.loads(body or b"{}"), user)
            if method == "PUT" and len(segs) == 2 and segs[0] == "__lfs":
                return self._lfs_put(segs[1], body)
            if segs[0] == "api" and len(segs) == 2 and segs[1] in ("models", "datasets", "spaces") \
                    and method == "GET":
                return self._list_repos(segs[1][:-1], query, user)
            if segs[0] == "api" and len(segs) >= 4 and segs[1] in ("models", "datasets", "spaces"):
                return self._api_repo(segs[1][:-1], segs[2:], query, body, user)
            if raw.endswith(".git/info/lfs/objects/batch") and method == "POST":
                return self._lfs_batch(segs, json.loads(body), user)
            if "resolve" in segs and method in ("GET", "HEAD"):
                return self._resolve(segs, user)
        raise HubError(404, f"emulator: no route for {method} {raw}")

    def _api_repo(self, repo_type: str, rest: list[str], query: dict, body: bytes, user: str | None) -> None:
        repo_id, rest = "/".join(rest[:2]), rest[2:]
        method = self.command
        if not rest and method == "GET":
            return self._repo_info(self._repo(repo_type, repo_id, user), "main", query)
        action, args = rest[0], rest[1:]
        if action == "revision" and method == "GET":
            return self._repo_info(self._repo(repo_type, repo_id, user), "/".join(args), query)
        if action == "tree" and method == "GET":
            return self._tree(self._repo(repo_type, repo_id, user), args[0], "/".join(args[1:]), query)
        if action == "paths-info" and method == "POST":
            return self._paths_info(self._repo(repo_type, repo_id, user), args[0], body)
        if action == "preupload" and method == "POST":
            return self._preupload(self._repo(repo_type, repo_id, user, write=not self._pr(query, user)), args[0],
                                   json.loads(body))
        if action == "commit" and method == "POST":
            return self._create_commit(self._repo(repo_type, repo_id, user, write=not self._pr(query, user)),
                                       args[0], body, query, user)
        if action == "commits" and method == "GET":
            return self._list_commits(self._repo(repo_type, repo_id, user), args[0] if args else "main")
        if action == "refs" and method == "GET":
            return self._refs(self._repo(repo_type, repo_id, user), query)
        if action == "branch" and method == "POST":
            return self._create_branch(self._repo(repo_type, repo_id, user, write=True), "/".join(args),
                                       json.loads(body or b"{}"))
        raise HubError(404, f"emulator: no route for {method} {self.path}")

    # ----------------------------------------------------------------- endpoints
    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        if match:
            try:
                import yaml  # PyYAML ships with huggingface_hub's dependencies

                meta = yaml.safe_load(match.group(1))
                if meta is not None and not isinstance(meta, dict):
                    raise ValueError("metadata must be a mapping")
            except Exception as e:
                return self._json({"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []}, 400)
        return self._json({"errors": [], "warnings": []})

    def _create_repo(self, payload: dict, user: str | None) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository", header_message=True)
        owner = payload.get("organization") or user
        if owner != user:
            raise HubError(403, f"You don't have the rights to create a repository under '{owner}'",
                           header_message=True)
        repo_type = payload.get("type") or "model"
        repo_id = f"{owner}/{payload['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.base_url}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.state.repos:
            return self._json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        sdk = payload.get("sdk") if repo_type == "space" else None
        if repo_type == "space" and sdk not in SPACE_SDKS:
            raise HubError(400, f"Invalid sdk {sdk!r} for a Space: choose one of {list(SPACE_SDKS)}",
                           header_message=True)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_type, repo_id, owner, private, _now(), sdk=sdk)
        self.state.repos[(repo_type, repo_id)] = repo
        self.state.new_commit(repo, "main", {".gitattributes": StoredFile(GITATTRIBUTES)}, "initial commit", "",
                              user)
        return self._json({"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    @staticmethod
    def _card_data(commit: Commit) -> dict[str, Any]:
        """The YAML metadata of the README at ``commit`` ({} when there is none or it does not parse)."""
        readme = commit.files.get("README.md")
        text = readme.content.decode("utf-8", "replace") if readme else ""
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
        if not match:
            return {}
        try:
            import yaml

            meta = yaml.safe_load(match.group(1))
        except Exception:
            return {}
        return meta if isinstance(meta, dict) else {}

    def _space_fields(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        card = self._card_data(commit)
        models = card.get("models") or []
        return {"sdk": repo.sdk, "cardData": card, "models": models if isinstance(models, list) else [models],
                "subdomain": repo.repo_id.replace("/", "-").lower(),
                "runtime": {"stage": "RUNNING", "hardware": {"current": "cpu-basic", "requested": "cpu-basic"},
                            "storage": None, "gcTimeout": None, "replicas": {"current": 1, "requested": 1}}}

    def _list_repos(self, repo_type: str, query: dict, user: str | None) -> None:
        """``GET /api/{type}s``: repos visible to ``user``, filtered by author, search text and linked model."""
        out = []
        for (kind, repo_id), repo in sorted(self.state.repos.items()):
            if kind != repo_type or (repo.private and user != repo.owner):
                continue
            if query.get("author") and repo.owner != query["author"]:
                continue
            if query.get("search") and query["search"].lower() not in repo_id.lower():
                continue
            commit = repo.commits[repo.branches["main"]]
            extra = self._space_fields(repo, commit) if repo_type == "space" else {}
            if query.get("models") and query["models"] not in extra.get("models", []):
                continue
            out.append({"_id": repo_id, "id": repo_id, "author": repo.owner, "sha": commit.sha,
                        "private": repo.private, "likes": 0, "tags": [], "createdAt": repo.created_at,
                        "lastModified": commit.date, **extra})
        self._json(out)

    def _repo_info(self, repo: Repo, revision: str, query: dict) -> None:
        commit = self._commit(repo, revision)
        blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, f in sorted(commit.files.items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=f.size, blobId=f.oid)
                if f.lfs_sha256:
                    sib["lfs"] = {"size": f.size, "sha256": f.lfs_sha256, "pointerSize": len(f.pointer)}
            siblings.append(sib)
        self._json({"_id": repo.repo_id, "id": repo.repo_id, "author": repo.owner, "sha": commit.sha,
                    "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                    "tags": [], "createdAt": repo.created_at, "lastModified": commit.date,
                    "siblings": siblings, **(self._space_fields(repo, commit) if repo.repo_type == "space" else {})})

    def _entry(self, path: str, f: StoredFile | None, commit: Commit, expand: bool) -> dict:
        if f is None:
            entry: dict[str, Any] = {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(),
                                     "size": 0, "path": path}
        else:
            entry = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
            if f.lfs_sha256:
                entry["lfs"] = {"oid": f.lfs_sha256, "size": f.size, "pointerSize": len(f.pointer)}
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
        return entry

    @staticmethod
    def _dirs(commit: Commit) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)}

    def _tree(self, repo: Repo, revision: str, path: str, query: dict) -> None:
        commit = self._commit(repo, revision)
        path = path.strip("/")
        recursive = query.get("recursive", "").lower() in ("1", "true")
        expand = query.get("expand", "").lower() in ("1", "true")
        dirs = self._dirs(commit)
        if path and path not in dirs:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        prefix = f"{path}/" if path else ""
        entries = []
        for name in sorted(dirs | set(commit.files)):
            if not name.startswith(prefix) or name == path:
                continue
            if not recursive and "/" in name[len(prefix):]:
                continue
            entries.append(self._entry(name, commit.files.get(name), commit, expand))
        entries.sort(key=lambda e: (e["type"] != "directory", e["path"]))
        self._json(entries)

    def _paths_info(self, repo: Repo, revision: str, body: bytes) -> None:
        commit = self._commit(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            payload = json.loads(body)
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[-1].lower() in ("1", "true")
        dirs = self._dirs(commit)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(self._entry(p, commit.files[p], commit, expand))
            elif p in dirs:
                out.append(self._entry(p, None, commit, expand))
        self._json(out)

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> None:
        commit = repo.resolve(revision)  # a new branch may not exist yet: compare against nothing then
        files = []
        for item in payload.get("files", []):
            path = item["path"]
            sample = base64.b64decode(item.get("sample", ""))
            lfs = (item.get("size", 0) >= LFS_SIZE_THRESHOLD or path.lower().endswith(LFS_SUFFIXES)
                   or b"\0" in sample)
            existing = commit.files.get(path) if commit else None
            oid = None
            if existing is not None:
                oid = existing.lfs_sha256 if existing.lfs_sha256 else git_blob_sha1(existing.content)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json({"files": files, "commitOid": commit.sha if commit else None})

    def _lfs_batch(self, segs: list[str], payload: dict, user: str | None) -> None:
        if segs[0] in ("datasets", "spaces"):
            repo_type, ns, name = segs[0][:-1], segs[1], segs[2]
        else:
            repo_type, ns, name = "model", segs[0], segs[1]
        # an upload for a pull request names no ref (huggingface_hub); any signed-in reader may make it
        self._repo(repo_type, f"{ns}/{name.removesuffix('.git')}", user, write="ref" in payload or user is None)
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.base_url}/__lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"content does not match sha256 {oid}")
        self.state.lfs_objects[oid] = body
        self._send(200, b"")

    def _create_commit(self, repo: Repo, revision: str, body: bytes, query: dict, user: str) -> None:
        pr_number = None
        if self._pr(query, user):
            revision, pr_number = self._open_pull_request(repo, revision)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "commit header with a summary is required")
        head = repo.branches[revision]
        parent = header.get("parentCommit")
        if parent and not head.startswith(parent):
            raise HubError(412, f"A commit has happened since {parent}: {revision} is now at {head}",
                           header_message=True)
        files = dict(repo.commits[head].files)
        for item in lines:
            key, value = item["key"], item["value"]
            path = value.get("path", "").strip("/") if isinstance(value, dict) else ""
            if key == "file":
                content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                    value["content"].encode()
                files[path] = StoredFile(content)
            elif key == "lfsFile":
                content = self.state.lfs_objects.get(value["oid"])
                if content is None:
                    raise HubError(422, f"LFS object {value['oid']} for {path} was not uploaded")
                files[path] = StoredFile(content, lfs_sha256=value["oid"])
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(path + "/")}
            elif key != "header":
                raise HubError(400, f"emulator: unsupported commit operation {key}")
        commit = self.state.new_commit(repo, revision, files, header["summary"], header.get("description", ""),
                                       user)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        pr_url = f"{self.base_url}/{prefix}{repo.repo_id}/discussions/{pr_number}" if pr_number else None
        self._json({"success": True, "commitOid": commit.sha, "pullRequestUrl": pr_url,
                    "commitUrl": f"{self.base_url}/{prefix}{repo.repo_id}/commit/{commit.sha}"})

    def _list_commits(self, repo: Repo, revision: str) -> None:
        commit = self._commit(repo, revision)
        self._json([{"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                     "authors": [{"user": c.author}]} for c in repo.history(commit.sha)])

    def _refs(self, repo: Repo, query: dict | None = None) -> None:
        def refs(prs: bool) -> list[dict]:
            return [{"name": b, "ref": b if prs else f"refs/heads/{b}", "targetCommit": sha}
                    for b, sha in repo.branches.items() if b.startswith("refs/pr/") == prs]

        out = {"branches": refs(False), "tags": [], "converts": []}
        if (query or {}).get("include_prs", "").lower() in ("1", "true"):
            out["pullRequests"] = refs(True)
        self._json(out)

    # ----------------------------------------------------------------- pull requests
    @staticmethod
    def _pr(query: dict, user: str | None) -> bool:
        """True for a pull-request upload (``?create_pr=1``); it needs a signed-in user."""
        if not query.get("create_pr"):
            return False
        if user is None:
            raise HubError(401, "You must be authenticated to open a pull request", header_message=True)
        return True

    def _open_pull_request(self, repo: Repo, revision: str) -> tuple[str, int]:
        """A new branch ``refs/pr/N`` at the head of ``revision``; returns (branch, N)."""
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        number = 1 + sum(b.startswith("refs/pr/") for b in repo.branches)
        branch = f"refs/pr/{number}"
        repo.branches[branch] = repo.branches[revision]
        return branch, number

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> None:
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: {branch}", header_message=True)
        start = self._commit(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        self._json({})

    def _resolve(self, segs: list[str], user: str | None) -> None:
        i = segs.index("resolve")
        head = segs[:i]
        repo_type = head[0][:-1] if head and head[0] in ("datasets", "spaces") else "model"
        repo_id = "/".join(head[1:] if repo_type != "model" else head)
        repo = self._repo(repo_type, repo_id, user)
        commit = self._commit(repo, segs[i + 1])
        path = "/".join(segs[i + 2:])
        f = commit.files.get(path)
        if f is None:
            return self._entry_not_found(commit, path)
        headers = {"ETag": f'"{f.etag}"', "X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        content, status = f.content, 200
        range_header = self.headers.get("Range")
        if range_header:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if not m:
                raise HubError(416, f"bad range {range_header}")
            start_s, end_s = m.groups()
            if start_s:
                start, end = int(start_s), int(end_s) if end_s else f.size - 1
            else:  # suffix range: the last N bytes
                start, end = max(f.size - int(end_s), 0), f.size - 1
            end = min(end, f.size - 1)
            if start >= f.size and f.size:
                raise HubError(416, f"range {range_header} outside a file of {f.size} bytes")
            content, status = f.content[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        self._send(status, content, headers, content_type="application/octet-stream")

    def _entry_not_found(self, commit: Commit, path: str) -> None:
        self._send(404, json.dumps({"error": "Entry not found"}).encode(),
                   {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                    "X-Repo-Commit": commit.sha})


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


def start_hub(tmp_path: str | Path | None = None, users: dict[str, str] | None = None) -> tuple[str, HubServer]:
    """Start the emulator on a free loopback port in a daemon thread; returns ``(url, server)``.

    Storage is in memory (``tmp_path`` is accepted for symmetry with other fixtures and unused).
    Stop it with ``server.shutdown(); server.server_close()``.
    """
    server = HubServer(("127.0.0.1", 0), HubHandler)
    server.state = HubState(users)
    thread = threading.Thread(target=server.serve_forever, name="hub-emulator", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}", server


if __name__ == "__main__":  # manual use: python tests/hub_emulator.py
    url, srv = start_hub()
    print(f"Hub emulator at {url}; tokens: {DEFAULT_USERS}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.shutdown()
