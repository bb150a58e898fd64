"""Transport maps for every space of a parent, solved in flow order against the anchor.

Each space gets its ground cost from activation statistics or, data-free, from unit weight vectors whose
other axes were already moved into the anchor's basis by the maps solved upstream. Attention is solved
head-aware by default: whole heads are matched on the cost of their best within-head matching, then the
within-head maps of the matched pairs are assembled into one coupling over (head, dim) units, so that Q and K
(and V and O) share a map and the fused attention is an attention of aligned heads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import ot
import torch
from tqdm.auto import tqdm

from .align import align_tensor
from .config import FusionConfig
from .errors import SpecError
from .plan import FusionPlan, Space
from .statistics import UnitStatistics, statistics_keys
from .transport import (
    SolveInfo,
    TransportMap,
    plan_entropy,
    softness,
    solve_transport,
    solve_transport_batch,
    uniform,
)

logger = logging.getLogger(__name__)

# Head pairs whose head-plan mass is below this fraction of the largest entry keep their exact within-head plan.
SIGNIFICANT_HEAD_MASS = 1e-3


@dataclass
class SpaceDiagnostics:
    """One solved space of one parent: sizes, cost source, solver outcome and time."""

    parent: int
    space: str
    units: tuple[int, int]
    cost_source: str
    solver: str
    reg: float | None
    transport_cost: float
    entropy: float
    softness: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _CostSources:
    """The per-source ground costs of a space for one parent, from activations or weights."""

    parent_plan: FusionPlan
    anchor_plan: FusionPlan
    parent_params: dict[str, torch.Tensor]
    anchor_params: dict[str, torch.Tensor]
    stats: dict[str, UnitStatistics] | None
    config: FusionConfig
    keys: dict[str, str]  # hook module -> statistics key, as `collect_statistics` accumulated them

    def kind(self, space: str) -> str:
        if self.config.cost == "activations" and self.stats is not None and self.anchor_plan.hooks.get(space):
            return "activations"
        return "weights"

    def costs(self, space: str, maps: dict[str, TransportMap], pooled: bool) -> list[np.ndarray]:
        """One cost per source (hook or parameter), or a single cost with all sources pooled."""
        if self.kind(space) == "activations":
            keys = dict.fromkeys(self.keys[hook] for hook in self.anchor_plan.hooks[space])
            moments = [self.stats[key] for key in keys]
            if pooled and len(moments) > 1:
                moments = [sum(moments[1:], start=moments[0])]
            return [s.cost(self.config.activation_cost) for s in moments]
        features = self._weight_features(space, maps)
        if not features:
            raise SpecError(
                f"Space {space} has no parameter whose other axes are aligned before it, so it has no weight-based "
                "cost; list it after the spaces it reads in the spec, or give it hooks and use cost='activations'."
            )
        if pooled:
            features = [(np.concatenate([a for a, _ in features], 1), np.concatenate([b for _, b in features], 1))]
        return [ot.dist(a, b, metric="sqeuclidean") for a, b in features]

    def _weight_features(self, space: str, maps: dict[str, TransportMap]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per parameter: the units' weight vectors in both models, other axes already in the anchor basis.

        Only parameters whose other bound axes are already solved take part, which is what makes the
        flow order matter: the residual space comes from embeddings and LayerNorms, layer spaces from
        weights reading the already-aligned residual stream.
        """
        features = []
        for name in self.anchor_plan.parameters_of(space):
            axes = self.anchor_plan.parameters[name]
            own = [dim for dim, axis in enumerate(axes) if axis is not None and axis.space == space]
            others = [axis.space for axis in axes if axis is not None and axis.space != space]
            if len(own) != 1 or any(other not in maps for other in others):
                continue
            dim = own[0]
            parent = align_tensor(self.parent_params[name], self.parent_plan.parameters[name], maps, skip_axis=dim)
            anchor = self.anchor_params[name].detach().to(torch.float64)
            features.append(
                (
                    parent.movedim(dim, 0).reshape(parent.shape[dim], -1).numpy(),
                    anchor.movedim(dim, 0).reshape(anchor.shape[dim], -1).numpy(),
                )
            )
        return features


def per_hook_spaces(plan: FusionPlan, config: FusionConfig) -> set[str]:
    """Spaces whose hooks need statistics of their own: residual streams under the `mean` policy."""
    return {name for name, space in plan.spaces.items() if space.stream and config.residual == "mean"}


