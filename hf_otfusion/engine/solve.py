"""How one space's cost becomes its transport map: a plain solve, the average over several sources, head-aware
matching of attention heads, and the orthogonal maps (rotations) of the residual stream and within heads.

`maps.compute_maps` decides which space is solved when and from which cost; this module solves it. Head-aware
matching pairs whole heads on the cost of their best within-head matching, then assembles the within-head maps
of the matched pairs into one coupling over (head, dim) units, so that Q and K (and V and O) share a map.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..config import FusionConfig
from ..errors import SpecError, TransportError
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


def orthogonal_residual_from_weights(
    features: Iterable[tuple[np.ndarray, np.ndarray]],
) -> tuple[TransportMap, SolveInfo]:
    """The data-free rotation of the residual stream: Procrustes on the weights that hold or read it.

    `features` pairs, per parameter, the parent's and the anchor's unit vectors along the stream (rows: the
    stream's units; columns: every other axis, already moved into the anchor's basis by the maps solved so far).
    Each parameter's cross product A Bᵀ is divided by its Frobenius norm before they are summed, as the sites are
    in `orthogonal_residual_map`, so that no single large tensor decides the rotation. The pairs are reduced as
    they come (n x n sums), so that a ViT-B's tensors are never all held in float64 at once.

    Where these tensors do not fix the rotation (a first round from the embeddings alone, on a model whose stream
    is wider than they span), Procrustes is free in the directions they leave out. The best one-to-one matching of
    the units on the same weighted features (their squared distance, zero for a unit and its own permuted copy)
    decides those: its permutation matrix, scaled to 1e-6 of the cross moment, is added before the SVD. It moves
    a rotation the tensors fix by about that much, and makes a permuted copy come back exactly.

    The reported cost is ‖OᵀA − B‖² per unit, averaged over the parameters. Exact for reparameterised parents
    only (see there).
    """
    normalised = raw = squares_a = squares_b = None
    squares, count = 0.0, 0
    for a, b in features:
        cross = a @ b.T
        norm = max(np.linalg.norm(cross), np.finfo(np.float64).tiny)
        normalised = cross / norm if normalised is None else normalised + cross / norm
        raw = cross if raw is None else raw + cross
        rows_a, rows_b = (a**2).sum(1) / norm, (b**2).sum(1) / norm
        squares_a = rows_a if squares_a is None else squares_a + rows_a
        squares_b = rows_b if squares_b is None else squares_b + rows_b
        squares += float((a**2).sum() + (b**2).sum())
        count += 1
    if normalised is None or raw is None or squares_a is None or squares_b is None:
        raise TransportError("The residual rotation from weights needs at least one parameter on the stream.")
    n = normalised.shape[0]
    rows, cols = linear_sum_assignment(squares_a[:, None] + squares_b[None, :] - 2.0 * normalised)
    matching = np.zeros_like(normalised)
    matching[rows, cols] = 1.0
    tie_break = 1e-6 * np.linalg.norm(normalised) / np.sqrt(n)
    transport = solve_orthogonal(normalised + tie_break * matching, fixed=np.ones(n))
    cost = (squares - 2.0 * float(np.vdot(transport.output_matrix(), raw))) / (count * n)
    return transport, procrustes_info(transport, cost)


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


@dataclass
class UnitMoments:
    """What a within-head rotation reads of one space: the cross moment of the parent's and the anchor's units
    (n_a x n_b) and each unit's mean square on either side, from activations or, data-free, from weights."""

    cross: np.ndarray
    squares_a: np.ndarray
    squares_b: np.ndarray

    @classmethod
    def of_statistics(cls, stats: UnitStatistics) -> UnitMoments:
        """E[x_a x_bᵀ] and E[x²] of the activations (all the space's hooks pooled)."""
        return cls(stats.cross_moment(), *mean_squares(stats))

    @classmethod
    def of_weights(cls, features: Iterable[tuple[np.ndarray, np.ndarray]]) -> UnitMoments:
        """Σ A Bᵀ and the squared norms of the units' weight vectors, summed over the space's parameters (Q and K
        together, as their activations are pooled; V's rows with O's columns, which read them)."""
        cross = squares_a = squares_b = None
        for a, b in features:
            cross = a @ b.T if cross is None else cross + a @ b.T
            squares_a = (a**2).sum(1) if squares_a is None else squares_a + (a**2).sum(1)
            squares_b = (b**2).sum(1) if squares_b is None else squares_b + (b**2).sum(1)
        if cross is None or squares_a is None or squares_b is None:
            raise TransportError("A within-head rotation from weights needs at least one parameter of the space.")
        return cls(cross, squares_a, squares_b)


def solve_heads_orthogonal(
    heads: Space, nested: list[Space], moments: list[UnitMoments], parent_plan: FusionPlan, config: FusionConfig
) -> list[tuple[str, TransportMap, SolveInfo]]:
    """Heads matched on the cost of their best within-head rotation, then each matched pair's dims rotated.

    Inside a head, Q and K can be rotated by one shared orthogonal R (Q·Kᵀ is unchanged) and V and O by another
    (O reads what V writes): a larger symmetry than permutations of dims. For every (parent head, anchor head)
    pair and nested space, the Procrustes rotation R = U Vᵀ of the within-head cross moment C = U S Vᵀ (Q and
    K pooled; `UnitMoments`, of activations or weights) leaves the residual E‖Rᵀx_a − x_b‖² = E‖x_a‖² + E‖x_b‖²
    − 2 tr S, the pair's cost; an exact
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
        dim, cross = space.head_dim, stats.cross
        squares_a, squares_b = stats.squares_a, stats.squares_b
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
