"""`otfusion-hub push` and `otfusion-hub serve-hub`, and the upload that `fuse` and `finetune` end with."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .flags import add_push_options, count


def add_parsers(commands) -> None:
    """The `push` and `serve-hub` sub-commands."""
    push = commands.add_parser(
        "push",
        help="upload a fused output directory to the Hub in one commit",
        description="Create REPO if needed and upload DIR (written by `otfusion-hub fuse`) as one commit; prints "
        "the commit SHA and URL. The token comes from HF_TOKEN or `hf auth login` and is never written anywhere.",
    )
    push.add_argument("folder", type=Path, metavar="DIR", help="the fused model directory")
    push.add_argument("repo_id", metavar="REPO", help="target model repository, e.g. user/fused-model")
    add_push_options(push, prefix="")
    push.add_argument("--commit-message", help="summary of the commit (default: names the directory)")
    push.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    serve = commands.add_parser("serve-hub", help="serve a local Hub-compatible API on 127.0.0.1")
    serve.add_argument("--port", type=count(0, 65535), default=8765, help="TCP port on 127.0.0.1; point clients "
                       "at it with HF_ENDPOINT=http://127.0.0.1:PORT (default: 8765; 0 picks a free port)")  # fmt: skip
    serve.add_argument("--root", type=Path, required=True, help="directory holding the repositories")
    serve.add_argument("--token", help="token clients must send (HF_TOKEN) to write and to read private repos "
                       "(default: $OTFUSION_HUB_TOKEN, else a random one, printed at start)")  # fmt: skip


def run_push(args: argparse.Namespace) -> int:
    if args.quiet:
        from .progress import silence_progress_bars

        silence_progress_bars()
    return push_output(args.folder, args.repo_id, args, commit_message=args.commit_message)


def push_output(folder: Path, repo_id: str, options, commit_message: str | None = None) -> int:
    """Uploads `folder`; prints the commit SHA and URL, or the error and the command that retries it.

    `options` holds `private`, `revision` and `create_pr`: the parsed flags, or the `FuseJob`.
    """
    from ..errors import PushError
    from ..hub.push import push_folder

    try:
        pushed = push_folder(
            folder, repo_id, private=bool(options.private), revision=options.revision,
            create_pr=bool(options.create_pr), commit_message=commit_message,
        )  # fmt: skip
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    if not pushed.changed:
        print(f"No changes: {pushed.repo_id}@{pushed.revision} already holds the files of {folder}; nothing committed")
    else:
        print(f"Pushed {folder} to {pushed.repo_url} (revision {pushed.revision})")
    print(f"commit: {pushed.commit_sha}")
    print(f"url: {pushed.pr_url or pushed.commit_url}")
    return 0


def run_serve_hub(args: argparse.Namespace) -> int:
    from ..hub.server import serve

    try:
        serve(args.root, args.port, token=args.token)
    except OSError as error:
        if error.errno is None:
            raise
        print(f"error: cannot serve on 127.0.0.1:{args.port}: {error.strerror}; choose another --port",
              file=sys.stderr)  # fmt: skip
        return 2
    return 0
