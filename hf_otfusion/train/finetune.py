"""Finetune a (fused) classifier with `transformers.Trainer`, and record the run in its model card.

One recipe serves text classification (BERT) and image classification (ViT, DeiT): the `Trainer` does the loop,
so the same call runs on one process or under `torchrun`/`accelerate launch` unchanged. Metrics are the offline
`evaluate` modules shipped in `hf_otfusion/metrics`. The model card of the source checkpoint (for a fused model:
its parents, fusion config and diagnostics) is kept, and a finetuning section with the data, steps and results is
appended, so the card tells how the model was made from end to end.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from transformers import PreTrainedModel

from ..checkpoints import ModelOrPath, load_parent
from ..engine.tasks import takes_labels, trainable_sibling
from ..errors import UnsupportedTaskError
from ..output.card import pipeline_and_auto_class
from ..output.provenance import CONFIG_FILE, PROVENANCE_FILE
from ..output.staging import check_output_dir, stage_output, staging_path
from .config import FinetuneConfig  # FinetuneConfig re-exported: hf_otfusion.train.finetune API
from .evaluation import check_classifier, check_dataset, data_collator, evaluate_model
from .metrics import load_metric

RUNS_FILE = "finetune_runs.json"
# Files next to a checkpoint that describe how it was made; copied to the finetuned checkpoint unchanged.
PROVENANCE_FILES = (PROVENANCE_FILE, CONFIG_FILE, RUNS_FILE)


@dataclass
class FinetuneResult:
    """What `finetune` produced.

    Attributes:
        model: the finetuned model (trained in place).
        metrics_before / metrics_after: `accuracy`, `loss`, `num_examples` on the evaluation data (None without it).
        train_loss: mean training loss over the run.
        steps: optimiser steps taken.
        log_history: the `Trainer`'s log entries (training loss every `logging_steps`).
        output_dir: where the checkpoint and card were written, if anywhere.
    """

    model: PreTrainedModel
    config: FinetuneConfig
    metrics_before: dict[str, float] | None
    metrics_after: dict[str, float] | None
    train_loss: float
    steps: int
    log_history: list[dict[str, float]] = field(default_factory=list)
    output_dir: Path | None = None


def finetune(
    model: ModelOrPath,
    train_data,
    eval_data=None,
    config: FinetuneConfig | None = None,
    *,
    output_dir: str | Path | None = None,
    processor=None,
    source: str | None = None,
    source_dir: str | Path | None = None,
    data_name: str = "training data",
    eval_name: str | None = None,
    hub_datasets: list[str] | None = None,
    base_model: str | None = None,
    eval_dataset: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    teachers: list[ModelOrPath] | None = None,
    teacher_names: list[str] | None = None,
    **training_args,
) -> FinetuneResult:
    """Finetunes a sequence or image classifier with `transformers.Trainer`.

    Args:
        model: a classifier, or a checkpoint directory / Hub id (loaded as its saved class with safetensors).
        train_data: a `datasets.Dataset` of model inputs and integer `labels` (e.g. from `encode_dataset`).
        eval_data: optional `datasets.Dataset` scored before and after training (accuracy and loss).
        config: the recipe; defaults to `FinetuneConfig()`.
        output_dir: if given, the finetuned checkpoint, its processor, the source's provenance files (fusion
            config and record), `finetune_runs.json` and the updated `README.md` card go here. They are written to
            a sibling directory first and swapped into place (see `hf_otfusion.output.staging`), so a failed run
            leaves no half checkpoint and an interrupted `overwrite` keeps the old one.
        processor: the tokenizer or image processor saved with the checkpoint; read from `source_dir` when None.
            A tokenizer also pads variable-length text batches.
        source / source_dir: how the card names the model finetuned, and the directory holding its card and
            provenance files; both default to `model` when it is a local directory.
        data_name / eval_name: how the card names the data (a Hub id, a path, a description).
        hub_datasets: Hub ids of the data sets used, listed under the card's `datasets:` metadata.
        base_model: the Hub id of the model finetuned; the card then names it as `base_model` with
            `base_model_relation: finetune` (in place of what the source's card named, e.g. a fusion's parents).
        eval_dataset: the evaluation data for the card's results: `type` (a Hub id or path), `name`, `split`,
            `revision` (the commit); default: `eval_name`.
        overwrite: replace a non-empty `output_dir` (refused otherwise, before any training).
        progress: show progress bars and training-loss logs.
        teachers: classifiers with the model's labels whose mean output distribution the model also learns from
            (`config.distill_alpha` > 0), e.g. the parents of a fused model. They are not trained.
        teacher_names: how the run record names them; default: the paths or ids given, else `teacher k`.
        **training_args: any `TrainingArguments` field, overriding the recipe (e.g. `use_cpu=True`).

    Returns:
        A `FinetuneResult`.

    Raises:
        OutputExistsError: `output_dir` is not empty and `overwrite` is False.
        UnsafeOutputError: `output_dir` is the working or home directory (or an ancestor), the source checkpoint's
            directory (or overlaps it), a file or a symbolic link.
        UnsupportedTaskError: the model has no trainable classification head.
        TrainingDataError: the data lacks the model's inputs or labels, or has labels the head does not know.
        InvalidConfigError: `distill_alpha` > 0 without teachers, or teachers with `distill_alpha` = 0.
    """
    from transformers import PrinterCallback

    from ..data import load_processor
    from .distillation import DistillationTrainer, check_teachers

    config = config or FinetuneConfig()
    if isinstance(model, str | Path):
        source = source or str(model)
        source_dir = source_dir or (model if Path(model).is_dir() else None)
    source_dir = Path(source_dir) if source_dir is not None else None
    out = None
    if output_dir is not None:
        inputs = [source_dir] if source_dir is not None else []
        out = check_output_dir(output_dir, overwrite=overwrite, inputs=inputs, flag="output_dir")
    config.check_teachers(len(teachers or []))
    model = load_parent(model)
    check_trainable(model)
    teacher_models = check_teachers([load_parent(t) for t in teachers or []], model)
    check_dataset(train_data, model)
    if eval_data is not None:
        check_dataset(eval_data, model)
    if processor is None and source_dir is not None:
        processor = load_processor(source_dir)

    # the Trainer insists on a directory even though it saves nothing there (the model is saved below, staged)
    scratch = tempfile.mkdtemp(prefix="otfusion-finetune-")
    args = config.training_arguments(scratch, progress, **training_args)
    trainer = DistillationTrainer(
        teacher_models,
        config.distill_alpha,
        config.distill_temperature,
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=data_collator(processor),
        processing_class=processor,
        compute_metrics=compute_accuracy,
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)
    # Scores come from `evaluate_model`, not `Trainer.evaluate`: calling the latter before `train()` under DDP
    # leaves the model unwrapped, so the processes would train apart, and its loss averages padded batches.
    score = functools.partial(evaluate_model, dataset=eval_data, processor=processor, batch_size=config.eval_batch_size)
    try:
        before = score(model) if eval_data is not None and config.evaluate_before else None
        train_output = trainer.train()
        trained = cast(PreTrainedModel, trainer.model)  # the model given, trained in place
        after = score(trained) if eval_data is not None else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = FinetuneResult(
        model=trained,
        config=config,
        metrics_before=before,
        metrics_after=after,
        train_loss=float(train_output.training_loss),
        steps=int(train_output.global_step),
        log_history=[entry for entry in trainer.state.log_history if "loss" in entry],
        output_dir=out,
    )
    if out is None:
        return result
    if not trainer.is_world_process_zero():
        # every process calls save_model with the same path (sharded setups gather there); only the main one writes
        trainer.save_model(str(staging_path(out, "finetune")))
        return result
    with stage_output(out, overwrite=overwrite, name="finetune") as stage:
        trainer.save_model(str(stage.path))  # unwrapped from any DDP wrapper
        # the Trainer also pickles its arguments; the JSON run record says the same without pickle
        (stage.path / "training_args.bin").unlink(missing_ok=True)
        run = run_record(result, source, data_name, len(train_data), eval_name, eval_data, args.world_size)
        run["hub_datasets"] = list(hub_datasets or [])
        run["teachers"] = teacher_names or [
            str(t) if isinstance(t, str | Path) else f"teacher {k}" for k, t in enumerate(teachers or [])
        ]
        run["base_model"], run["eval_dataset"] = base_model, eval_dataset
        write_provenance(stage.path, source_dir, run)
        update_model_card(source_dir / "README.md" if source_dir else None, run, model).save(
            str(stage.path / "README.md")
        )
        stage.publish()
    return result


def check_trainable(model: PreTrainedModel) -> None:
    """Raises `UnsupportedTaskError` unless the model is a classifier that computes a loss from `labels`."""
    check_classifier(model)
    if not takes_labels(type(model)):  # DeiT's distillation model: its second head is trained against a teacher
        name = type(model).__name__
        sibling = trainable_sibling(name, model.config.model_type)
        fix = (
            f"Finetune it as {sibling}.from_pretrained(<checkpoint>), which keeps the backbone and the class head."
            if sibling
            else "Load the checkpoint with a classifier class that takes labels first."
        )
        raise UnsupportedTaskError(
            f"{name} takes no labels, so it computes no loss to train on. {fix}", model_class=name
        )


def compute_accuracy(eval_prediction) -> dict[str, float]:
    """`Trainer.compute_metrics`: accuracy of the argmax of the logits, through the shipped `evaluate` module."""
    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return load_metric("accuracy").compute(
        predictions=np.asarray(logits).argmax(-1), references=np.asarray(eval_prediction.label_ids)
    )


def run_record(
    result: FinetuneResult, source, data_name, num_train, eval_name, eval_data, world_size: int
) -> dict[str, Any]:
    """The finetuning run as a JSON-safe dict: what the card shows and `finetune_runs.json` keeps."""
    from importlib.metadata import version

    return {
        "source": source,
        "train_data": data_name,
        "train_examples": num_train,
        "eval_data": (eval_name or "evaluation data") if eval_data is not None else None,
        "eval_examples": len(eval_data) if eval_data is not None else None,
        "steps": result.steps,
        "global_batch_size": result.config.batch_size * world_size,
        "processes": world_size,
        "train_loss": result.train_loss,
        "before": result.metrics_before,
        "after": result.metrics_after,
        "config": result.config.to_dict(),
        "hf_otfusion_version": version("hf-otfusion"),
    }


def write_provenance(output_dir: Path, source_dir: Path | None, run: dict[str, Any]) -> None:
    """Copies the source's provenance files and appends this run to `finetune_runs.json`."""
    runs: list[dict[str, Any]] = []
    if source_dir is not None:
        for name in PROVENANCE_FILES:
            if (source_dir / name).is_file() and name != RUNS_FILE:
                shutil.copyfile(source_dir / name, output_dir / name)
        if (source_dir / RUNS_FILE).is_file():
            runs = json.loads((source_dir / RUNS_FILE).read_text())
    (output_dir / RUNS_FILE).write_text(json.dumps([*runs, run], indent=1) + "\n")


