"""A local stand-in for the Hugging Face Hub: the HTTP calls `huggingface_hub` makes to pull and push models.

Speaks, for model repos: repo info (``/api/models/{repo}[/revision/{rev}]``: sha and siblings), tree
listing, ``resolve`` downloads (HEAD/GET with ``ETag``, ``X-Repo-Commit``, ``X-Error-Code`` on 404),
repo creation, ``preupload`` (answering ``uploadMode: "regular"``) and ``commit`` (NDJSON, file
contents base64-encoded inline), and README metadata validation. Every commit gets a new sha and moves
its branch; old commits stay downloadable. Writes, and reads of private repos, need ``Bearer <token>``.

Point the real client at it with ``HF_ENDPOINT`` (set before `huggingface_hub` is imported, as in a
fresh process: `HubServer.env`) or, in a process that already imported it, with `use_hub` (which sets
the module-level constants the library reads at call time).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

TOKEN = "hf_local_test_token"


@dataclass
class Commit:
    parent: str | None
    files: dict[str, tuple[str, int]]  # path -> (blob sha1, size)
    message: str


@dataclass
class Repo:
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


class Store:
    """Repos in memory, file contents on disk by git blob id."""

    def __init__(self, root: Path):
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path), for tests that count calls

    def create(self, repo_id: str, private: bool) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            repo = self.repos[repo_id] = Repo(private=private)
            sha = self._sha(None, {}, "initial commit")
            repo.commits[sha] = Commit(None, {}, "initial commit")
            repo.refs["main"] = sha
            return True

    def put_blob(self, data: bytes) -> tuple[str, int]:
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id, the Hub's "oid"
        path = self.blobs / blob_id
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return blob_id, len(data)

    def commit(self, repo_id: str, branch: str, message: str, added: dict[str, tuple[str, int]], deleted: list[str]) -> str | None:
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo.refs.get(branch)
            if parent is None:
                return None
            files = dict(repo.commits[parent].files)
            for path in deleted:
                prefix = path.rstrip("/") + "/"
                for name in [n for n in files if n == path or n.startswith(prefix)]:
                    del files[name]
            files.update(added)
            sha = self._sha(parent, files, message)
            repo.commits[sha] = Commit(parent, files, message)
            repo.refs[branch] = sha
            return sha

    def resolve(self, repo_id: str, revision: str) -> str | None:
        repo = self.repos[repo_id]
        if revision in repo.refs:
            return repo.refs[revision]
        return revision if revision in repo.commits else None

    @staticmethod
    def _sha(parent: str | None, files: dict, message: str) -> str:
        body = json.dumps([parent, sorted(files.items()), message, time.time_ns()])
        return hashlib.sha1(body.encode()).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # keep test output clean
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        extra = dict(headers or {}, **({"X-Error-Code": code} if code else {}), **{"X-Error-Message": message})
        self._json(status, {"error": message}, extra)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.server.token}"

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.server.store.repos.get(repo_id)
        if write and not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        self.server.store.requests.append((self.command, url.path))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if self.command == "GET" and not rest:
                return self.model_info(repo_id, "main")
            if self.command == "GET" and rest[:1] == ["revision"] and len(rest) == 2:
                return self.model_info(repo_id, rest[1])
            if self.command == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                return self.tree(repo_id, rest[1], "/".join(rest[2:]), query)
            if self.command == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
                return self.preupload(repo_id, rest[1])
            if self.command == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
                return self.commit(repo_id, rest[1], query)
        if self.command == "POST" and parts == ["api", "repos", "create"]:
            return self.create_repo()
        if self.command == "POST" and parts == ["api", "validate-yaml"]:
            return self.validate_yaml()
        if self.command == "GET" and parts == ["api", "whoami-v2"]:
            return self._json(200, {"type": "user", "name": "tester"}) if self._authorized() else self._error(401, None, "Invalid token")
        if self.command in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve_file("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        self._error(404, None, f"no route for {self.command} {url.path}")

    do_GET = do_HEAD = do_POST = lambda self: self._dispatch()  # noqa: E731

    # -- endpoints ---------------------------------------------------------------------------
    def model_info(self, repo_id: str, revision: str) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        sha = self.server.store.resolve(repo_id, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[sha].files
        self._json(200, {
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": [], "lastModified": "2025-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": path, "blobId": blob, "size": size} for path, (blob, size) in sorted(files.items())],
        })  # fmt: skip

    def tree(self, repo_id: str, revision: str, folder: str, query: dict) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        sha = self.server.store.resolve(repo_id, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path, (blob, size) in sorted(repo.commits[sha].files.items()):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :]
            if "/" in rel and not recursive:
                folders.add(prefix + rel.split("/")[0])
                continue
            for i, _ in enumerate(rel.split("/")[:-1]):
                folders.add(prefix + "/".join(rel.split("/")[: i + 1]))
            entries.append({"type": "file", "oid": blob, "size": size, "path": path})
        self._json(200, [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)] + entries)

    def resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        sha = self.server.store.resolve(repo_id, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        entry = repo.commits[sha].files.get(path)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": sha})
        blob, size = entry
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob}"', "Accept-Ranges": "bytes"}
        data = b"" if self.command == "HEAD" else (self.server.store.blobs / blob).read_bytes()
        start = _range_start(self.headers.get("Range"))
        if start and self.command == "GET" and start < size:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
            return self._send(206, data[start:], headers, "application/octet-stream")
        if self.command == "HEAD":  # Content-Length of the file, no body
            self.send_response(200)
            for key, value in dict(headers, **{"Content-Type": "application/octet-stream", "Content-Length": str(size)}).items():
                self.send_header(key, value)
            self.end_headers()
            return
        self._send(200, data, headers, "application/octet-stream")

    def create_repo(self) -> None:
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") != "model":
            return self._error(400, None, "this local Hub serves model repos only")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else f"tester/{payload['name']}"
        if not self.server.store.create(repo_id, payload.get("visibility") == "private" or bool(payload.get("private"))):
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo_id}"})
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def preupload(self, repo_id: str, revision: str) -> None:
        if (repo := self._repo(repo_id, write=True)) is None:
            return
        payload = json.loads(self._body())
        sha = self.server.store.resolve(repo_id, revision)
        existing = repo.commits[sha].files if sha else {}
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": existing.get(f["path"], (None,))[0]}
            for f in payload.get("files", [])
        ]
        self._json(200, {"files": files, "commitOid": sha})

    def commit(self, repo_id: str, revision: str, query: dict) -> None:
        if self._repo(repo_id, write=True) is None:
            return
        if query.get("create_pr"):
            return self._error(400, None, "pull requests are not supported by this local Hub")
        store, header, added, deleted = self.server.store, {}, {}, []
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, None, "file content must be base64-encoded")
                added[value["path"]] = store.put_blob(base64.b64decode(value["content"]))
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:  # lfsFile, copies: this server takes only inline ("regular") uploads
                return self._error(400, None, f"unsupported commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent and parent != store.resolve(repo_id, revision):
            return self._error(412, None, "A newer commit exists on this branch (parentCommit mismatch)")
        sha = store.commit(repo_id, revision, header.get("summary", ""), added, deleted)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}"})

    def validate_yaml(self) -> None:
        content = json.loads(self._body()).get("content", "")
        if content.startswith("---"):
            try:
                yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as err:
                return self._error(400, None, f"Invalid YAML in README.md: {err}")
        self._json(200, {"warnings": []})


def _range_start(value: str | None) -> int:
    if value and value.startswith("bytes=") and value[6:].split("-")[0].isdigit():
        return int(value[6:].split("-")[0])
    return 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    store: Store
    token: str
    url: str


class HubServer:
    """The local Hub on 127.0.0.1 (a free port), in a daemon thread; repos live under `root`."""

    def __init__(self, root: Path, token: str = TOKEN):
        self.root = Path(root)
        self.token = token
        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.store, self.httpd.token = Store(self.root / "store"), token
        self.url = self.httpd.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="local-hub", daemon=True)

    @property
    def store(self) -> Store:
        return self.httpd.store

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def env(self, cache: Path | None = None) -> dict[str, str]:
        """Environment for a fresh process using this Hub (and `cache` as its Hub cache)."""
        env = dict(os.environ, HF_ENDPOINT=self.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=self.token, HF_HUB_DISABLE_TELEMETRY="1")
        env["HF_HUB_CACHE"] = str(cache or self.root / "cache")
        env.pop("HF_HUB_OFFLINE", None)
        return env


@contextlib.contextmanager
def use_hub(server: HubServer, cache: Path) -> Iterator[None]:
    """Point this process's `huggingface_hub` at `server`: the environment plus the constants it read at import."""
    from huggingface_hub import constants, hf_api

    from transformers.utils import hub as transformers_hub

    saved_env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_HUB_DISABLE_XET", "HF_TOKEN")}
    names = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_CACHE", "HF_HUB_DISABLE_XET")
    saved = {name: getattr(constants, name) for name in names}
    saved_api, saved_tf_api = hf_api.api.endpoint, transformers_hub._hf_api
    os.environ.update(server.env(cache))
    constants.ENDPOINT = server.url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_CACHE = str(cache)
    constants.HF_HUB_DISABLE_XET = True
    hf_api.api.endpoint = server.url  # the module-level client behind `huggingface_hub.create_repo` & co.
    transformers_hub._hf_api = None  # transformers' lazily built client picks up the new endpoint
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(constants, name, value)
        hf_api.api.endpoint, transformers_hub._hf_api = saved_api, saved_tf_api
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory) -> Iterator[HubServer]:
    """A running local Hub for the session, with this process's `huggingface_hub` pointed at it."""
    root = tmp_path_factory.mktemp("local_hub")
    server = HubServer(root).start()
    with use_hub(server, root / "cache"):
        yield server
    server.stop()
