"""`otfusion-hub fuse` and `otfusion-hub inspect`: the commands that align parents."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import FusionError
from .flags import (
    add_config_flags,
    add_encoding_options,
    add_job_flags,
    config_help,
    config_values,
    count,
    encode_rows,
)
from .hub import push_output

EXAMPLES = """examples:
  # data-free fusion of two Hub or local checkpoints (without --data: weight-based cost, exact OT)
  otfusion-hub fuse user/vit-a user/vit-b --out fused

  # Hub parents pinned to revisions, soft alignment on 500 rows of a Hub data set, evaluated, then pushed
  otfusion-hub fuse user/vit-a user/vit-b@v1.0 --out fused --data user/images --num-samples 500 \\
      --solver sinkhorn --reg 0.3 --eval-data user/images --eval-split test --push-to-hub user/vit-fused

  # check parents, revisions and data without downloading any weights
  otfusion-hub fuse user/vit-a user/vit-b --out fused --data user/images --dry-run

  # retry an upload that failed (the fused directory was kept)
  otfusion-hub push fused user/vit-fused

  # activation-based soft alignment on a saved datasets.Dataset (or csv/json/parquet files, an image folder)
  otfusion-hub fuse ./model-a ./model-b --out fused --data ./align-ds --solver sinkhorn --reg 0.3

  # do the parents need alignment, or are they fine-tunes of one base? (per-layer distances + advice)
  otfusion-hub inspect ./model-a ./model-b

  # every parent aligned onto the anchor (function-preserving), to merge with mergekit (see `align --help`)
  otfusion-hub align ./model-a ./model-b --out aligned

  # fine-tunes of one base: RegMean on alignment data, or task arithmetic against the shared base
  otfusion-hub fuse ./ft-a ./ft-b --out merged --method regmean --data ./align-ds
  otfusion-hub fuse ./ft-a ./ft-b --out merged --method task-arithmetic --base ./base-model --scale 0.5

  # fine-tunes of one base for different tasks (other label sets): one merged encoder, each task's own head,
  # written as merged/nli/ and merged/sentiment/ (see merge_tasks)
  otfusion-hub fuse ./ft-nli ./ft-sst --out merged --method task-arithmetic --base ./base-model --multi-task \\
      --task-names nli sentiment

  # the same with each task's own data (in the parents' order): RegMean's Gram rows, each task scored on its own
  # test set (merged vs own fine-tune), pushed as one repository per task: user/merged-nli, user/merged-sentiment
  otfusion-hub fuse ./ft-nli ./ft-sst --out merged --method regmean --multi-task --task-names nli sentiment \\
      --data ./nli-train ./sst-train --eval-data ./nli-test ./sst-test --push-to-hub user/merged

  # a Hub-compatible server on 127.0.0.1 for trying Hub workflows offline
  otfusion-hub serve-hub --port 8765 --root ./hub-data
