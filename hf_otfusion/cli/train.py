"""`otfusion-hub finetune` and `otfusion-hub eval`: train and score classifiers with the transformers Trainer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .flags import (
    add_config_flags,
    add_data_options,
    add_push_options,
    config_values,
    count,
    encode_rows,
)
from .hub import push_output

FINETUNE_EXAMPLES = """examples:
  # 200 steps on the train split of a saved DatasetDict, scored on its test split before and after
  otfusion-hub finetune ./fused --data ./fmnist --split train --eval-split test --out fused-ft --max-steps 200

  # the same on 2 CPU processes (gloo) or GPUs: the Trainer handles the distribution
  torchrun --nproc_per_node 2 -m hf_otfusion.cli finetune ./fused --data ./fmnist --eval-split test --out fused-ft

  # text classification from a Hub data set, then upload the finetuned model
  otfusion-hub finetune user/bert-fused --data user/news --text-column text --label-column label \\
      --eval-split test --out bert-ft --learning-rate 1e-4 --push-to-hub user/bert-fused-ft
"""


def add_parsers(commands) -> None:
    """The `finetune` and `eval` sub-commands."""
    _add_finetune_parser(commands)
    _add_eval_parser(commands)


def _add_finetune_parser(commands) -> None:
    from ..train.config import FinetuneConfig  # not .finetune: building the parser must not import torch

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
    add_data_options(data, default_split="train")
    data.add_argument("--eval-data", help="evaluation data source (default: --data, when --eval-split is given)")
    data.add_argument("--eval-split", help="split scored before and after training (default with --eval-data: the "
                      "only split, or test)")  # fmt: skip
    data.add_argument("--eval-num-samples", type=count(1), help="score on this many rows (seeded by --data-seed)")
    recipe = finetune.add_argument_group("training recipe (FinetuneConfig fields)")
    add_config_flags(recipe, FinetuneConfig)
    recipe.add_argument(
        "--teachers", nargs="+", metavar="MODEL", default=[],
        help="classifiers with the model's labels (checkpoint directories or Hub ids[@revision], e.g. the fused "
        "model's parents) whose mean prediction the model also learns from; needs --distill-alpha > 0. The data is "
        "encoded with the model's processor for every teacher",
    )  # fmt: skip
    hub = finetune.add_argument_group("Hub")
    hub.add_argument("--push-to-hub", metavar="REPO", help="after training, upload --out to this model repository "
                     "in one commit")  # fmt: skip
    add_push_options(hub, prefix="")


EVAL_EXAMPLES = """examples:
  # parents and fused model on the same rows
  otfusion-hub eval ./parent-a ./parent-b ./fused --data ./fmnist --split test --markdown

  # a multi-task output (fuse --multi-task --out merged): one source per task, in the task order; each task's
  # merged model next to its own fine-tune and the base under its head
  otfusion-hub eval merged --data ./nli-test ./sst-test --markdown --json scores.json
