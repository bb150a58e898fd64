"""Transport maps for every space of a parent, solved in flow order against the anchor.

Each space gets its ground cost from activation statistics or, data-free, from unit weight vectors whose
other axes were already moved into the anchor's basis by the maps solved upstream. Attention is solved
head-aware by default: whole heads are matched on the cost of their best within-head matching, then the
within-head maps of the matched pairs are assembled into one coupling over (head, dim) units, so that Q and K
(and V and O) share a map and the fused attention is an attention of aligned heads.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import ot
import torch
from tqdm.auto import tqdm

from ..config import FusionConfig
from ..errors import SpecError
from .align import align_tensor
from .plan import FusionPlan, Space
from .statistics import UnitStatistics, statistics_keys
from .transport import (
    SolveInfo,
    TransportMap,
    importance_marginal,
    plan_entropy,
    softness,
    solve_orthogonal,
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
    kind: str  # the map's kind: permutation, coupling or orthogonal (`TransportMap.kind`)
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

    def upstream_spaces(self, space: Space) -> set[str]:
        """The spaces whose maps this space's cost may read: the other axes of its (and its nested) parameters."""
        names = [nested.name for nested in self.anchor_plan.nested_in(space.name)] or [space.name]
        if all(self.kind(name) == "activations" for name in names):
            return set()
        return {
            axis.space
            for name in names
            for parameter in self.anchor_plan.parameters_of(name)
            for axis in self.anchor_plan.parameters[parameter]
            if axis is not None and axis.space not in names and axis.space != space.name
        }

    def importance(self, space: str, maps: dict[str, TransportMap]) -> tuple[np.ndarray, np.ndarray]:
        """Each unit's importance in the parent and in the anchor: mean squared activation, or squared weight norm.

        Call it before `costs`, which releases the space's statistics.
        """
        if self.kind(space) == "activations":
            keys = dict.fromkeys(self.keys[hook] for hook in self.anchor_plan.hooks[space])
            squares = [mean_squares(self.stats[key]) for key in keys]
            return sum(a for a, _ in squares), sum(b for _, b in squares)
        features = self._weight_features(space, maps)
        if not features:  # `costs` says why this space has no weight cost
            return np.ones(self.parent_plan.spaces[space].size), np.ones(self.anchor_plan.spaces[space].size)
        return sum((a**2).sum(1) for a, _ in features), sum((b**2).sum(1) for _, b in features)

    def costs(self, space: str, maps: dict[str, TransportMap], pooled: bool) -> list[np.ndarray]:
        """One cost per source (hook or parameter), or a single cost with all sources pooled.

        Activation statistics are released once read: each belongs to exactly one space.
        """
        if self.kind(space) == "activations":
            moments = [self.pooled_moments(space)] if pooled else self.release(space)
            return [s.cost(self.config.activation_cost) for s in moments]
        features = self._weight_features(space, maps)
        if not features:
            raise SpecError(
                f"Space {space} has no parameter whose other axes are aligned before it, so it has no weight-based "
                "cost; list it after the spaces it reads in the spec, or give it hooks and use cost='activations'.",
                key=space,
            )
        if pooled:
            features = [(np.concatenate([a for a, _ in features], 1), np.concatenate([b for _, b in features], 1))]
        return [ot.dist(a, b, metric="sqeuclidean") for a, b in features]

    def pooled_moments(self, space: str) -> UnitStatistics:
        """The activation statistics of all of a space's hooks together, released from `stats`."""
        moments = self.release(space)
        return sum(moments[1:], start=moments[0]) if len(moments) > 1 else moments[0]

    def release(self, space: str) -> list[UnitStatistics]:
        """The activation statistics of each of a space's statistics keys, removed from `stats`."""
        keys = dict.fromkeys(self.keys[hook] for hook in self.anchor_plan.hooks[space])
        return [self.stats.pop(key) for key in keys]

    def _weight_features(self, space: str, maps: dict[str, TransportMap]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per parameter: the units' weight vectors in both models, other axes already in the anchor basis.

        Only parameters whose other bound axes are already solved take part, which is what makes the
        flow order matter: the residual space comes from embeddings and LayerNorms, layer spaces from
        weights reading the already-aligned residual stream. When the space is wider in the parent (n_a > n_b),
        the input side sums about n_a/n_b parent columns into each anchor column, so a parent's reading column
        is compared after scaling by n_a/n_b: the copies of a unit whose outgoing weights were split then cost 0.
        """
        features = []
        for name, dim in feature_parameters(self.anchor_plan, space, maps):
            axes = self.anchor_plan.parameters[name]
            parent = align_tensor(self.parent_params[name], self.parent_plan.parameters[name], maps, skip_axis=dim)
            if axes[dim].reads and parent.shape[dim] != self.anchor_params[name].shape[dim]:
                parent = parent * (parent.shape[dim] / self.anchor_params[name].shape[dim])
            anchor = self.anchor_params[name].detach().to(torch.float64)
            features.append(
                (
                    parent.movedim(dim, 0).reshape(parent.shape[dim], -1).numpy(),
                    anchor.movedim(dim, 0).reshape(anchor.shape[dim], -1).numpy(),
                )
            )
        return features


def feature_parameters(plan: FusionPlan, space: str, maps: dict[str, TransportMap]) -> list[tuple[str, int]]:
    """(name, axis) of the parameters that give `space` weight features: one axis in the space, every other bound
    axis in a space whose map is already in `maps`."""
    found = []
    for name in plan.parameters_of(space):
        axes = plan.parameters[name]
        own = [dim for dim, axis in enumerate(axes) if axis is not None and axis.space == space]
        others = [axis.space for axis in axes if axis is not None and axis.space != space]
        if len(own) == 1 and all(other in maps for other in others):
            found.append((name, own[0]))
    return found


def per_hook_spaces(plan: FusionPlan, config: FusionConfig) -> set[str]:
    """Spaces whose hooks need statistics of their own: residual streams under the `mean` and `orthogonal` policies
    (the orthogonal map weighs every site of the stream equally, see `orthogonal_residual_map`)."""
    per_hook = config.residual in ("mean", "orthogonal")
    return {name for name, space in plan.spaces.items() if space.stream and per_hook}


def compute_maps(
    parent_index: int,
    parent_plan: FusionPlan,
    anchor_plan: FusionPlan,
    parent_params: dict[str, torch.Tensor],
    anchor_params: dict[str, torch.Tensor],
    stats: dict[str, UnitStatistics] | None,
    config: FusionConfig,
    progress: bool = False,
    workers: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, TransportMap], list[SpaceDiagnostics]]:
    """Solves the transport map of every space of one parent onto the anchor, in flow order.

    A space's cost needs only the maps of the spaces upstream of it (none for activation costs), so spaces
    whose inputs are ready are solved concurrently on `workers` threads (default: one per CPU core; the
    linear-assignment and POT solvers release the GIL). The result is the same as solving one by one.
    `stats` is consumed: each space's statistics are removed from it once its cost is built, so that the
    co-moment matrices do not outlive their use (a copy made here would not free them: the caller's reference
    to the dict keeps every entry alive until this returns). Pass a copy to keep them. Sinkhorn solves run on `device`
    (default CPU); exact solves always run on the CPU.

    Returns:
        The maps keyed by space name (nested head spaces included, heads spaces too in `aware` mode) and
        one `SpaceDiagnostics` per solve, in flow order.
    """
    per_hook = per_hook_spaces(anchor_plan, config)
    keys = statistics_keys(anchor_plan, per_hook)
    sources = _CostSources(parent_plan, anchor_plan, parent_params, anchor_params, stats, config, keys)
    tasks = _solve_order(anchor_plan, config)
    producer = {name: i for i, task in enumerate(tasks) for name in _produced(task, anchor_plan)}
    maps: dict[str, TransportMap] = {}

    def solve(index: int, waits_for: list[Future]) -> list[tuple[str, TransportMap, SolveInfo, str, float]]:
        for future in waits_for:
            future.result()
        space = tasks[index]
        # exactly the maps a one-by-one solve would have had, whatever else has finished by now
        upstream = {name: transport for name, transport in dict(maps).items() if producer[name] < index}
        started = time.perf_counter()
        nested = anchor_plan.nested_in(space.name)
        importance = config.marginals == "importance"
        if nested:
            solved = []
            head_marginals = None
            if importance:
                units = [sources.importance(inner.name, upstream) for inner in nested]
                sizes = (parent_plan.spaces[space.name].size, space.size)
                head_marginals = tuple(
                    importance_marginal(sum(unit[side].reshape(sizes[side], -1).sum(1) for unit in units))
                    for side in (0, 1)
                )
            if config.within_heads == "orthogonal":
                moments = [sources.pooled_moments(inner.name) for inner in nested]
                heads_solved = solve_heads_orthogonal(space, nested, moments, parent_plan, config)
            else:
                unit_costs = [sources.costs(inner.name, upstream, pooled=True)[0] for inner in nested]
                heads_solved = solve_heads(space, nested, unit_costs, parent_plan, config, head_marginals, device)
            for name, transport, info in heads_solved:
                solved.append((name, transport, info, sources.kind(nested[0].name), time.perf_counter() - started))
                started = time.perf_counter()  # the heads entry carries the time of the joint solve
        elif space.stream and config.residual == "orthogonal":
            if sources.kind(space.name) != "activations":  # no statistics, or no hooks on the stream
                raise SpecError(
                    "residual='orthogonal' solves the residual rotation from activation statistics of the residual "
                    f"stream, which space {space.name} has none of: use cost='activations' with alignment data.",
                    key=space.name,
                )
            transport, info = orthogonal_residual_map(sources.release(space.name))
            solved = [(space.name, transport, info, "activations", time.perf_counter() - started)]
        else:
            mean_policy = space.name in per_hook
            marginals = (None, None)
            if importance:
                marginals = tuple(importance_marginal(side) for side in sources.importance(space.name, upstream))
            costs = sources.costs(space.name, upstream, pooled=not mean_policy)
            if mean_policy:
                transport, info = _solve_mean(costs, config, *marginals, device=device)
            else:
                transport, info = _solve(costs[0], config, *marginals, device=device)
            solved = [(space.name, transport, info, sources.kind(space.name), time.perf_counter() - started)]
        for name, transport, *_ in solved:
            transport.output_scale = logit_scale(parent_plan.spaces[name], anchor_plan.spaces[name])
            maps[name] = transport
        return solved

    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(tasks), desc=f"transport maps, parent {parent_index}", disable=not progress)
    futures: list[Future] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, space in enumerate(tasks):
            needed = {producer[name] for name in sources.upstream_spaces(space) if producer.get(name, index) < index}
            futures.append(pool.submit(solve, index, [futures[i] for i in sorted(needed)]))
            futures[-1].add_done_callback(lambda _: bar.update())
        results = [future.result() for future in futures]
    bar.close()

    diagnostics = []
    for solved in results:
        for name, transport, info, source, seconds in solved:
            diagnostics.append(
                SpaceDiagnostics(
                    parent_index, name, transport.shape, transport.kind, source, info.solver, info.reg,
                    info.transport_cost, info.entropy, info.softness, seconds,
                )
            )  # fmt: skip
            logger.debug(
                "parent %d %-10s %4dx%-4d %s/%s cost=%.4g entropy=%.3f softness=%.3f (%.2fs)",
                parent_index, name, *transport.shape, source, info.solver, info.transport_cost,
                info.entropy, info.softness, seconds,
            )  # fmt: skip
    return maps, diagnostics


def logit_scale(parent_space: Space, anchor_space: Space) -> float:
    """(d_a/d_b)^(1/4) for a query/key space whose head size is d_a in the parent and d_b in the anchor, else 1.

    Applied to both Q and K, it keeps the attention logits Q·Kᵀ/√d_head on the parent's scale (see
    `TransportMap.output_scale`).
    """
    if not anchor_space.scaled_dot_product or parent_space.head_dim == anchor_space.head_dim:
        return 1.0
    return (parent_space.head_dim / anchor_space.head_dim) ** 0.25


def _solve_order(plan: FusionPlan, config: FusionConfig) -> list[Space]:
    """The spaces solved on their own, in flow order: a heads space carries its nested spaces in `aware` mode."""
    if config.heads == "aware":
        return [space for space in plan.spaces.values() if space.heads is None]
    return [space for space in plan.spaces.values() if not plan.nested_in(space.name)]


def _produced(space: Space, plan: FusionPlan) -> list[str]:
    """The maps one solve of `space` yields: itself, and in `aware` mode the spaces nested in it."""
    return [space.name] + [nested.name for nested in plan.nested_in(space.name)]


def mean_squares(moments: UnitStatistics) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's mean squared activation in the parent and in the anchor: the unit importance of a space."""
    count = float(max(moments.count, 1))
    return moments.m2_a / count + moments.mean_a**2, moments.m2_b / count + moments.mean_b**2


