"""Content-addressed file contents on disk, shared by every repo of the local Hub server.

A blob is stored once under its sha256 (``blobs/<sha256[:2]>/<sha256>``) and never changes, so readers need no
lock and a commit can refer to it by hash forever. Writes go through a temp file and a rename, so a reader
never sees half a blob. The git blob SHA-1 is what the Hub reports as a regular file's ``oid`` and ETag.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import HubError

CHUNK = 2**20


def git_blob_oid(size: int, chunks: Iterator[bytes]) -> str:
    """The git blob SHA-1 (what the Hub reports as a regular file's ``oid`` and ETag)."""
    digest = hashlib.sha1(f"blob {size}\0".encode())
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


class Blobs:
    """The blob directory; ``tmp`` (same file system) receives partial writes before their rename."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.tmp = tmp
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> dict[str, Any]:
        """Store bytes under their sha256 and return the file entry a commit records for them."""
        return self.put_stream(iter((data,)))

    def put_stream(self, chunks: Iterable[bytes], expect_sha256: str | None = None) -> dict[str, Any]:
        """Store a stream of bytes, written to disk as it comes (an upload is never whole in memory).

        With ``expect_sha256`` (an LFS upload, named by its hash before it is sent), content that hashes to
        anything else is refused and never enters the store.
        """
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        tmp = Path(name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            sha256 = digest.hexdigest()
            if expect_sha256 is not None and sha256 != expect_sha256:
                raise HubError(400, f"Uploaded content has sha256 {sha256}, not the announced {expect_sha256}")
            # the git oid hashes the size first, known only now: a second pass over the (page-cached) file
            entry = {"sha256": sha256, "size": size, "oid": git_blob_oid(size, _file_chunks(tmp))}
            target = self.path(sha256)
            if target.exists():
                tmp.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return entry

    def existing(self, sha256: str, size: int | None = None) -> dict[str, Any]:
        """File entry for a blob already stored (an ``lfsFile`` commit line refers to content by sha256).

        Raises:
            HubError: 422 when no such blob was uploaded (or it has another ``size`` than the line says).
        """
        sha256 = sha256.lower()
        path = self.path(sha256)
        if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not path.is_file():
            raise HubError(422, f"Unknown LFS object {sha256}: upload it through the LFS batch endpoint first")
        stored = path.stat().st_size
        if size is not None and size != stored:
            raise HubError(422, f"LFS object {sha256} has {stored} bytes, not {size}")
        return {"sha256": sha256, "size": stored, "oid": git_blob_oid(stored, _file_chunks(path))}
