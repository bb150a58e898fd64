"""What a multi-task merge returns and records: the task models, the run record, the task repositories."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from ..checkpoints import Checkpoint
from ..config import FusionConfig
from ..fusion import FusionResult
from ..output.provenance import Provenance


@dataclass
class RunRecord:
    """What an `otfusion-hub fuse` run records beside its task folders (the Python API writes none of it).

    A multi-task output records its provenance like a single fused model, once per task, so that every task
    folder, pushed alone to its own repository, still says exactly what made it and how to make it again.

    Attributes:
        job: the pinned job (`FuseJob.pinned(...).to_dict()`, task names included), written as `fusion_job.yaml`
            at the top level and in every task folder: `otfusion-hub fuse --config fusion_job.yaml --out DIR`
            rebuilds every task's weights byte for byte.
        provenance: task name -> its `Provenance` (the parents and base pinned to commits with their weights'
            sha256, the data, this task's evaluation, versions), written as the task's `fusion_provenance.json`
            with the sha256 of the task's own weight files, and rendered in its card.
        repo_ids: task name -> the Hub repository the task is pushed to (`--push-to-hub`), which the cards link
            and load from; None: they link the sibling folders.
        max_shard_size: as for `save_pretrained`.
        dtype: the `--dtype` the task models were cast to, if any (a non-finite value then names the cast).
    """

    job: dict[str, Any]
    provenance: dict[str, Provenance]
    repo_ids: dict[str, str] | None = None
    max_shard_size: str | int = "5GB"
    dtype: str | None = None


def task_repo_id(repo_id: str, task: str) -> str:
    """The Hub repository of task `task` when a multi-task merge is pushed to `repo_id`: `<repo_id>-<task>`.

    One repository per task rather than one with a folder per task: the Hub renders a repository's own card,
    `model-index` and pipeline widget, and `from_pretrained(repo)` and `pipeline(model=repo)` load it, only at
    the repository's root; a task in a subfolder would need `subfolder=` everywhere and get none of those.
    """
    return f"{repo_id}-{task}"


@dataclass
class MultiTaskResult:
    """The merged task models, with what the encoder merge did.

    Attributes:
        models: task name -> that task's model (the parent's class and config, the merged encoder, the
            parent's head), in the parents' order.
        config: the `FusionConfig` used.
        encoder: the `FusionResult` of the encoder merge (maps, diagnostics, timings); its `model` is dropped,
            since every task model holds the merged encoder.
        encoder_prefix: each task's base-model prefix (`bert.`): the parameters under it are shared.
        heads: task name -> the names of the parameters kept from its parent (the head).
        out: the directory written, or None.
    """

    models: dict[str, PreTrainedModel]
    config: FusionConfig
    encoder: FusionResult
    encoder_prefix: dict[str, str] = field(default_factory=dict)
    heads: dict[str, list[str]] = field(default_factory=dict)
    out: Path | None = None

    @property
    def task_names(self) -> list[str]:
        return list(self.models)

    def summary(self) -> str:
        """One line per task (class, labels, head parameters), then the encoder merge's diagnostics."""
        lines = [
            f"task {name}: {type(model).__name__}, {model.config.num_labels} labels, head {', '.join(self.heads[name])}"
            for name, model in self.models.items()
        ]
        diagnostics = self.encoder.summary() if self.encoder.diagnostics else ""
        return "\n".join(lines + ([diagnostics] if diagnostics else []))


def parent_location(parent: Any) -> str:
    """Where a parent given as a checkpoint or path is (a model object has none: see `cards`)."""
    return str(parent.location if isinstance(parent, Checkpoint) else parent)