def orthogonal_residual_map(sites: list[UnitStatistics]) -> tuple[TransportMap, SolveInfo]:
    """One rotation of the residual stream (fixing the all-ones direction) from its statistics at every site.

    Each site's raw cross moment E[x_a x_bᵀ] is divided by its Frobenius norm before they are summed, so that
    the late sites, whose activations are larger, do not decide the rotation alone. The reported transport cost
    is E‖Oᵀx_a − x_b‖² per unit, averaged over the sites: the euclidean cost of the rotated parent's units.
    Only exact for a reparameterised parent (`hf_otfusion.engine.reparameterise`), whose stream lies in the complement
    of the ones vector; the statistics may come from the original parent since Qᵀ C Q is the same.
    """
    cross = [site.cross_moment() for site in sites]
    total = sum(c / max(np.linalg.norm(c), np.finfo(np.float64).tiny) for c in cross)
    transport = solve_orthogonal(total, fixed=np.ones(total.shape[0]))
    rotation = transport.output_matrix()
    costs = []
    for site, c in zip(sites, cross, strict=True):
        squares_a, squares_b = mean_squares(site)
        costs.append((squares_a.sum() + squares_b.sum() - 2.0 * float(np.vdot(rotation, c))) / len(squares_b))
    return transport, _procrustes_info(transport, float(np.mean(costs)))


