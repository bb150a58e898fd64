"""Repos, refs and commits of the local Hub server, on disk; no HTTP here.

Commits are immutable and content-addressed: a commit SHA is the sha1 of a canonical JSON of (parent SHA,
{path: blob sha256}, message), so a parent pinned by SHA in a model card is served again bit for bit. Keeping
this apart from the request handling means the invariants (immutable commits, race-free ref moves, paths that
cannot escape the tree) can be read and checked in one place.

Layout under ``root``::

    blobs/<sha256[:2]>/<sha256>              file contents, shared by all repos (see ``blobs``)
    repos/<type>/<namespace>/<name>/repo.json      creation metadata
    repos/<type>/<namespace>/<name>/refs.json      branches, tags and pull-request refs -> commit SHA
    repos/<type>/<namespace>/<name>/commits/<sha>.json   commit objects (files, parent, message, date)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .blobs import Blobs
from .errors import HubError, repo_not_found

logger = logging.getLogger("hf_otfusion.hub.server")

DEFAULT_BRANCH = "main"

# repo type -> (API collection segment, URL prefix of the web/resolve routes)
REPO_TYPES: dict[str, tuple[str, str]] = {
    "model": ("models", ""),
    "dataset": ("datasets", "datasets/"),
    "space": ("spaces", "spaces/"),
}

_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
SHORT_SHA_RE = re.compile(r"^[0-9a-fA-F]{5,40}$")
_PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def commit_sha(parent: str | None, files: dict[str, str], message: str) -> str:
    """Content address of a commit: sha1 of canonical JSON of (parent, {path: blob sha256}, message).

    The date is left out on purpose, so the same change on the same parent always gets the same SHA.
    """
    return hashlib.sha1(canonical({"parent": parent, "files": files, "message": message})).hexdigest()


def clean_repo_path(path: Any) -> str:
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
class Repo:
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
        return f"{REPO_TYPES[self.repo_type][1]}{self.repo_id}"


@dataclass
class Op:
    kind: str  # "add" | "delete_file" | "delete_folder"
    path: str
    blob: dict[str, Any] | None = None


class Store:
    """On-disk repos, refs, commit objects and content-addressed blobs.

    Blobs and commit objects are immutable once written, so they are read without locking; every change to
    refs (and repo creation/deletion) happens under one lock, which makes the stale-parent check race-free.
    """

    def __init__(self, root: Path, username: str) -> None:
        self.root = root
        self.username = username
        self.lock = threading.RLock()
        for sub in ("repos", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.blobs = Blobs(root / "blobs", root / "tmp")

    # ----------------------------------------------------------------------------------------------- repos
    def repo(self, repo_type: str, namespace: str, name: str) -> Repo:
        """Look a repo up; any unknown or malformed id is simply 'not found'."""
        repo_id = f"{namespace}/{name}"
        if repo_type not in REPO_TYPES or not (_NAME_RE.match(namespace) and _NAME_RE.match(name)):
            raise repo_not_found(repo_id)
        path = self.root / "repos" / repo_type / namespace / name
        if not (path / "refs.json").is_file():
            raise repo_not_found(repo_id)
        return Repo(repo_type, namespace, name, path)

    def create_repo(self, repo_type: str, namespace: str, name: str, private: bool) -> Repo:
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        for part in (namespace, name):
            if not _NAME_RE.match(part) or ".." in part or "--" in part:
                raise HubError(400, f"Invalid repo name {namespace}/{name}")
        path = self.root / "repos" / repo_type / namespace / name
        with self.lock:
            if (path / "refs.json").is_file():
                raise HubError(409, f"You already created this {repo_type} repo: {namespace}/{name}")
            repo = Repo(repo_type, namespace, name, path)
            meta = {"id": repo.repo_id, "type": repo_type, "private": private, "createdAt": _now_iso()}
            _write_atomic(path / "repo.json", canonical(meta))
            # Like the Hub, a new repo starts with one commit, so `main` and `model_info().sha` always exist.
            initial = self._write_commit(repo, None, {}, "initial commit", "")
            refs = {"branches": {DEFAULT_BRANCH: initial}, "tags": {}, "prs": {}, "next_pr": 1}
            _write_atomic(path / "refs.json", canonical(refs))  # written last: it marks the repo as existing
        logger.info("created %s repo %s", repo_type, repo.repo_id)
        return repo

    def delete_repo(self, repo: Repo) -> None:
        with self.lock:
            # Rename first so the repo vanishes atomically, then remove. Blobs stay (they may be shared).
            trash = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="deleted-"))
            os.replace(repo.path, trash / "repo")
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted %s repo %s", repo.repo_type, repo.repo_id)

    def meta(self, repo: Repo) -> dict[str, Any]:
        return json.loads((repo.path / "repo.json").read_bytes())

    def refs(self, repo: Repo) -> dict[str, Any]:
        try:
            return json.loads((repo.path / "refs.json").read_bytes())
        except FileNotFoundError:
            raise repo_not_found(repo.repo_id) from None

    def _save_refs(self, repo: Repo, refs: dict[str, Any]) -> None:
        _write_atomic(repo.path / "refs.json", canonical(refs))

    # --------------------------------------------------------------------------------------------- commits
    def commit(self, repo: Repo, sha: str) -> dict[str, Any]:
        try:
            return json.loads((repo.path / "commits" / f"{sha}.json").read_bytes())
        except FileNotFoundError:
            raise HubError(404, f"Invalid rev id: {sha}", "RevisionNotFound") from None

    def has_commit(self, repo: Repo, sha: str) -> bool:
        return bool(_SHA_RE.match(sha)) and (repo.path / "commits" / f"{sha}.json").is_file()

    def _expand_sha(self, repo: Repo, short: str) -> str:
        """Full SHA for a (possibly abbreviated) commit id of this repo."""
        short = short.lower()
        if not SHORT_SHA_RE.match(short):
            raise HubError(400, f"Invalid commit id {short!r}")
        matches = [p.stem for p in (repo.path / "commits").glob(f"{short}*.json")]
        if len(matches) != 1:
            raise HubError(404, f"Commit {short} not found (or ambiguous) in {repo.repo_id}", "RevisionNotFound")
        return matches[0]

    def resolve(self, repo: Repo, revision: str) -> str:
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
        self, repo: Repo, parent: str | None, files: dict[str, dict[str, Any]], title: str, description: str
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
            _write_atomic(target, canonical(obj))
        return sha

    def check_parent(self, repo: Repo, revision: str, parent_commit: str) -> None:
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
        repo: Repo,
        revision: str,
        ops: list[Op],
        title: str,
        description: str,
        parent_commit: str | None,
        create_pr: bool,
    ) -> tuple[str, int | None]:
        """Apply ``ops`` on the revision's head and move the ref; returns (commit SHA, PR number or None).

        Committing to a branch that does not exist creates it (from ``parent_commit`` or the default branch).
        A commit that changes no file on an existing head records nothing and returns that head (HUB_API.md
        leaves this open); one that opens a pull request or creates a branch still does.
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

            base_files = self.commit(repo, base)["files"]
            files: dict[str, dict[str, Any]] = dict(base_files)
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

            if files == base_files and not create_pr and head == base:
                # Nothing changes (every file re-sent as it is): like huggingface_hub, which skips such a commit
                # client-side, answer the current head rather than record an empty commit.
                logger.info("no-op commit on %s@%s: head %s kept", repo.repo_id, revision, head[:10])
                return head, None
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

    def set_ref(self, repo: Repo, kind: str, name: str, revision: str | None) -> None:
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

    def delete_ref(self, repo: Repo, kind: str, name: str) -> None:
        with self.lock:
            refs = self.refs(repo)
            table = refs["branches" if kind == "branch" else "tags"]
            if name not in table:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            if kind == "branch" and name == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            del table[name]
            self._save_refs(repo, refs)

    def history(self, repo: Repo, sha: str) -> list[dict[str, Any]]:
        out = []
        current: str | None = sha
        while current is not None:
            obj = self.commit(repo, current)
            out.append(obj)
            current = obj["parent"]
        return out