"""


def _add_eval_parser(commands) -> None:
    from ..train.metrics import available_metrics

    evaluate = commands.add_parser(
        "eval",
        help="print the accuracy and loss of one or more classifiers on one split, or of each task of a "
        "multi-task merge",
        description="Score each MODEL (local directory or Hub id[@revision]) on the same rows: accuracy, mean "
        "cross-entropy loss and any extra --metrics, computed offline with the evaluate modules shipped in "
        "hf_otfusion. Given the folder of a multi-task merge (`fuse --multi-task --out DIR`) and one --data per "
        "task, score each task's merged model next to its own fine-tune and the base under that task's head "
        "(the parents and base pinned in its fusion_job.yaml).",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("models", nargs="+", help="checkpoint directories or Hub model ids[@revision], or one "
                          "multi-task output folder")  # fmt: skip
    add_data_options(evaluate.add_argument_group("data"), default_split="test", per_task=True)
    evaluate.add_argument("--batch-size", type=count(1), default=64, help="examples per forward pass (default: 64)")
    extra = [m for m in available_metrics() if m != "accuracy"]
    evaluate.add_argument("--metrics", nargs="+", default=[], choices=extra, help="extra metrics (f1: macro-averaged)")
    evaluate.add_argument("--markdown", action="store_true", help="print a markdown table")
    evaluate.add_argument("--json", type=Path, help="also write the table as JSON to this file")
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _load_classifier(source: str, progress: bool):
    """A checkpoint resolved (Hub ids pinned to a commit), downloaded with its processor, card and provenance."""
    from ..data import load_processor
    from ..hub.parents import load_parent_model

    parent = _downloaded(source, progress)
    processor = load_processor(parent.directory) if parent.processor_files else None
    return parent, load_parent_model(parent), processor


def _downloaded(source: str, progress: bool):
    """The `Parent` of `source`, pinned and downloaded (weights, config, processor, card and provenance)."""
    from ..hub.parents import download_parents, resolve_parent

    parent = resolve_parent(source)
    download_parents([parent], 0, progress=progress)
    if parent.on_hub:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        from ..train.finetune import PROVENANCE_FILES

        for name in ("README.md", *PROVENANCE_FILES):  # the card and provenance that finetuning carries over
            try:
                hf_hub_download(parent.repo_id, name, revision=parent.commit)
            except EntryNotFoundError:
                continue
    return parent


def _encoded_split(args, source: str, split: str | None, num_samples: int | None, label2id, processor,
                   default_split: str = "train"):  # fmt: skip
    """Rows of one split as model inputs and labels, and the `DataSource` that says where they came from.

    `split=None` takes the source's only split, or `default_split` when it has several; `label2id` is the
    model's, to which class names in the data are mapped.
    """
    from ..data import DataSource

    data_source = DataSource.resolve(source, split, num_samples, args.data_seed, default_split=default_split)
    return encode_rows(args, data_source, label2id, processor), data_source


def _card_dataset(source) -> dict:
    """The evaluation data as a card's `EvalResult` names it: the Hub id (or path), the split, the commit."""
    where = source.hub_id or source.source
    return {"type": where, "name": where, "split": source.split, "revision": source.commit}


def _describe(source) -> str:
    return f"{source.pinned} (split {source.split})"