def _procrustes_info(transport: TransportMap, cost: float) -> SolveInfo:
    """The `SolveInfo` of an orthogonal map, its entropy and softness those of its coupling O∘O / n."""
    entropy = plan_entropy(transport.plan)
    return SolveInfo("procrustes", None, cost, entropy, softness(entropy, *transport.shape))


def _solve(
    cost: np.ndarray,
    config: FusionConfig,
    mu: np.ndarray | None = None,
    nu: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> tuple[TransportMap, SolveInfo]:
    return solve_transport(
        cost,
        device=device,
        mu=mu,
        nu=nu,
        solver=config.solver,
        reg=config.reg,
        reg_mode=config.reg_mode,
        emd_max_iter=config.emd_max_iter,
        sinkhorn_max_iter=config.sinkhorn_max_iter,
    )


def _solve_mean(
    costs: list[np.ndarray],
    config: FusionConfig,
    mu: np.ndarray | None = None,
    nu: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> tuple[TransportMap, SolveInfo]:
    """The `mean` residual policy: one plan per source, averaged (still a coupling with the same marginals)."""
    solved = [_solve(cost, config, mu, nu, device) for cost in costs]
    plan = np.mean([transport.plan for transport, _ in solved], axis=0)
    first, info = solved[0]
    entropy = plan_entropy(plan)
    mean_cost = float(np.mean([i.transport_cost for _, i in solved]))
    info = SolveInfo(info.solver, info.reg, mean_cost, entropy, softness(entropy, *plan.shape))
    return TransportMap(plan, first.mu, first.nu), info


def head_pair_costs(
    unit_costs: list[np.ndarray], head_dims_a: list[int], head_dims_b: list[int]
) -> tuple[np.ndarray, list[tuple[int, int]], list[np.ndarray], list[dict]]:
    """The cost of every (parent head, anchor head) pair: the sum over nested spaces of its best within-head matching.

    Args:
        unit_costs: one (H_a·d_a, H_b·d_b) unit cost per nested space, head-major on both sides.
        head_dims_a, head_dims_b: the head size of each nested space in the parent and the anchor.

    Returns:
        The (H_a, H_b) head cost, the head pairs, per nested space the stacked within-head cost blocks (one per
        pair) and the exact within-head solves keyed by pair.
    """
    heads_a, heads_b = unit_costs[0].shape[0] // head_dims_a[0], unit_costs[0].shape[1] // head_dims_b[0]
    pairs = [(a, b) for a in range(heads_a) for b in range(heads_b)]
    blocks = []
    for cost, dim_a, dim_b in zip(unit_costs, head_dims_a, head_dims_b, strict=True):
        blocks.append(np.stack([cost[a * dim_a : (a + 1) * dim_a, b * dim_b : (b + 1) * dim_b] for a, b in pairs]))
    within = [dict(zip(pairs, solve_transport_batch(stack, solver="exact"), strict=True)) for stack in blocks]
    head_cost = np.zeros((heads_a, heads_b))
    for solved in within:
        for (a, b), (_, info) in solved.items():
            head_cost[a, b] += info.transport_cost
    return head_cost, pairs, blocks, within


def solve_heads(
    heads: Space,
    nested: list[Space],
    unit_costs: list[np.ndarray],
    parent_plan: FusionPlan,
    config: FusionConfig,
    head_marginals: tuple[np.ndarray, np.ndarray] | None = None,
    device: torch.device | str | None = None,
) -> list[tuple[str, TransportMap, SolveInfo]]:
    """Heads first, on the cost of each head pair's best within-head matchings; then dims within matched heads.

    `heads` and `nested` are the anchor's spaces, `unit_costs` one pooled unit cost per nested space, and
    `parent_plan` gives the parent's head count and head sizes (which may differ from the anchor's).
    `head_marginals` are the heads' masses (uniform when None); dims within a head share its mass equally.
    The head-pair costs come from exact within-head matchings (cheap linear assignments). With a soft solver,
    only head pairs that carry a noticeable share of the head plan's mass (at least `SIGNIFICANT_HEAD_MASS` of
    its largest entry) get a soft within-head plan; the rest keep their exact one. Their mass is negligible,
    and skipping them makes the soft attention solve cost about H small problems instead of H^2.
    """
    dims_a = [parent_plan.spaces[space.name].head_dim for space in nested]
    head_cost, pairs, blocks, within = head_pair_costs(unit_costs, dims_a, [space.head_dim for space in nested])
    head_map, head_info = _solve(head_cost, config, *(head_marginals or (None, None)), device=device)
    if config.solver == "sinkhorn":
        significant = [
            i for i, (a, b) in enumerate(pairs) if head_map.plan[a, b] >= SIGNIFICANT_HEAD_MASS * head_map.plan.max()
        ]
        for solved, stack in zip(within, blocks, strict=True):
            soft = solve_transport_batch(
                stack[significant], solver="sinkhorn", reg=config.reg, reg_mode=config.reg_mode,
                sinkhorn_max_iter=config.sinkhorn_max_iter, device=device,
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
        mu, nu = (plan.sum(1), plan.sum(0)) if head_marginals else (uniform(n_a), uniform(n_b))
        results.append((space.name, TransportMap(plan, mu, nu), info))
    return results


def solve_heads_orthogonal(
    heads: Space, nested: list[Space], moments: list[UnitStatistics], parent_plan: FusionPlan, config: FusionConfig
) -> list[tuple[str, TransportMap, SolveInfo]]:
    """Heads matched on the cost of their best within-head rotation, then each matched pair's dims rotated.

    Inside a head, Q and K can be rotated by one shared orthogonal R (Q·Kᵀ is unchanged) and V and O by another
    (O reads what V writes): a larger symmetry than permutations of dims. For every (parent head, anchor head)
    pair and nested space, the Procrustes rotation R = U Vᵀ of the within-head cross moment C = U S Vᵀ (Q and
    K pooled) leaves the residual E‖Rᵀx_a − x_b‖² = E‖x_a‖² + E‖x_b‖² − 2 tr S, the pair's cost; an exact
    assignment on the summed costs matches the heads, and each nested map is the block matrix of the matched
    pairs' rotations (orthogonal as a whole).
    """
    if parent_plan.spaces[heads.name].size != heads.size or any(
        parent_plan.spaces[space.name].size != space.size for space in nested
    ):
        raise SpecError(
            f"within_heads='orthogonal' needs the same heads and head size in every parent ({heads.name}).",
            key=heads.name,
        )
    count = heads.size
    pair_costs = np.zeros((len(nested), count, count))
    rotations: list[dict[tuple[int, int], np.ndarray]] = []
    for index, (space, stats) in enumerate(zip(nested, moments, strict=True)):
        dim, cross = space.head_dim, stats.cross_moment()
        squares_a, squares_b = mean_squares(stats)
        found = {}
        for a in range(count):
            for b in range(count):
                u, singular, vt = np.linalg.svd(cross[a * dim : (a + 1) * dim, b * dim : (b + 1) * dim])
                found[(a, b)] = u @ vt
                pair_costs[index, a, b] = (
                    squares_a[a * dim : (a + 1) * dim].sum()
                    + squares_b[b * dim : (b + 1) * dim].sum()
                    - 2 * singular.sum()
                )
        rotations.append(found)
    head_map, head_info = _solve(pair_costs.sum(0), config)  # exact: FusionConfig allows no other solver here
    sources = head_map.permutation  # sources[b]: the parent head matched to anchor head b
    results = [(heads.name, head_map, head_info)]
    for index, space in enumerate(nested):
        dim = space.head_dim
        matrix = np.zeros((space.size, space.size))
        for b, a in enumerate(sources):
            matrix[a * dim : (a + 1) * dim, b * dim : (b + 1) * dim] = rotations[index][(a, int(b))]
        transport = TransportMap.from_orthogonal(matrix)
        cost = float(sum(pair_costs[index, a, b] for b, a in enumerate(sources)) / space.size)
        results.append((space.name, transport, _procrustes_info(transport, cost)))
    return results
