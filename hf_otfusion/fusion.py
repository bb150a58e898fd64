"""`fuse`: the whole pipeline, spec -> plan -> statistics -> maps -> aligned parents -> weighted average."""

from __future__ import annotations

import copy
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from .checkpoints import ModelOrPath, load_parent, skeleton
from .config import FusionConfig
from .engine.average import average_into
from .engine.compatibility import check_finite
from .engine.distributed import broadcast_from_main, is_main_process, models_on, process_state, resolve_device
from .engine.held_back import QualityChoice, divergence, ensemble, label_loss, labelled, model_logits, split
from .engine.maps import SpaceDiagnostics, compute_maps, per_hook_spaces
from .engine.passes import batch_size_of, batches, evaluating
from .engine.plan import FusionPlan, named_tensors, resolve_plan
from .engine.prepare import prepare
from .engine.refine import RefineReport, refine_maps
from .engine.repair import SiteRepair, repair_model
from .engine.reparameterise import check_rotatable, fusion_tensors, output_norm_of, restore_output_norm
from .engine.spec import AlignmentSpec
from .engine.statistics import collect_statistics, statistics_keys
from .engine.transport import TransportMap
from .errors import EmptyAlignmentDataError, FusionError, InvalidConfigError
from .methods.fused_inputs import LayerRefit, refit_linears
from .methods.same_base import (
    SAME_BASE_METHODS,
    aligned_model,
    base_in_anchor_class,
    merge_parameters,
    parent_grams,
)
from .methods.target import target_basis

logger = logging.getLogger(__name__)


@dataclass
class FusionResult:
    """The fused model with what it took to get there.

    Attributes:
        model: the fused model, an instance of the anchor's class with the anchor's config.
        config: the `FusionConfig` used.
        maps: `maps[k][space]`, the transport map of each space of parent k onto the anchor (empty for the
            anchor and for unaligned methods); with `task-arithmetic` and `align="ot"`, key `len(parents)`
            holds the base model's maps.
        diagnostics: one entry per solved space and parent (cost, entropy, softness, time).
        timings: wall seconds per stage (`plan`, `statistics`, `maps`, `gram` for RegMean, `apply` = align
            and merge, `repair`).
        repair: one entry per repaired site (`config.repair`), in flow order.
        refine: what learned refinement of the orthogonal maps did (`config.refine_steps`), else None.
        choice: with `quality="best"`, each candidate's held-back divergence and the one kept, else None.
        refit: one entry per linear layer refitted on the fused model's inputs (`regmean_inputs="fused"`), in flow
            order: its relative output error before and after.
    """

    model: PreTrainedModel
    config: FusionConfig
    maps: dict[int, dict[str, TransportMap]] = field(default_factory=dict)
    diagnostics: list[SpaceDiagnostics] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    repair: list[SiteRepair] = field(default_factory=list)
    refine: RefineReport | None = None
    choice: QualityChoice | None = None
    refit: list[LayerRefit] = field(default_factory=list)

    def summary(self) -> str:
        """A plain-text table of the per-space diagnostics."""
        lines = [f"{'parent':>6} {'space':<12} {'units':>11} {'map':<11} {'source':<11} {'cost':>10} {'softness':>8}"]
        for d in self.diagnostics:
            units = f"{d.units[0]}x{d.units[1]}"
            lines.append(
                f"{d.parent:>6} {d.space:<12} {units:>11} {d.kind:<11} {d.cost_source:<11} {d.transport_cost:>10.4g} "
                f"{d.softness:>8.3f}"
            )
        for site in self.repair:
            lines.append(
                f"repair {site.site}: fused std {site.std_ratio_before:.3f} of target, scale {site.mean_scale:.3f}"
            )
        return "\n".join(lines)


