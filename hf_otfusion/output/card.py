"""The model card of a fused checkpoint, rendered from its provenance with `huggingface_hub.ModelCard`.

The front matter is what the Hub indexes (`base_model` + `base_model_relation: merge` link the parents'
pages to the fused model, `model-index` carries the evaluation); the body is what a person needs to trust and
rebuild it: parents pinned to commits with file hashes, every hyperparameter, the alignment data, results,
per-layer diagnostics, a usage snippet, the exact command and the package versions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..engine.spec import load_spec
from ..engine.tasks import task_of
from ..errors import SpecError, UnsupportedArchitectureError
from .provenance import Provenance

TEMPLATE_PATH = Path(str(files("hf_otfusion.model_cards") / "fused_model_card.md"))  # top-level model_cards/
CARD_TAGS = ("merge", "model-fusion", "optimal-transport", "hf-otfusion")
FUSED_ROW = "fused"
VANILLA_ROW = "vanilla average"


def pipeline_and_auto_class(architecture: str, model_type: str) -> tuple[str, str]:
    """The Hub pipeline tag of an architecture and the `transformers` Auto class that loads it.

    Read from transformers' auto tables and the spec's `modality` (see `hf_otfusion.engine.tasks`).
    """
    task = task_of(architecture, model_type)
    return task.pipeline_tag, task.auto_class


def build_card_data(provenance: Provenance, licenses: list[str | None], model_name: str) -> ModelCardData:
    """The card's front matter: parents as `base_model`, relation `merge`, tags, data sets, licence, results."""
    pipeline_tag, _ = pipeline_and_auto_class(provenance.architecture, provenance.model_type)
    hub_parents = [p["repo_id"] for p in provenance.parents if p.get("repo_id")]
    datasets = [d["repo_id"] for d in (provenance.alignment_data, provenance.eval_data) if d and d.get("kind") == "hub"]
    data = ModelCardData(
        model_name=model_name,
        base_model=hub_parents or None,
        base_model_relation="merge",
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=[*CARD_TAGS, provenance.model_type],
        datasets=list(dict.fromkeys(datasets)) or None,
        license=inherited_license(licenses),
        eval_results=_eval_results(provenance, pipeline_tag) or None,
    )
    return data


def inherited_license(licenses: Sequence[str | None]) -> str | None:
    """The licence the fused model's metadata declares: the parents' one when they all declare the same.

    Otherwise `license` is left out rather than set to `other`: on the Hub `other` means "a custom licence that
    `license_name` / `license_link` define", which would claim the fused weights have a licence of their own.
    They have none that we can know; the combination of the parents' licences is for the user to judge, and a
    card without a licence says exactly that (the Hub shows it as unknown). `license_conflict` writes why.
    """
    known = set(licenses)
    return known.pop() if len(known) == 1 and None not in known else None


def license_conflict(licenses: Sequence[str | None], names: Sequence[str] | None = None) -> str | None:
    """The sentence (for the log and the card) saying the parents' licences differ, or `None` when they agree.

    Parents that declare no licence count as different from one that does: their terms are unknown, so the
    fused model cannot simply inherit the other's. Nothing is said when no parent declares a licence at all.

    Args:
        licenses: each parent's licence (`None` when its card has none).
        names: each parent's name for the message (defaults to `parent k`).
    """
    if inherited_license(licenses) is not None or all(license is None for license in licenses):
        return None
    names = names or [f"parent {k}" for k in range(len(licenses))]
    each = ", ".join(f"{name}: {license or 'none declared'}" for name, license in zip(names, licenses, strict=True))
    return (
        f"The parents' licences differ ({each}), so this card declares no `license`: check that the licences are "
        "compatible, and which one applies to the fused weights, before using or sharing them."
    )