def update_model_card(card_path: str | Path | None, run: dict[str, Any], model: PreTrainedModel):
    """The model card with a finetuning section and results appended; everything already in it is kept.

    Args:
        card_path: the source checkpoint's `README.md` (for a fused model: the fusion card with its parents and
            config), or None to start a new card.
        run: the run record from `run_record`.
        model: the finetuned model; fills `pipeline_tag` when the card has none.

    Returns:
        A `huggingface_hub.ModelCard`; save it with `card.save(path)`.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if card_path is not None and Path(card_path).is_file():
        card = ModelCard.load(str(card_path))
    else:
        card = ModelCard(f"---\n{ModelCardData(library_name='transformers').to_yaml()}\n---\n")
    data = card.data
    data.tags = list(dict.fromkeys([*(data.tags or []), "hf-otfusion", "finetuned"]))
    data.library_name = data.library_name or "transformers"
    if run.get("hub_datasets"):
        data.datasets = list(dict.fromkeys([*(data.datasets or []), *run["hub_datasets"]]))
    data.pipeline_tag = data.pipeline_tag or pipeline_and_auto_class(type(model).__name__, model.config.model_type)[0]
    if run.get("base_model"):  # this model's own parent: the finetuned checkpoint, not what it was made from
        data.base_model, data.base_model_relation = run["base_model"], "finetune"
    # the model-index describes this model only: results of the source (a fusion's) stay in the card's text
    data.eval_results = None
    if run["after"] is not None:
        data.model_name = data.model_name or "finetuned-model"
        dataset = run.get("eval_dataset") or {"type": run["eval_data"], "name": run["eval_data"]}
        data.eval_results = [
            EvalResult(
                task_type=data.pipeline_tag,
                dataset_type=dataset["type"],
                dataset_name=dataset.get("name") or dataset["type"],
                dataset_split=dataset.get("split"),
                dataset_revision=dataset.get("revision"),
                metric_type=metric,
                metric_name=f"{metric} after finetuning",
                metric_value=round(float(run["after"][metric]), 6),
            )
            for metric in ("accuracy", "loss")
        ]
    previous = card.text.count("\n## Finetuning")
    heading = "## Finetuning" if previous == 0 else f"## Finetuning (run {previous + 1})"
    card.text = card.text.rstrip() + "\n\n" + finetuning_section(heading, run) + "\n"
    return card


def finetuning_section(heading: str, run: dict[str, Any]) -> str:
    """Markdown for one finetuning run: data, steps and the before/after scores."""
    config = run["config"]
    lines = [
        heading,
        "",
        f"Finetuned with `hf_otfusion.finetune` (transformers `Trainer`, hf_otfusion {run['hf_otfusion_version']})"
        + (f" from `{run['source']}`." if run["source"] else "."),
        "",
        f"- Training data: {run['train_data']} ({run['train_examples']} examples)",
    ]
    if run["eval_data"] is not None:
        lines.append(f"- Evaluation data: {run['eval_data']} ({run['eval_examples']} examples)")
    lines += [
        f"- Steps: {run['steps']} optimiser steps of {run['global_batch_size']} examples "
        f"({run['processes']} process{'es' if run['processes'] > 1 else ''}), learning rate "
        f"{config['learning_rate']:g} ({config['lr_scheduler_type']}, warmup {config['warmup']:g}), "
        f"weight decay {config['weight_decay']:g}, seed {config['seed']}",
        f"- Mean training loss: {run['train_loss']:.4f}",
    ]
    if run["after"] is not None:
        lines += ["", "| | accuracy | loss |", "|---|---:|---:|"]
        for label, key in (("before finetuning", "before"), ("after finetuning", "after")):
            if run[key] is not None:
                lines.append(f"| {label} | {100 * run[key]['accuracy']:.2f} % | {run[key]['loss']:.4f} |")
    lines += ["", "```json", json.dumps(config, indent=1, sort_keys=True), "```"]
    return "\n".join(lines)
