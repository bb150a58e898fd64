"""Uploading a finished output directory to the Hub in one commit, with the command that retries a failed upload.

A separate step from writing the output, so that a failed upload (HTTP error, or the connection: refused,
reset, timed out) keeps the directory, and `otfusion-hub push` can retry it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import PushError


@dataclass
class PushResult:
    """Where an upload landed: the commit SHA and its URLs (`pr_url` for `create_pr`).

    `changed` is False when the branch already held exactly these files: no commit was made, and `commit_sha`
    is the branch's head as it was.
    """

    repo_id: str
    revision: str
    commit_sha: str
    commit_url: str
    repo_url: str
    pr_url: str | None = None
    changed: bool = True


def push_command(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                 create_pr: bool = False) -> str:  # fmt: skip
    """The `otfusion-hub push` command line that uploads `folder` again (printed when an upload failed)."""
    words = ["otfusion-hub", "push", str(folder), repo_id]
    words += ["--private"] * private + (["--revision", revision] if revision else []) + ["--create-pr"] * create_pr
    return shlex.join(words)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> PushResult:
    """Creates `repo_id` if needed and uploads everything in `folder` as ONE commit.

    The token is whatever huggingface_hub finds (HF_TOKEN or `hf auth login`); it is never read, written or
    logged here.

    Raises:
        PushError: the upload failed (an HTTP error, or the connection: refused, reset, timed out, cut); its
            message holds the `otfusion-hub push` command that retries it.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    retry = push_command(folder, repo_id, private=private, revision=revision, create_pr=create_pr)
    if not (folder / "config.json").is_file():
        raise PushError(
            f"{folder} holds no config.json; push a directory written by `otfusion-hub fuse`.",
            retry=retry,
            repo_id=repo_id,
            folder=folder,
        )
    api = HfApi()
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":  # a new branch, or the base of a pull request, must exist first
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        before = _head(api, repo_id, revision or "main")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload fused model ({folder.name}) with hf_otfusion",
        )  # fmt: skip
    # HfHubHTTPError's bases are the HTTP client's own error class (httpx's: connection refused or reset, timeouts and
    # server disconnects all derive from it) and OSError (what requests, and the file reads, raise)
    except (*HfHubHTTPError.__bases__, ValueError) as error:  # type: ignore[misc]  # a tuple of classes at run time
        raise PushError(
            f"Upload of {folder} to {repo_id} failed: {_short_error(error)}\nThe fused model is kept in {folder}; "
            f"retry the upload with:\n  {retry}",
            retry=retry,
            repo_id=repo_id,
            folder=folder,
        ) from error
    return PushResult(
        repo_id=repo_id, revision=revision or "main", commit_sha=info.oid, commit_url=info.commit_url,
        repo_url=str(repo_url), pr_url=info.pr_url, changed=create_pr or info.oid != before,
    )  # fmt: skip


def _head(api, repo_id: str, revision: str) -> str | None:
    """The commit `revision` of `repo_id` points at now, or None for a branch that does not exist yet."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return api.repo_info(repo_id, revision=revision).sha
    except RevisionNotFoundError:
        return None


def _short_error(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
