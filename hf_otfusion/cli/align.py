"""`otfusion-hub align`: every parent re-expressed in the anchor's basis, written as checkpoints for mergekit."""

from __future__ import annotations

import argparse
from pathlib import Path

from .flags import SEED, add_config_flags, add_encoding_options, add_push_options

EXAMPLES = """examples:
  # data-free (weight cost): permutations only; writes aligned/a/ and aligned/b/
  otfusion-hub align ./model-a ./model-b --out aligned

  # Hub parents, activation cost on 500 rows: ViT/DeiT also get their residual stream rotated (exact)
  otfusion-hub align user/vit-a user/vit-b@v1.0 user/vit-c --out aligned --data user/images --num-samples 500

  # then merge the aligned directories with mergekit (see README.md of any of them for the recipe)
  mergekit-yaml config.yml merged/

  # push each aligned parent to its own repo: user/aligned-vit-a, user/aligned-vit-b
  otfusion-hub align user/vit-a user/vit-b --out aligned --data user/images --push-to-hub user/aligned
"""

DESCRIPTION = """\
Align every parent onto the anchor (parent --anchor) with exact OT maps: permutations of neurons and
attention heads, and, for ViT/DeiT with --data, rotations of the residual stream (after the LayerNorms are
folded into their readers, an exact rewrite). Each parent is written, re-expressed in the anchor's basis, as
a normal safetensors checkpoint OUT/<parent-name>/ with its processor files and a model card; the anchor is
re-saved in the same parameterisation. Every output still computes its parent's function, but the weights
now line up unit for unit, so mergekit (linear, ties, slerp, ...) or any other merge tool can merge
independently trained models. Soft maps are refused (--solver sinkhorn, --marginals importance, --residual
mean, other widths): they are not function-preserving.
"""

# the FusionConfig fields that shape the maps; the others (method, weights, repair, target, ...) merge
ALIGN_FIELDS = (
    "cost", "solver", "residual", "heads", "within_heads", "activation_cost", "tokens", "tokens_per_sample", "anchor",
    "marginals", "rotation_rounds", "refine_steps", "refine_lr", "batch_size", "num_samples", "emd_max_iter",
)  # fmt: skip


def add_parsers(commands) -> None:
    """The `align` sub-command."""
    from ..config import FusionConfig

    align = commands.add_parser(
        "align",
        help="write every parent aligned onto the anchor (function-preserving), for mergekit or any merge tool",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    align.add_argument("parents", nargs="+", help="Hub model ids with an optional @revision (user/model@v1) or "
                       "local checkpoint directories; two or more")  # fmt: skip
    align.add_argument("--out", type=Path, required=True, help="output directory, one sub-directory per parent "
                       "(refused if it exists and is not empty, unless --overwrite)")  # fmt: skip
    align.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    align.add_argument("--config", type=Path, help="a YAML (or JSON) file of FusionConfig fields; flags override it")
    align.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    data = align.add_argument_group("alignment data")
    data.add_argument("--data", help="alignment data (for --cost activations): a Hub dataset id[@revision], a "
                      "save_to_disk directory, a data directory (imagefolder, csv, ...) or data files")  # fmt: skip
    data.add_argument("--split", help="split of --data (default: the only split, or train)")
    data.add_argument("--data-seed", type=SEED, default=0, help="seed of the row sample drawn with --num-samples")
    add_encoding_options(data)
    add_config_flags(
        align.add_argument_group("alignment (FusionConfig fields)"), FusionConfig,
        shown_defaults={"cost": "activations with --data, else weights"}, only=ALIGN_FIELDS,
    )  # fmt: skip
    align.add_argument(
        "--device",
        help="where the forward passes over the alignment data run (statistics, RegMean, repair) and Sinkhorn "
        "solves: cpu, cuda, auto (default: cpu); exact solves and refinement stay on the CPU",
    )
    hub = align.add_argument_group("Hub")
    hub.add_argument("--push-to-hub", metavar="NS/NAME", help="after writing, upload each aligned parent to its "
                     "own model repository NS/NAME-<parent-name>, one commit each")  # fmt: skip
    add_push_options(hub, prefix="")


def run_align(args: argparse.Namespace) -> int:
    from ..alignment import AlignedOutput, _main_process, align_models, check_exact_config, unique_names, write_aligned
    from ..config import FusionConfig, load_config_file
    from ..data import DataSource, load_processor
    from ..errors import EmptyAlignmentDataError
    from ..hub.parents import download_parents, parent_checkpoint
    from ..job.preflight import preflight
    from ..output.staging import check_output_dir
    from .flags import config_values, encode_rows
    from .fuse import fuse_config
    from .hub import push_output
    from .progress import silence_progress_bars

    values = config_values(args, FusionConfig, load_config_file(args.config) if args.config else {})
    config = fuse_config(values, has_data=args.data is not None)
    check_exact_config(config)
    if args.quiet:
        silence_progress_bars()
    progress = not args.quiet
    inputs = [*args.parents, *([args.data] if args.data else [])]
    target = check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    if config.needs_data and args.data is None:
        raise EmptyAlignmentDataError(
            "cost=activations needs alignment data: pass --data (a Hub dataset id, a save_to_disk directory, a data "
            "directory or files), or --cost weights for a data-free alignment (permutations and rotations from the "
            "weights)."
        )
    checked = preflight(args.parents, config)  # pins revisions, reads configs + headers, checks compatibility
    source = None
    if args.data is not None and config.needs_data:
        source = DataSource.resolve(args.data, args.split, config.num_samples, args.data_seed)
        source.choose_split()
    parents, anchor = checked.parents, checked.anchor
    for parent in parents:  # each parent's own processor files too: they are written next to its weights
        download_parents([parent], anchor=0, progress=progress)
    sources = [parent_checkpoint(parent) for parent in parents]
    data = None
    if source is not None:
        processor = load_processor(parents[anchor].directory) if parents[anchor].processor_files else None
        data = encode_rows(args, source, sources[anchor].config().label2id, processor)
    alignment = align_models(sources, config, data=data, progress=progress, device=args.device)
    outputs = unique_names([
        AlignedOutput(
            name=(parent.repo_id or str(parent.path)).rstrip("/").rsplit("/", 1)[-1], label=parent.pinned,
            repo_id=parent.repo_id, processor_dir=parent.directory, processor_files=list(parent.processor_files),
        )
        for parent in parents
    ])  # fmt: skip
    if not _main_process():
        return 0  # under torchrun / accelerate launch, only the main process writes the output (and pushes)
    target = check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)  # again: aligning took a while
    write_aligned(alignment, outputs, target, overwrite=args.overwrite)
    kinds = ", ".join(f"{space}: {'/'.join(found)}" for space, found in alignment.map_kinds().items())
    print(f"Maps (function-preserving): {kinds or 'none'}")
    for k, output in enumerate(outputs):
        role = " (the anchor, re-saved)" if k == anchor else ""
        print(f"Aligned {output.label} -> {args.out / output.name}{role}")
    print(f"Merge them with mergekit: see {args.out / outputs[anchor].name / 'README.md'} for a config.yml")
    if args.push_to_hub:
        for output in outputs:
            code = push_output(
                args.out / output.name, f"{args.push_to_hub}-{output.name}", args,
                commit_message=f"{output.label} aligned onto {outputs[anchor].label} with hf_otfusion",
            )  # fmt: skip
            if code:
                return code
    return 0
