"""The JSON documents the Hub API answers (tree entries, repo info, refs, history), built from storage objects.

These shapes are what ``huggingface_hub`` parses (``sha`` in repo info is required, tree entries need ``oid``);
keeping them apart from routing and from storage means a client-compatibility fix touches one small module.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import yaml

from .errors import HubError
from .lfs import pointer_size
from .storage import Repo, Store, canonical

#: Largest README / config read to fill repo info (a bigger one is served, just not indexed).
MAX_INDEXED_FILE = 2**20
# the same front-matter block `huggingface_hub.repocard` reads
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_ARXIV_LINK = re.compile(r"arxiv\.org/(?:abs|pdf)/(\d{4}\.\d{4,5})")


def file_entry(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A tree / paths-info entry; an LFS file also names its object (``RepoFile.lfs`` on the client)."""
    out = {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}
    if entry.get("lfs"):
        pointer = pointer_size(entry["sha256"], entry["size"])
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer}
    return out


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
        "tags": [],  # filled from the card below, as the Hub does
        "lastModified": commit["date"],
        "createdAt": meta["createdAt"],
        "usedStorage": sum(e["size"] for e in files.values()),
        "siblings": [{"rfilename": p, "size": e["size"], "blobId": e["oid"]} for p, e in sorted(files.items())],
    }
    config = _small_file(store, files, "config.json")
    if repo.repo_type == "model" and config is not None:
        try:  # lets `pipeline()` and similar callers see the architecture without a download
            cfg = json.loads(config)
            info["config"] = {k: cfg[k] for k in ("architectures", "model_type") if k in cfg}
            info["library_name"] = "transformers"
        except (ValueError, TypeError, AttributeError):
            pass
    readme = _small_file(store, files, "README.md")
    if readme is not None:
        info.update(card_fields(readme.decode("utf-8", "replace"), repo.repo_type, info.get("library_name")))
    return info


def card_fields(readme: str, repo_type: str, library_name: str | None = None) -> dict[str, Any]:
    """``cardData``, ``tags``, ``pipeline_tag`` and ``library_name`` of a repo, from its README, as the Hub has them.

    The Hub indexes the card's YAML front matter: the client builds ``ModelInfo.card_data`` from ``cardData``,
    and search, the model page and ``list_models(filter=...)`` work on ``tags``, which the Hub derives from the
    metadata (the card's own tags, the library, ``dataset:``, ``base_model:``, ``license:`` and ``arxiv:`` tags
    for linked papers). A card whose front matter is not a YAML mapping is indexed as having none, like the Hub
    does after its ``validate-yaml`` warning.
    """
    match = _YAML_BLOCK.search(readme)
    try:
        data = yaml.safe_load(match.group(2)) if match else None
    except yaml.YAMLError:
        data = None
    out: dict[str, Any] = {}
    data = data if isinstance(data, dict) else {}
    if data:
        out["cardData"] = data
    if repo_type == "model" and isinstance(data.get("pipeline_tag"), str):
        out["pipeline_tag"] = data["pipeline_tag"]
    if repo_type == "model" and isinstance(data.get("library_name"), str):
        out["library_name"] = library_name = data["library_name"]
    tags = [str(tag) for tag in _as_list(data.get("tags"))]
    if library_name:
        tags.append(library_name)
    tags += [f"dataset:{d}" for d in _as_list(data.get("datasets"))]
    for base in _as_list(data.get("base_model")):
        relation = data.get("base_model_relation")
        tags += [f"base_model:{base}"] + ([f"base_model:{relation}:{base}"] if isinstance(relation, str) else [])
    tags += [f"arxiv:{paper}" for paper in _ARXIV_LINK.findall(readme)]
    tags += [f"license:{license}" for license in _as_list(data.get("license"))]
    out["tags"] = list(dict.fromkeys(tags))
    return out


def _as_list(value: Any) -> list[Any]:
    """A metadata field that may be one value or a list of them, as a list of its scalar values."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, (str, int, float)) and not isinstance(v, bool)]


def _small_file(store: Store, files: dict[str, dict[str, Any]], path: str) -> bytes | None:
    """The bytes of ``path`` in a commit when it exists and is small enough to index, else ``None``."""
    entry = files.get(path)
    if entry is None or entry["size"] > MAX_INDEXED_FILE:
        return None
    try:
        return store.blobs.path(entry["sha256"]).read_bytes()
    except OSError:
        return None


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