def render_card(
    provenance: Provenance,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    licenses: list[str | None] | None = None,
) -> ModelCard:
    """The model card (`README.md`) of a fused checkpoint.

    Args:
        provenance: the fusion's record.
        repo_id: the Hub repo (or local directory) the usage snippet loads from.
        model_name: the card's title and `model-index` name; defaults to the last part of `repo_id`.
        licenses: each parent's licence (`None` when unknown); the card inherits one only when all agree, and
            says that the licences differ otherwise (`license_conflict`).
    """
    repo_id = repo_id or "path/to/fused-model"
    model_name = model_name or repo_id.rstrip("/").split("/")[-1]
    licenses = licenses if licenses is not None else [p.get("license") for p in provenance.parents]
    card_data = build_card_data(provenance, licenses, model_name)
    names = [str(p.get("repo_id") or p.get("path") or f"parent {k}") for k, p in enumerate(provenance.parents)]
    _, auto_class = pipeline_and_auto_class(provenance.architecture, provenance.model_type)
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        architecture=provenance.architecture,
        num_parents=len(provenance.parents),
        license_text=license_conflict(licenses, names if len(names) == len(licenses) else None) or "",
        method_text=method_text(provenance.config, provenance.anchor),
        parent_rows=_parent_rows(provenance),
        base_text=_base_text(provenance),
        config_rows=[(f"`{key}`", f"`{value}`") for key, value in provenance.config.items()],
        data_text=_data_text(provenance),
        results_text=results_text(provenance),
        diagnostics_text=_diagnostics_text(provenance) + _quality_text(provenance),
        readiness_text=_readiness_text(provenance),
        auto_class=auto_class,
        repo_id=repo_id,
        otfusion_version=provenance.versions.get("hf-otfusion", ""),
        reproduce=provenance.reproduce,
        out_name=(provenance.job or {}).get("out") or "fused",
        command=provenance.command,
        version_rows=sorted(provenance.versions.items()),
    )


def _eval_results(provenance: Provenance, pipeline_tag: str) -> list[EvalResult]:
    """The fused model's own scores, as `model-index` entries (parents and vanilla stay in the body table)."""
    if not provenance.evaluation or not provenance.eval_data:
        return []
    rows = {row["name"]: row for row in provenance.evaluation["rows"]}
    if FUSED_ROW not in rows:
        return []
    data = provenance.eval_data
    dataset = data.get("repo_id") or Path(data["source"]).name
    common = dict(
        task_type=pipeline_tag, dataset_type=dataset, dataset_name=dataset, dataset_split=data.get("split"),
        dataset_revision=data.get("commit"),
    )  # fmt: skip
    fused = rows[FUSED_ROW]
    return [
        EvalResult(metric_type="accuracy", metric_name="Accuracy", metric_value=fused["accuracy"], **common),
        EvalResult(metric_type="loss", metric_name="Cross-entropy loss", metric_value=fused["loss"], **common),
    ]


def method_text(config: dict[str, Any], anchor: int) -> str:
    """The card's "How:" sentence for a `FusionConfig.to_dict()` whose anchor is parent `anchor`."""
    weights = config.get("weights") or "uniform"
    aligned = (
        f"the units of every parent (residual dimensions, attention heads, within-head dimensions, MLP neurons) "
        f"were first matched to the anchor's (parent {anchor}) by optimal transport ({config['solver']} "
        f"solver, {config['cost']}-based ground cost)"
    )
    texts = {
        "ot": f"How: {aligned}, then the aligned weights were averaged (weights: {weights}).",
        "vanilla": f"How: the parents' weights were averaged as they are, without alignment (weights: {weights}).",
        "interpolate": f"How: the parents' weights were interpolated (weights: {weights}).",
        "task-arithmetic": _task_arithmetic_text(config),
        "regmean": f"How: RegMean, every linear layer solved in closed form from the Gram matrices of its inputs "
        f"(off-diagonal scale {config.get('regmean_alpha')}), other weights averaged."
        if config.get("regmean_inputs", "parents") == "parents"
        else "How: RegMean on the fused model's own inputs: the weights averaged, then every linear layer, in the "
        "order the model runs them, refitted by least squares to its parents' outputs on the inputs the layers "
        "below it give it.",
    }
    text = texts.get(config["method"], f"How: method {config['method']}.")
    if config["method"] not in ("ot", "vanilla") and config.get("align") == "ot":
        text += f" Before merging, {aligned}."
    return text


