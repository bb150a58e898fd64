"""`otfusion-hub`: fuse checkpoints from the command line, and serve a local Hub for offline work.

Every `fuse` option that shapes the fusion is a `FusionConfig` field of the same name, so a command line and
a saved `fusion_config.json` describe the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

EXAMPLES = """examples:
  # data-free fusion of two local checkpoints (weight-based cost, exact OT)
  otfusion-hub fuse ./model-a ./model-b --out fused --cost weights

  # activation-based soft alignment on a saved datasets.Dataset of model inputs
  otfusion-hub fuse ./model-a ./model-b --out fused --data ./align-ds --solver sinkhorn --reg 0.3

  # a Hub-compatible server on 127.0.0.1 for trying Hub workflows offline
  otfusion-hub serve-hub --port 8765 --root ./hub-data
"""


def build_parser() -> argparse.ArgumentParser:
    from .config import _CHOICES, FusionConfig

    parser = argparse.ArgumentParser(
        prog="otfusion-hub",
        description="Fuse Hugging Face transformers (BERT, ViT, DeiT) with optimal-transport alignment.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    fuse = commands.add_parser(
        "fuse",
        help="align two or more parents onto the anchor and average them",
        description="Align every parent onto the anchor (parent --anchor) with OT, average, and save a "
        "safetensors checkpoint of the anchor's class.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fuse.add_argument("parents", nargs="+", help="local checkpoint directories or Hub model ids (two or more)")
    fuse.add_argument(
        "--out", type=Path, required=True, help="output directory (refused if it exists and is not empty)"
    )
    fuse.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    fuse.add_argument("--data", type=Path, help="alignment data: a datasets.Dataset saved with save_to_disk, "
                      "holding the model's input columns (needed for --cost activations)")  # fmt: skip
    fuse.add_argument("--config", type=Path, help="a JSON file of FusionConfig fields; flags override it")
    fuse.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    defaults = FusionConfig()
    for field in dataclasses.fields(FusionConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = f"FusionConfig.{field.name} (default: {default})"
        if field.name in _CHOICES:
            fuse.add_argument(flag, choices=_CHOICES[field.name], default=None, help=help_text)
        elif field.name == "weights":
            fuse.add_argument(flag, type=float, nargs="+", default=None, help=help_text + "; one per parent")
        else:
            kind = float if isinstance(default, float) else int
            fuse.add_argument(flag, type=kind, default=None, help=help_text)

    serve = commands.add_parser("serve-hub", help="serve a local Hub-compatible API on 127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--root", type=Path, required=True, help="directory holding the repositories")
    return parser


def run_fuse(args: argparse.Namespace) -> int:
    from .config import FusionConfig

    values = json.loads(args.config.read_text()) if args.config else {}
    for field in dataclasses.fields(FusionConfig):
        flag_value = getattr(args, field.name)
        if flag_value is not None:
            values[field.name] = flag_value
    config = FusionConfig.from_dict(values)

    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise SystemExit(f"error: --out {out} exists and is not empty; choose another path or pass --overwrite.")
    data = None
    if args.data is not None:
        from datasets import load_from_disk

        data = load_from_disk(str(args.data))

    from .fusion import fuse_with_diagnostics

    result = fuse_with_diagnostics(args.parents, data=data, config=config, progress=not args.quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result.model.save_pretrained(staging)
        (staging / "fusion_config.json").write_text(config.to_json() + "\n")
        (staging / "fusion_diagnostics.json").write_text(
            json.dumps([d.to_dict() for d in result.diagnostics], indent=1) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not args.quiet:
        print(result.summary())
    print(f"Fused model written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve-hub":
        from .hub_server import serve

        serve(args.root, args.port)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("hf_otfusion").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from .errors import FusionError

    try:
        return run_fuse(args)
    except FusionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
