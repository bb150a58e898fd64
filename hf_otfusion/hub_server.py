"""A small local Hugging Face Hub-compatible HTTP server, bound to a loopback address.

Fusion workflows pull parents from the Hub and push fused models back. Tests and offline demos need the
REAL ``huggingface_hub`` and ``transformers`` clients to talk to something that answers like the Hub, with no
network. This module serves the HTTP subset those clients use (create repo, model info, tree listing,
preupload, NDJSON commits, ``/resolve`` downloads with ``Range``, branches, refs, history, pull-request refs)
from a directory on disk.

Commits are immutable and content-addressed: a commit SHA is the sha1 of a canonical JSON of (parent SHA,
{path: blob sha256}, message), so a parent pinned by SHA in a model card is served again bit for bit.
Point a client at it with ``HF_ENDPOINT=<server.url>`` (set before importing ``huggingface_hub``),
``HF_HUB_DISABLE_XET=1`` and any ``HF_TOKEN``; tokens are accepted but not checked.

Storage layout under ``root``::

    blobs/<sha256[:2]>/<sha256>              file contents, shared by all repos
    repos/<type>/<namespace>/<name>/repo.json      creation metadata
    repos/<type>/<namespace>/<name>/refs.json      branches, tags and pull-request refs -> commit SHA
    repos/<type>/<namespace>/<name>/commits/<sha>.json   commit objects (files, parent, message, date)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import HubServerStateError, UnsafeHostError

__all__ = ["HubServer", "HubError", "serve"]

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
#: JSON API bodies (create repo, preupload, validate-yaml, ...) are small; anything bigger is refused.
MAX_JSON_BODY_BYTES = 16 * 2**20
#: Commit bodies carry base64 file contents; they are streamed line by line, one file in memory at a time.
DEFAULT_MAX_COMMIT_BYTES = 4 * 2**30
#: Most (method, path) pairs kept in ``HubServer.request_log``, so a long-running ``serve`` stays bounded.
REQUEST_LOG_LIMIT = 100_000
_CHUNK = 2**20

# repo type -> (API collection segment, URL prefix of the web/resolve routes)
_REPO_TYPES: dict[str, tuple[str, str]] = {
    "model": ("models", ""),
    "dataset": ("datasets", "datasets/"),
    "space": ("spaces", "spaces/"),
}
_TYPE_BY_COLLECTION = {collection: repo_type for repo_type, (collection, _) in _REPO_TYPES.items()}
_TYPE_BY_URL_PREFIX = {prefix.rstrip("/"): repo_type for repo_type, (_, prefix) in _REPO_TYPES.items() if prefix}

_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA_RE = re.compile(r"^[0-9a-fA-F]{5,40}$")
_PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class HubError(Exception):
    """An error answered to the client as JSON ``{"error": msg}`` plus the Hub's ``X-Error-Code`` header.

    The client maps ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) to its exception classes;
    HEAD answers have no body, so the header is what carries the meaning there.
    """

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def _repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _git_blob_oid(size: int, chunks: Iterator[bytes]) -> str:
    """The git blob SHA-1 (what the Hub reports as a regular file's ``oid`` and ETag)."""
    digest = hashlib.sha1(f"blob {size}\0".encode())
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def commit_sha(parent: str | None, files: dict[str, str], message: str) -> str:
    """Content address of a commit: sha1 of canonical JSON of (parent, {path: blob sha256}, message).

    The date is left out on purpose, so the same change on the same parent always gets the same SHA.
    """
    return hashlib.sha1(_canonical({"parent": parent, "files": files, "message": message})).hexdigest()


def _clean_repo_path(path: Any) -> str:
    """Validate a path inside a repo: relative, no empty, ``.`` or ``..`` segments (no escaping the tree)."""
    if not isinstance(path, str) or not path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    if path.startswith("/") or "\\" in path or "\0" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file and rename, so readers never see a half-written JSON document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _Repo:
    repo_type: str
    namespace: str
    name: str
    path: Path

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def url_path(self) -> str:
        """Path of the repo's web page, e.g. ``ns/name`` or ``datasets/ns/name``."""
        return f"{_REPO_TYPES[self.repo_type][1]}{self.repo_id}"


@dataclass
class _Op:
    kind: str  # "add" | "delete_file" | "delete_folder"
    path: str
    blob: dict[str, Any] | None = None


class _Store:
    """On-disk repos, refs, commit objects and content-addressed blobs.

    Blobs and commit objects are immutable once written, so they are read without locking; every change to
    refs (and repo creation/deletion) happens under one lock, which makes the stale-parent check race-free.
    """

    def __init__(self, root: Path, username: str) -> None:
        self.root = root
        self.username = username
        self.lock = threading.RLock()
        for sub in ("blobs", "repos", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------------------------- blobs
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def put_blob(self, data: bytes) -> dict[str, Any]:
        """Store bytes under their sha256 and return the file entry a commit records for them."""
        sha256 = hashlib.sha256(data).hexdigest()
        entry = {"sha256": sha256, "size": len(data), "oid": _git_blob_oid(len(data), iter((data,)))}
        target = self.blob_path(sha256)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix="blob-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return entry

    def existing_blob(self, sha256: str) -> dict[str, Any]:
        """File entry for a blob already stored (an ``lfsFile`` commit line refers to content by sha256)."""
        sha256 = sha256.lower()
        path = self.blob_path(sha256)
        if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not path.is_file():
            raise HubError(422, f"Unknown LFS object {sha256}: this server only accepts regular uploads")
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    yield chunk

        return {"sha256": sha256, "size": size, "oid": _git_blob_oid(size, chunks())}

    # ----------------------------------------------------------------------------------------------- repos
    def repo(self, repo_type: str, namespace: str, name: str) -> _Repo:
        """Look a repo up; any unknown or malformed id is simply 'not found'."""
        repo_id = f"{namespace}/{name}"
        if repo_type not in _REPO_TYPES or not (_NAME_RE.match(namespace) and _NAME_RE.match(name)):
            raise _repo_not_found(repo_id)
        path = self.root / "repos" / repo_type / namespace / name
        if not (path / "refs.json").is_file():
            raise _repo_not_found(repo_id)
        return _Repo(repo_type, namespace, name, path)

    def create_repo(self, repo_type: str, namespace: str, name: str, private: bool) -> _Repo:
        if repo_type not in _REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        for part in (namespace, name):
            if not _NAME_RE.match(part) or ".." in part or "--" in part:
                raise HubError(400, f"Invalid repo name {namespace}/{name}")
        path = self.root / "repos" / repo_type / namespace / name
        with self.lock:
            if (path / "refs.json").is_file():
                raise HubError(409, f"You already created this {repo_type} repo: {namespace}/{name}")
            repo = _Repo(repo_type, namespace, name, path)
            meta = {"id": repo.repo_id, "type": repo_type, "private": private, "createdAt": _now_iso()}
            _write_atomic(path / "repo.json", _canonical(meta))
            # Like the Hub, a new repo starts with one commit, so `main` and `model_info().sha` always exist.
            initial = self._write_commit(repo, None, {}, "initial commit", "")
            refs = {"branches": {DEFAULT_BRANCH: initial}, "tags": {}, "prs": {}, "next_pr": 1}
            _write_atomic(path / "refs.json", _canonical(refs))  # written last: it marks the repo as existing
        logger.info("created %s repo %s", repo_type, repo.repo_id)
        return repo

    def delete_repo(self, repo: _Repo) -> None:
        with self.lock:
            # Rename first so the repo vanishes atomically, then remove. Blobs stay (they may be shared).
            trash = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="deleted-"))
            os.replace(repo.path, trash / "repo")
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted %s repo %s", repo.repo_type, repo.repo_id)

    def meta(self, repo: _Repo) -> dict[str, Any]:
        return json.loads((repo.path / "repo.json").read_bytes())

    def refs(self, repo: _Repo) -> dict[str, Any]:
        try:
            return json.loads((repo.path / "refs.json").read_bytes())
        except FileNotFoundError:
            raise _repo_not_found(repo.repo_id) from None

    def _save_refs(self, repo: _Repo, refs: dict[str, Any]) -> None:
        _write_atomic(repo.path / "refs.json", _canonical(refs))

    # --------------------------------------------------------------------------------------------- commits
    def commit(self, repo: _Repo, sha: str) -> dict[str, Any]:
        try:
            return json.loads((repo.path / "commits" / f"{sha}.json").read_bytes())
        except FileNotFoundError:
            raise HubError(404, f"Invalid rev id: {sha}", "RevisionNotFound") from None

    def has_commit(self, repo: _Repo, sha: str) -> bool:
        return bool(_SHA_RE.match(sha)) and (repo.path / "commits" / f"{sha}.json").is_file()

    def _expand_sha(self, repo: _Repo, short: str) -> str:
        """Full SHA for a (possibly abbreviated) commit id of this repo."""
        short = short.lower()
        if not _SHORT_SHA_RE.match(short):
            raise HubError(400, f"Invalid commit id {short!r}")
        matches = [p.stem for p in (repo.path / "commits").glob(f"{short}*.json")]
        if len(matches) != 1:
            raise HubError(404, f"Commit {short} not found (or ambiguous) in {repo.repo_id}", "RevisionNotFound")
        return matches[0]

    def resolve(self, repo: _Repo, revision: str) -> str:
        """Commit SHA a revision (branch, tag, ``refs/...`` name or commit SHA) points to."""
        refs = self.refs(repo)
        rev = revision
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/") :]
        elif rev.startswith("refs/tags/"):
            rev = rev[len("refs/tags/") :]
            if rev in refs["tags"]:
                return refs["tags"][rev]
        if rev in refs["branches"]:
            return refs["branches"][rev]
        if rev in refs["tags"]:
            return refs["tags"][rev]
        pr = _PR_REF_RE.match(revision)
        if pr and pr.group(1) in refs["prs"]:
            return refs["prs"][pr.group(1)]
        if self.has_commit(repo, revision):
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _write_commit(
        self, repo: _Repo, parent: str | None, files: dict[str, dict[str, Any]], title: str, description: str
    ) -> str:
        message = title if not description else f"{title}\n\n{description}"
        sha = commit_sha(parent, {p: e["sha256"] for p, e in files.items()}, message)
        target = repo.path / "commits" / f"{sha}.json"
        if not target.exists():  # same SHA => same content; keep the first object (and its date)
            obj = {
                "id": sha,
                "parent": parent,
                "files": dict(sorted(files.items())),
                "title": title,
                "message": description,
                "date": _now_iso(),
                "authors": [self.username],
            }
            _write_atomic(target, _canonical(obj))
        return sha

    def check_parent(self, repo: _Repo, revision: str, parent_commit: str) -> None:
        """Reject early (before storing any upload) a commit whose parentCommit is not the branch head."""
        refs = self.refs(repo)
        head = refs["branches"].get(revision)
        pr = _PR_REF_RE.match(revision)
        if pr:
            head = refs["prs"].get(pr.group(1))
        if head is not None and not head.startswith(parent_commit.lower()):
            raise HubError(412, f"Parent commit {parent_commit} is not the head of {revision} (head is {head})")

    def create_commit(
        self,
        repo: _Repo,
        revision: str,
        ops: list[_Op],
        title: str,
        description: str,
        parent_commit: str | None,
        create_pr: bool,
    ) -> tuple[str, int | None]:
        """Apply ``ops`` on the revision's head and move the ref; returns (commit SHA, PR number or None).

        Committing to a branch that does not exist creates it (from ``parent_commit`` or the default branch).
        """
        with self.lock:
            refs = self.refs(repo)
            pr_match = _PR_REF_RE.match(revision)
            branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
            if pr_match:
                if pr_match.group(1) not in refs["prs"]:
                    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                if create_pr:
                    raise HubError(400, "Cannot open a pull request from a pull request ref")
                head: str | None = refs["prs"][pr_match.group(1)]
            elif branch in refs["branches"]:
                head = refs["branches"][branch]
            elif branch in refs["tags"] or _SHA_RE.match(branch):
                raise HubError(400, f"Cannot commit to {revision!r}: only branches and pull requests move")
            elif _BRANCH_RE.match(branch) and not branch.startswith("refs/") and ".." not in branch:
                if create_pr:
                    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                head = None  # new branch
            else:
                raise HubError(400, f"Invalid branch name {revision!r}")

            if parent_commit is not None:
                parent_full = self._expand_sha(repo, parent_commit)
                if head is not None and not create_pr and parent_full != head:
                    raise HubError(412, f"Parent commit {parent_commit} is not the head of {revision} (head is {head})")
                base = parent_full
            else:
                base = head if head is not None else refs["branches"][DEFAULT_BRANCH]

            files: dict[str, dict[str, Any]] = dict(self.commit(repo, base)["files"])
            for op in ops:
                if op.kind == "add":
                    assert op.blob is not None
                    files[op.path] = op.blob
                elif op.kind == "delete_file":
                    if files.pop(op.path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {op.path}", "EntryNotFound")
                else:
                    prefix = op.path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {op.path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]

            sha = self._write_commit(repo, base, files, title, description)
            pr_num: int | None = None
            if create_pr:
                pr_num = int(refs["next_pr"])
                refs["next_pr"] = pr_num + 1
                refs["prs"][str(pr_num)] = sha
            elif pr_match:
                refs["prs"][pr_match.group(1)] = sha
            else:
                refs["branches"][branch] = sha
            self._save_refs(repo, refs)
        logger.info("commit %s on %s@%s (%d op(s))", sha[:10], repo.repo_id, revision, len(ops))
        return sha, pr_num

    def set_ref(self, repo: _Repo, kind: str, name: str, revision: str | None) -> None:
        """Create a branch or tag at ``revision`` (default: head of the default branch); 409 if it exists."""
        if not _BRANCH_RE.match(name) or name.startswith("refs/") or ".." in name or _SHA_RE.match(name):
            raise HubError(400, f"Invalid {kind} name {name!r}")
        with self.lock:
            refs = self.refs(repo)
            table = refs["branches" if kind == "branch" else "tags"]
            if name in table:
                raise HubError(409, f"{kind.capitalize()} {name!r} already exists in {repo.repo_id}")
            table[name] = self.resolve(repo, revision or DEFAULT_BRANCH)
            self._save_refs(repo, refs)

    def delete_ref(self, repo: _Repo, kind: str, name: str) -> None:
        with self.lock:
            refs = self.refs(repo)
            table = refs["branches" if kind == "branch" else "tags"]
            if name not in table:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            if kind == "branch" and name == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            del table[name]
            self._save_refs(repo, refs)

    def history(self, repo: _Repo, sha: str) -> list[dict[str, Any]]:
        out = []
        current: str | None = sha
        while current is not None:
            obj = self.commit(repo, current)
            out.append(obj)
            current = obj["parent"]
        return out


def _file_entry(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    return {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}


def _dir_entry(files: dict[str, dict[str, Any]], path: str) -> dict[str, Any]:
    prefix = path + "/"
    listing = {p[len(prefix) :]: e["oid"] for p, e in files.items() if p.startswith(prefix)}
    return {
        "type": "directory",
        "path": path,
        "size": 0,
        "oid": hashlib.sha1(_canonical(listing)).hexdigest(),
    }


def _tree_listing(files: dict[str, dict[str, Any]], base: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries under directory ``base`` (``""`` = root): direct children, or everything when recursive."""
    prefix = base + "/" if base else ""
    under = sorted(p for p in files if p.startswith(prefix))
    if base and not under:
        raise HubError(404, f"Directory not found: {base}", "EntryNotFound")
    dirs: set[str] = set()
    entries = []
    for path in under:
        parts = path[len(prefix) :].split("/")
        if recursive:
            dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
            entries.append(_file_entry(path, files[path]))
        elif len(parts) > 1:
            dirs.add(prefix + parts[0])
        else:
            entries.append(_file_entry(path, files[path]))
    return sorted([_dir_entry(files, d) for d in dirs] + entries, key=lambda e: e["path"])


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for a single ``bytes=`` range; None to serve the whole file.

    Raises 416 for a syntactically valid but unsatisfiable range; ignores what it does not understand
    (multiple ranges, other units), which RFC 9110 allows.
    """
    if not header:
        return None
    match = _RANGE_RE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.groups()
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None
    else:
        suffix = int(last)
        if suffix == 0:
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        start, end = max(0, size - suffix), size - 1
    if start >= size:
        raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


@dataclass
class _Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None
    start: int = 0
    length: int = 0


def _json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode("utf-8"))


def _header_safe(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1").replace("\r", " ").replace("\n", " ")[:500]


class _Handler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the store. HTTP/1.1 keep-alive, so every answer carries Content-Length."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "hf-otfusion-hub/0.1"
    timeout = 120  # seconds a connection may stall; keeps idle keep-alive threads from living forever

    def log_message(self, format: str, *args: Any) -> None:
        """Send the base class's per-request lines to logging instead of stderr."""
        logger.debug("%s - " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ------------------------------------------------------------------------------------------ plumbing
    @property
    def hub(self) -> HubServer:
        return self.server.hub

    @property
    def store(self) -> _Store:
        return self.server.hub.store

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.hub._record(method, split.path)
        self._request_path = split.path
        self._unread = 0
        try:
            self._unread = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._unread = -1
        try:
            if self._unread < 0:
                raise HubError(400, "Invalid Content-Length")
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise HubError(411, "Chunked request bodies are not supported; send Content-Length")
            response = self._route(method, split.path, parse_qs(split.query))
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = _header_safe(err.message)
            if err.status >= 500:
                logger.warning("%s %s -> %d %s", method, split.path, err.status, err.message)
            else:
                logger.debug("%s %s -> %d %s", method, split.path, err.status, err.message)
            response = _json_response({"error": err.message}, err.status, headers)
        except Exception:  # a bug must not kill the connection thread silently
            logger.exception("internal error on %s %s", method, split.path)
            response = _json_response({"error": "Internal server error"}, 500)
        self._send(response, head=method == "HEAD")

    def _send(self, response: _Response, head: bool) -> None:
        length = response.length if response.file is not None else len(response.body)
        try:
            self.send_response(response.status)
            for key, value in response.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(length))
            if self._unread:  # part of the request body is still on the socket: the connection is unusable
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            if head:
                return
            if response.file is None:
                self.wfile.write(response.body)
                return
            # logged before the body goes out, so a client that has read it always finds the entry
            self.hub._record_download(self._request_path, response.length)
            with open(response.file, "rb") as f:
                f.seek(response.start)
                remaining = response.length
                while remaining > 0:
                    chunk = f.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise OSError(f"blob {response.file} is shorter than recorded")
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        except (BrokenPipeError, ConnectionResetError) as err:
            logger.debug("client went away: %s", err)
            self.close_connection = True

    def _read_body(self, limit: int = MAX_JSON_BODY_BYTES) -> bytes:
        if self._unread > limit:
            raise HubError(413, f"Request body too large ({self._unread} > {limit} bytes)")
        data = self.rfile.read(self._unread) if self._unread else b""
        if len(data) != self._unread:
            self._unread = 0
            self.close_connection = True
            raise HubError(400, "Truncated request body")
        self._unread = 0
        return data

    def _read_json(self) -> dict[str, Any]:
        raw = self._read_body()
        if not raw.strip():
            return {}
        try:
            obj = json.loads(raw)
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise HubError(400, "Request body must be a JSON object")
        return obj

    def _iter_lines(self) -> Iterator[bytes]:
        """NDJSON lines of the body, read one at a time so only one file's content is in memory."""
        while self._unread > 0:
            line = self.rfile.readline(self._unread)
            if not line:
                self.close_connection = True
                raise HubError(400, "Truncated request body")
            self._unread -= len(line)
            if line.strip():
                yield line

    def _drain(self) -> None:
        while self._unread > 0:
            chunk = self.rfile.read(min(_CHUNK, self._unread))
            if not chunk:
                break
            self._unread -= len(chunk)

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.hub.url

    # ------------------------------------------------------------------------------------------ routing
    def _route(self, method: str, raw_path: str, query: dict[str, list[str]]) -> _Response:
        segs = raw_path.split("/")[1:]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        if segs[:1] == ["api"]:
            return self._api(method, segs[1:], query)
        repo_type = "model"
        if segs and segs[0] in _TYPE_BY_URL_PREFIX:
            repo_type = _TYPE_BY_URL_PREFIX[segs[0]]
            segs = segs[1:]
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, segs, method == "HEAD")
        raise self._unsupported(method, raw_path)

    def _unsupported(self, method: str, raw_path: str) -> HubError:
        logger.warning("unsupported route %s %s", method, raw_path)
        return HubError(404, f"Route not supported by this local Hub server: {method} {raw_path}")

    def _api(self, method: str, segs: list[str], query: dict[str, list[str]]) -> _Response:
        route = (method, *segs[:2])
        if route == ("GET", "whoami-v2"):
            name = self.store.username
            return _json_response(
                {
                    "type": "user",
                    "name": name,
                    "fullname": name,
                    "orgs": [],
                    "auth": {
                        "type": "access_token",
                        "accessToken": {"displayName": "local", "role": "write"},
                    },
                }
            )
        if route == ("GET", "agent-harnesses"):  # huggingface_hub's best-effort user-agent registry
            return _json_response({"standardEnvVars": [], "harnesses": {}})
        if route == ("POST", "validate-yaml"):
            self._read_json()
            return _json_response({})
        if route == ("POST", "repos", "create"):
            return self._create_repo(self._read_json())
        if route == ("DELETE", "repos", "delete"):
            body = self._read_json()
            repo_type = body.get("type") or "model"
            namespace = body.get("organization") or self.store.username
            self.store.delete_repo(self.store.repo(repo_type, namespace, str(body.get("name"))))
            return _json_response({})
        if len(segs) >= 3 and segs[0] in _TYPE_BY_COLLECTION:
            repo = self.store.repo(_TYPE_BY_COLLECTION[segs[0]], unquote(segs[1]), unquote(segs[2]))
            return self._repo_api(method, repo, [unquote(s) for s in segs[3:]], query)
        raise self._unsupported(method, "/api/" + "/".join(segs))

    def _repo_api(self, method: str, repo: _Repo, rest: list[str], query: dict[str, list[str]]) -> _Response:
        action = rest[0] if rest else ""
        args = rest[1:]
        if method == "GET" and not rest:
            return _json_response(self._info(repo, DEFAULT_BRANCH))
        if method == "GET" and action == "revision" and args:
            return _json_response(self._info(repo, "/".join(args)))
        if method == "GET" and action == "tree" and args:
            sha = self.store.resolve(repo, args[0])
            files = self.store.commit(repo, sha)["files"]
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            base = "/".join(args[1:]).strip("/")
            return _json_response(_tree_listing(files, base, recursive))
        if method == "POST" and action == "paths-info" and args:
            return self._paths_info(repo, args[0])
        if method == "POST" and action == "preupload" and args:
            return self._preupload(repo, "/".join(args))
        if method == "POST" and action == "commit" and args:
            create_pr = query.get("create_pr", ["0"])[0].lower() in ("1", "true")
            return self._commit(repo, "/".join(args), create_pr)
        if method == "GET" and action == "refs" and not args:
            return _json_response(self._refs(repo, "include_prs" in query))
        if method == "GET" and action == "commits" and args:
            sha = self.store.resolve(repo, "/".join(args))
            return _json_response(
                [
                    {
                        "id": c["id"],
                        "title": c["title"],
                        "message": c["message"],
                        "date": c["date"],
                        "authors": [{"user": a} for a in c["authors"]],
                    }
                    for c in self.store.history(repo, sha)
                ]
            )
        if action in ("branch", "tag") and args and method in ("POST", "DELETE"):
            name = "/".join(args)
            if method == "DELETE":
                self.store.delete_ref(repo, action, name)
                return _json_response({})
            body = self._read_json()
            if action == "branch":
                self.store.set_ref(repo, "branch", name, body.get("startingPoint"))
            else:  # the client posts to /tag/{revision} with the tag name in the body
                self.store.set_ref(repo, "tag", str(body.get("tag")), name)
            return _json_response({})
        raise self._unsupported(method, f"/api/{_REPO_TYPES[repo.repo_type][0]}/{repo.repo_id}/{'/'.join(rest)}")

    # ------------------------------------------------------------------------------------------ handlers
    def _create_repo(self, body: dict[str, Any]) -> _Response:
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or self.store.username
        name = body.get("name")
        if not isinstance(name, str) or not isinstance(namespace, str) or not isinstance(repo_type, str):
            raise HubError(400, "create needs string 'name', 'organization' and 'type'")
        private = bool(body.get("private")) or body.get("visibility") == "private"
        try:
            repo = self.store.create_repo(repo_type, namespace, name, private)
        except HubError as error:
            if error.status != 409:
                raise
            # Like the Hub, a 409 names the existing repo's URL: `create_repo(exist_ok=True)` returns it.
            prefix = _REPO_TYPES[repo_type][1]
            url = f"{self._base_url()}/{prefix}{namespace}/{name}"
            return _json_response({"error": error.message, "url": url}, 409, {"X-Error-Message": error.message})
        return _json_response({"url": f"{self._base_url()}/{repo.url_path}", "name": repo.repo_id})

    def _info(self, repo: _Repo, revision: str) -> dict[str, Any]:
        """What ``model_info``/``dataset_info``/``repo_info`` parse; the client requires ``sha``."""
        sha = self.store.resolve(repo, revision)
        commit = self.store.commit(repo, sha)
        meta = self.store.meta(repo)
        files = commit["files"]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": sha,
            "private": meta["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "usedStorage": sum(e["size"] for e in files.values()),
            "siblings": [{"rfilename": p, "size": e["size"], "blobId": e["oid"]} for p, e in sorted(files.items())],
        }
        config = files.get("config.json")
        if repo.repo_type == "model" and config is not None and config["size"] <= 2**20:
            try:  # lets `pipeline()` and similar callers see the architecture without a download
                cfg = json.loads(self.store.blob_path(config["sha256"]).read_bytes())
                info["config"] = {k: cfg[k] for k in ("architectures", "model_type") if k in cfg}
                info["library_name"] = "transformers"
            except (OSError, ValueError, TypeError):
                pass
        return info

    def _refs(self, repo: _Repo, include_prs: bool) -> dict[str, Any]:
        refs = self.store.refs(repo)

        def table(prefix: str, items: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"{prefix}{n}", "targetCommit": s} for n, s in sorted(items.items())]

        out: dict[str, Any] = {
            "branches": table("refs/heads/", refs["branches"]),
            "tags": table("refs/tags/", refs["tags"]),
            "converts": [],
        }
        if include_prs:
            out["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                for n, s in sorted(refs["prs"].items(), key=lambda kv: int(kv[0]))
            ]
        return out

    def _paths_info(self, repo: _Repo, revision: str) -> _Response:
        form = parse_qs(self._read_body().decode("utf-8", "replace"))
        files = self.store.commit(repo, self.store.resolve(repo, revision))["files"]
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(_file_entry(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append(_dir_entry(files, path))
        return _json_response(out)

    def _preupload(self, repo: _Repo, revision: str) -> _Response:
        """Answer ``regular`` for every file (no LFS protocol) + current oid: unchanged files get skipped."""
        body = self._read_json()
        try:
            files = self.store.commit(repo, self.store.resolve(repo, revision))["files"]
        except HubError:
            files = {}  # a branch about to be created by the commit
        out = []
        for item in body.get("files") or []:
            path = item.get("path") if isinstance(item, dict) else None
            if not isinstance(path, str):
                raise HubError(400, "Each preupload entry needs a 'path'")
            entry: dict[str, Any] = {"path": path, "uploadMode": "regular", "shouldIgnore": False}
            if path in files:
                entry["oid"] = files[path]["oid"]
            out.append(entry)
        return _json_response({"files": out})

    def _commit(self, repo: _Repo, revision: str, create_pr: bool) -> _Response:
        if self.hub._take_commit_failure():
            if self._unread <= self.hub.max_commit_bytes:
                self._drain()  # read the upload, so the client sees the 500 rather than a reset connection
            raise HubError(500, "Injected failure (fail_next_commits): commit not applied")
        if self._unread > self.hub.max_commit_bytes:
            raise HubError(413, f"Commit body too large ({self._unread} > {self.hub.max_commit_bytes} bytes)")
        header: dict[str, Any] | None = None
        ops: list[_Op] = []
        for line in self._iter_lines():
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, "Malformed NDJSON commit line") from None
            if not isinstance(value, dict):
                raise HubError(400, f"Malformed {key!r} commit line")
            if key == "header":
                header = value
                parent = value.get("parentCommit")
                if parent and not create_pr and _SHORT_SHA_RE.match(str(parent)):
                    self.store.check_parent(repo, revision, str(parent))
            elif key == "file":
                path = _clean_repo_path(value.get("path"))
                content = value.get("content", "")
                try:
                    if value.get("encoding", "base64") == "base64":
                        data = base64.b64decode(content, validate=True)
                    else:
                        data = str(content).encode("utf-8")
                except (binascii.Error, ValueError, TypeError):
                    raise HubError(400, f"Invalid base64 content for {path}") from None
                ops.append(_Op("add", path, self.store.put_blob(data)))
            elif key == "lfsFile":
                path = _clean_repo_path(value.get("path"))
                ops.append(_Op("add", path, self.store.existing_blob(str(value.get("oid")))))
            elif key == "deletedFile":
                ops.append(_Op("delete_file", _clean_repo_path(value.get("path"))))
            elif key == "deletedFolder":
                ops.append(_Op("delete_folder", _clean_repo_path(str(value.get("path", "")).rstrip("/"))))
            else:
                raise HubError(400, f"Unknown commit line key {key!r}")
        if header is None or not str(header.get("summary") or "").strip():
            raise HubError(400, "Commit needs a header line with a non-empty summary")
        parent_commit = header.get("parentCommit") or None
        sha, pr_num = self.store.create_commit(
            repo,
            revision,
            ops,
            str(header["summary"]),
            str(header.get("description") or ""),
            str(parent_commit) if parent_commit else None,
            create_pr,
        )
        base = f"{self._base_url()}/{repo.url_path}"
        return _json_response(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{base}/commit/{sha}",
                "pullRequestUrl": f"{base}/discussions/{pr_num}" if pr_num is not None else None,
            }
        )

    def _resolve(self, repo_type: str, segs: list[str], head: bool) -> _Response:
        repo = self.store.repo(repo_type, unquote(segs[0]), unquote(segs[1]))
        revision, path_segs = unquote(segs[3]), segs[4:]
        if revision == "refs" and len(path_segs) >= 3:  # an unquoted "refs/pr/1" typed by a person
            revision = "refs/" + "/".join(unquote(s) for s in path_segs[:2])
            path_segs = path_segs[2:]
        path = "/".join(unquote(s) for s in path_segs)
        sha = self.store.resolve(repo, revision)
        entry = self.store.commit(repo, sha)["files"].get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache the file's absence for this commit.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        size = entry["size"]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry["oid"]}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Cache-Control": "no-cache" if sha != revision else "public, max-age=31536000, immutable",
        }
        byte_range = None if head else _parse_range(self.headers.get("Range"), size)
        if byte_range is None:
            return _Response(200, headers, file=self.store.blob_path(entry["sha256"]), length=size)
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return _Response(206, headers, file=self.store.blob_path(entry["sha256"]), start=start, length=end - start + 1)


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its HubServer and does not wait for idle keep-alive threads on close."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        self.hub = hub
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _loopback_host(host: str) -> str:
    """The loopback IP to bind for ``host``; anything else is refused, since this server has no auth."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise UnsafeHostError(
            f"Refusing to bind the local Hub server to {host!r}: use a loopback address", host=host
        ) from None
    if not ip.is_loopback:
        raise UnsafeHostError(
            f"Refusing to bind the local Hub server to {host!r}: it has no authentication, so it only serves "
            "loopback addresses such as 127.0.0.1 or ::1",
            host=host,
        )
    return str(ip)


class HubServer:
    """A local Hub-compatible server over ``root``, for tests and offline use of the real Hub clients.

    Usage::

        with HubServer(tmp_path) as hub:
            env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "dummy"}
            ...

    Test hooks: ``fail_next_commits = n`` makes the next ``n`` commit POSTs answer HTTP 500 without applying
    anything; ``request_log`` lists every ``(method, path)`` received (path as sent, URL-quoted, no query);
    ``download_log`` lists ``(path, bytes)`` for every file body served (a ``Range`` read sends only its
    slice), which tells a header read from a download.
    """

    def __init__(
        self,
        root: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        username: str = "local-user",
        max_commit_bytes: int = DEFAULT_MAX_COMMIT_BYTES,
    ) -> None:
        bind_host = _loopback_host(host)
        self.root = Path(root)
        self.store = _Store(self.root, username)
        self.max_commit_bytes = max_commit_bytes
        self.fail_next_commits = 0
        self.request_log: list[tuple[str, str]] = []
        self.download_log: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        server_cls = _HTTPServer6 if ":" in bind_host else _HTTPServer
        self._httpd = server_cls((bind_host, port), self)
        self._thread: threading.Thread | None = None
        self._started = False
        self._stopped = False

    @property
    def url(self) -> str:
        """Base URL for ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:54321``."""
        host, port = self._httpd.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Serve in a daemon thread (returns at once; the socket is already listening)."""
        if self._stopped:
            raise HubServerStateError("HubServer was stopped; create a new one", state="stopped")
        if not self._started:
            self._started = True
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.5},
                name="hub-server",
                daemon=True,
            )
            self._thread.start()
            logger.info("local Hub server at %s (root %s)", self.url, self.root)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``stop()`` from another thread or KeyboardInterrupt."""
        if self._started or self._stopped:
            raise HubServerStateError(
                "HubServer is already running or stopped", state="stopped" if self._stopped else "running"
            )
        self._started = True
        logger.info("local Hub server at %s (root %s)", self.url, self.root)
        self._httpd.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            self._httpd.shutdown()  # returns once serve_forever has exited
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.request_log.append((method, path))
            if len(self.request_log) > REQUEST_LOG_LIMIT:
                del self.request_log[: len(self.request_log) - REQUEST_LOG_LIMIT]

    def _record_download(self, path: str, size: int) -> None:
        with self._lock:
            self.download_log.append((path, size))
            if len(self.download_log) > REQUEST_LOG_LIMIT:
                del self.download_log[: len(self.download_log) - REQUEST_LOG_LIMIT]

    def _take_commit_failure(self) -> bool:
        with self._lock:
            if self.fail_next_commits > 0:
                self.fail_next_commits -= 1
                return True
            return False


def serve(root: str | Path, port: int, host: str = "127.0.0.1") -> None:
    """Serve a local Hub over ``root`` on ``host:port`` until interrupted (for ``otfusion-hub serve-hub``)."""
    server = HubServer(root, host=host, port=port)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # A service manager stops us with SIGTERM: shut down as cleanly as on Ctrl-C.
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    print(f"Serving a local Hugging Face Hub at {server.url} (root {Path(root).resolve()})", flush=True)
    print(f"Use it with: HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1 HF_TOKEN=dummy", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("interrupted, stopping")
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
