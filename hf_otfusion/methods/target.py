"""Fusing into a narrower target shape (compression): a target-shaped basis built by compressing the anchor with OT.

Parents of any width can be aligned onto a model of the target shape, but the alignment needs a *basis*: target
units whose weights and activations the parents' units can be compared with. We build it from the anchor alone,
space by space in flow order:

1. Centres: `m` of the anchor's `n` units, picked by importance-weighted farthest-point selection: the most
   important unit first (mean squared activation on the alignment data, or squared weight norm without data),
   then each next one maximising importance x squared distance to the nearest centre already picked. A unit
   that duplicates a picked one (distance 0) is never picked while distinct units remain, and with m = n every
   unit is its own centre. Heads are picked the same way on the head-pair cost, then dims within each head.
2. Merge: exact OT from all `n` units onto the centres, on the anchor's own unit-to-unit cost (activation
   statistics of the anchor against itself, or weight vectors whose other axes were already compressed). With
   uniform marginals every target unit absorbs n/m anchor units (balanced clusters); with
   `marginals="importance"` each unit carries its importance and each centre the importance of its nearest
   units, so the plan is an importance-weighted nearest-centre clustering.
3. The anchor moved through these maps with the two normalisations of `TransportMap` (held tensors averaged over
   a cluster, reading columns summed) is the basis: each target unit computes what its cluster computed.

Then every parent, the anchor included, is aligned onto the basis by the ordinary engine and averaged; the basis
itself gets no weight. Two invariants follow and are tested: a copy widened by duplicating units compresses back
exactly, and a target equal to the anchor's shape gives the anchor itself, so fusion reduces to ordinary fusion.

Why not simply prune to the top-m units? A pruned model reads one copy of a merged group instead of their sum, so
its downstream weights and activations are on the wrong scale to compare parents with; merging keeps them right.
The basis is always solved exactly and head-aware, whatever the parents' alignment options: it is a coordinate
system, and soft plans would blur it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import ot
import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..checkpoints import init_kwargs, weightless_model
from ..config import FusionConfig, parse_target
from ..engine.align import align_parameters, align_tensor
from ..engine.compatibility import check_finite
from ..engine.distributed import models_on, resolve_device
from ..engine.maps import SpaceDiagnostics, feature_parameters, logit_scale
from ..engine.plan import FusionPlan, Space, named_tensors, resolve_plan
from ..engine.solve import head_pair_costs, mean_squares, solve_heads
from ..engine.spec import AlignmentSpec, load_spec
from ..engine.statistics import collect_statistics, statistics_keys
from ..engine.transport import TransportMap, importance_marginal, solve_transport
from ..errors import EmptyAlignmentDataError, SpecError, TargetShapeError

logger = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    """The target-shaped basis and how it was obtained from the anchor.

    Attributes:
        model: the anchor compressed into the target shape (the anchor's class, the target config).
        maps: per space, the transport map of the anchor's units onto the target's.
        diagnostics: one entry per solved space (`parent` is the anchor's index, the space name has a
            `target:` prefix so it reads apart from the parents' maps in a fusion summary).
    """

    model: PreTrainedModel
    maps: dict[str, TransportMap] = field(default_factory=dict)
    diagnostics: list[SpaceDiagnostics] = field(default_factory=list)


def target_config(
    anchor: PreTrainedModel, target: dict[str, int], spec: AlignmentSpec | None = None
) -> PretrainedConfig:
    """The anchor's config with the target sizes set.

    Raises:
        TargetShapeError: a key that sizes no space of the spec (or sets the depth), or a value that is not
            a positive integer.
    """
    spec = spec or load_spec(anchor.config.model_type)
    sizable = sorted({space.size for space in spec.spaces})
    for key, value in target.items():
        if key not in sizable:
            raise TargetShapeError(
                f"target key {key!r} is not a width of {anchor.config.model_type!r} models; a target may set "
                f"{sizable} (depth stays the anchor's: layer i is fused with layer i).",
                key=key,
                target=target,
            )
        if not isinstance(value, int) or value < 1:
            raise TargetShapeError(
                f"target[{key!r}] must be a positive integer, got {value!r}.", key=key, target=target
            )
    config = copy.deepcopy(anchor.config)
    for key, value in target.items():
        setattr(config, key, value)
    return config


def compress(
    model: PreTrainedModel,
    target: dict[str, int] | str,
    data=None,
    config: FusionConfig | None = None,
    *,
    spec: AlignmentSpec | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """`model` compressed into the `target` shape by merging its units with OT (see the module docstring).

    This is the basis that fusion into a target uses, and a one-model compression baseline in its own right.
    `config` supplies the cost (`activations` needs `data`), the activation-pass options and `marginals`.
    """
    config = dataclasses.replace(config or FusionConfig(), target=parse_target(target))
    assert config.target is not None
    resolved = resolve_device(device)
    return target_basis(model, config.target, data, config, spec=spec, progress=progress, device=resolved).model


def target_basis(
    anchor: PreTrainedModel,
    target: dict[str, int],
    data,
    config: FusionConfig,
    *,
    spec: AlignmentSpec | None = None,
    anchor_index: int = 0,
    progress: bool = True,
    device: torch.device | None = None,
    process=None,
) -> CompressionResult:
    """The anchor compressed into the target shape: the basis every parent is aligned onto.

    Raises:
        TargetShapeError: the target is wider than the anchor in some space (or in a head's size), or its
            hidden size does not split into its heads.
        EmptyAlignmentDataError: `config.cost="activations"` without data.
    """
    check_finite([anchor])
    spec = spec or load_spec(anchor.config.model_type)
    anchor_plan = resolve_plan(anchor, spec)
    basis = _target_model(anchor, target, spec)
    basis_plan = _resolve_target_plan(basis, spec, target)
    _check_narrower(anchor_plan, basis_plan)

    stats = None
    if config.cost == "activations":
        if data is None:
            raise EmptyAlignmentDataError(
                "Compressing the anchor into the target with cost='activations' needs alignment data; pass data= "
                "or use FusionConfig(cost='weights')."
            )
        twin = copy.deepcopy(anchor)  # the anchor against itself: its unit-to-unit cost and importance
        with models_on([anchor, twin], device):
            stats = collect_statistics(
                [anchor, twin], [anchor_plan, anchor_plan], data, anchor=0, keys=statistics_keys(anchor_plan),
                progress=progress, process=process, **config.statistics_options(),
            )[1]  # fmt: skip
        del twin
    params = named_tensors(anchor)
    costs = _SelfCosts(anchor_plan, params, stats, config)
    exact = dataclasses.replace(config, solver="exact", target=None)
    result = CompressionResult(basis)
    for space in [s for s in basis_plan.spaces.values() if s.heads is None]:
        started = time.perf_counter()
        nested = basis_plan.nested_in(space.name)
        if nested:
            solved = _compress_heads(space, nested, anchor_plan, costs, result.maps, exact)
        else:
            cost, importance = costs.of(space.name, result.maps)
            centres = select_centres(cost, importance, space.size)
            solved = [(space.name, *_merge_onto(cost[:, centres], importance, centres, cost, config))]
        kind = costs.kind(nested[0].name if nested else space.name)
        for name, transport, info in solved:
            transport.output_scale = logit_scale(anchor_plan.spaces[name], basis_plan.spaces[name])
            result.maps[name] = transport
            result.diagnostics.append(
                SpaceDiagnostics(
                    anchor_index, f"target:{name}", transport.shape, transport.kind, kind, info.solver, None,
                    info.transport_cost, info.entropy, info.softness, time.perf_counter() - started,
                )
            )  # fmt: skip
            started = time.perf_counter()
    compressed = align_parameters(params, anchor_plan, result.maps)
    with torch.no_grad():
        for name, param in basis.named_parameters():
            param.copy_(compressed[name].to(param.dtype))
    return result


def select_centres(cost: np.ndarray, importance: np.ndarray, m: int) -> np.ndarray:
    """Indices of `m` units picked by importance-weighted farthest-point selection, in increasing order.

    `cost[u, c]` is the (squared) distance of unit u to unit c. The first centre is the most important unit;
    each next maximises importance x distance to the nearest centre picked so far, so exact duplicates of a
    centre come last and every centre stands for a distinct, heavy part of the space.
    """
    n = len(importance)
    chosen = [int(np.argmax(importance))]
    nearest = np.maximum(cost[:, chosen[0]], 0.0)
    free = np.ones(n, dtype=bool)
    free[chosen[0]] = False
    for _ in range(m - 1):
        score = np.where(free, importance * nearest, -np.inf)
        centre = int(np.argmax(score))
        chosen.append(centre)
        free[centre] = False
        nearest = np.minimum(nearest, np.maximum(cost[:, centre], 0.0))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _merge_onto(
    cost: np.ndarray, importance: np.ndarray, centres: np.ndarray, self_cost: np.ndarray, config: FusionConfig
):
    """Exact OT of all units onto the centres: balanced (uniform) or importance-weighted nearest-centre."""
    if config.marginals != "importance":
        return solve_transport(cost, solver="exact", emd_max_iter=config.emd_max_iter)
    mu, nu = _clustered_marginals(importance, centres, self_cost)
    return solve_transport(cost, solver="exact", mu=mu, nu=nu, emd_max_iter=config.emd_max_iter)


def _clustered_marginals(importance: np.ndarray, centres: np.ndarray, self_cost: np.ndarray):
    """Units weighted by importance; each centre weighted by the importance of the units nearest to it."""
    mu = importance_marginal(importance)
    nearest = np.argmin(self_cost[:, centres], axis=1)
    return mu, np.bincount(nearest, weights=mu, minlength=len(centres))


def _compress_heads(
    heads: Space,
    nested: list[Space],
    anchor_plan: FusionPlan,
    costs: _SelfCosts,
    maps: dict[str, TransportMap],
    config: FusionConfig,
):
    """Centre heads on the head-pair self cost, centre dims within each centre head, then the head-aware solve."""
    unit = [costs.of(space.name, maps) for space in nested]
    dims = [anchor_plan.spaces[space.name].head_dim for space in nested]
    head_cost, *_ = head_pair_costs([cost for cost, _ in unit], dims, dims)
    num_heads = anchor_plan.spaces[heads.name].size
    head_importance = sum(importance.reshape(num_heads, -1).sum(1) for _, importance in unit)
    centre_heads = select_centres(head_cost, head_importance, heads.size)
    head_marginals = None
    if config.marginals == "importance":
        head_marginals = _clustered_marginals(head_importance, centre_heads, head_cost)
    unit_costs = []
    for (cost, importance), dim, space in zip(unit, dims, nested, strict=True):
        centres = []
        for head in centre_heads:
            block = slice(head * dim, (head + 1) * dim)
            centres.extend(head * dim + select_centres(cost[block, block], importance[block], space.head_dim))
        unit_costs.append(cost[:, centres])
    return solve_heads(heads, nested, unit_costs, anchor_plan, config, head_marginals)


class _SelfCosts:
    """The anchor's unit-to-unit cost and unit importance per space, from its own activations or weights."""

    def __init__(self, plan: FusionPlan, params: dict[str, torch.Tensor], stats, config: FusionConfig):
        self.plan, self.params, self.stats, self.config = plan, params, stats, config
        self.keys = statistics_keys(plan)

    def kind(self, space: str) -> str:
        return "activations" if self.stats is not None and self.plan.hooks.get(space) else "weights"

    def of(self, space: str, maps: dict[str, TransportMap]) -> tuple[np.ndarray, np.ndarray]:
        """(n x n cost, n importances): activation statistics when the space is hooked, else weight vectors."""
        if self.kind(space) == "activations":
            moments = self.stats[self.keys[self.plan.hooks[space][0]]]  # the space's hooks pooled
            return moments.cost(self.config.activation_cost), mean_squares(moments)[1]
        features = []
        for name, dim in feature_parameters(self.plan, space, maps):
            aligned = align_tensor(self.params[name], self.plan.parameters[name], maps, skip_axis=dim)
            features.append(aligned.movedim(dim, 0).reshape(aligned.shape[dim], -1).numpy())
        if not features:
            raise SpecError(f"Space {space} has no parameter whose other axes are compressed before it.", key=space)
        stacked = np.concatenate(features, axis=1)
        return ot.dist(stacked, stacked, metric="sqeuclidean"), (stacked**2).sum(axis=1)


def check_target(anchor: PreTrainedModel, target: dict[str, int], spec: AlignmentSpec | None = None) -> None:
    """Raises `TargetShapeError` unless `target` is a valid compression of `anchor`; builds only a meta model.

    The checks `target_basis` makes before it compresses (known keys, sizes that build a model and split into
    heads, no space wider than the anchor's), so that pre-flight can make them on the anchor's weightless
    skeleton before any weight is downloaded, and both refuse a bad target with the same message.
    """
    spec = spec or load_spec(anchor.config.model_type)
    basis_plan = _resolve_target_plan(_target_model(anchor, target, spec, meta=True), spec, target)
    _check_narrower(resolve_plan(anchor, spec), basis_plan)


def _target_model(
    anchor: PreTrainedModel, target: dict[str, int], spec: AlignmentSpec, meta: bool = False
) -> PreTrainedModel:
    config = target_config(anchor, target, spec)
    kwargs = init_kwargs(type(anchor), list(anchor.state_dict()))  # an anchor without pooler: a basis without
    try:
        if meta:
            return weightless_model(type(anchor), config, **kwargs)
        dtype = next(anchor.parameters()).dtype
        return type(anchor)(config, **kwargs).to(dtype).eval()  # type: ignore[arg-type]  # .to is typed loosely
    except ValueError as error:  # the model's own check, e.g. BERT's hidden size not a multiple of its heads
        raise TargetShapeError(
            f"The target {target} does not give a valid {type(anchor).__name__}: {str(error).rstrip('.')}. Choose "
            "sizes that divide evenly, e.g. a hidden_size that is a multiple of num_attention_heads.",
            target=target,
        ) from None


def _resolve_target_plan(basis: PreTrainedModel, spec: AlignmentSpec, target: dict[str, int]) -> FusionPlan:
    try:
        return resolve_plan(basis, spec)
    except SpecError as error:
        raise TargetShapeError(
            f"The target {target} does not give a valid model: {error} Choose sizes that divide evenly, e.g. a "
            "hidden_size that is a multiple of num_attention_heads.",
            target=target,
        ) from None


def _check_narrower(anchor_plan: FusionPlan, target_plan: FusionPlan) -> None:
    for name, space in target_plan.spaces.items():
        source = anchor_plan.spaces[name]
        if space.size > source.size:
            problem = f"{space.size} units in space {name!r} where the anchor has {source.size}"
        elif space.heads and space.head_dim > source.head_dim:
            problem = f"heads of {space.head_dim} dims in space {name!r} where the anchor's have {source.head_dim}"
        else:
            continue
        raise TargetShapeError(
            f"The target has {problem}: a target compresses, it cannot widen. Pick the widest parent as anchor, "
            "or a target no wider than it in every space (also hidden_size / num_attention_heads, the head size)."
        )
