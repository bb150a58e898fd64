"""The one error type of the local Hub server, shared by the storage and the HTTP layers.

Storage failures (unknown repo, revision or file, stale parent, bad name) *are* the Hub API's error vocabulary:
the client maps the status and the ``X-Error-Code`` header to its exception classes. So the storage layer
raises them directly, and the HTTP layer only turns them into a response; nothing here touches a socket.
"""

from __future__ import annotations


class HubError(Exception):
    """An error answered to the client as JSON ``{"error": msg}`` plus the Hub's ``X-Error-Code`` header.

    The client maps ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) to its exception classes;
    HEAD answers have no body, so the header is what carries the meaning there.
    """

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