"""


def add_parsers(commands) -> None:
    """The `fuse` and `inspect` sub-commands."""
    from ..config import _CHOICES, FusionConfig

    fuse = commands.add_parser(
        "fuse",
        help="align two or more parents onto the anchor and average them",
        description="Align every parent onto the anchor (parent --anchor) with OT, average, and save a "
        "safetensors checkpoint of the anchor's class.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_fuse_io_arguments(fuse)
    add_config_flags(fuse.add_argument_group("fusion (FusionConfig fields)"), FusionConfig,
                     shown_defaults={"cost": "activations with --data, else weights"})  # fmt: skip

    inspect = commands.add_parser(
        "inspect",
        help="measure how far apart the parents are before and after OT alignment, and recommend a method",
        description="Per layer and overall: relative L2 distance, cosine and sign disagreement of the weights "
        "before and after OT alignment onto the anchor, the share of units OT leaves in place and, with --data, "
        "the activation correlation of matched units. Recommends `ot` or a same-base method and says why.",
    )
    inspect.add_argument("parents", nargs="+", help="local checkpoint directories or Hub model ids (two or more)")
    data = inspect.add_argument_group("alignment data")
    data.add_argument("--data", help="alignment data, as for `fuse --data`: a Hub dataset id[@revision], a "
                      "save_to_disk directory, a data directory (imagefolder, csv, ...) or data files")  # fmt: skip
    data.add_argument("--split", help="split of --data (default: the only split, or train)")
    add_encoding_options(data)
    inspect.add_argument("--anchor", type=count(0), default=0, help=config_help(FusionConfig, "anchor"))
    inspect.add_argument("--cost", choices=_CHOICES["cost"], default=None,
                         help=config_help(FusionConfig, "cost", "activations with --data, else weights"))  # fmt: skip
    inspect.add_argument("--solver", choices=_CHOICES["solver"], default="exact",
                         help=config_help(FusionConfig, "solver"))  # fmt: skip
    inspect.add_argument("--batch-size", type=count(1), default=8, help=config_help(FusionConfig, "batch_size"))
    inspect.add_argument("--num-samples", type=count(1), default=None, help=config_help(FusionConfig, "num_samples"))
    inspect.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    inspect.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_fuse_io_arguments(fuse: argparse.ArgumentParser) -> None:
    """The `fuse` options that are `FuseJob` fields (generated from them), and the three that steer the command."""
    from ..job.fuse_job import DTYPE_NAMES, JOB_NUMBERS, FuseJob

    fuse.add_argument("--config", type=Path, help="a YAML (or JSON) job file: any FuseJob fields (parents, out, "
                      "data, ...) and the FusionConfig fields, at the top level or under `config:`, e.g. the "
                      "fusion_job.yaml or fusion_config.yaml of a fused model; flags override it")  # fmt: skip
    fuse.add_argument("--dry-run", action="store_true", help="resolve revisions, read configs and weight headers, "
                      "check compatibility, print the plan; download no weights, write nothing")  # fmt: skip
    fuse.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    add_job_flags(fuse, FuseJob, rules=JOB_NUMBERS, choices={"dtype": DTYPE_NAMES})


def run_fuse(args: argparse.Namespace, argv: list[str]) -> int:
    """`otfusion-hub fuse`: the job from `--config` and the flags (flags win), pre-flight, then the run."""
    import shlex

    from ..config import FusionConfig, load_config_file
    from ..job.fuse_job import FuseJob
    from ..job.run import run_job
    from .progress import silence_progress_bars

    job_values, from_file = FuseJob.split_dict(load_config_file(args.config) if args.config else {})
    for name in FuseJob.flag_fields():
        if getattr(args, name) not in (None, []):
            job_values[name] = getattr(args, name)
    fusion_values = config_values(args, FusionConfig, from_file)
    for name, flag in (("parents", "PARENTS arguments"), ("out", "--out")):
        if not job_values.get(name):
            raise FusionError(f"fuse needs {name}: give {flag}, or `{name}:` in a --config job file.")
    config = fuse_config(fusion_values, has_data=job_values.get("data") is not None)
    if args.quiet:
        silence_progress_bars()
    job = FuseJob.from_dict(
        {**job_values, "config": config.to_dict()}, command=shlex.join(["otfusion-hub", *argv]), progress=not args.quiet
    )
    checked = job.preflight()
    if args.dry_run:
        push = job.push_to_hub
        if push and job.multi_task:
            from ..multitask import task_repo_id

            push = f"{task_repo_id(push, '<task>')} (one repository per task)"
        print(checked.describe(job.config, job.out, push))
        print("Dry run: pre-flight passed; no weights were downloaded and nothing was written.")
        return 0
    result = run_job(job, checked)
    from ..engine.distributed import is_main_process, process_state

    if not is_main_process(process_state(None)):
        return 0  # under torchrun / accelerate launch, only the main process writes the output (and pushes)
    if not args.quiet:
        print(result.summary())
    if job.multi_task:
        return _report_multi_task(job, result.task_names)
    if job.eval_data:
        from ..output.card import results_text
        from ..output.provenance import Provenance

        print(results_text(Provenance.load(job.out)))
    print(f"Fused model written to {job.out}")
    if job.push_to_hub:
        message = f"Fuse {', '.join(job.parents)} with hf_otfusion"
        return push_output(job.out, job.push_to_hub, job, commit_message=message)
    return 0


def _report_multi_task(job, task_names: list[str]) -> int:
    """Each task's evaluation (with --eval-data), where the tasks were written, then one push per task."""
    from ..output.card import results_text
    from ..output.provenance import Provenance

    if job.eval_data:
        for name in task_names:
            print(f"Task {name}: {results_text(Provenance.load(job.out / name))}")
    print(f"Multi-task merge written to {job.out}: {', '.join(job.out.name + '/' + t for t in task_names)}")
    if not job.push_to_hub:
        return 0
    return _push_tasks(job, task_names)


