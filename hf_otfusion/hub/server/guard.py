"""Who may talk to the local Hub server: checks run on every request before it is routed.

Binding to loopback is not enough on a developer machine: any web page the user opens can make the browser
send requests to ``127.0.0.1`` (CSRF), and a DNS-rebinding page can even read the answers under its own host
name. So every request must name the server by a loopback ``Host`` (with its port), a browser's ``Origin``
must be the server's own, and no CORS headers are ever sent. Writes, and reads of private repos, need the
server's bearer token (``HF_TOKEN`` on the client), which a page cannot know. The one write without it is the
``PUT`` of an LFS object, which the client sends with no ``Authorization`` header (on the Hub it goes to a
presigned storage URL): its URL carries an HMAC keyed by the token instead (``sign`` / ``check_upload``), handed
out only to token holders by the LFS batch endpoint.

Missing or private repos are answered to an unauthenticated client with 401 and ``X-Error-Code: RepoNotFound``,
as the real Hub does, so that the answer does not tell a private repo from a missing one; ``huggingface_hub``
raises ``RepositoryNotFoundError`` for both. A token that is sent but wrong is always 401 with the real Hub's
message "Invalid credentials in Authorization header", so a client with a stale token fails loudly.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from email.message import Message

from ...errors import InvalidConfigError
from .errors import HubError

#: Where ``HubServer(token=None)`` and ``serve-hub`` without ``--token`` take the token from (argv is visible
#: to every local user in ``ps``; the environment is not).
TOKEN_ENV = "OTFUSION_HUB_TOKEN"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def default_token() -> tuple[str, bool]:
    """(token, generated): ``$OTFUSION_HUB_TOKEN`` if set, else a fresh random one."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token, False
    return "hf_local_" + secrets.token_urlsafe(24), True


class Guard:
    """The Host/Origin/token checks for one server listening on ``port``."""

    def __init__(self, token: str, port: int) -> None:
        if not token or any(c.isspace() for c in token):
            raise InvalidConfigError(
                "The local Hub token must be a non-empty string without spaces; give --token a word like "
                "'my-local-token', or leave it out for a generated one",
                field="token",
            )
        self.token = token
        self.hosts = {f"{name}:{port}" for name in LOOPBACK_NAMES}

    def check(self, headers: Message) -> bool:
        """Raise the refusal for a request, or return whether it carries the right token."""
        host = headers.get("Host")
        if not host:
            raise HubError(400, "A Host header is required")
        if host.lower() not in self.hosts:
            raise HubError(421, f"This local Hub server answers only to {', '.join(sorted(self.hosts))}, not {host!r}")
        origin = headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{host.lower()}":
            raise HubError(403, f"Cross-origin requests are refused (Origin {origin!r})")
        auth = headers.get("Authorization")
        if auth is None:
            return False
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
            raise HubError(401, INVALID_CREDENTIALS)
        return True

    def sign(self, *parts: str) -> str:
        """An HMAC of ``parts`` keyed by the token: the authority of a URL the client later uses without one."""
        return hmac.new(self.token.encode(), "\0".join(parts).encode(), hashlib.sha256).hexdigest()

    def check_upload(self, oid: str, size: str, expires: str, signature: str) -> None:
        """Refuse an LFS upload URL (see ``lfs``) that this server did not sign, or that has expired."""
        if not hmac.compare_digest(signature.encode(), self.sign(oid, size, expires).encode()):
            raise HubError(403, "LFS upload URL not signed by this server: ask the batch endpoint for a new one")
        if not expires.isdigit() or int(expires) < time.time():
            raise HubError(403, "LFS upload URL expired: ask the batch endpoint for a new one")


def unauthorized(what: str) -> HubError:
    """A write (or other token-only request) made without a token."""
    return HubError(401, f"{what} needs a token: send 'Authorization: Bearer <token>' (set HF_TOKEN)")