def compute_maps(
    parent_index: int,
    parent_plan: FusionPlan,
    anchor_plan: FusionPlan,
    parent_params: dict[str, torch.Tensor],
    anchor_params: dict[str, torch.Tensor],
    stats: dict[str, UnitStatistics] | None,
    config: FusionConfig,
    progress: bool = False,
) -> tuple[dict[str, TransportMap], list[SpaceDiagnostics]]:
    """Solves the transport map of every space of one parent onto the anchor, in flow order.

    Returns:
        The maps keyed by space name (nested head spaces included, heads spaces too in `aware` mode) and
        one `SpaceDiagnostics` per solve.
    """
    per_hook = per_hook_spaces(anchor_plan, config)
    keys = statistics_keys(anchor_plan, per_hook)
    sources = _CostSources(parent_plan, anchor_plan, parent_params, anchor_params, stats, config, keys)
    maps: dict[str, TransportMap] = {}
    diagnostics: list[SpaceDiagnostics] = []

    def record(space: str, transport: TransportMap, info: SolveInfo, source: str, started: float) -> None:
        seconds = time.perf_counter() - started
        diagnostics.append(
            SpaceDiagnostics(
                parent_index, space, transport.plan.shape, source, info.solver, info.reg,
                info.transport_cost, info.entropy, info.softness, seconds,
            )
        )  # fmt: skip
        logger.debug(
            "parent %d %-10s %4dx%-4d %s/%s cost=%.4g entropy=%.3f softness=%.3f (%.2fs)",
            parent_index, space, *transport.plan.shape, source, info.solver, info.transport_cost,
            info.entropy, info.softness, seconds,
        )  # fmt: skip

    spaces = tqdm(anchor_plan.spaces.values(), desc=f"transport maps, parent {parent_index}", disable=not progress)
    for space in spaces:
        started = time.perf_counter()
        nested = anchor_plan.nested_in(space.name)
        if space.heads is not None and config.heads == "aware":
            continue  # solved together with its heads space
        if nested:
            if config.heads == "aware":
                for name, transport, info in _solve_heads(space, nested, sources, maps, parent_plan, config):
                    maps[name] = transport
                    record(name, transport, info, sources.kind(nested[0].name), started)
                    started = time.perf_counter()  # the heads entry carries the time of the joint solve
            continue
        mean_policy = space.name in per_hook
        costs = sources.costs(space.name, maps, pooled=not mean_policy)
        transport, info = _solve_mean(costs, config) if mean_policy else _solve(costs[0], config)
        maps[space.name] = transport
        record(space.name, transport, info, sources.kind(space.name), started)
    return maps, diagnostics


def _solve(cost: np.ndarray, config: FusionConfig) -> tuple[TransportMap, SolveInfo]:
    return solve_transport(
        cost,
        solver=config.solver,
        reg=config.reg,
        reg_mode=config.reg_mode,
        emd_max_iter=config.emd_max_iter,
        sinkhorn_max_iter=config.sinkhorn_max_iter,
    )


def _solve_mean(costs: list[np.ndarray], config: FusionConfig) -> tuple[TransportMap, SolveInfo]:
    """The `mean` residual policy: one plan per source, averaged (still a coupling with the same marginals)."""
    solved = [_solve(cost, config) for cost in costs]
    plan = np.mean([transport.plan for transport, _ in solved], axis=0)
    first, info = solved[0]
    entropy = plan_entropy(plan)
    mean_cost = float(np.mean([i.transport_cost for _, i in solved]))
    info = SolveInfo(info.solver, info.reg, mean_cost, entropy, softness(entropy, *plan.shape))
    return TransportMap(plan, first.mu, first.nu), info


def _solve_heads(
    heads: Space,
    nested: list[Space],
    sources: _CostSources,
    maps: dict[str, TransportMap],
    parent_plan: FusionPlan,
    config: FusionConfig,
) -> list[tuple[str, TransportMap, SolveInfo]]:
    """Heads first, on the cost of each head pair's best within-head matchings; then dims within matched heads.

    The head-pair costs come from exact within-head matchings (cheap linear assignments). With a soft solver,
    only head pairs that carry a noticeable share of the head plan's mass (at least `SIGNIFICANT_HEAD_MASS` of
    its largest entry) get a soft within-head plan; the rest keep their exact one. Their mass is negligible,
    and skipping them makes the soft attention solve cost about H small problems instead of H^2.
    """
    heads_a, heads_b = parent_plan.spaces[heads.name].size, heads.size
    unit_costs = [sources.costs(space.name, maps, pooled=True)[0] for space in nested]
    pairs = [(a, b) for a in range(heads_a) for b in range(heads_b)]
    blocks = []
    for space, cost in zip(nested, unit_costs, strict=True):
        dim_a, dim_b = parent_plan.spaces[space.name].head_dim, space.head_dim
        blocks.append(np.stack([cost[a * dim_a : (a + 1) * dim_a, b * dim_b : (b + 1) * dim_b] for a, b in pairs]))
    within = [dict(zip(pairs, solve_transport_batch(stack, solver="exact"), strict=True)) for stack in blocks]
    head_cost = np.zeros((heads_a, heads_b))
    for solved in within:
        for (a, b), (_, info) in solved.items():
            head_cost[a, b] += info.transport_cost
    head_map, head_info = _solve(head_cost, config)
    if config.solver == "sinkhorn":
        significant = [
            i for i, (a, b) in enumerate(pairs) if head_map.plan[a, b] >= SIGNIFICANT_HEAD_MASS * head_map.plan.max()
        ]
        for solved, stack in zip(within, blocks, strict=True):
            soft = solve_transport_batch(
                stack[significant], solver="sinkhorn", reg=config.reg, reg_mode=config.reg_mode,
                sinkhorn_max_iter=config.sinkhorn_max_iter,
            )  # fmt: skip
            solved.update(zip([pairs[i] for i in significant], soft, strict=True))
    results = [(heads.name, head_map, head_info)]
    for solved, space, cost in zip(within, nested, unit_costs, strict=True):
        dim_a, dim_b = parent_plan.spaces[space.name].head_dim, space.head_dim
        plan = np.zeros_like(cost)
        for (a, b), (transport, _) in solved.items():
            weight = head_map.plan[a, b]
            if weight > 0:
                plan[a * dim_a : (a + 1) * dim_a, b * dim_b : (b + 1) * dim_b] = weight * transport.plan
        n_a, n_b = plan.shape
        entropy = plan_entropy(plan)
        info = SolveInfo(config.solver, head_info.reg, float((plan * cost).sum()), entropy, softness(entropy, n_a, n_b))
        results.append((space.name, TransportMap(plan, uniform(n_a), uniform(n_b)), info))
    return results
