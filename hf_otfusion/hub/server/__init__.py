"""A small local Hugging Face Hub-compatible HTTP server, bound to a loopback address.

Fusion workflows pull parents from the Hub and push fused models back. Tests and offline demos need the
REAL ``huggingface_hub``, ``transformers`` and ``datasets`` clients to talk to something that answers like the
Hub, with no network. This package serves the HTTP subset those clients use (create repo, model and dataset
info with the card's metadata, tree listing, preupload, the LFS batch API and uploads, NDJSON commits,
``/resolve`` downloads with ``Range``, branches, refs, history, pull-request refs)
from a directory on disk. Point a client at it with ``HF_ENDPOINT=<server.url>`` (set before importing
``huggingface_hub``), ``HF_HUB_DISABLE_XET=1`` and ``HF_TOKEN=<server.token>``: writes and private repos need
that token, and requests must name a loopback ``Host`` and carry no foreign ``Origin`` (``guard``).

One concept per module, so each can be read (and reviewed) alone:

- ``storage`` (+ ``blobs``): repos, refs, immutable content-addressed commits and file contents on disk; no HTTP.
- ``views``: the JSON documents the Hub API answers, built from storage objects.
- ``responses``, ``handler``, ``routes``: HTTP responses, the per-connection plumbing, and what each endpoint does.
- ``ndjson``: the streaming parse of commit bodies, which spools file contents to disk as they arrive.
- ``lfs``: which files go through Git LFS, the batch API's answer, and the signed upload URLs it hands out.
- ``guard``: the checks every request passes first (loopback ``Host``, same ``Origin``, bearer token).
- ``server``: binding, serving in a thread or the foreground, stopping, test hooks (``HubServer``, ``serve``).

Only the names below are the package's interface; the modules' other names may change.
"""

from .errors import HubError
from .server import HubServer, serve
from .storage import commit_sha

__all__ = ["HubServer", "HubError", "commit_sha", "serve"]
