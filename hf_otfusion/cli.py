"""`otfusion-hub`: fuse checkpoints from the command line, and serve a local Hub for offline work.

Every `fuse` option that shapes the fusion is a `FusionConfig` field of the same name (and every `finetune`
recipe option a `FinetuneConfig` field), with the field's documentation as its help, so a command line, `--help`
and the `fusion_config.yaml` written next to the fused weights describe the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

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

  # fine-tunes of one base: RegMean on alignment data, or task arithmetic against the shared base
  otfusion-hub fuse ./ft-a ./ft-b --out merged --method regmean --data ./align-ds
  otfusion-hub fuse ./ft-a ./ft-b --out merged --method task-arithmetic --base ./base-model --scale 0.5

  # a Hub-compatible server on 127.0.0.1 for trying Hub workflows offline
  otfusion-hub serve-hub --port 8765 --root ./hub-data
"""


EXIT_CODES = """exit codes:
  0  success
  1  internal error (a bug, or the system failed: disk full, permissions); rerun with --debug for the traceback
  2  bad input: the message says what to change (nothing was written)
  3  the upload failed; the output directory was kept and the message holds the command that retries it
"""


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors end, like every other error, in one `error: ...` line (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def count(low: int, high: int | None = None):
    """An argparse `type` for an integer flag in `[low, high]`, so a bad value fails as the flag's usage error."""

    from .config import NumberRule

    rule = NumberRule(int, low, high)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        problem = rule.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "integer"  # what argparse calls the type in its messages
    return parse


SEED = count(0, 2**32 - 1)


def build_parser() -> argparse.ArgumentParser:
    from .config import _CHOICES, FusionConfig

    parser = Parser(
        prog="otfusion-hub",
        description="Fuse Hugging Face transformers (BERT, ViT, DeiT) with optimal-transport alignment.",
        epilog=EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

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
    _add_encoding_options(data)
    inspect.add_argument("--anchor", type=count(0), default=0, help=config_help(FusionConfig, "anchor"))
    inspect.add_argument("--cost", choices=_CHOICES["cost"], default=None,
                         help=config_help(FusionConfig, "cost", "activations with --data, else weights"))  # fmt: skip
    inspect.add_argument("--solver", choices=_CHOICES["solver"], default="exact",
                         help=config_help(FusionConfig, "solver"))  # fmt: skip
    inspect.add_argument("--batch-size", type=count(1), default=8, help=config_help(FusionConfig, "batch_size"))
    inspect.add_argument("--num-samples", type=count(1), default=None, help=config_help(FusionConfig, "num_samples"))
    inspect.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    inspect.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    push = commands.add_parser(
        "push",
        help="upload a fused output directory to the Hub in one commit",
        description="Create REPO if needed and upload DIR (written by `otfusion-hub fuse`) as one commit; prints "
        "the commit SHA and URL. The token comes from HF_TOKEN or `hf auth login` and is never written anywhere.",
    )
    push.add_argument("folder", type=Path, metavar="DIR", help="the fused model directory")
    push.add_argument("repo_id", metavar="REPO", help="target model repository, e.g. user/fused-model")
    _add_push_options(push, prefix="")
    push.add_argument("--commit-message", help="summary of the commit (default: names the directory)")
    push.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    _add_finetune_parser(commands)
    _add_eval_parser(commands)

    serve = commands.add_parser("serve-hub", help="serve a local Hub-compatible API on 127.0.0.1")
    serve.add_argument("--port", type=count(0, 65535), default=8765, help="TCP port on 127.0.0.1; point clients "
                       "at it with HF_ENDPOINT=http://127.0.0.1:PORT (default: 8765; 0 picks a free port)")  # fmt: skip
    serve.add_argument("--root", type=Path, required=True, help="directory holding the repositories")
    serve.add_argument("--token", help="token clients must send (HF_TOKEN) to write and to read private repos "
                       "(default: $OTFUSION_HUB_TOKEN, else a random one, printed at start)")  # fmt: skip
    for command in commands.choices.values():  # `--debug` after the command too; SUPPRESS keeps one given before
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def config_help(cls: type, name: str, shown_default: str | None = None) -> str:
    """The help of the flag for field `name` of config class `cls`: its docstring entry, default and range.

    The text comes from the class's `Args:` section (see `hf_otfusion.docstrings`), so the CLI says what the
    API documentation says.
    """
    from .config import FIELD_RULES
    from .docstrings import field_docs

    text = field_docs(cls)[name]
    default = shown_default if shown_default is not None else getattr(cls(), name)
    rule = FIELD_RULES[cls].get(name)
    bounds = f"; must {rule.describe()}" if rule is not None and rule.low is not None else ""
    return f"{text} (default: {default}{bounds})".replace("%", "%%")  # argparse formats help with %


def add_config_flags(group, cls: type, shown_defaults: dict[str, str] | None = None) -> None:
    """One flag per field of the config dataclass `cls` (`--reg` for `reg`), with `config_help` text.

    Every flag defaults to None, so that only the flags given override a `--config` file.
    """
    from .config import _CHOICES

    defaults = cls()
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = config_help(cls, field.name, (shown_defaults or {}).get(field.name))
        if field.name in _CHOICES:
            group.add_argument(flag, choices=_CHOICES[field.name], default=None, help=help_text)
        elif isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif field.name == "weights":
            group.add_argument(flag, type=float, nargs="+", default=None, metavar="W", help=help_text)
        elif field.name == "target":
            group.add_argument(flag, metavar="KEY=INT,...", default=None, help=help_text)
        else:
            kind = float if isinstance(default, float) else str if "str" in str(field.type) else int
            group.add_argument(flag, type=kind, default=None, help=help_text)


def _add_fuse_io_arguments(fuse: argparse.ArgumentParser) -> None:
    """The `fuse` options that are not FusionConfig fields: inputs, data, output, Hub, safety."""
    fuse.add_argument("parents", nargs="+", help="Hub model ids with an optional @revision (user/model@v1, "
                      "user/model@<commit sha>) or local checkpoint directories; two or more")  # fmt: skip
    fuse.add_argument("--out", type=Path, required=True, help="output directory (refused if it exists and is "
                      "not empty, unless --overwrite)")  # fmt: skip
    fuse.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    fuse.add_argument("--config", type=Path, help="a YAML (or JSON) file of FusionConfig fields, e.g. the "
                      "fusion_config.yaml of a fused model; flags override it")  # fmt: skip
    fuse.add_argument("--dry-run", action="store_true", help="resolve revisions, read configs and weight headers, "
                      "check compatibility, print the plan; download no weights, write nothing")  # fmt: skip
    fuse.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    data = fuse.add_argument_group("alignment and evaluation data")
    data.add_argument("--data", help="alignment data (for --cost activations): a Hub dataset id[@revision], a "
                      "save_to_disk directory, a data directory (imagefolder, csv, ...) or data files")  # fmt: skip
    data.add_argument("--split", help="split of --data (default: the only split, or train)")
    data.add_argument("--data-seed", type=SEED, default=0, help="seed of the row sample drawn with --num-samples")
    _add_encoding_options(data)
    data.add_argument("--eval-data", help="evaluate parents, vanilla average and fused model on this data")
    data.add_argument("--eval-split", help="split of --eval-data (default: the only split, or test)")
    data.add_argument("--eval-num-samples", type=count(1), help="evaluate on this many rows (seeded by --data-seed)")
    output = fuse.add_argument_group("compute and output")
    output.add_argument("--device", help="where the statistics pass runs: cpu, cuda, auto (default: cpu)")
    output.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the saved fused weights (default: the anchor's)")  # fmt: skip
    output.add_argument("--max-shard-size", default="5GB", help="shard model.safetensors above this size, with "
                        "an index (default: 5GB)")  # fmt: skip
    safety = fuse.add_argument_group("safety")
    safety.add_argument("--allow-pickle", action="store_true", help="load pickle (.bin) weights when a parent has "
                        "no safetensors; unpickling can run code, so only for authors you trust")  # fmt: skip
    safety.add_argument("--trust-remote-code", action="store_true", help="allow parents whose model class is code "
                        "in their repository (it runs on your machine)")  # fmt: skip
    hub = fuse.add_argument_group("Hub")
    hub.add_argument("--push-to-hub", metavar="REPO", help="after a successful fusion, upload --out to this "
                     "model repository in one commit")  # fmt: skip
    _add_push_options(hub, prefix="")


def _add_push_options(group, prefix: str) -> None:
    group.add_argument(f"--{prefix}private", action="store_true", help="create the repository as private")
    group.add_argument(f"--{prefix}revision", metavar="BRANCH", help="push to this branch (created if missing)")
    group.add_argument(f"--{prefix}create-pr", action="store_true", help="open a pull request instead of "
                       "committing to the branch")  # fmt: skip


def run_fuse(args: argparse.Namespace, argv: list[str]) -> int:
    import shlex

    from .config import FusionConfig
    from .pipeline import FuseJob, load_config_file, silence_progress_bars

    values = load_config_file(args.config) if args.config else {}
    for field in dataclasses.fields(FusionConfig):
        flag_value = getattr(args, field.name)
        if flag_value is not None:
            values[field.name] = flag_value
    config = fuse_config(values, has_data=args.data is not None)
    if args.quiet:
        silence_progress_bars()
    job = FuseJob(
        parents=args.parents, out=args.out, config=config, data=args.data, split=args.split, seed=args.data_seed,
        text_column=args.text_column, image_column=args.image_column, label_column=args.label_column,
        max_length=args.max_length, eval_data=args.eval_data, eval_split=args.eval_split,
        eval_num_samples=args.eval_num_samples, device=args.device, dtype=args.dtype,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code, repo_id=args.push_to_hub,
        command=shlex.join(["otfusion-hub", *argv]), progress=not args.quiet,
    )  # fmt: skip
    plan = job.plan()
    if args.dry_run:
        print(plan.describe(config, args.out, args.push_to_hub))
        print("Dry run: pre-flight passed; no weights were downloaded and nothing was written.")
        return 0
    result = job.run(plan)
    from .distributed import is_main_process, process_state

    if not is_main_process(process_state(None)):
        return 0  # under torchrun / accelerate launch, only the main process writes the output (and pushes)
    if not args.quiet:
        print(result.summary())
    if args.eval_data:
        from .card import results_text
        from .provenance import Provenance

        print(results_text(Provenance.load(args.out)))
    print(f"Fused model written to {args.out}")
    if args.push_to_hub:
        message = f"Fuse {', '.join(args.parents)} with hf_otfusion"
        return _push(args.out, args.push_to_hub, args, commit_message=message)
    return 0


def fuse_config(values: dict, has_data: bool):
    """The run's `FusionConfig`; without `--data` and without a cost chosen, the data-free weight cost.

    The activation cost is the better default when there is data, but the simplest command
    (`otfusion-hub fuse a b --out fused`) has none and should still fuse. A cost given by flag or config file is
    kept, and an option that only works on data (`--repair`, `--method regmean`, ...) is left for the pre-flight
    to refuse with its own message.
    """
    from .config import FusionConfig
    from .errors import FusionError

    if not has_data and "cost" not in values:
        try:
            data_free = FusionConfig.from_dict({**values, "cost": "weights"})
        except FusionError:
            data_free = None  # an option tied to activations: FusionConfig(values) fails or asks for data below
        if data_free is not None and not data_free.needs_data:
            logging.getLogger("hf_otfusion").info(
                "No --data: fusing data-free (cost=weights, units matched by their weights); pass --data for an "
                "activation-based fusion."
            )
            return data_free
    return FusionConfig.from_dict(values)


def run_push(args: argparse.Namespace) -> int:
    if args.quiet:
        from .pipeline import silence_progress_bars

        silence_progress_bars()
    return _push(args.folder, args.repo_id, args, commit_message=args.commit_message)


def _push(folder: Path, repo_id: str, args: argparse.Namespace, commit_message: str | None = None) -> int:
    """Uploads `folder`; prints the commit SHA and URL, or the error and the command that retries it."""
    from .errors import PushError
    from .hub import push_folder

    try:
        pushed = push_folder(
            folder, repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
            commit_message=commit_message,
        )  # fmt: skip
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(f"Pushed {folder} to {pushed.repo_url} (revision {pushed.revision})")
    print(f"commit: {pushed.commit_sha}")
    print(f"url: {pushed.pr_url or pushed.commit_url}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from .config import FusionConfig
    from .data import DataSource, load_processor
    from .hub import download_parents, parent_checkpoint, resolve_parent
    from .readiness import readiness_report

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
        data = _encoded(args, data_source, sources[anchor].config().label2id, processor)
    report = readiness_report(sources, data=data, config=config, progress=not args.quiet)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    print(report.to_markdown())
    return 0


FINETUNE_EXAMPLES = """examples:
  # 200 steps on the train split of a saved DatasetDict, scored on its test split before and after
  otfusion-hub finetune ./fused --data ./fmnist --split train --eval-split test --out fused-ft --max-steps 200

  # the same on 2 CPU processes (gloo) or GPUs: the Trainer handles the distribution
  torchrun --nproc_per_node 2 -m hf_otfusion.cli finetune ./fused --data ./fmnist --eval-split test --out fused-ft

  # text classification from a Hub data set, then upload the finetuned model
  otfusion-hub finetune user/bert-fused --data user/news --text-column text --label-column label \\
      --eval-split test --out bert-ft --learning-rate 1e-4 --push-to-hub user/bert-fused-ft
"""


def _add_data_options(group, default_split: str) -> None:
    """Where the rows come from and how raw rows become model inputs (shared by `finetune` and `eval`)."""
    group.add_argument("--data", required=True, help="a Hub dataset id[@revision], a save_to_disk directory, a "
                       "data directory (imagefolder, csv, ...) or data files")  # fmt: skip
    group.add_argument("--split", help=f"split of --data (default: the only split, or {default_split})")
    group.add_argument("--num-samples", type=count(1), help="use this many rows of the split (seeded by --data-seed)")
    group.add_argument("--data-seed", type=SEED, default=0, help="seed of the row sample drawn with --num-samples")
    _add_encoding_options(group)


def _add_encoding_options(group) -> None:
    """How raw rows become model inputs with the model's tokenizer or image processor (every `--data`)."""
    group.add_argument("--text-column", help="column holding the text (default: detected)")
    group.add_argument("--image-column", help="column holding the images (default: detected)")
    group.add_argument("--label-column", help="column holding the labels (default: label/labels)")
    group.add_argument("--max-length", type=count(1), default=128, help="tokenizer truncation/padding length")


def _add_finetune_parser(commands) -> None:
    from .config import FinetuneConfig  # not .finetune: building the parser must not import torch

    finetune = commands.add_parser(
        "finetune",
        help="finetune a (fused) classifier with the transformers Trainer and extend its model card",
        description="Train MODEL (a sequence or image classifier: local directory or Hub id[@revision]) on --data "
        "with the transformers Trainer, save it to --out with its processor and provenance, and append the run "
        "(data, steps, results) to its model card. Runs unchanged under torchrun / accelerate launch.",
        epilog=FINETUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_argument("model", help="a checkpoint directory or Hub model id[@revision]")
    finetune.add_argument("--out", type=Path, required=True, help="output directory (refused if it exists and is "
                          "not empty, unless --overwrite)")  # fmt: skip
    finetune.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    finetune.add_argument("--config", type=Path, help="a YAML or JSON file of FinetuneConfig fields; flags override it")
    finetune.add_argument("-q", "--quiet", action="store_true", help="no progress bars or loss logs")
    data = finetune.add_argument_group("training and evaluation data")
    _add_data_options(data, default_split="train")
    data.add_argument("--eval-data", help="evaluation data source (default: --data, when --eval-split is given)")
    data.add_argument("--eval-split", help="split scored before and after training (default with --eval-data: the "
                      "only split, or test)")  # fmt: skip
    data.add_argument("--eval-num-samples", type=count(1), help="score on this many rows (seeded by --data-seed)")
    add_config_flags(finetune.add_argument_group("training recipe (FinetuneConfig fields)"), FinetuneConfig)
    hub = finetune.add_argument_group("Hub")
    hub.add_argument("--push-to-hub", metavar="REPO", help="after training, upload --out to this model repository "
                     "in one commit")  # fmt: skip
    _add_push_options(hub, prefix="")


def _add_eval_parser(commands) -> None:
    from .metrics import available_metrics

    evaluate = commands.add_parser(
        "eval",
        help="print the accuracy and loss of one or more classifiers on one split",
        description="Score each MODEL (local directory or Hub id[@revision]) on the same rows: accuracy, mean "
        "cross-entropy loss and any extra --metrics, computed offline with the evaluate modules shipped in "
        "hf_otfusion.",
    )
    evaluate.add_argument("models", nargs="+", help="checkpoint directories or Hub model ids[@revision]")
    _add_data_options(evaluate.add_argument_group("data"), default_split="test")
    evaluate.add_argument("--batch-size", type=count(1), default=64, help="examples per forward pass (default: 64)")
    extra = [m for m in available_metrics() if m != "accuracy"]
    evaluate.add_argument("--metrics", nargs="+", default=[], choices=extra, help="extra metrics (f1: macro-averaged)")
    evaluate.add_argument("--markdown", action="store_true", help="print a markdown table")
    evaluate.add_argument("--json", type=Path, help="also write the table as JSON to this file")
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _load_classifier(source: str, progress: bool):
    """A checkpoint resolved (Hub ids pinned to a commit), downloaded with its processor, card and provenance."""
    from .data import load_processor
    from .hub import download_parents, load_parent_model, resolve_parent

    parent = resolve_parent(source)
    download_parents([parent], 0, progress=progress)
    if parent.on_hub:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        from .finetune import PROVENANCE_FILES

        for name in ("README.md", *PROVENANCE_FILES):  # the card and provenance that finetuning carries over
            try:
                hf_hub_download(parent.repo_id, name, revision=parent.commit)
            except EntryNotFoundError:
                continue
    processor = load_processor(parent.directory) if parent.processor_files else None
    return parent, load_parent_model(parent), processor


def _encoded_split(args, source: str, split: str | None, num_samples: int | None, label2id, processor,
                   default_split: str = "train"):  # fmt: skip
    """Rows of one split as model inputs and labels, and the `DataSource` that says where they came from.

    `split=None` takes the source's only split, or `default_split` when it has several; `label2id` is the
    model's, to which class names in the data are mapped.
    """
    from .data import DataSource

    data_source = DataSource.resolve(source, split, num_samples, args.data_seed, default_split=default_split)
    return _encoded(args, data_source, label2id, processor), data_source


def _encoded(args, data_source, label2id, processor):
    """The rows of a resolved `DataSource` as model inputs, encoded with the `--text-column`... options."""
    from .data import encode_dataset

    return encode_dataset(
        data_source.load(), processor, text_column=args.text_column, image_column=args.image_column,
        label_column=args.label_column, max_length=args.max_length, label2id=label2id,
    )  # fmt: skip


def _describe(source) -> str:
    pinned = f"{source.repo_id}@{source.commit}" if source.kind == "hub" else source.source
    return f"{pinned} (split {source.split})"


def run_finetune(args: argparse.Namespace) -> int:
    from .distributed import is_main_process, process_state
    from .finetune import FinetuneConfig, finetune
    from .output_dir import check_output_dir
    from .pipeline import load_config_file, silence_progress_bars

    values = load_config_file(args.config) if args.config else {}
    for field in dataclasses.fields(FinetuneConfig):
        if getattr(args, field.name) is not None:
            values[field.name] = getattr(args, field.name)
    config = FinetuneConfig.from_dict(values)
    inputs = [args.model, args.data, *([args.eval_data] if args.eval_data else [])]
    check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)  # before any download or training
    if args.quiet:
        silence_progress_bars()
    parent, model, processor = _load_classifier(args.model, progress=not args.quiet)
    label2id = getattr(model.config, "label2id", None)
    train, train_source = _encoded_split(args, args.data, args.split, args.num_samples, label2id, processor)
    evaluation, eval_source = None, None
    if args.eval_data or args.eval_split:
        evaluation, eval_source = _encoded_split(
            args, args.eval_data or args.data, args.eval_split, args.eval_num_samples, label2id, processor, "test"
        )
    result = finetune(
        model, train, evaluation, config, output_dir=args.out, processor=processor, source=parent.pinned,
        source_dir=parent.directory, data_name=_describe(train_source),
        eval_name=_describe(eval_source) if eval_source else None, overwrite=args.overwrite,
        hub_datasets=[s.hub_id for s in (train_source, eval_source) if s is not None and s.hub_id],
        progress=not args.quiet,
    )  # fmt: skip
    if not is_main_process(process_state(None)):
        return 0  # under torchrun / accelerate launch, only the main process wrote the output (and pushes)
    if result.metrics_after is not None:
        before, after = result.metrics_before or {}, result.metrics_after
        print(
            f"accuracy {before.get('accuracy', float('nan')):.4f} -> {after['accuracy']:.4f}, "
            f"loss {before.get('loss', float('nan')):.4f} -> {after['loss']:.4f} after {result.steps} steps"
        )
    print(f"Finetuned model written to {args.out}")
    if args.push_to_hub:
        return _push(args.out, args.push_to_hub, args, commit_message=f"Finetune {args.model} with hf_otfusion")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluation import EvaluationTable, ModelScore, evaluate_model

    if args.quiet:
        from .pipeline import silence_progress_bars

        silence_progress_bars()
    rows, encodings, split = [], [], args.split
    for source in args.models:
        parent, model, processor = _load_classifier(source, progress=not args.quiet)
        # rows are encoded once per distinct processor and label mapping, so parents and fused models share them
        key = (_processor_key(processor), sorted((getattr(model.config, "label2id", None) or {}).items()))
        dataset = next((d for k, d in encodings if k == key), None)
        if dataset is None:
            label2id = getattr(model.config, "label2id", None)
            dataset, data_source = _encoded_split(
                args, args.data, args.split, args.num_samples, label2id, processor, default_split="test"
            )
            encodings.append((key, dataset))
            split = data_source.split
        scores = evaluate_model(
            model, dataset, processor=processor, batch_size=args.batch_size, metrics=args.metrics,
            progress=not args.quiet, desc=parent.name,
        )  # fmt: skip
        rows.append(ModelScore.from_scores(source, scores))
    table = EvaluationTable(rows=rows, split=str(split))
    print(table.to_markdown() if args.markdown else table)
    if args.json is not None:
        args.json.write_text(table.to_json() + "\n")
    return 0


def _processor_key(processor) -> str:
    """What makes two processors encode the same rows identically: the image settings, or the vocabulary."""
    if processor is None:
        return "none"
    if hasattr(processor, "get_vocab"):
        return type(processor).__name__ + json.dumps(sorted(processor.get_vocab().items()))
    return type(processor).__name__ + processor.to_json_string()


def run_serve_hub(args: argparse.Namespace) -> int:
    from .hub_server import serve

    try:
        serve(args.root, args.port, token=args.token)
    except OSError as error:
        if error.errno is None:
            raise
        print(f"error: cannot serve on 127.0.0.1:{args.port}: {error.strerror}; choose another --port",
              file=sys.stderr)  # fmt: skip
        return 2
    return 0


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
    if args.command in ("fuse", "inspect", "finetune", "eval"):  # the commands that load models
        from .pipeline import hide_weight_loading_bars

        hide_weight_loading_bars()
    from .errors import FusionError

    commands = {"push": run_push, "finetune": run_finetune, "eval": run_eval, "inspect": run_inspect,
                "serve-hub": run_serve_hub, "fuse": lambda args: run_fuse(args, argv)}  # fmt: skip
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


if __name__ == "__main__":
    sys.exit(main())