def _task_arithmetic_text(config: dict) -> str:
    scale, density = config.get("scale"), config.get("density", 1.0)
    vectors = config.get("task_vector", "plain")
    if vectors == "ties":
        return (
            f"How: task arithmetic with TIES merging, base + {scale} x the disjoint mean of the parents' task "
            f"vectors, each trimmed to its largest {density:g} fraction of entries, with signs elected per entry."
        )
    if vectors == "dare":
        return (
            f"How: task arithmetic with DARE, base + {scale} x the sum of the parents' task vectors, each entry "
            f"kept with probability {density:g} and rescaled by 1/{density:g} (seed {config.get('seed', 0)})."
        )
    return f"How: task arithmetic, base + {scale} x the sum of the parents' task vectors."


def _parent_rows(provenance: Provenance) -> list[tuple[str, ...]]:
    rows = []
    for k, parent in enumerate(provenance.parents):
        role = "anchor" if k == provenance.anchor else "parent"
        where = parent.get("repo_id") or parent.get("path")
        revision = (parent.get("revision") or "(default branch)") if parent.get("repo_id") else "(local)"
        commit = f"`{parent['commit']}`" if parent.get("commit") else "-"
        for i, weight in enumerate(parent["weight_files"]):
            first = i == 0
            rows.append(
                (str(k) if first else "", role if first else "", str(where) if first else "", revision if first else "",
                 commit if first else "", weight["name"], f"`{weight['sha256']}`")
            )  # fmt: skip
    return rows


def _base_text(provenance: Provenance) -> str:
    base = provenance.base
    if not base:
        return ""
    where = base.get("repo_id") or base.get("path")
    at = f" at commit `{base['commit']}`" if base.get("commit") else ""
    hashes = ", ".join(f"{w['name']} `{w['sha256']}`" for w in base["weight_files"])
    return f"Task arithmetic subtracted the shared ancestor `{where}`{at} ({hashes})."


def _data_text(provenance: Provenance) -> str:
    data = provenance.alignment_data
    if not data:
        return f"None: this fusion was data-free (`method={provenance.config['method']}`, " \
            f"`cost={provenance.config['cost']}`)."  # fmt: skip
    commit = f"`{data['commit']}`" if data.get("commit") else "-"
    return "\n".join(
        [
            "| source | requested revision | commit | split | rows used | sample seed |",
            "|---|---|---|---|---|---|",
            f"| {data.get('repo_id') or data['source']} | {data.get('revision') or '-'} | {commit} | {data['split']} "
            f"| {data['num_rows']} | {data['seed']} |",
        ]
    )


def results_text(provenance: Provenance) -> str:
    """The evaluation of parents, vanilla average and fused model as a markdown table (or why there is none)."""
    evaluation, data = provenance.evaluation, provenance.eval_data
    if not evaluation or not data:
        return "No evaluation was run (`otfusion-hub fuse ... --eval-data DATA` puts parents, vanilla average and " \
            "fused model side by side here)."  # fmt: skip
    rows = evaluation["rows"]
    source = data.get("repo_id") or data["source"]
    lines = [
        f"On `{source}`, split `{evaluation['split']}` ({rows[0]['num_examples']} examples, the same for every row):",
        "",
        "| model | accuracy | loss |",
        "|---|---:|---:|",
    ]
    lines += [f"| {row['name']} | {row['accuracy']:.4f} | {row['loss']:.4f} |" for row in rows]
    return "\n".join(lines)


def _readiness_text(provenance: Provenance) -> str:
    """How far apart the parents were before and after alignment, and which kind of merge suits them."""
    if provenance.readiness is None:
        return "Not measured for this checkpoint."
    from ..methods.readiness import ReadinessReport

    return ReadinessReport.from_dict(provenance.readiness).to_markdown()


