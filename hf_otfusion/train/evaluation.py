"""Accuracy and loss of several classifiers on one split, as a table: how fused models are compared to parents.

The loss is the mean cross-entropy of the model's logits over examples, computed here rather than taken from the
model, so every head (including DeiT-with-teacher, which takes no labels) is scored the same way. Accuracy comes
from the `evaluate` module shipped in `hf_otfusion/metrics`.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, default_data_collator
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..checkpoints import ModelOrPath, load_parent
from ..engine.passes import evaluating
from ..engine.tasks import task_of
from ..errors import TrainingDataError, UnsupportedTaskError
from .metrics import load_metric

# a row's model: a model or checkpoint, or a function that builds one when the row is scored
RowModel = ModelOrPath | Callable[[], PreTrainedModel]
#: the row of a multi-task evaluation that scores the base encoder under the task's own head (no merge)
BASE_HEAD_ROW = "base + this head"


@dataclass
class ModelScore:
    """One row of an `EvaluationTable`."""

    name: str
    accuracy: float
    loss: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_scores(cls, name: str, scores: dict[str, float]) -> ModelScore:
        """A row from the dict `evaluate_model` returns; keys beyond accuracy, loss and size are extra metrics."""
        extra = {k: v for k, v in scores.items() if k not in ("accuracy", "loss", "num_examples")}
        return cls(name, scores["accuracy"], scores["loss"], int(scores["num_examples"]), extra)


@dataclass
class EvaluationTable:
    """Scores of several models on the same examples."""

    rows: list[ModelScore]
    split: str = "test"

    def __str__(self) -> str:
        width = max([len("model"), *(len(row.name) for row in self.rows)])
        extra = sorted({key for row in self.rows for key in row.metrics})
        header = f"{'model':<{width}}  {'accuracy':>8}  {'loss':>8}" + "".join(f"  {k:>8}" for k in extra)
        lines = [f"split: {self.split} ({self.rows[0].num_examples} examples)" if self.rows else "", header]
        for row in self.rows:
            values = "".join(f"  {row.metrics.get(k, math.nan):>8.4f}" for k in extra)
            lines.append(f"{row.name:<{width}}  {row.accuracy:>8.4f}  {row.loss:>8.4f}{values}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The table in GitHub markdown, accuracy in percent."""
        extra = sorted({key for row in self.rows for key in row.metrics})
        lines = ["| model | accuracy % | loss |" + "".join(f" {k} |" for k in extra)]
        lines.append("|---|---:|---:|" + "---:|" * len(extra))
        for row in self.rows:
            values = "".join(f" {row.metrics.get(k, math.nan):.4f} |" for k in extra)
            lines.append(f"| {row.name} | {100 * row.accuracy:.2f} | {row.loss:.4f} |{values}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"split": self.split, "rows": [asdict(row) for row in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def check_classifier(model: PreTrainedModel) -> None:
    """Raises `UnsupportedTaskError` unless the model is a sequence or image classifier.

    A classifier is a class transformers' auto tables list as its model type's sequence or image classifier.
    """
    name = type(model).__name__
    if not task_of(name, model.config.model_type).classifier:
        raise UnsupportedTaskError(
            f"{name} has no classification head; hf_otfusion evaluates and finetunes *ForSequenceClassification "
            "and *ForImageClassification models. Load the checkpoint with such a class (a new head is added) first.",
            model_class=name,
        )


def check_dataset(dataset, model: PreTrainedModel) -> None:
    """Raises `TrainingDataError` unless `dataset` holds the model's inputs and labels the model's head knows.

    Labels are checked against the head's size and, when the dataset carries `ClassLabel` names and the model has
    real label names, against those names too: averaging or scoring with permuted classes would give silently
    meaningless numbers.
    """
    columns = list(dataset.column_names)
    if model.main_input_name not in columns:
        raise TrainingDataError(
            f"The data has columns {columns} but {type(model).__name__} reads {model.main_input_name!r}; encode it "
            "first (hf_otfusion.data.encode_dataset with the model's tokenizer or image processor).",
            columns=columns,
        )
    if "labels" not in columns:
        raise TrainingDataError(
            f"The data has no 'labels' column (columns: {columns}); rename the label column to 'labels' or "
            "encode it with encode_dataset(..., label_column=<name>).",
            columns=columns,
        )
    if len(dataset) == 0:
        raise TrainingDataError("The data has no examples; check the split name and any sample cap.", columns=columns)
    num_labels: int = model.config.num_labels  # type: ignore[assignment]  # always set for a classifier
    labels = np.asarray(dataset.with_format("numpy")["labels"][:])
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_labels:
        raise TrainingDataError(
            f"Labels span [{low}, {high}] but the model's head has {num_labels} classes; map the labels to "
            f"0..{num_labels - 1} in the order of the model's config.id2label.",
            labels=(low, high),
        )
    names = getattr(dataset.features["labels"], "names", None)
    id2label: dict[Any, str] = dict(model.config.id2label or {})
    model_names = [id2label[i] for i in range(num_labels)]
    if names and model_names != [f"LABEL_{i}" for i in range(num_labels)] and list(names) != model_names:
        raise TrainingDataError(
            f"The data's label names {list(names)} differ from the model's id2label {model_names}; "
            "align them (datasets' align_labels_with_mapping(model.config.label2id, 'labels')) before scoring.",
            labels=list(names),
        )


def data_collator(processor=None):
    """Pads variable-length text batches with the tokenizer, and stacks fixed-size inputs as they are."""
    if isinstance(processor, PreTrainedTokenizerBase):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(processor)
    return default_data_collator


def model_input_columns(model: PreTrainedModel, dataset) -> list[str]:
    """The dataset columns that the model's forward accepts, plus `labels`."""
    accepted = set(inspect.signature(model.forward).parameters)
    return [c for c in dataset.column_names if c in accepted and c != "labels"] + ["labels"]


@torch.no_grad()
def evaluate_model(
    model: PreTrainedModel,
    dataset,
    *,
    processor=None,
    batch_size: int = 64,
    metrics: Sequence[str] = (),
    progress: bool = False,
    desc: str = "evaluating",
) -> dict[str, float]:
    """Accuracy, mean cross-entropy loss and any extra shipped metrics of one classifier on a dataset.

    Args:
        model: a sequence or image classifier.
        dataset: a `datasets.Dataset` of model inputs and integer `labels`.
        processor: the tokenizer, needed only when text rows have different lengths (they are padded per batch).
        batch_size: evaluation batch size.
        metrics: names of extra metrics from `hf_otfusion.train.metrics` (e.g. `"f1"`, macro-averaged).
        progress: show a progress bar.

    Returns:
        `{"accuracy": ..., "loss": ..., "num_examples": ..., <metric>: ...}`.

    Raises:
        UnsupportedTaskError: the model is not a classifier.
        TrainingDataError: the dataset lacks the model's inputs or labels, or has labels the head does not know.
    """
    from tqdm.auto import tqdm

    check_classifier(model)
    check_dataset(dataset, model)
    columns = model_input_columns(model, dataset)
    loader = torch.utils.data.DataLoader(
        dataset.with_format("torch", columns=columns), batch_size=batch_size, collate_fn=data_collator(processor)
    )
    device = next(model.parameters()).device
    accuracy = load_metric("accuracy")
    extra = {name: load_metric(name) for name in metrics}
    total_loss, count = 0.0, 0
    with evaluating([model]):  # the model's own train/eval mode back afterwards
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            total_loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            count += len(labels)
            predictions = logits.argmax(-1).cpu()
            for metric in (accuracy, *extra.values()):
                metric.add_batch(predictions=predictions, references=labels.cpu())
    scores = {"accuracy": accuracy.compute()["accuracy"], "loss": total_loss / count, "num_examples": count}
    for name, metric in extra.items():
        scores[name] = metric.compute()[name]
    return scores


def evaluate_models(
    models: Sequence[RowModel] | Mapping[str, RowModel],
    dataset,
    *,
    split: str = "test",
    processor=None,
    batch_size: int = 64,
    metrics: Sequence[str] = (),
    progress: bool = True,
) -> EvaluationTable:
    """Scores several classifiers on the same dataset, one row per model.

    Args:
        models: models or checkpoint paths/Hub ids (loaded as their saved class with safetensors), as a list or
            a `{row name: model}` mapping. A checkpoint, or a zero-argument function that builds a model, is
            loaded when its row is scored and freed after it, so that only one such model is held at a time.
        dataset: a `datasets.Dataset` of model inputs and integer `labels` (see `evaluate_model`).
        split: the split's name, shown in the table.
        processor, batch_size, metrics, progress: as in `evaluate_model`.

    Returns:
        An `EvaluationTable`; `print(table)` gives a plain-text table, `table.to_markdown()` a markdown one.
    """
    named = models.items() if isinstance(models, Mapping) else ((_row_name(m, i), m) for i, m in enumerate(models))
    rows = []
    for name, model in named:
        scores = evaluate_model(
            _row_model(model), dataset, processor=processor, batch_size=batch_size, metrics=metrics,
            progress=progress, desc=name,
        )  # fmt: skip
        rows.append(ModelScore.from_scores(name, scores))
    return EvaluationTable(rows=rows, split=split)


def evaluate_task(
    merged: RowModel,
    own: ModelOrPath,
    dataset,
    *,
    own_name: str,
    base: ModelOrPath | None = None,
    split: str = "test",
    processor=None,
    batch_size: int = 64,
    metrics: Sequence[str] = (),
    progress: bool = True,
) -> EvaluationTable:
    """One task of a multi-task merge scored against what it is measured by: its own fine-tune, and the base.

    The rows are `own fine-tune: <own_name>`, then, with a `base`, `base + this head` (the base's encoder under
    the task's head, unmerged: what the head alone gives, see `multitask.base_with_head`), then `fused`. The same
    table serves `fuse --multi-task --eval-data` (recorded in each task's card) and `eval MERGED --data ...`, so
    the two report the same numbers on the same rows.

    Args:
        merged: the task's merged model (or its checkpoint).
        own: the task's fine-tune, the parent whose head the merged model keeps.
        dataset: the task's rows, encoded with its processor and labels (see `evaluate_model`).
        own_name: how the fine-tune's row names it (its repository or directory).
        base: the parents' shared ancestor, when the merge had one (a bare encoder or a model whose head is ignored).
        split, processor, batch_size, metrics, progress: as in `evaluate_models`.
    """
    from ..multitask import base_with_head
    from ..output.card import FUSED_ROW

    rows: dict[str, RowModel] = {f"own fine-tune: {own_name}": own}
    if base is not None:
        rows[BASE_HEAD_ROW] = lambda: base_with_head(base, own)
    rows[FUSED_ROW] = merged
    return evaluate_models(
        rows, dataset, split=split, processor=processor, batch_size=batch_size, metrics=metrics, progress=progress
    )


def _row_model(model: RowModel) -> PreTrainedModel:
    if isinstance(model, PreTrainedModel) or not callable(model):  # a module is callable too: it runs forward
        return load_parent(model)
    return model()


def _row_name(model: RowModel, index: int) -> str:
    return str(model) if isinstance(model, str | Path) else f"model {index}"
