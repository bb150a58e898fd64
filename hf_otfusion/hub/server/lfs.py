"""Git LFS on the local Hub server: which uploads go through it, the batch endpoint's answer, signed uploads.

The Hub stores large and binary files in LFS, and clients depend on it: ``preupload`` says per file whether
its content is sent inside the commit (``regular``) or beforehand through the LFS batch API (``lfs``), and
``datasets.Dataset.push_to_hub`` writes each parquet shard to a temporary file, uploads it through LFS, deletes
the file, and only then commits ``lfsFile`` lines that name the content by sha256. A server that answered
``regular`` for everything made that commit read files that no longer exist.

The flow, as ``huggingface_hub.lfs`` drives it:

1. ``POST /api/{type}s/{repo}/preupload/{rev}``: ``lfs`` for binary or large files (``upload_mode``).
2. ``POST /{prefix}{repo}.git/info/lfs/objects/batch`` (token required): for each ``{oid, size}``, nothing
   when the blob is already stored, else an ``upload`` action whose ``href`` points back to this server
   (``batch_answer``).
3. ``PUT`` to that ``href``, the raw bytes, with no ``Authorization`` header (on the Hub it is a presigned S3
   URL). So the ``href`` carries its own authority: an HMAC of (oid, size, expiry) keyed by the server token
   (``guard.Guard.sign``), which only a client holding the token can have obtained from step 2. The bytes
   are streamed into the blob store and kept only if their sha256 and size are the ones signed.
4. The commit's ``lfsFile`` line refers to the stored blob by its sha256.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import time
from typing import Any
from urllib.parse import quote

from .blobs import Blobs
from .errors import HubError
from .guard import Guard

#: Files larger than this always go through LFS, whatever their content (the Hub's threshold).
LFS_SIZE_THRESHOLD = 10 * 2**20
#: Suffixes a new Hub repo's ``.gitattributes`` tracks with LFS even when their first bytes look like text.
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib", ".mlmodel", ".model", ".msgpack",
    ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar", ".safetensors",
    ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)  # fmt: skip
#: How long an upload ``href`` stays valid: long enough for a slow multi-file push, short for a leaked log.
UPLOAD_URL_LIFETIME_S = 3600
UPLOAD_ROUTE = "/api/lfs-upload/"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"


def upload_mode(path: str, size: int, sample_b64: Any) -> str:
    """``lfs`` or ``regular`` for a file of ``size`` bytes whose first bytes are ``sample_b64`` (base64).

    LFS for large files, for the suffixes the Hub tracks, and for binary content (a NUL byte or invalid UTF-8
    in the sample, which is what git calls binary); empty files stay regular, as the client requires.
    """
    if size == 0:
        return "regular"
    if size > LFS_SIZE_THRESHOLD or path.lower().endswith(LFS_SUFFIXES):
        return "lfs"
    try:
        sample = base64.b64decode(sample_b64 or "", validate=True)
        # a last character cut by the end of the sample is fine, unless the sample is the whole file
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=len(sample) >= size)
    except (binascii.Error, ValueError, TypeError):
        return "lfs"
    return "lfs" if b"\0" in sample else "regular"


def batch_answer(body: dict[str, Any], blobs: Blobs, guard: Guard, base_url: str, max_bytes: int) -> dict[str, Any]:
    """The LFS batch API's answer to an upload request: per object, nothing (stored), an action, or an error.

    Raises:
        HubError: 422, the request is not an upload batch (the message says what is wrong).
    """
    if body.get("operation") != "upload":
        raise HubError(422, "This server's LFS batch endpoint serves uploads only; downloads use /resolve")
    if body.get("hash_algo", "sha256") != "sha256":
        raise HubError(422, "Only sha256 LFS objects are supported")
    transfers = body.get("transfers") or ["basic"]
    if "basic" not in transfers:
        raise HubError(422, f"No common LFS transfer: the client offers {transfers}, this server speaks 'basic'")
    objects = body.get("objects")
    if not isinstance(objects, list):
        raise HubError(422, "An LFS batch request needs a list of 'objects'")
    expires = int(time.time()) + UPLOAD_URL_LIFETIME_S
    return {"transfer": "basic", "objects": [_object(o, blobs, guard, base_url, max_bytes, expires) for o in objects]}


def _object(obj: Any, blobs: Blobs, guard: Guard, base_url: str, max_bytes: int, expires: int) -> dict[str, Any]:
    oid = str(obj.get("oid", "")).lower() if isinstance(obj, dict) else ""
    size = obj.get("size") if isinstance(obj, dict) else None
    if not SHA256_RE.match(oid) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        message = "An LFS object needs a sha256 'oid' and an integer 'size'"
        return {"oid": oid, "size": size if isinstance(size, int) else 0, "error": {"code": 422, "message": message}}
    if size > max_bytes:
        return {"oid": oid, "size": size, "error": {"code": 413, "message": f"Object larger than {max_bytes} bytes"}}
    answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
    path = blobs.path(oid)
    if path.is_file() and path.stat().st_size == size:
        return answer  # no actions: the client skips the upload
    query = f"size={size}&expires={expires}&signature={quote(guard.sign(oid, str(size), str(expires)))}"
    answer["actions"] = {
        "upload": {"href": f"{base_url}{UPLOAD_ROUTE}{oid}?{query}", "expires_in": UPLOAD_URL_LIFETIME_S}
    }
    return answer


def pointer_size(sha256: str, size: int) -> int:
    """Bytes of the git LFS pointer file that stands for the object in git (what the Hub's tree reports)."""
    return len(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