def _diagnostics_text(provenance: Provenance) -> str:
    """Per parent and layer, `transport cost / softness` of each space kind (heads, qk, vo, mlp, ...)."""
    if not provenance.diagnostics:
        return f"No transport problem was solved (`method={provenance.config['method']}` does not align)."
    order = _space_order(provenance.model_type)
    kinds = sorted({d["space"].split(".")[0] for d in provenance.diagnostics}, key=lambda k: _space_rank(k, order))
    cells: dict[tuple[int, str], dict[str, str]] = {}
    for d in provenance.diagnostics:
        kind = d["space"].split(".")[0]
        layer = next((part for part in d["space"].split(".")[1:] if part.isdigit()), "-")
        cells.setdefault((d["parent"], layer), {})[kind] = f"{d['transport_cost']:.3g} / {d['softness']:.2f}"
    lines = [
        "Per parent and layer, for each space: transport cost / plan softness (0 = a hard permutation, 1 = the "
        "uniform coupling); `-` marks spaces shared by all layers.",
        "",
        "| parent | layer | " + " | ".join(kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for (parent, layer), row in sorted(cells.items(), key=lambda kv: (kv[0][0], _layer_rank(kv[0][1]))):
        lines.append(f"| {parent} | {layer} | " + " | ".join(row.get(kind, "") for kind in kinds) + " |")
    return "\n".join(lines)


def _quality_text(provenance: Provenance) -> str:
    """Which kind of map each space got, what repair and refinement did, which candidate `quality="best"` kept, and a
    warning when the fused model did worse than the anchor on held-back data (the choice's measure, when there is
    one, else refinement's)."""
    quality = provenance.quality
    if not quality:
        return ""
    lines = [""]
    kinds = quality.get("map_kinds") or {}
    if kinds:
        described = ", ".join(f"{space}: {'/'.join(found)}" for space, found in sorted(kinds.items()))
        lines += ["", f"Maps: {described}."]
    if quality.get("repair"):
        lines += ["", f"Repair restored the activation mean and std of {len(quality['repair'])} sites."]
    refit = quality.get("refit")
    if refit:
        before = sum(layer["error_before"] for layer in refit) / len(refit)
        after = sum(layer["error_after"] for layer in refit) / len(refit)
        lines += [
            "",
            f"Refit on the fused inputs: {len(refit)} linear layers; mean relative output error against the parents "
            f"{before:.4f} (averaged) -> {after:.4f} (refitted), on the alignment data.",
        ]
    refine = quality.get("refine")
    if refine:
        lines += [
            "",
            f"Refinement: {refine['steps']} steps (best at {refine['best_step']}); held-back KL to the parents' "
            f"ensemble {refine['held_back_loss_before']:.4f} -> {refine['held_back_loss_after']:.4f} (the anchor "
            f"alone: {refine['anchor_held_back_loss']:.4f}).",
        ]
        if refine.get("layer_weights"):
            learned = "; ".join(
                f"{group} {', '.join(f'{w:.2f}' for w in ws)}" for group, ws in refine["layer_weights"].items()
            )
            lines += ["", f"Learned parent weights per layer group (parents in order): {learned}."]
        if refine["held_back_loss_after"] > refine["anchor_held_back_loss"] and not quality.get("choice"):
            lines += ["", "**Warning:** the fused model is further from the parents' ensemble than the anchor alone."]
    choice = quality.get("choice")
    if choice:
        losses, kept = choice["held_back_loss"], choice["kept"]
        measure = "cross-entropy on their labels" if choice["criterion"] == "labels" else "KL to the parents' ensemble"
        other = next(name for name in losses if name not in (kept, "anchor"))
        lines += [
            "",
            f'`quality="best"` kept the {kept} fusion over the {other} one: on {choice["held_back_samples"]} '
            f"held-back alignment samples, {measure} {losses[kept]:.4f} against {losses[other]:.4f} (the anchor "
            f"alone: {losses['anchor']:.4f}).",
        ]
        if losses[kept] > losses["anchor"]:
            lines += ["", "**Warning:** on those samples the fused model does worse than the anchor alone."]
    return "\n".join(lines)


def _space_order(model_type: str) -> tuple[str, ...]:
    """The kinds of space in the order the spec declares them (flow order); none known without a spec."""
    try:
        return load_spec(model_type).space_kinds
    except (UnsupportedArchitectureError, SpecError):
        return ()


def _space_rank(kind: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(kind) if kind in order else len(order), kind)


def _layer_rank(layer: str) -> tuple[int, int]:
    return (0, -1) if not re.fullmatch(r"\d+", layer) else (1, int(layer))


def usage_section(auto_class: str, location: str) -> str:
    """A card's "## Usage" section: the model loaded with its Auto class from `location` (a directory or repo)."""
    return f"""## Usage

```python
from transformers import {auto_class}

model = {auto_class}.from_pretrained("{location}")  # this directory, or the repository it was pushed to
```
"""
