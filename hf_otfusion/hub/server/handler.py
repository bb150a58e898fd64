"""HTTP plumbing of the local Hub server: request bodies, errors and responses on one keep-alive connection.

``BaseHTTPRequestHandler`` parses the request line and headers; this module adds what every endpoint needs
(bounded body reads, NDJSON line streaming, JSON/file responses with ``Content-Length``, ``Range``, and
turning a ``HubError`` into the Hub's error shape) so that ``routes`` only says what each endpoint answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from .blobs import CHUNK
from .errors import HubError
from .responses import Response, header_safe, json_response
from .routes import Routes

if TYPE_CHECKING:
    from .guard import Guard
    from .storage import Store


class ServedHub(Protocol):
    """What a request handler needs from the `HubServer` it runs in (a protocol, so that the handler does not
    import the server that imports it)."""

    store: Store
    guard: Guard
    url: str
    max_commit_bytes: int

    def _record(self, method: str, path: str) -> None: ...

    def _record_download(self, path: str, size: int) -> None: ...

    def _take_commit_failure(self) -> bool: ...


logger = logging.getLogger("hf_otfusion.hub.server")

#: JSON API bodies (create repo, preupload, validate-yaml, ...) are small; anything bigger is refused.
MAX_JSON_BODY_BYTES = 16 * 2**20


class Handler(Routes, BaseHTTPRequestHandler):
    """Routes one HTTP request to the store. HTTP/1.1 keep-alive, so every answer carries Content-Length."""

    server: Any  # the server's `_HTTPServer`, whose `hub` is the `ServedHub`
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

    @property
    def hub(self) -> ServedHub:
        return self.server.hub

    @property
    def store(self) -> Store:
        return self.server.hub.store

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.hub._record(method, split.path)
        self._request_path = split.path
        self._unread = 0
        self.authenticated = False
        try:
            self._unread = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._unread = -1
        try:
            if self._unread < 0:
                raise HubError(400, "Invalid Content-Length")
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise HubError(411, "Chunked request bodies are not supported; send Content-Length")
            self.authenticated = self.hub.guard.check(self.headers)
            response = self._route(method, split.path, parse_qs(split.query))
        except HubError as err:
            if 0 < self._unread <= MAX_JSON_BODY_BYTES:
                self._drain()  # a small unread body (e.g. refused for its token): keep the connection usable
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = header_safe(err.message)
            if err.status >= 500:
                logger.warning("%s %s -> %d %s", method, split.path, err.status, err.message)
            else:
                logger.debug("%s %s -> %d %s", method, split.path, err.status, err.message)
            response = json_response({"error": err.message}, err.status, headers)
        except Exception:  # a bug must not kill the connection thread silently
            logger.exception("internal error on %s %s", method, split.path)
            response = json_response({"error": "Internal server error"}, 500)
        self._send(response, head=method == "HEAD")

    def _send(self, response: Response, head: bool) -> None:
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
                    chunk = f.read(min(CHUNK, remaining))
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

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body, read from the socket in pieces (for uploads streamed straight to disk)."""
        while self._unread > 0:
            chunk = self.rfile.read(min(CHUNK, self._unread))
            if not chunk:
                self.close_connection = True
                raise HubError(400, "Truncated request body")
            self._unread -= len(chunk)
            yield chunk

    def _drain(self) -> None:
        while self._unread > 0:
            chunk = self.rfile.read(min(CHUNK, self._unread))
            if not chunk:
                break
            self._unread -= len(chunk)

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.hub.url
