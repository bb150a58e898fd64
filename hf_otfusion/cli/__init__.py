"""`otfusion-hub`: fuse checkpoints from the command line, and serve a local Hub for offline work.

One module per group of commands (`fuse`, `align`, `train`, `hub`), their shared flag builders in `flags`; this
module builds the parser from them and turns every error into one `error: ...` line and an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import align, fuse, hub, train
from .flags import Parser

EXIT_CODES = """exit codes:
  0  success
  1  internal error (a bug, or the system failed: disk full, permissions); rerun with --debug for the traceback
  2  bad input: the message says what to change (nothing was written)
  3  the upload failed; the output directory was kept and the message holds the command that retries it
"""


def build_parser() -> argparse.ArgumentParser:
    from ..engine.spec import available_specs  # the families are the shipped spec files, not a list kept here

    parser = Parser(
        prog="otfusion-hub",
        description=f"Fuse Hugging Face transformers ({', '.join(available_specs())}) with optimal-transport "
        "alignment.",
        epilog=fuse.EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    fuse.add_parsers(commands)
    align.add_parsers(commands)
    train.add_parsers(commands)
    hub.add_parsers(commands)
    for command in commands.choices.values():  # `--debug` after the command too; SUPPRESS keeps one given before
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one `otfusion-hub` command; returns its exit code (see `EXIT_CODES`).

    Every error ends in one `error: ...` line on stderr; tracebacks only with `--debug`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Under torchrun / accelerate launch every process runs this: only the main one (RANK 0) shows progress and
    # says what happens, the others report errors only.
    secondary = os.environ.get("RANK", "0") != "0"
    if secondary and hasattr(args, "quiet"):
        args.quiet = True
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    level = logging.ERROR if secondary else logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.getLogger("hf_otfusion").setLevel(level)
    if args.command in ("fuse", "align", "inspect", "finetune", "eval"):  # the commands that load models
        from .progress import hide_weight_loading_bars

        hide_weight_loading_bars()
    from ..errors import FusionError

    commands = {"push": hub.run_push, "finetune": train.run_finetune, "eval": train.run_eval,
                "inspect": fuse.run_inspect, "serve-hub": hub.run_serve_hub, "align": align.run_align,
                "fuse": lambda args: fuse.run_fuse(args, argv)}  # fmt: skip
    try:
        return commands[args.command](args)
    except FusionError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (an --out being written was left unchanged)", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, OSError) and error.errno is not None:  # the system, not the input: disk, permissions
            print(f"error: {error}", file=sys.stderr)
        else:
            print(f"error: internal error: {type(error).__name__}: {str(error).rstrip('.')}. This is a bug in "
                  "hf_otfusion; please "
                  "report it with the command line (rerun with --debug for the traceback).",
                  file=sys.stderr)  # fmt: skip
        return 1