@dataclass
class _FusionRun:
    """One `fuse` call's inputs, checked and planned, handed from one step of the flow to the next.

    Attributes:
        sources: the parents as given (models or checkpoints).
        parents: loaded models, or, on the OT and vanilla path, weightless skeletons of the parents given as
            checkpoints (`from_checkpoint`), loaded when their turn comes.
        plans: each parent's resolved plan.
        weights: each parent's normalised weight.
        timings: wall seconds per stage, filled in as the steps run.
    """

    sources: list[ModelOrPath]
    parents: list[PreTrainedModel]
    plans: list[FusionPlan]
    data: Any
    config: FusionConfig
    weights: list[float]
    timings: dict[str, float]
    progress: bool
    device: torch.device | None
    process: Any  # accelerate's PartialState in a multi-process launch, else None
    spec: AlignmentSpec | None
    parent_data: list[Any] | None = None  # RegMean: each parent's own Gram data (a multi-task merge)

    @property
    def anchor(self) -> int:
        return self.config.anchor

    @property
    def from_checkpoint(self) -> list[bool]:
        """Which parents were given as checkpoints rather than loaded models."""
        return [not isinstance(source, PreTrainedModel) for source in self.sources]


def fuse(
    models: Sequence[ModelOrPath],
    data=None,
    config: FusionConfig | None = None,
    *,
    spec: AlignmentSpec | str | Path | None = None,
    base: ModelOrPath | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Fuses two or more parents into one model of the anchor's class; see `fuse_with_diagnostics`."""
    return fuse_with_diagnostics(models, data, config, spec=spec, base=base, progress=progress, device=device).model


def fuse_with_diagnostics(
    models: Sequence[ModelOrPath],
    data=None,
    config: FusionConfig | None = None,
    *,
    spec: AlignmentSpec | str | Path | None = None,
    base: ModelOrPath | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    parent_data: list | None = None,
) -> FusionResult:
    """Aligns every parent onto the anchor with optimal transport, then averages in the anchor's basis.

    With a same-base `config.method` (`interpolate`, `task-arithmetic`, `regmean`), the parents are merged by
    that method instead, after OT alignment only when `config.align="ot"` (see `hf_otfusion.methods.same_base`).

    Args:
        models: parents, as loaded models or local/Hub checkpoints (loaded with safetensors only). For OT
            and vanilla fusion, checkpoints are loaded one at a time and the fused model is the loaded anchor
            overwritten, so two checkpoints fuse in the memory of two models (see `_align_and_average`).
        data: alignment data for `cost="activations"`: a `datasets.Dataset` with the model's input
            columns (`input_ids`, `attention_mask`, `pixel_values`, ...), a DataLoader or an iterable of
            batch dicts; or where such data is, as `fuse --data` takes it (a Hub dataset id, a `save_to_disk`
            directory, a data directory or files), raw text or images then encoded with the anchor's saved
            tokenizer or image processor. Not needed for `cost="weights"` or unaligned methods, except `regmean`,
            which measures each linear layer's inputs on it.
        config: the fusion choices; defaults to `FusionConfig()`.
        spec: an alignment spec (object, shipped `model_type` name or YAML path); defaults to the spec of the
            parents' `model_type`.
        base: the parents' shared ancestor for `task-arithmetic`, as a model or checkpoint; defaults to
            `config.base`.
        progress: show progress bars.
        device: where the forward passes over the data run (statistics, RegMean's Gram and fused-inputs passes,
            repair), and the Sinkhorn solves: `"cuda"`, `"cpu"`, `"auto"` (CUDA when available); `None` leaves the
            models where they are. Models are moved there for each stage and get their original tensors back
            afterwards, with what the refit or repair wrote into the fused model. Exact solves and refinement run
            on the CPU.
        parent_data: `regmean` only: each parent's own data for its Gram statistics, one entry per parent, in
            place of `data` (`data` still serves the alignment of `align="ot"`). `merge_tasks` passes each
            task's data here.

    Launched on several processes (`torchrun --nproc_per_node N`, `accelerate launch`), every process runs
    this same call: each takes its share of the alignment batches, the statistics are summed over processes,
    the maps are solved on the main process and broadcast, and every process returns the same fused model.

    Returns:
        A `FusionResult` whose `model` is a normal `PreTrainedModel` (save it with `save_pretrained`).

    Raises:
        FusionError: and its subclasses for incompatible parents, unsupported architectures, non-finite
            weights or missing alignment data; each message says what to do.
    """
    run = _planned_run(models, data, config, spec=spec, progress=progress, device=device, parent_data=parent_data)
    if run.config.method in SAME_BASE_METHODS:
        return _merge_same_base(run, base)
    if run.config.target is not None:
        return _fuse_into_target(run)
    return _refined_or_closed_form(run) if run.config.quality == "best" else _align_and_average(run)


def _planned_run(
    models: Sequence[ModelOrPath],
    data=None,
    config: FusionConfig | None = None,
    *,
    spec: AlignmentSpec | str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    parent_data: list | None = None,
) -> _FusionRun:
    """Every check of `fuse_with_diagnostics` (same arguments), the data encoded and each parent planned: what
    the fusion steps (`_solve_maps`, then averaging, or a same-base merge) start from. Loads no weights of the parents
    given as checkpoints on the OT and vanilla path."""
    config = config or FusionConfig()
    if parent_data is not None and (config.method != "regmean" or len(parent_data) != len(models)):
        raise InvalidConfigError(
            f"parent_data gives each parent its own RegMean data: it needs method='regmean' (got "
            f"{config.method!r}) and one entry per parent ({len(models)}, got {len(parent_data)}).",
            field="parent_data",
            value=len(parent_data),
        )
    where = resolve_device(device)
    process = process_state(where)  # None unless this is one of several launched processes
    if process is not None and where is not None and where.type == "cuda":
        where = process.device  # this process's own GPU
    timings: dict[str, float] = {}
    started = time.perf_counter()
    # OT and vanilla averaging load checkpoints one at a time (`_align_and_average`): check and plan them on
    # weightless skeletons first. The same-base methods need every parent at once and load them all here.
    streamed = config.method not in SAME_BASE_METHODS
    from_checkpoint = [streamed and not isinstance(model, PreTrainedModel) for model in models]
    parents = [skeleton(m) if lazy else load_parent(m) for m, lazy in zip(models, from_checkpoint, strict=True)]
    if isinstance(data, str | Path) or _raw_rows(data):
        data = _encoded_data(data, models[config.anchor], parents[config.anchor], config)
    prepared = prepare(parents, config, spec)
    plans, weights, spec = prepared.plans, prepared.weights, prepared.spec
    config = prepared.resolved(config)
    if config.residual == "orthogonal":
        for plan in plans:
            check_rotatable(plan)
    in_memory = [k for k, lazy in enumerate(from_checkpoint) if not lazy]
    check_finite([parents[k] for k in in_memory], in_memory)
    if parent_data is not None and any(d is None for d in parent_data):
        missing = [k for k, d in enumerate(parent_data) if d is None]
        raise EmptyAlignmentDataError(f"method=regmean needs every parent's data; parent(s) {missing} have none.")
    # parent_data comes with method=regmean only: it serves RegMean's Gram matrices, not activation costs or repair
    shared_data = parent_data is None or config.aligns_on_activations or config.repair != "none"
    if config.needs_data and data is None and shared_data:
        regmean = config.method == "regmean" and parent_data is None
        if regmean or config.aligns_on_activations:
            reason = "method=regmean" if regmean else "cost=activations"
            fix = (
                "or use FusionConfig(cost='weights') for data-free alignment (method='interpolate' for a data-free "
                "same-base merge)"
            )
        else:  # data-free maps, then a step that measures the fused model on data
            reason = "repair" if config.repair != "none" else "refine_steps"
            fix = f"or drop {reason} for a data-free fusion"
        raise EmptyAlignmentDataError(
            f"{reason} needs alignment data: pass data=<datasets.Dataset or DataLoader of model inputs>, {fix}."
        )
    if data is not None and config.needs_data:
        _check_data_fits(data, parents[config.anchor])
    run = _FusionRun(
        list(models), parents, plans, data, config, weights, timings, progress, where, process, spec, parent_data
    )
    timings["plan"] = time.perf_counter() - started
    return run


def _merge_same_base(run: _FusionRun, base: ModelOrPath | None) -> FusionResult:
    """The same-base methods (`methods.same_base`) on every parent in memory, aligned first with `align="ot"`.

    With a rotating residual (`residual="orthogonal"`, pre-LN parents aligned with OT) every model is merged
    reparameterised, as `fuse` averages it (`_fusion_parameters`): RegMean then fits each linear layer on the
    inputs it reads in that form, and the anchor's output norm is given back at the end.
    """
    config, parents, anchor, timings = run.config, run.parents, run.anchor, run.timings
    aligns = config.align == "ot"
    started = time.perf_counter()
    base_model = None
    if config.method == "task-arithmetic":  # the ancestor joins the alignment as one more model, never averaged
        if base is None and config.base is None:
            raise FusionError("method='task-arithmetic' needs the parents' shared ancestor: set FusionConfig.base.")
        ancestor = base if base is not None else config.base
        assert ancestor is not None
        base_model = base_in_anchor_class(load_parent(ancestor), parents[anchor])
    models = [*parents, base_model.model] if base_model and aligns else parents
    plans = run.plans + [resolve_plan(model, run.spec) for model in models[len(parents) :]]
    timings["plan"] += time.perf_counter() - started

    rotates = config.residual == "orthogonal"
    params = [_fusion_parameters(model, plans[k], config) for k, model in enumerate(models)]
    result = FusionResult(model=parents[anchor], config=config, timings=timings)
    if aligns:
        result.maps, result.diagnostics = _maps_onto_anchor(run, dict(enumerate(models)), plans, params.__getitem__)
    grams = None
    if config.method == "regmean" and config.regmean_inputs == "parents":
        started = time.perf_counter()
        grams = parent_grams(
            parents, params, plans, result.maps, run.data, config, run.progress, device=run.device,
            process=run.process, parent_data=run.parent_data, rewritten=rotates,
        )  # fmt: skip
        timings["gram"] = time.perf_counter() - started

    started = time.perf_counter()
    result.model = merge_parameters(
        parents[anchor], params[: len(parents)], plans[: len(parents)], result.maps, config, base=base_model,
        base_maps=result.maps.get(len(parents)), grams=grams,
    )  # fmt: skip
    timings["apply"] = time.perf_counter() - started
    if config.method == "regmean" and config.regmean_inputs == "fused":
        result.refit = _refit(run, result.model, result.maps, params)
    if config.repair != "none":  # RegMean only (`FusionConfig`); before the output norm is given back
        result.repair = _repair(run, result.model, result.maps, params.__getitem__)
    anchor_norm = output_norm_of(parents[anchor], plans[anchor]) if rotates else None
    if anchor_norm is not None:  # the anchor's own output norm back (the logits do not change)
        restore_output_norm(result.model, plans[anchor], *anchor_norm)
    return result


def _fuse_into_target(run: _FusionRun) -> FusionResult:
    """Fusion into `config.target`: the anchor compressed into the target shape (`hf_otfusion.methods.target`) becomes
    the anchor of an ordinary fusion of every parent, the original anchor included, with weight 0 itself."""
    started = time.perf_counter()
    assert run.config.target is not None
    basis = target_basis(
        load_parent(run.sources[run.anchor]), run.config.target, run.data, run.config, spec=run.spec,
        anchor_index=run.anchor, progress=run.progress, device=run.device, process=run.process,
    )  # fmt: skip
    run.timings["target"] = time.perf_counter() - started
    inner = replace(
        run,
        sources=[*run.sources, basis.model],
        parents=[*run.parents, basis.model],
        plans=[*run.plans, resolve_plan(basis.model, run.spec)],
        config=replace(run.config, anchor=len(run.parents)),
        weights=[*run.weights, 0.0],
    )
    result = _align_and_average(inner)
    result.config, result.diagnostics = run.config, basis.diagnostics + result.diagnostics
    return result


class _Parents:
    """The parents of a run, loaded when their turn comes and freed after it.

    Parents given as checkpoints are loaded on first use (their finiteness checked then) and, when there are
    several groups to align one at a time, freed once their group is done; parents given as models are the
    caller's and only referenced. `groups` are the non-anchor parents in the order they are handled: one
    group with all of them when every one is in memory, else one group per parent.

    Each loaded parent's tensors as they are averaged (`tensors`) are computed once and kept with it: with a
    rotating residual they are a reparameterised copy, which the weight cost, refinement and the average all
    read, and folding every norm again for each would repeat the same work three times per parent.
    """

    def __init__(self, run: _FusionRun):
        self.run = run
        self.loaded: dict[int, PreTrainedModel] = {}
        self.averaged: dict[int, dict[str, torch.Tensor]] = {}
        others = [k for k in range(len(run.parents)) if k != run.anchor]
        from_checkpoint = run.from_checkpoint
        self.groups = [[k] for k in others] if any(from_checkpoint[k] for k in others) else [others]

    def get(self, k: int) -> PreTrainedModel:
        if k not in self.loaded:
            lazy = self.run.from_checkpoint[k]
            self.loaded[k] = load_parent(self.run.sources[k]) if lazy else self.run.parents[k]
            if lazy:
                check_finite([self.loaded[k]], [k])
        return self.loaded[k]

    def tensors(self, k: int) -> dict[str, torch.Tensor]:
        """Parent k's tensors as they enter the average (`_fusion_parameters`), computed on first use."""
        if k not in self.averaged:
            self.averaged[k] = _fusion_parameters(self.get(k), self.run.plans[k], self.run.config)
        return self.averaged[k]

    def release(self, group: list[int]) -> None:
        if len(self.groups) > 1:  # a single group stays loaded from its maps to the average
            for k in group:
                self.loaded.pop(k, None)
                self.averaged.pop(k, None)
            gc.collect()

    def forget_tensors(self) -> None:
        """Frees the kept tensors once the average is built (repair and the caller need them no more)."""
        self.averaged.clear()
        gc.collect()


def _solve_maps(run: _FusionRun, parents: _Parents | None = None) -> FusionResult:
    """The maps of every parent onto the anchor (`config.method="ot"`; none for vanilla), refined when
    `config.refine_steps` asks for it; the result's `model` is the anchor itself, not yet averaged.

    `align_models` stops here; `_align_and_average` goes on from the same `parents`, so a single group of
    parents stays loaded from its maps to the average.
    """
    parents = parents or _Parents(run)
    anchor = run.anchor
    result = FusionResult(model=parents.get(anchor), config=run.config, timings=run.timings)
    if run.config.method == "ot":
        for group in parents.groups:
            members = {k: parents.get(k) for k in [anchor, *group]}  # not kept past the call: `release` frees them
            maps, diagnostics = _maps_onto_anchor(run, members, run.plans, parents.tensors)
            del members
            result.maps.update(maps)
            result.diagnostics.extend(diagnostics)
            parents.release(group)
    if run.config.refine_steps:
        started = time.perf_counter()
        weighted = [k for k, weight in enumerate(run.weights) if weight > 0 or k == anchor]
        tensors = {k: parents.tensors(k) for k in weighted}
        result.refine = refine_maps(
            parents.get(anchor), run.plans[anchor], tensors,
            result.maps, run.weights, run.data, steps=run.config.refine_steps, learning_rate=run.config.refine_lr,
            statistics_options=run.config.statistics_options(), permutations=run.config.refine_permutations,
            norms=run.config.refine_norms, mixing=run.config.refine_weights,
            invertible=run.config.refine_invertible, progress=run.progress,
        )  # fmt: skip
        run.timings["refine"] = time.perf_counter() - started
    return result


def _align_and_average(run: _FusionRun) -> FusionResult:
    """OT fusion (or vanilla averaging) that holds the anchor and one other checkpoint at a time.

    Parents given as checkpoints are loaded when needed and freed after use: each one's statistics pass and
    maps run against the anchor alone, and its aligned tensors are added into the fused parameters, which for
    a checkpoint anchor are the anchor's own tensors (overwritten one by one once every map is solved). Two
    checkpoints thus fuse in the memory of two models, and so do N (each non-anchor parent is then loaded
    twice: for its maps, and for the average). Parents given as models are in memory anyway: they share one
    statistics pass and one averaging step, and the anchor is copied rather than overwritten. The maps (and
    refinement) are `_solve_maps`'s, from the same loaded parents.
    """
    anchor, from_checkpoint = run.anchor, run.from_checkpoint
    parents = _Parents(run)
    result = _solve_maps(run, parents)

    started = time.perf_counter()
    anchor_model = parents.get(anchor)
    rotates = run.config.residual == "orthogonal"  # the anchor's output norm is given back to the fused model
    anchor_norm = output_norm_of(anchor_model, run.plans[anchor]) if rotates else None
    fused = anchor_model if from_checkpoint[anchor] else copy.deepcopy(anchor_model)
    mixed = result.refine is not None and result.refine.layer_weights is not None  # all learned: no plain average
    for i, group in enumerate(parents.groups):
        if not mixed:
            indices = ([anchor] if i == 0 else []) + group
            params = {k: parents.tensors(k) for k in indices}
            average_into(fused, params, run.plans, result.maps, run.weights, accumulate=i > 0)
            del params
        parents.release(group)
    parents.forget_tensors()
    if result.refine is not None and result.refine.learned:  # learned norms or mixtures replace the average
        own = dict(fused.named_parameters())
        with torch.no_grad():
            for name, tensor in result.refine.learned.items():
                own[name].copy_(tensor.to(own[name].dtype))
    result.model = fused
    run.timings["apply"] = time.perf_counter() - started
    if run.config.repair != "none":
        parents.loaded.clear()  # a checkpoint anchor was overwritten by the average: its original is loaded again

        def tensors_of(k: int) -> dict[str, torch.Tensor]:
            parent = load_parent(run.sources[k]) if from_checkpoint[k] else run.parents[k]
            return _fusion_parameters(parent, run.plans[k], run.config)

        result.repair = _repair(run, fused, result.maps, tensors_of)
    if anchor_norm is not None:
        restore_output_norm(fused, run.plans[anchor], *anchor_norm)
    return result


def _refined_or_closed_form(run: _FusionRun) -> FusionResult:
    """`quality="best"`: the refined fusion and the closed form (`FusionConfig.closed_form_candidate`), both fitted
    on the same batches, and the one with the lower loss on the held-back ones (`engine.held_back`): on their labels
    when the alignment data has them, else the KL divergence from the parents' ensemble.

    Refinement holds back every fifth alignment batch itself; the closed form gets the other four only, so that
    neither candidate has seen the batches that judge them (repair after refinement, when asked for, still reads
    every batch, as it does without the preset). Every process of a launch runs both and keeps the main process's
    choice.
    """
    options = run.config.statistics_options()
    with_labels = list(
        batches(run.data, run.parents[run.anchor], options["batch_size"], options["num_samples"], labels=True)
    )
    loaded = [{key: value for key, value in batch.items() if key != "labels"} for batch in with_labels]
    fitting, held_back = split(loaded)
    refined = _align_and_average(replace(run, data=loaded))
    started = time.perf_counter()
    closed_run = _planned_run(
        run.sources, fitting, run.config.closed_form_candidate(), spec=run.spec, progress=run.progress,
        device=run.device,
    )  # fmt: skip
    closed = _merge_same_base(closed_run, None)
    parents = closed_run.parents  # every parent loaded, as given: the same-base path loads them all
    judged = {"refined": refined.model, "closed-form": closed.model, "anchor": parents[run.anchor]}
    scored = [*parents, refined.model, closed.model]
    labelled_held_back = split(with_labels)[1]
    criterion = "labels" if labelled(labelled_held_back) else "ensemble"
    with models_on(scored, run.device), evaluating(scored):
        if criterion == "labels":
            losses = {name: label_loss(model_logits(m, run.device), labelled_held_back) for name, m in judged.items()}
        else:
            targets = [ensemble([model_logits(p, run.device) for p in parents], run.weights, b) for b in held_back]
            losses = {name: divergence(model_logits(m, run.device), held_back, targets) for name, m in judged.items()}
    candidates = ("refined", "closed-form")
    kept = broadcast_from_main(min(candidates, key=losses.__getitem__), run.process)  # a tie keeps refinement
    result = refined if kept == "refined" else closed
    result.config, result.timings = run.config, run.timings
    result.timings["closed-form"] = time.perf_counter() - started
    result.choice = QualityChoice(criterion, losses, kept, sum(map(batch_size_of, held_back)))
    described = "cross-entropy on the labels" if criterion == "labels" else "KL to the parents' ensemble"
    logger.info(
        "quality='best' kept the %s fusion: held-back %s %s (the anchor alone: %.4f).",
        kept, described, ", ".join(f"{name} {losses[name]:.4f}" for name in candidates), losses["anchor"],
    )  # fmt: skip
    if result.choice.worse_than_anchor:
        logger.warning(
            "The fused model's held-back %s is worse than the anchor's alone (%.4f vs %.4f): the parents may be "
            "too far apart to fuse well; compare on your task.",
            described, losses[kept], losses["anchor"],
        )  # fmt: skip
    return result


def _repair(
    run: _FusionRun,
    fused: PreTrainedModel,
    maps: dict[int, dict[str, TransportMap]],
    tensors_of: Callable[[int], dict[str, torch.Tensor]],
) -> list[SiteRepair]:
    """Repairs `fused` (in the anchor's basis, reparameterised where the residual rotates) in place towards its
    parents moved with `maps`: parent k's tensors as they are averaged come from `tensors_of(k)` when its turn
    comes (loaded then, or kept by the caller). Adds the stage's time."""
    started = time.perf_counter()
    aligned_parents = ((model, weight) for _, model, weight in _aligned_parents(run, fused, maps, tensors_of))
    repaired = repair_model(
        fused, run.plans[run.anchor], aligned_parents, run.data, run.config.repair,
        run.config.statistics_options(), progress=run.progress, device=run.device,
    )  # fmt: skip
    run.timings["repair"] = time.perf_counter() - started
    return repaired


def _aligned_parents(
    run: _FusionRun,
    fused: PreTrainedModel,
    maps: dict[int, dict[str, TransportMap]],
    tensors_of: Callable[[int], dict[str, torch.Tensor]],
) -> Iterator[tuple[int, PreTrainedModel, float]]:
    """(k, parent k moved into the anchor's basis as a copy of `fused`, its weight) for every parent of positive
    weight, built one at a time when iterated (repair holds one at a time; the refit holds them all)."""
    for k, weight in enumerate(run.weights):
        if weight > 0:
            yield k, aligned_model(fused, tensors_of(k), run.plans[k], maps.get(k, {})), weight


def _refit(
    run: _FusionRun,
    fused: PreTrainedModel,
    maps: dict[int, dict[str, TransportMap]],
    params: list[dict[str, torch.Tensor]],
) -> list[LayerRefit]:
    """RegMean on the fused model's own inputs (`methods.fused_inputs`): `fused` (the average, in the anchor's basis)
    refitted in place to its parents moved with `maps`, all held at once; on each parent's own data for a
    multi-task merge (`parent_data`). Adds the stage's time."""
    started = time.perf_counter()
    aligned = list(_aligned_parents(run, fused, maps, params.__getitem__))  # (k, model, weight), all held at once
    if run.parent_data is None:
        sources = [(run.data, [(model, weight) for _, model, weight in aligned])]
    else:
        sources = [(run.parent_data[k], [(model, weight)]) for k, model, weight in aligned]
    refitted = refit_linears(
        fused, sources, run.config.statistics_options(), progress=run.progress, device=run.device, process=run.process
    )
    run.timings["refit"] = time.perf_counter() - started
    return refitted


def _raw_rows(data) -> bool:
    """Whether `data` is a `datasets.Dataset` of raw text or images (no model-input column yet)."""
    from .data import MODEL_INPUT_COLUMNS

    columns = getattr(data, "column_names", None)
    return isinstance(columns, list) and not any(c in columns for c in MODEL_INPUT_COLUMNS)


def _encoded_data(data, anchor: Any, anchor_model: PreTrainedModel, config: FusionConfig):
    """`data` as model inputs: rows at a path or Hub id are loaded first (`data.DataSource`: the split
    `load_dataset` picks, `config.num_samples` of them, seed 0), then raw text or images are encoded with the
    processor saved next to the anchor when it is given as a checkpoint, as `fuse --data` does."""
    from .checkpoints import Checkpoint
    from .data import DataSource, encode_with_anchor_processor, load_processor

    location = anchor.location if isinstance(anchor, Checkpoint) else anchor if isinstance(anchor, str | Path) else None
    processor = load_processor(location) if location is not None else None
    where = str(data) if isinstance(data, str | Path) else "the alignment data"
    rows = DataSource.resolve(where, None, config.num_samples, 0).load() if isinstance(data, str | Path) else data
    missing = (
        "The anchor has no saved tokenizer or image processor here (it is given as a model, or its directory has "
        "none), so give data that holds model inputs, or encode it first with "
        "hf_otfusion.encode_dataset(dataset, processor)."
    )
    label2id = getattr(anchor_model.config, "label2id", None)
    return encode_with_anchor_processor(rows, processor, missing, source=where, label2id=label2id)


def _check_data_fits(data, anchor: PreTrainedModel) -> None:
    """The first alignment row against the anchor's embeddings (sequence length, image shape), before any pass:
    what the CLI's pre-flight checks (`job.inputs`), for data given to the Python API as model inputs."""
    from .data_checks import FIXES_FOR_GIVEN_INPUTS, check_model_inputs

    first = next(iter(batches(data, anchor, 1, 1)), None)
    if first is None:
        raise EmptyAlignmentDataError("The alignment data holds no rows; give data with at least one example.")
    example = {name: value[0] for name, value in first.items()}
    check_model_inputs(example, anchor, source="The alignment data", **FIXES_FOR_GIVEN_INPUTS)


def _fusion_parameters(model: PreTrainedModel, plan: FusionPlan, config: FusionConfig) -> dict[str, torch.Tensor]:
    """The tensors of a parent that enter the average (`engine.reparameterise.fusion_tensors`)."""
    return fusion_tensors(model, plan, config.residual == "orthogonal")  # FusionConfig allows it where OT aligns


def _maps_onto_anchor(
    run: _FusionRun,
    models: dict[int, PreTrainedModel],
    plans: list[FusionPlan],
    averaged: Callable[[int], dict[str, torch.Tensor]] | None = None,
) -> tuple[dict[int, dict[str, TransportMap]], list[SpaceDiagnostics]]:
    """The transport maps of every model in `models` (keyed by index into `plans`, anchor included) onto the anchor.

    `averaged(k)` gives model k's tensors as they are averaged (`_fusion_parameters`), for a caller that keeps
    them for later stages (`_Parents.tensors`); they are computed here otherwise.

    With an activation cost, one statistics pass runs them all on the data (on `run.device`, sharded over the
    processes of a distributed launch). The maps are solved on the main process only and broadcast.
    Adds the stage times to `run.timings`.
    """
    config, anchor, timings = run.config, run.anchor, run.timings
    order = sorted(models)
    stats = None
    if config.cost == "activations":
        started = time.perf_counter()
        keys = statistics_keys(plans[anchor], per_hook_spaces(plans[anchor], config))
        listed = [models[k] for k in order]
        with models_on(listed, run.device):
            stats = collect_statistics(
                listed, [plans[k] for k in order], run.data, anchor=order.index(anchor), keys=keys,
                progress=run.progress, process=run.process, **config.statistics_options(),
            )  # fmt: skip
        stats = {order[i]: per_parent for i, per_parent in stats.items()}
        timings["statistics"] = timings.get("statistics", 0.0) + time.perf_counter() - started
    started = time.perf_counter()
    maps, diagnostics = {}, []
    if is_main_process(run.process):  # solved once, then broadcast

        def weights_of(k: int) -> dict[str, torch.Tensor]:
            """What weight costs read: the tensors as they are averaged (reparameterised where the residual rotates)."""
            if config.cost != "weights":
                return named_tensors(models[k])
            return averaged(k) if averaged else _fusion_parameters(models[k], plans[k], config)

        anchor_params = weights_of(anchor)
        for k in order:
            if k != anchor:
                maps[k], found = compute_maps(
                    k, plans[k], plans[anchor], weights_of(k), anchor_params,
                    stats.pop(k) if stats else None, config, run.progress, device=run.device,
                )  # fmt: skip
                diagnostics.extend(found)
    del stats  # the Gram matrices are not needed once the maps exist; free them before building the model
    maps, diagnostics = broadcast_from_main((maps, diagnostics), run.process)
    timings["maps"] = timings.get("maps", 0.0) + time.perf_counter() - started
    return maps, diagnostics