def _push_tasks(job, task_names: list[str]) -> int:
    """Pushes every task folder to its own repository (see `task_repo_id`), each in one commit: 0, or 3 when any
    upload failed.

    A failed push does not stop the others, so a run can end with some task repositories pushed and some not;
    it then ends by naming both and printing the commands that push the rest (the output folder is kept as
    written, so retrying uploads the same bytes).
    """
    from ..hub.push import push_command
    from ..multitask import task_repo_id

    pushed, missing = [], []
    for name in task_names:
        repo = task_repo_id(job.push_to_hub, name)
        message = f"Task {name} of a multi-task merge of {', '.join(job.parents)} with hf_otfusion"
        code = push_output(job.out / name, repo, job, commit_message=message)
        (pushed if code == 0 else missing).append((name, repo))
    if not missing:
        return 0
    retry = [
        push_command(job.out / name, repo, private=bool(job.private), revision=job.revision,
                     create_pr=bool(job.create_pr))
        for name, repo in missing
    ]  # fmt: skip
    listed = [", ".join(f"{name} ({repo})" for name, repo in tasks) or "none" for tasks in (missing, pushed)]
    print(
        f"error: {len(missing)} of {len(task_names)} task repositories were not pushed: {listed[0]}. Pushed: "
        f"{listed[1]}.\nEvery task folder is kept in {job.out}; push the rest with:\n  " + "\n  ".join(retry),
        file=sys.stderr,
    )
    return 3


def fuse_config(values: dict, has_data: bool):
    """The run's `FusionConfig`; without `--data` and without a cost chosen, the data-free weight cost.

    The activation cost is the better default when there is data, but the simplest command
    (`otfusion-hub fuse a b --out fused`) has none and should still fuse. A cost given by flag or config file is
    kept, and an option that only works on data (`--repair`, `--method regmean`, ...) is left for the pre-flight
    to refuse with its own message.
    """
    from ..config import FusionConfig
    from ..errors import FusionError

    if not has_data and "cost" not in values:
        try:
            data_free = FusionConfig.from_dict({**values, "cost": "weights"})
        except FusionError:
            data_free = None  # an option tied to activations: FusionConfig(values) fails or asks for data below
        if data_free is not None and not data_free.needs_data:
            logging.getLogger("hf_otfusion").info(
                "No --data: fusing data-free (cost=weights, units matched by their weights); pass --data for an "
                "activation-based fusion (and refinement and repair)."
            )
            return data_free
    return FusionConfig.from_dict(values)


def run_inspect(args: argparse.Namespace) -> int:
    from ..config import FusionConfig
    from ..data import DataSource, load_processor
    from ..hub.parents import download_parents, parent_checkpoint, resolve_parent
    from ..job.inputs import check_encoded
    from ..methods.readiness import readiness_report

    # read and encoded as `fuse --data` is; resolved first, so that a missing data set fails before any download
    data_source = DataSource.resolve(args.data, args.split) if args.data is not None else None
    cost = args.cost or ("activations" if args.data is not None else "weights")
    config = FusionConfig(
        cost=cost, solver=args.solver, anchor=args.anchor, batch_size=args.batch_size, num_samples=args.num_samples
    )
    # resolved as `fuse` resolves them: a missing parent or revision fails with its own error, weights are pinned
    parents = [resolve_parent(source) for source in args.parents]
    anchor = args.anchor if args.anchor < len(parents) else -1  # out of range: the report says so below
    download_parents(parents, anchor=anchor, progress=not args.quiet)  # the anchor's processor encodes --data
    sources = [parent_checkpoint(parent) for parent in parents]
    data = None
    if data_source is not None:
        processor = load_processor(parents[anchor].directory) if parents[anchor].processor_files else None
        data = encode_rows(args, data_source, sources[anchor].config().label2id, processor)
        check_encoded(data_source.load(), data, sources[anchor].skeleton(), source=f"--data {args.data}",
                      text_column=args.text_column, image_column=args.image_column)  # fmt: skip
    report = readiness_report(sources, data=data, config=config, progress=not args.quiet)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    print(report.to_markdown())
    return 0
