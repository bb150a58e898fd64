"""The cards of a multi-task merge: one per task (its own `model-index`), and the overview linking them."""

from __future__ import annotations

import yaml
from transformers import PreTrainedModel

from ..alignment import AlignedOutput, _is_model
from ..output.provenance import Provenance
from .result import MultiTaskResult, RunRecord, parent_location

#: the tags of every task card (with the model type)
CARD_TAGS = ("merge", "multi-task", "hf-otfusion")


def _method_line(result: MultiTaskResult, base) -> str:
    from ..output.card import method_text

    text = method_text(result.config.to_dict(), result.config.anchor)
    if result.config.method == "task-arithmetic" and base is not None:
        text += f" Base: `{parent_location(base) if not _is_model(base) else _model_label(base)}`."
    return text


def task_card(
    result: MultiTaskResult, outputs: list[AlignedOutput], index: int, base=None, record: RunRecord | None = None
):
    """The model card of task `index`: which task of which merge, the method, the parents, its labels; with a
    `record`, also the parents pinned to commits, the data, this task's evaluation (in `model-index` too) and
    the command that rebuilds it."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..output.card import _eval_results, pipeline_and_auto_class, usage_section

    name, model = list(result.models.items())[index]
    output = outputs[index]
    architecture = type(model).__name__
    pipeline_tag, auto_class = pipeline_and_auto_class(architecture, model.config.model_type)
    hub_parents = [o.repo_id for o in outputs if o.repo_id]
    provenance = record.provenance[name] if record is not None else None
    datasets = [
        d["repo_id"] for d in (provenance.alignment_data, provenance.eval_data) if d and d.get("kind") == "hub"
    ] if provenance else []  # fmt: skip
    data = ModelCardData(
        model_name=name,
        base_model=hub_parents or None,
        base_model_relation="merge" if hub_parents else None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=[*CARD_TAGS, model.config.model_type],
        datasets=list(dict.fromkeys(datasets)) or None,
        eval_results=(_eval_results(provenance, pipeline_tag) or None) if provenance else None,
    )
    links = _task_links(result, record)
    prefix = result.encoder_prefix[name]
    aligned = index in result.encoder.maps
    head = ", ".join(f"`{p}`" for p in result.heads[name])
    kept = (
        "re-expressed in the anchor's basis with this parent's alignment maps (the encoder was OT-aligned first)"
        if aligned
        else "unchanged, byte for byte"
    )
    rows = "\n".join(
        f"| {'**' + o.name + '**' if i == index else o.name} | {o.label} | {type(m).__name__} | "
        f"{m.config.num_labels} | {links[o.name]} |"
        for i, ((_, m), o) in enumerate(zip(result.models.items(), outputs, strict=True))
    )
    labels = "\n".join(f"| {i} | {label} |" for i, label in sorted((model.config.id2label or {}).items()))
    config_yaml = yaml.safe_dump(result.config.to_dict(), sort_keys=False).strip()
    body = f"""
# {name}

Task **{name}** of a multi-task merge of {len(outputs)} fine-tunes by hf_otfusion (`merge_tasks`): the shared
encoder (every parameter under `{prefix}`) is merged across all tasks, and the head ({head}) is the one of
the parent **{output.label}**, {kept}. Every task folder of this merge holds the same encoder tensors.

{_method_line(result, base)}

## Tasks of this merge

| task | parent | class | labels | {"repository" if record and record.repo_ids else "folder"} |
|---|---|---|---:|---|
{rows}

## Labels of this task

| id | label |
|---:|---|
{labels}
{_record_sections(provenance) if provenance else ""}
## Merge config

```yaml
{config_yaml}
```

{usage_section(auto_class, record.repo_ids[name] if record and record.repo_ids else name)}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _task_links(result: MultiTaskResult, record: RunRecord | None) -> dict[str, str]:
    """Each task's link from a card: its pushed repository, or its sibling folder."""
    if record is not None and record.repo_ids:
        from huggingface_hub import constants

        return {name: f"[{repo}]({constants.ENDPOINT}/{repo})" for name, repo in record.repo_ids.items()}
    return {name: f"[{name}](../{name}/)" for name in result.models}


def _record_sections(provenance: Provenance) -> str:
    """The pinned parents, base, data, evaluation and reproduce command of a task card (from its provenance)."""
    from ..output.card import _base_text, _data_text, _parent_rows, results_text

    parents = "\n".join("| " + " | ".join(row) + " |" for row in _parent_rows(provenance))
    out = (provenance.job or {}).get("out") or "merged"
    return f"""
## Parents (pinned)

| # | role | parent | requested revision | commit | weight file | sha256 |
|---:|---|---|---|---|---|---|
{parents}

{_base_text(provenance)}

## Data

{_data_text(provenance)}

## Evaluation of this task

{results_text(provenance)}

## Reproduce

Every task folder of this merge holds the same `fusion_job.yaml` (the whole run, pinned to commits); from the
folder that holds it:

```bash
otfusion-hub fuse --config fusion_job.yaml --out {out}
```

As run: `{provenance.command}`
"""


def overview(result: MultiTaskResult, outputs: list[AlignedOutput], base=None, record: RunRecord | None = None) -> str:
    """The top-level `README.md` of a multi-task output: what was merged and a link to every task folder."""
    pushed = record.repo_ids if record is not None and record.repo_ids else {}
    rows = "\n".join(
        f"| [{name}]({name}/) | {o.label} | {type(m).__name__} | {m.config.num_labels} |"
        + (f" `{pushed[name]}` |" if pushed else "")
        for (name, m), o in zip(result.models.items(), outputs, strict=True)
    )
    header = "| task | parent | class | labels |" + (" pushed to |" if pushed else "")
    rule = "|---|---|---|---:|" + ("---|" if pushed else "")
    rebuild = (
        "\n`fusion_job.yaml` is the whole run, pinned to commits: `otfusion-hub fuse --config fusion_job.yaml --out "
        "DIR` rebuilds every task folder's weights byte for byte.\n"
        if record is not None
        else ""
    )
    return f"""# Multi-task merge

{len(outputs)} fine-tunes merged by hf_otfusion (`merge_tasks`): one shared encoder, merged across the tasks,
and each task's own head. Each folder is a standard checkpoint of its parent's class and config.

{_method_line(result, base)}

{header}
{rule}
{rows}
{rebuild}"""


def _model_label(model: PreTrainedModel) -> str:
    return str(getattr(model, "name_or_path", "") or "a model object")
