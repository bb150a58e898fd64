"""How one space's cost becomes its transport map: a plain solve, the average over several sources, head-aware
matching of attention heads, and the orthogonal maps (rotations) of the residual stream and within heads.

`maps.compute_maps` decides which space is solved when and from which cost; this module solves it. Head-aware
matching pairs whole heads on the cost of their best within-head matching, then assembles the within-head maps
of the matched pairs into one coupling over (head, dim) units, so that Q and K (and V and O) share a map.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import FusionConfig
from ..errors import SpecError
from .plan import FusionPlan, Space
from .statistics import UnitStatistics
from .transport import (
    SolveInfo,
    TransportMap,
    plan_entropy,
    softness,
    solve_orthogonal,
    solve_transport,
    solve_transport_batch,
    uniform,
)

# Head pairs whose head-plan mass is below this fraction of the largest entry keep their exact within-head plan.
SIGNIFICANT_HEAD_MASS = 1e-3


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
    return transport, procrustes_info(transport, float(np.mean(costs)))


def orthogonal_residual_from_weights(features: list[tuple[np.ndarray, np.ndarray]]) -> tuple[TransportMap, SolveInfo]:
    """The data-free rotation of the residual stream: Procrustes on the weights that hold or read it.

    `features` pairs, per parameter, the parent's and the anchor's unit vectors along the stream (rows: the
    stream's units; columns: every other axis, already moved into the anchor's basis by the maps solved so far).
    Each parameter's cross product A Bᵀ is divided by its Frobenius norm before they are summed, as the sites are
    in `orthogonal_residual_map`, so that no single large tensor decides the rotation. The reported cost is
    ‖OᵀA − B‖² per unit, averaged over the parameters. Exact for reparameterised parents only (see there).
    """
    cross = [a @ b.T for a, b in features]
    total = sum(c / max(np.linalg.norm(c), np.finfo(np.float64).tiny) for c in cross)
    transport = solve_orthogonal(total, fixed=np.ones(total.shape[0]))
    rotation = transport.output_matrix()
    costs = [
        (float((a**2).sum() + (b**2).sum()) - 2.0 * float(np.vdot(rotation, c))) / a.shape[0]
        for (a, b), c in zip(features, cross, strict=True)
    ]
    return transport, procrustes_info(transport, float(np.mean(costs)))


def procrustes_info(transport: TransportMap, cost: float) -> SolveInfo:
    """The `SolveInfo` of an orthogonal map, its entropy and softness those of its coupling O∘O / n."""
    entropy = plan_entropy(transport.plan)
    return SolveInfo("procrustes", None, cost, entropy, softness(entropy, *transport.shape))


def solve_cost(
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


def solve_mean(
    costs: list[np.ndarray],
    config: FusionConfig,
    mu: np.ndarray | None = None,
    nu: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> tuple[TransportMap, SolveInfo]:
    """The `mean` residual policy: one plan per source, averaged (still a coupling with the same marginals)."""
    solved = [solve_cost(cost, config, mu, nu, device) for cost in costs]
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
    head_map, head_info = solve_cost(head_cost, config, *(head_marginals or (None, None)), device=device)
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
    head_map, head_info = solve_cost(pair_costs.sum(0), config)  # exact: FusionConfig allows no other solver here
    sources = head_map.permutation  # sources[b]: the parent head matched to anchor head b
    results = [(heads.name, head_map, head_info)]
    for index, space in enumerate(nested):
        dim = space.head_dim
        matrix = np.zeros((space.size, space.size))
        for b, a in enumerate(sources):
            matrix[a * dim : (a + 1) * dim, b * dim : (b + 1) * dim] = rotations[index][(a, int(b))]
        transport = TransportMap.from_orthogonal(matrix)
        cost = float(sum(pair_costs[index, a, b] for b, a in enumerate(sources)) / space.size)
        results.append((space.name, transport, procrustes_info(transport, cost)))
    return results
