"""Transport maps for every space of a parent, solved in flow order against the anchor.

Each space gets its ground cost from activation statistics or, data-free, from unit weight vectors whose
other axes were already moved into the anchor's basis by the maps solved upstream. This module decides which
space is solved when, from which cost and with which marginals; `solve` turns each cost into its map
(head-aware for attention by default, rotations for a rotatable residual stream).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
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
from .solve import (
    UnitMoments,
    mean_squares,
    orthogonal_residual_from_weights,
    orthogonal_residual_map,
    solve_cost,
    solve_heads,
    solve_heads_orthogonal,
    solve_mean,
)
from .statistics import UnitStatistics, statistics_keys
from .transport import (
    SolveInfo,
    TransportMap,
    importance_marginal,
)

logger = logging.getLogger(__name__)


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
        features = list(self.weight_features(space, maps))
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
        features = list(self.weight_features(space, maps))
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

    def weight_features(self, space: str, maps: dict[str, TransportMap]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per parameter: the units' weight vectors in both models, other axes already in the anchor basis.

        Only parameters whose other bound axes are already solved take part, which is what makes the
        flow order matter: the residual space comes from embeddings and LayerNorms, layer spaces from
        weights reading the already-aligned residual stream. When the space is wider in the parent (n_a > n_b),
        the input side sums about n_a/n_b parent columns into each anchor column, so a parent's reading column
        is compared after scaling by n_a/n_b: the copies of a unit whose outgoing weights were split then cost 0.
        One parameter at a time, so that a caller that reduces them as they come holds one float64 copy at most.
        """
        for name, dim in feature_parameters(self.anchor_plan, space, maps):
            axes = self.anchor_plan.parameters[name]
            parent = align_tensor(self.parent_params[name], self.parent_plan.parameters[name], maps, skip_axis=dim)
            if axes[dim].reads and parent.shape[dim] != self.anchor_params[name].shape[dim]:
                parent = parent * (parent.shape[dim] / self.anchor_params[name].shape[dim])
            anchor = self.anchor_params[name].detach().to(torch.float64)
            yield (
                parent.movedim(dim, 0).reshape(parent.shape[dim], -1).numpy(),
                anchor.movedim(dim, 0).reshape(anchor.shape[dim], -1).numpy(),
            )


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
                moments = [
                    UnitMoments.of_statistics(sources.pooled_moments(inner.name))
                    if sources.kind(inner.name) == "activations"
                    else UnitMoments.of_weights(sources.weight_features(inner.name, upstream))
                    for inner in nested
                ]
                heads_solved = solve_heads_orthogonal(space, nested, moments, parent_plan, config)
            else:
                unit_costs = [sources.costs(inner.name, upstream, pooled=True)[0] for inner in nested]
                heads_solved = solve_heads(space, nested, unit_costs, parent_plan, config, head_marginals, device)
            for name, transport, info in heads_solved:
                solved.append((name, transport, info, sources.kind(nested[0].name), time.perf_counter() - started))
                started = time.perf_counter()  # the heads entry carries the time of the joint solve
        elif space.stream and config.residual == "orthogonal":
            if sources.kind(space.name) == "activations":
                transport, info = orthogonal_residual_map(sources.release(space.name))
            else:  # data-free: from the tensors that need no other map yet (embeddings, biases); see the rounds below
                transport, info = _stream_rotation_from_weights(sources, space.name, upstream)
            solved = [(space.name, transport, info, sources.kind(space.name), time.perf_counter() - started)]
        else:
            mean_policy = space.name in per_hook
            marginals = (None, None)
            if importance:
                marginals = tuple(importance_marginal(side) for side in sources.importance(space.name, upstream))
            costs = sources.costs(space.name, upstream, pooled=not mean_policy)
            if mean_policy:
                transport, info = solve_mean(costs, config, *marginals, device=device)
            else:
                transport, info = solve_cost(costs[0], config, *marginals, device=device)
            solved = [(space.name, transport, info, sources.kind(space.name), time.perf_counter() - started)]
        for name, transport, *_ in solved:
            transport.output_scale = logit_scale(parent_plan.spaces[name], anchor_plan.spaces[name])
            maps[name] = transport
        return solved

    workers = workers or os.cpu_count() or 1
    stream = anchor_plan.stream
    rounds = 1
    if config.residual == "orthogonal" and stream is not None and sources.kind(stream) == "weights":
        rounds = config.rotation_rounds
    bar = tqdm(total=len(tasks) * rounds, desc=f"transport maps, parent {parent_index}", disable=not progress)

    def solve_all(given: dict[str, TransportMap]) -> list:
        """Every task's solve in flow order, concurrently where the inputs allow; the maps in `given` are kept."""
        maps.clear()
        maps.update(given)
        futures: dict[int, Future] = {}
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for index, space in enumerate(tasks):
                if space.name in given:
                    continue
                upstream = sources.upstream_spaces(space)
                needed = sorted({producer[name] for name in upstream if producer.get(name, index) < index})
                waits = [futures[i] for i in needed if i in futures]  # the maps given are not waited for
                futures[index] = pool.submit(solve, index, waits)
                futures[index].add_done_callback(lambda _: bar.update())
            return [future.result() for future in futures.values()]

    results = solve_all({})
    for _ in range(rounds - 1):
        # the data-free rotation again, now from every tensor of the stream (the other maps move their other axes),
        # then every other space again in the new basis: the alternation of weight matching (Theus et al. alternate
        # about five times; `FusionConfig.rotation_rounds` says why 2 is the default)
        started = time.perf_counter()
        others = {name: transport for name, transport in maps.items() if name != stream}
        transport, info = _stream_rotation_from_weights(sources, stream, others)
        stream_solved = [(stream, transport, info, "weights", time.perf_counter() - started)]
        bar.update()
        results = [stream_solved, *solve_all({stream: transport})]
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


def _stream_rotation_from_weights(
    sources: _CostSources, stream: str, maps: dict[str, TransportMap]
) -> tuple[TransportMap, SolveInfo]:
    """The residual rotation from the weight features of the stream that `maps` (the spaces solved) allow."""
    if not feature_parameters(sources.anchor_plan, stream, maps):
        raise SpecError(
            f"residual='orthogonal' without data rotates the stream {stream} from the weights that hold it alone "
            "(embeddings, biases, norms), and this spec lists none: use cost='activations' with alignment data.",
            key=stream,
        )
    return orthogonal_residual_from_weights(sources.weight_features(stream, maps))


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
