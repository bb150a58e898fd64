"""Lifecycle of the local Hub server: bind a loopback socket, serve in a thread or in the foreground, stop.

This is the part tests and ``otfusion-hub serve-hub`` hold on to (``HubServer``, ``serve``); it also carries
the test hooks (``fail_next_commits``, ``request_log``, ``download_log``) because they are state of one
running server, shared by all its connection threads.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import socketserver
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from ...errors import HubServerStateError, InvalidConfigError, UnsafeHostError
from .guard import TOKEN_ENV, Guard, default_token
from .handler import Handler
from .storage import Store

logger = logging.getLogger("hf_otfusion.hub.server")

#: Commit bodies carry base64 file contents; they are streamed line by line, one file in memory at a time.
DEFAULT_MAX_COMMIT_BYTES = 4 * 2**30
#: Most (method, path) pairs kept in ``HubServer.request_log``, so a long-running ``serve`` stays bounded.
REQUEST_LOG_LIMIT = 100_000
#: Connection threads at most. Clients keep connections alive between requests (huggingface_hub pools a
#: handful per process), so this bounds open connections, not requests; 64 is far more than tests need.
DEFAULT_MAX_WORKERS = 64
#: How long a new connection waits for a free worker before it is answered 503 and closed.
DEFAULT_BUSY_WAIT_S = 10.0
_BUSY_BODY = b'{"error": "Local Hub server busy: too many open connections"}'


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most ``max_workers`` connection threads; no waiting for them on close.

    The stdlib server starts one thread per connection without limit, so stalled or idle connections (a
    client that never sends, or a pile of keep-alives) could exhaust threads and memory. A semaphore slot is
    taken before a connection's thread starts and released when it ends; the accept loop waits (bounded) for
    a slot, and a connection that gets none is answered 503. Stalled connections end after
    ``Handler.timeout``, which frees their slots.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer, max_workers: int, busy_wait_s: float) -> None:
        if max_workers < 1:
            raise InvalidConfigError("max_workers must be at least 1", field="max_workers", value=max_workers)
        self.hub = hub
        self.busy_wait_s = busy_wait_s
        self._slots = threading.BoundedSemaphore(max_workers)
        self._held: set[int] = set()  # the requests holding a slot, so each slot is released exactly once
        self._held_lock = threading.Lock()
        super().__init__(address, Handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(timeout=self.busy_wait_s):
            logger.warning("all connection workers busy: refusing a connection from %s", client_address)
            try:
                request.settimeout(1)
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_BUSY_BODY)
                    + _BUSY_BODY
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._held_lock:
            self._held.add(id(request))
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            # interrupted while the thread starts (Ctrl-C): it may be running already and release the slot itself
            self._release_slot(request)
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release_slot(request)

    def _release_slot(self, request) -> None:  # type: ignore[no-untyped-def]
        with self._held_lock:
            if id(request) not in self._held:
                return
            self._held.discard(id(request))
        self._slots.release()

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _loopback_host(host: str) -> str:
    """The loopback IP to bind for ``host``; anything else is refused: one shared token over plain HTTP is no
    protection on a network, so the server is for this machine only."""
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
            f"Refusing to bind the local Hub server to {host!r}: it speaks plain HTTP with one shared token, "
            "so it only serves loopback addresses such as 127.0.0.1 or ::1",
            host=host,
        )
    return str(ip)


class HubServer:
    """A local Hub-compatible server over ``root``, for tests and offline use of the real Hub clients.

    Usage::

        with HubServer(tmp_path, token="secret") as hub:
            env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": hub.token}
            ...

    ``token`` is what clients must send (``HF_TOKEN``) to write and to read private repos; without one it is
    ``$OTFUSION_HUB_TOKEN``, else a random one (``token_generated`` is then true). See ``guard``.
    At most ``max_workers`` connections are served at once; one more waits ``busy_wait_s`` for a free worker,
    then gets 503. Stopping waits for that wait, at most.

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
        token: str | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
        busy_wait_s: float = DEFAULT_BUSY_WAIT_S,
    ) -> None:
        bind_host = _loopback_host(host)
        self.root = Path(root)
        self.store = Store(self.root, username)
        self.max_commit_bytes = max_commit_bytes
        self.fail_next_commits = 0
        self.request_log: list[tuple[str, str]] = []
        self.download_log: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        server_cls = _HTTPServer6 if ":" in bind_host else _HTTPServer
        self._httpd = server_cls((bind_host, port), self, max_workers, busy_wait_s)
        if token is None:
            token, self.token_generated = default_token()
        else:
            self.token_generated = False
        self.token = token
        try:
            self.guard = Guard(token, int(self._httpd.server_address[1]))
        except ValueError:
            self._httpd.server_close()
            raise
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


def serve(root: str | Path, port: int, host: str = "127.0.0.1", token: str | None = None) -> None:
    """Serve a local Hub over ``root`` on ``host:port`` until interrupted (for ``otfusion-hub serve-hub``).

    A generated token is printed, since the user has no other way to learn it; a token the user gave (``--token``
    or ``$OTFUSION_HUB_TOKEN``) is not echoed, so it does not end up in terminal logs.
    """
    server = HubServer(root, host=host, port=port, token=token)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # A service manager stops us with SIGTERM: the serving loop is asked to end, from another thread since
        # `shutdown` waits for it, rather than an exception raised wherever the main thread happens to be (inside
        # the start of a worker thread, say, where socketserver would catch and log it and serve on).
        def request_stop(signum: int, frame: object) -> None:
            logger.info("signal %d, stopping", signum)
            threading.Thread(target=server._httpd.shutdown, daemon=True).start()

        previous = signal.signal(signal.SIGTERM, request_stop)
    print(f"Serving a local Hugging Face Hub at {server.url} (root {Path(root).resolve()})", flush=True)
    shown = server.token if server.token_generated else "<your token>"
    print(f"Use it with: HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1 HF_TOKEN={shown}", flush=True)
    if server.token_generated:
        print(f"Generated token (pass --token or set ${TOKEN_ENV} to choose one): {server.token}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("interrupted, stopping")
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
