"""The JSON documents the Hub API answers (tree entries, repo info, refs, history), built from storage objects.

These shapes are what ``huggingface_hub`` parses (``sha`` in repo info is required, tree entries need ``oid``);
keeping them apart from routing and from storage means a client-compatibility fix touches one small module.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .errors import HubError
from .storage import Repo, Store, canonical


def file_entry(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    return {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}


def dir_entry(files: dict[str, dict[str, Any]], path: str) -> dict[str, Any]:
    prefix = path + "/"
    listing = {p[len(prefix) :]: e["oid"] for p, e in files.items() if p.startswith(prefix)}
    return {
        "type": "directory",
        "path": path,
        "size": 0,
        "oid": hashlib.sha1(canonical(listing)).hexdigest(),
    }


def tree_listing(files: dict[str, dict[str, Any]], base: str, recursive: bool) -> list[dict[str, Any]]:
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
            entries.append(file_entry(path, files[path]))
        elif len(parts) > 1:
            dirs.add(prefix + parts[0])
        else:
            entries.append(file_entry(path, files[path]))
    return sorted([dir_entry(files, d) for d in dirs] + entries, key=lambda e: e["path"])


def repo_info(store: Store, repo: Repo, revision: str) -> dict[str, Any]:
    """What ``model_info``/``dataset_info``/``repo_info`` parse; the client requires ``sha``."""
    sha = store.resolve(repo, revision)
    commit = store.commit(repo, sha)
    meta = store.meta(repo)
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
            cfg = json.loads(store.blobs.path(config["sha256"]).read_bytes())
            info["config"] = {k: cfg[k] for k in ("architectures", "model_type") if k in cfg}
            info["library_name"] = "transformers"
        except (OSError, ValueError, TypeError):
            pass
    return info


def repo_refs(store: Store, repo: Repo, include_prs: bool) -> dict[str, Any]:
    refs = store.refs(repo)

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


def history(store: Store, repo: Repo, sha: str) -> list[dict[str, Any]]:
    """``list_repo_commits``: the commits from ``sha`` back to the repo's initial commit, newest first."""
    return [
        {
            "id": c["id"],
            "title": c["title"],
            "message": c["message"],
            "date": c["date"],
            "authors": [{"user": a} for a in c["authors"]],
        }
        for c in store.history(repo, sha)
    ]
