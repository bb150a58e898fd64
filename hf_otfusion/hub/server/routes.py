"""What each Hub endpoint answers: the routes ``huggingface_hub`` calls, mapped onto the storage layer.

A mixin of ``handler.Handler``: it reads bodies and headers through the handler's plumbing and returns a
``Response``; it never writes to the socket itself. See ``/work/shared/HUB_API.md`` for the subset served.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any
from urllib.parse import parse_qs, unquote

from . import lfs, views
from .errors import HubError
from .guard import unauthorized
from .ndjson import NDJSONReader, Spooled, decode_base64_chunks
from .responses import Response, json_response, parse_range
from .storage import DEFAULT_BRANCH, REPO_TYPES, SHORT_SHA_RE, Op, Repo, clean_repo_path

logger = logging.getLogger("hf_otfusion.hub.server")

_TYPE_BY_COLLECTION = {collection: repo_type for repo_type, (collection, _) in REPO_TYPES.items()}
_LFS_BATCH = ["info", "lfs", "objects", "batch"]
_TYPE_BY_URL_PREFIX = {prefix.rstrip("/"): repo_type for repo_type, (_, prefix) in REPO_TYPES.items() if prefix}


class Routes:
    """Routing and endpoint handlers; relies on the plumbing of ``handler.Handler`` (``_read_json``, ...)."""

    def _route(self, method: str, raw_path: str, query: dict[str, list[str]]) -> Response:
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
        if method == "POST" and len(segs) == 6 and segs[1].endswith(".git") and segs[2:] == _LFS_BATCH:
            return self._lfs_batch(repo_type, unquote(segs[0]), unquote(segs[1])[: -len(".git")])
        raise self._unsupported(method, raw_path)

    def _unsupported(self, method: str, raw_path: str) -> HubError:
        logger.warning("unsupported route %s %s", method, raw_path)
        return HubError(404, f"Route not supported by this local Hub server: {method} {raw_path}")

    def _require_token(self, what: str) -> None:
        if not self.authenticated:
            raise unauthorized(what)

    def _repo(self, repo_type: str, namespace: str, name: str) -> Repo:
        """The repo, if this client may see it: see ``guard`` for why a hidden one is a 401 ``RepoNotFound``."""
        try:
            repo = self.store.repo(repo_type, namespace, name)
        except HubError as error:
            if not self.authenticated and error.code == "RepoNotFound":
                raise HubError(401, error.message, "RepoNotFound") from None
            raise
        if not self.authenticated and self.store.meta(repo)["private"]:
            raise HubError(401, f"Repository not found: {repo.repo_id}", "RepoNotFound")
        return repo

    def _api(self, method: str, segs: list[str], query: dict[str, list[str]]) -> Response:
        route = (method, *segs[:2])
        if route == ("GET", "whoami-v2"):
            name = self.store.username
            return json_response(
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
            return json_response({"standardEnvVars": [], "harnesses": {}})
        if method == "PUT" and len(segs) == 2 and segs[0] == lfs.UPLOAD_ROUTE.strip("/").split("/")[-1]:
            return self._lfs_upload(segs[1], query)
        if route == ("POST", "validate-yaml"):
            self._read_json()
            return json_response({})
        if route == ("POST", "repos", "create"):
            self._require_token("Creating a repo")
            return self._create_repo(self._read_json())
        if route == ("DELETE", "repos", "delete"):
            self._require_token("Deleting a repo")
            body = self._read_json()
            repo_type = body.get("type") or "model"
            namespace = body.get("organization") or self.store.username
            self.store.delete_repo(self._repo(repo_type, namespace, str(body.get("name"))))
            return json_response({})
        if len(segs) >= 3 and segs[0] in _TYPE_BY_COLLECTION:
            repo = self._repo(_TYPE_BY_COLLECTION[segs[0]], unquote(segs[1]), unquote(segs[2]))
            return self._repo_api(method, repo, [unquote(s) for s in segs[3:]], query)
        raise self._unsupported(method, "/api/" + "/".join(segs))

    def _repo_api(self, method: str, repo: Repo, rest: list[str], query: dict[str, list[str]]) -> Response:
        action = rest[0] if rest else ""
        args = rest[1:]
        if method in ("POST", "DELETE") and action != "paths-info":  # paths-info is a read sent as a form POST
            self._require_token(f"{method} {action or 'on a repo'}")
        if method == "GET" and not rest:
            return json_response(views.repo_info(self.store, repo, DEFAULT_BRANCH))
        if method == "GET" and action == "revision" and args:
            return json_response(views.repo_info(self.store, repo, "/".join(args)))
        if method == "GET" and action == "tree" and args:
            sha = self.store.resolve(repo, args[0])
            files = self.store.commit(repo, sha)["files"]
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            base = "/".join(args[1:]).strip("/")
            return json_response(views.tree_listing(files, base, recursive))
        if method == "POST" and action == "paths-info" and args:
            return self._paths_info(repo, args[0])
        if method == "POST" and action == "preupload" and args:
            return self._preupload(repo, "/".join(args))
        if method == "POST" and action == "commit" and args:
            create_pr = query.get("create_pr", ["0"])[0].lower() in ("1", "true")
            return self._commit(repo, "/".join(args), create_pr)
        if method == "GET" and action == "refs" and not args:
            return json_response(views.repo_refs(self.store, repo, "include_prs" in query))
        if method == "GET" and action == "commits" and args:
            sha = self.store.resolve(repo, "/".join(args))
            return json_response(views.history(self.store, repo, sha))
        if action in ("branch", "tag") and args and method in ("POST", "DELETE"):
            name = "/".join(args)
            if method == "DELETE":
                self.store.delete_ref(repo, action, name)
                return json_response({})
            body = self._read_json()
            if action == "branch":
                self.store.set_ref(repo, "branch", name, body.get("startingPoint"))
            else:  # the client posts to /tag/{revision} with the tag name in the body
                self.store.set_ref(repo, "tag", str(body.get("tag")), name)
            return json_response({})
        raise self._unsupported(method, f"/api/{REPO_TYPES[repo.repo_type][0]}/{repo.repo_id}/{'/'.join(rest)}")

    # ------------------------------------------------------------------------------------------ handlers
    def _create_repo(self, body: dict[str, Any]) -> Response:
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
            prefix = REPO_TYPES[repo_type][1]
            url = f"{self._base_url()}/{prefix}{namespace}/{name}"
            return json_response({"error": error.message, "url": url}, 409, {"X-Error-Message": error.message})
        return json_response({"url": f"{self._base_url()}/{repo.url_path}", "name": repo.repo_id})

    def _paths_info(self, repo: Repo, revision: str) -> Response:
        form = parse_qs(self._read_body().decode("utf-8", "replace"))
        files = self.store.commit(repo, self.store.resolve(repo, revision))["files"]
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(views.file_entry(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append(views.dir_entry(files, path))
        return json_response(out)

    def _preupload(self, repo: Repo, revision: str) -> Response:
        """Each file's upload mode (``lfs.upload_mode``) and current oid, by which the client skips unchanged
        files: the git blob SHA-1 for a regular file, the sha256 for an LFS one (what the client compares)."""
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
            size = item.get("size")
            mode = lfs.upload_mode(path, size if isinstance(size, int) else 0, item.get("sample"))
            entry: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if path in files:
                entry["oid"] = files[path]["sha256" if mode == "lfs" else "oid"]
            out.append(entry)
        return json_response({"files": out})

    def _commit(self, repo: Repo, revision: str, create_pr: bool) -> Response:
        if self.hub._take_commit_failure():
            if self._unread <= self.hub.max_commit_bytes:
                self._drain()  # read the upload, so the client sees the 500 rather than a reset connection
            raise HubError(500, "Injected failure (fail_next_commits): commit not applied")
        if self._unread > self.hub.max_commit_bytes:
            raise HubError(413, f"Commit body too large ({self._unread} > {self.hub.max_commit_bytes} bytes)")
        ops: list[Op] = []
        header: dict[str, Any] | None = None
        # parsed as it streams in: a file's base64 goes to a spool file and its blob, never into memory whole
        reader = NDJSONReader(self.rfile, self._unread, self.store.root / "tmp")
        try:
            for item in reader:
                self._unread = reader.remaining
                header = self._commit_line(repo, revision, create_pr, item, ops) or header
                reader.cleanup()
        finally:
            self._unread = reader.remaining
            reader.cleanup()
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
        return json_response(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{base}/commit/{sha}",
                "pullRequestUrl": f"{base}/discussions/{pr_num}" if pr_num is not None else None,
            }
        )

    def _commit_line(
        self, repo: Repo, revision: str, create_pr: bool, item: Any, ops: list[Op]
    ) -> dict[str, Any] | None:
        """One NDJSON line: return a header; store a file's blob and queue its op; or queue a deletion."""
        try:
            key, value = item["key"], item["value"]
        except (KeyError, TypeError):
            raise HubError(400, "Malformed NDJSON commit line") from None
        if not isinstance(value, dict):
            raise HubError(400, f"Malformed {key!r} commit line")
        if key == "header":
            parent = value.get("parentCommit")
            if parent and not create_pr and SHORT_SHA_RE.match(str(parent)):
                self.store.check_parent(repo, revision, str(parent))
            return value
        elif key == "file":
            path = clean_repo_path(value.get("path"))
            content = value.get("content", "")
            base64_encoded = value.get("encoding", "base64") == "base64"
            try:
                if isinstance(content, Spooled):
                    chunks = decode_base64_chunks(content.chunks()) if base64_encoded else content.chunks()
                    blob = self.store.blobs.put_stream(chunks)
                elif base64_encoded:
                    blob = self.store.blobs.put(base64.b64decode(content, validate=True))
                else:
                    blob = self.store.blobs.put(str(content).encode("utf-8"))
            except (binascii.Error, ValueError, TypeError):
                raise HubError(400, f"Invalid base64 content for {path}") from None
            ops.append(Op("add", path, blob))
        elif key == "lfsFile":
            path = clean_repo_path(value.get("path"))
            if value.get("algo", "sha256") != "sha256":
                raise HubError(400, f"Unsupported LFS hash {value.get('algo')!r} for {path}")
            size = value.get("size")
            blob = self.store.blobs.existing(str(value.get("oid")), size if isinstance(size, int) else None)
            ops.append(Op("add", path, {**blob, "lfs": True}))
        elif key == "deletedFile":
            ops.append(Op("delete_file", clean_repo_path(value.get("path"))))
        elif key == "deletedFolder":
            ops.append(Op("delete_folder", clean_repo_path(str(value.get("path", "")).rstrip("/"))))
        else:
            raise HubError(400, f"Unknown commit line key {key!r}")
        return None

    def _lfs_batch(self, repo_type: str, namespace: str, name: str) -> Response:
        """The LFS batch API (``lfs.batch_answer``): where to upload each object, for token holders only."""
        self._require_token("An LFS upload")
        self._repo(repo_type, namespace, name)
        body = self._read_json()
        answer = lfs.batch_answer(body, self.store.blobs, self.hub.guard, self._base_url(), self.hub.max_commit_bytes)
        return json_response(answer, headers={"Content-Type": lfs.LFS_CONTENT_TYPE})

    def _lfs_upload(self, oid: str, query: dict[str, list[str]]) -> Response:
        """``PUT`` of an LFS object to the signed URL the batch API gave: streamed into the blob store."""
        size, expires, signature = (query.get(key, [""])[0] for key in ("size", "expires", "signature"))
        self.hub.guard.check_upload(oid, size, expires, signature)  # the URL's signature stands for the token
        if str(self._unread) != size:
            raise HubError(400, f"LFS upload of {oid}: Content-Length {self._unread} is not the signed size {size}")
        self.store.blobs.put_stream(self._body_chunks(), expect_sha256=oid)
        logger.info("LFS object %s stored (%s bytes)", oid[:10], size)
        return Response(200)

    def _resolve(self, repo_type: str, segs: list[str], head: bool) -> Response:
        repo = self._repo(repo_type, unquote(segs[0]), unquote(segs[1]))
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
        if entry.get("lfs"):  # as on the Hub: the client names (and checks) an LFS file's cache blob by sha256
            headers["X-Linked-Etag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Size"] = str(size)
        byte_range = None if head else parse_range(self.headers.get("Range"), size)
        if byte_range is None:
            return Response(200, headers, file=self.store.blobs.path(entry["sha256"]), length=size)
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return Response(206, headers, file=self.store.blobs.path(entry["sha256"]), start=start, length=end - start + 1)