def run_finetune(args: argparse.Namespace) -> int:
    from ..config import load_config_file
    from ..engine.distributed import is_main_process, process_state
    from ..output.staging import check_output_dir
    from ..train.finetune import FinetuneConfig, finetune
    from .progress import silence_progress_bars

    config = FinetuneConfig.from_dict(
        config_values(args, FinetuneConfig, load_config_file(args.config) if args.config else {})
    )
    config.check_teachers(len(args.teachers))
    inputs = [args.model, args.data, *([args.eval_data] if args.eval_data else []), *args.teachers]
    check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)  # before any download or training
    if args.quiet:
        silence_progress_bars()
    parent, model, processor = _load_classifier(args.model, progress=not args.quiet)
    teachers = [_load_classifier(source, progress=not args.quiet) for source in args.teachers]
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
        base_model=parent.repo_id, eval_dataset=_card_dataset(eval_source) if eval_source else None,
        progress=not args.quiet, teachers=[t[1] for t in teachers], teacher_names=[t[0].pinned for t in teachers],
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
        return push_output(args.out, args.push_to_hub, args, commit_message=f"Finetune {args.model} with hf_otfusion")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..errors import InvalidConfigError
    from ..train.evaluation import EvaluationTable, ModelScore, evaluate_model

    if args.quiet:
        from .progress import silence_progress_bars

        silence_progress_bars()
    multi_task = _multi_task_output(args.models)
    if multi_task is not None:
        return _run_task_eval(args, *multi_task)
    if len(args.data) != 1:
        raise InvalidConfigError(
            f"{len(args.data)} --data sources for models scored on the same rows; give one (one per task is for "
            "the folder of a multi-task merge: `otfusion-hub eval MERGED --data D1 D2 ...`).",
            field="data",
            value=args.data,
        )
    rows, encodings, split = [], [], args.split
    for source in args.models:
        parent, model, processor = _load_classifier(source, progress=not args.quiet)
        # rows are encoded once per distinct processor and label mapping, so parents and fused models share them
        key = (_processor_key(processor), sorted((getattr(model.config, "label2id", None) or {}).items()))
        dataset = next((d for k, d in encodings if k == key), None)
        if dataset is None:
            label2id = getattr(model.config, "label2id", None)
            dataset, data_source = _encoded_split(
                args, args.data[0], args.split, args.num_samples, label2id, processor, default_split="test"
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


def _multi_task_output(models: list[str]) -> tuple[Path, dict] | None:
    """The folder and pinned job of a multi-task merge among `models`, or None when they are checkpoints.

    Such a folder (`fuse --multi-task --out DIR`) is not a checkpoint but a folder of task checkpoints; its
    `fusion_job.yaml` names the tasks in the parents' order and pins the parents and base they came from.

    Raises:
        InvalidConfigError: the folder is given with other models (its tasks have their own labels, so they share
            no rows with them), or it records no job (written by `merge_tasks` in Python).
    """
    import yaml

    from ..errors import InvalidConfigError
    from ..output.provenance import JOB_FILE

    folders = [Path(m) for m in models if Path(m).is_dir() and not (Path(m) / "config.json").exists()]
    tasks = [f for f in folders if any((child / "config.json").is_file() for child in f.iterdir())]
    if not tasks:
        return None
    out = tasks[0]
    job = yaml.safe_load((out / JOB_FILE).read_text()) if (out / JOB_FILE).is_file() else None
    if not isinstance(job, dict) or not job.get("multi_task"):
        raise InvalidConfigError(
            f"{out} is a folder of checkpoints, not one, and not a multi-task merge written by `otfusion-hub fuse "
            f"--multi-task` (its {JOB_FILE} names the parents and base each task is compared with; merge_tasks "
            f"and align_parents in Python, and `otfusion-hub align`, record none). Score its checkpoints "
            f"themselves: `otfusion-hub eval {out}/<name> [PARENT ...] --data DATA`.",
            field="models",
            value=str(out),
        )
    if len(models) > 1:
        raise InvalidConfigError(
            f"{out} is a multi-task merge; evaluate it alone (`otfusion-hub eval {out} --data D1 D2 ...`): each task "
            "is scored next to its own fine-tune and base, which its fusion_job.yaml pins, on its own rows.",
            field="models",
            value=models,
        )
    return out, job


def _run_task_eval(args: argparse.Namespace, out: Path, job: dict) -> int:
    """`eval MERGED --data D1 D2 ...`: per task, its merged model, its own fine-tune and the base under its head
    on the task's rows (`train.evaluation.evaluate_task`, the table `fuse --multi-task --eval-data` records)."""
    from ..errors import InvalidConfigError
    from ..hub.parents import parent_checkpoint
    from ..train.evaluation import evaluate_task

    names, parents = list(job["task_names"]), list(job["parents"])
    if len(args.data) != len(names):
        raise InvalidConfigError(
            f"{out} is a multi-task merge of {len(names)} tasks ({', '.join(names)}) but {len(args.data)} --data "
            f"sources were given; give one per task, in that order: --data {' '.join(f'<{n}-data>' for n in names)}.",
            field="data",
            value=args.data,
        )
    progress = not args.quiet
    ancestor = (job.get("config") or {}).get("base")  # pinned, as the parents are (`FuseJob.pinned`)
    base = parent_checkpoint(_downloaded(ancestor, progress)) if ancestor else None
    tables = {}
    for name, source, data in zip(names, parents, args.data, strict=True):
        task, merged, processor = _load_classifier(str(out / name), progress)  # the task holds its parent's processor
        own = _downloaded(source, progress)
        dataset, data_source = _encoded_split(
            args, data, args.split, args.num_samples, merged.config.label2id, processor, default_split="test"
        )
        table = evaluate_task(
            merged, parent_checkpoint(own), dataset, own_name=own.name, base=base, split=str(data_source.split),
            processor=processor, batch_size=args.batch_size, metrics=args.metrics, progress=progress,
        )  # fmt: skip
        tables[name] = {"data": data_source.pinned, **table.to_dict()}
        print(f"Task {name} ({task.name}), on {_describe(data_source)}:")
        print(table.to_markdown() if args.markdown else table)
    if args.json is not None:
        args.json.write_text(json.dumps({"tasks": tables}, indent=1) + "\n")
    return 0


def _processor_key(processor) -> str:
    """What makes two processors encode the same rows identically: the image settings, or the vocabulary."""
    if processor is None:
        return "none"
    if hasattr(processor, "get_vocab"):
        return type(processor).__name__ + json.dumps(sorted(processor.get_vocab().items()))
    return type(processor).__name__ + processor.to_json_string()
