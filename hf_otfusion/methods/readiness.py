"""Merge readiness: how far apart the parents are before and after OT alignment, and which method fits.

Fine-tunes of one base have units that already correspond: OT matches (almost) every unit to itself, so OT
fusion would reduce to interpolation and a same-base method (interpolation, task arithmetic, RegMean) is the
right tool. Independently trained parents have permuted units: OT moves almost every unit, and alignment
brings their weights closer, so they need `ot`. `readiness_report` measures this per layer and overall:
relative L2 distance, cosine similarity and the fraction of weights whose signs disagree, before and after
alignment; the share of units OT leaves in place (what the recommendation rests on); and, with data, the
activation correlation of matched units.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import ModelOrPath, load_parent, skeleton
from ..config import FusionConfig
from ..engine.align import align_tensor, pieces
from ..engine.compatibility import check_finite
from ..engine.maps import compute_maps, per_hook_spaces
from ..engine.plan import FusionPlan
from ..engine.prepare import prepare
from ..engine.reparameterise import fusion_tensors
from ..engine.spec import AlignmentSpec
from ..engine.statistics import UnitStatistics, collect_statistics, statistics_keys
from ..engine.transport import TransportMap

# OT leaving at least this share of units in place means the parents' units already correspond (same base);
# the two regimes sit near 1 and near 1/width, far from it.
SAME_BASE_IDENTITY = 0.5
# Alignment that removes at least this share of the relative L2 distance found a real correspondence.
ALIGNMENT_GAIN = 0.1


@dataclass
class WeightDistance:
    """Distance between one parent and the anchor over a group of parameters, before and after alignment.

    Attributes:
        group: `embeddings`, `layer i`, `head` (everything after the encoder) or `overall`.
        relative_l2: ||θ_k − θ_anchor|| / ||θ_anchor||.
        cosine: cosine similarity of the flattened parameters.
        sign_disagreement: fraction of weights (both non-zero) whose signs differ.
    """

    parent: int
    group: str
    parameters: int
    relative_l2_before: float
    relative_l2_after: float
    cosine_before: float
    cosine_after: float
    sign_disagreement_before: float
    sign_disagreement_after: float


@dataclass
class UnitMatch:
    """How OT matched one space's units of a parent onto the anchor's.

    Attributes:
        identity_fraction: share of the anchor's units matched to the parent unit of the same index (the
            plan's mass on the diagonal; 1 for parents whose units already correspond). `None` for spaces of
            different widths.
        correlation_before / correlation_after: mean Pearson correlation, on the alignment data, between each
            anchor unit and the parent unit of the same index / the parent units OT matched to it. `None`
            without data or for spaces without activations (heads).
    """

    parent: int
    space: str
    units: tuple[int, int]
    identity_fraction: float | None
    correlation_before: float | None = None
    correlation_after: float | None = None


@dataclass
class ReadinessReport:
    """Per-layer and overall distances between the parents, and the recommended merge method."""

    anchor: int
    alignment: dict
    layers: list[WeightDistance]
    overall: list[WeightDistance]
    units: list[UnitMatch]
    recommendation: str
    methods: list[str]
    reason: str
    identity_fraction: dict[int, float | None] = field(default_factory=dict)
    correlation: dict[int, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain, JSON-safe dict (the form the model card and `--json` record)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ReadinessReport:
        """The report back from `to_dict()`, also after a JSON round trip (which turns int keys into strings)."""
        values = dict(values)
        values["layers"] = [WeightDistance(**row) for row in values["layers"]]
        values["overall"] = [WeightDistance(**row) for row in values["overall"]]
        values["units"] = [UnitMatch(**{**row, "units": tuple(row["units"])}) for row in values["units"]]
        for key in ("identity_fraction", "correlation"):
            values[key] = {int(parent): value for parent, value in values.get(key, {}).items()}
        return cls(**values)

    def to_markdown(self) -> str:
        """The report as Markdown: recommendation, overall table, per-layer table."""
        lines = [
            f"**Recommendation: `{self.recommendation}`** ({', '.join(f'`{m}`' for m in self.methods)}). {self.reason}",
            "",
            f"Alignment measured with OT ({self.alignment['cost']} cost, {self.alignment['solver']} solver) of every "
            f"parent onto parent {self.anchor}.",
            "",
            "| parent | units kept in place | rel. L2 before → after | cosine before → after "
            "| sign disagreement before → after | activation corr. before → after |",
            "|---|---|---|---|---|---|",
        ]
        for row in self.overall:
            identity = self.identity_fraction.get(row.parent)
            corr = self.correlation.get(row.parent, {})
            lines.append(
                f"| {row.parent} | {_percent(identity)} | {_pair(row.relative_l2_before, row.relative_l2_after)} "
                f"| {_pair(row.cosine_before, row.cosine_after)} "
                f"| {_pair(row.sign_disagreement_before, row.sign_disagreement_after)} "
                f"| {_pair(corr.get('before'), corr.get('after'))} |"
            )
        lines += [
            "",
            "| parent | group | parameters | rel. L2 before → after | cosine before → after "
            "| sign disagreement before → after |",
            "|---|---|---|---|---|---|",
        ]
        for row in self.layers:
            lines.append(
                f"| {row.parent} | {row.group} | {row.parameters:,} "
                f"| {_pair(row.relative_l2_before, row.relative_l2_after)} "
                f"| {_pair(row.cosine_before, row.cosine_after)} "
                f"| {_pair(row.sign_disagreement_before, row.sign_disagreement_after)} |"
            )
        return "\n".join(lines)


def _pair(before: float | None, after: float | None) -> str:
    return "–" if before is None or after is None else f"{before:.3f} → {after:.3f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


class _Accumulator:
    """Running sums behind relative L2, cosine and sign disagreement of one group."""

    def __init__(self) -> None:
        self.count = 0
        self.sums = np.zeros(5)  # |a - b|^2, |b|^2, a.b, |a|^2, sign disagreements
        self.signed = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        both = (a != 0) & (b != 0)
        self.count += a.numel()
        self.signed += int(both.sum())
        self.sums += [
            float(((a - b) ** 2).sum()),
            float((b**2).sum()),
            float((a * b).sum()),
            float((a**2).sum()),
            float((both & (a.sign() != b.sign())).sum()),
        ]

    def metrics(self) -> tuple[float, float, float]:
        diff, anchor, dot, parent, disagree = self.sums
        relative = float(np.sqrt(diff / anchor)) if anchor > 0 else float("nan")
        cosine = float(dot / np.sqrt(anchor * parent)) if anchor > 0 and parent > 0 else float("nan")
        return relative, cosine, float(disagree / self.signed) if self.signed else 0.0


def parameter_group(name: str, plan: FusionPlan) -> str:
    """`layer i` for the parameters the spec binds with `{i}`, `embeddings` before them, `head` after them."""
    return plan.parameter_group(name)


def weight_distances(
    parent_index: int,
    plan: FusionPlan,
    anchor_plan: FusionPlan,
    parent_params: dict[str, torch.Tensor],
    anchor_params: dict[str, torch.Tensor],
    maps: dict[str, TransportMap],
) -> tuple[list[WeightDistance], WeightDistance]:
    """Per-group and overall distances of one parent to the anchor, as it is and moved by `maps`.

    Before alignment, parameters whose shape differs from the anchor's (another width) count only after it.
    """
    groups: dict[str, tuple[_Accumulator, _Accumulator]] = {}
    total = (_Accumulator(), _Accumulator())
    for name, anchor_tensor in anchor_params.items():
        before, after = groups.setdefault(parameter_group(name, anchor_plan), (_Accumulator(), _Accumulator()))
        axes = plan.parameters[name]
        for piece in pieces(anchor_tensor.shape, axes):  # large tensors in slices: no whole float64 copies
            b = anchor_tensor[piece].detach().double()
            a = parent_params[name][piece].detach().double()
            aligned = align_tensor(parent_params[name][piece], axes, maps)
            for accumulators, tensor in (((before, total[0]), a), ((after, total[1]), aligned)):
                if tensor.shape == b.shape:
                    for accumulator in accumulators:
                        accumulator.add(tensor, b)

    def row(group: str, before: _Accumulator, after: _Accumulator) -> WeightDistance:
        (l2_b, cos_b, sign_b), (l2_a, cos_a, sign_a) = before.metrics(), after.metrics()
        return WeightDistance(parent_index, group, after.count, l2_b, l2_a, cos_b, cos_a, sign_b, sign_a)

    return [row(group, *pair) for group, pair in groups.items()], row("overall", *total)


def unit_matches(
    parent_index: int,
    anchor_plan: FusionPlan,
    maps: dict[str, TransportMap],
    stats: dict[str, UnitStatistics] | None,
    keys: dict[str, str],
) -> list[UnitMatch]:
    """How each space's units were matched, and how well matched units correlate on the data."""
    matches = []
    for space in [name for name in anchor_plan.spaces if name in maps]:  # flow order, however maps were solved
        transport = maps[space]
        plan = transport.plan
        n_a, n_b = plan.shape
        identity = float(np.trace(plan) / plan.sum()) if n_a == n_b else None
        before = after = None
        hooks = anchor_plan.hooks.get(space)
        if stats is not None and hooks:
            moments = [stats[key] for key in dict.fromkeys(keys[hook] for hook in hooks)]
            pooled = sum(moments[1:], start=moments[0]) if len(moments) > 1 else moments[0]
            correlation = 1.0 - pooled.cost("correlation")
            before = float(np.mean(np.diag(correlation))) if n_a == n_b else None
            after = float(np.mean((transport.output_matrix() * correlation).sum(0)))
        matches.append(UnitMatch(parent_index, space, (n_a, n_b), identity, before, after))
    return matches


def recommend(
    overall: list[WeightDistance], identity: dict[int, float | None], shapes_differ: bool
) -> tuple[str, list[str], str]:
    """The method to use and why, decided by the share of units OT leaves in place.

    OT between parents whose units already correspond returns (almost) the identity, and OT fusion then
    reduces to interpolation: a same-base method is the right tool. When OT moves most units, averaging without
    alignment would mix unrelated units. That share separates the two regimes far more clearly than any
    distance (about 1 against about 1/width), so the distances only explain the verdict.
    """
    same_base = ["interpolate", "task-arithmetic", "regmean"]
    if shapes_differ:
        return "ot", ["ot"], "The parents differ in width, so only OT fusion (or `--align ot`) can merge them."
    worst = min(overall, key=lambda row: identity.get(row.parent) or 0.0)  # the parent that most needs alignment
    kept = identity.get(worst.parent) or 0.0
    before, after = worst.relative_l2_before, worst.relative_l2_after
    numbers = (
        f"OT keeps {100 * kept:.1f} % of parent {worst.parent}'s units in place; alignment changes its relative L2 "
        f"distance to the anchor from {before:.3f} to {after:.3f} (cosine {worst.cosine_before:.3f} → "
        f"{worst.cosine_after:.3f}; signs disagree on {100 * worst.sign_disagreement_before:.1f} % → "
        f"{100 * worst.sign_disagreement_after:.1f} % of the weights)."
    )
    if kept >= SAME_BASE_IDENTITY:
        return (
            "same-base",
            same_base,
            (
                f"{numbers} The units already correspond, as in fine-tunes of one base model, so OT fusion would "
                "reduce to interpolation: merge without alignment (task arithmetic needs the shared base)."
            ),
        )
    if before > 0 and after <= (1 - ALIGNMENT_GAIN) * before:
        return (
            "ot",
            ["ot"],
            (
                f"{numbers} The parents' units are permuted relative to each other, so averaging them as they are "
                "would mix unrelated units: align them with OT first."
            ),
        )
    return (
        "ot",
        ["ot"],
        (
            f"{numbers} The units do not correspond, but alignment brings the parents little closer: expect any "
            "one-shot merge to lose accuracy; OT is the better bet, and fine-tuning after fusion may be needed."
        ),
    )


def readiness_report(
    models: Sequence[ModelOrPath],
    data: Iterable | None = None,
    config: FusionConfig | None = None,
    *,
    spec: AlignmentSpec | str | Path | None = None,
    maps: dict[int, dict[str, TransportMap]] | None = None,
    progress: bool = True,
) -> ReadinessReport:
    """Measures how far the parents are from the anchor before and after OT alignment, and recommends a method.

    Args:
        models: two or more parents (models or checkpoints), as for `fuse`; checkpoints are loaded one at a
            time, so the report holds the anchor and one other parent.
        data: optional alignment data; with it, the maps use activation costs and the report adds the
            activation correlation of matched units.
        config: alignment options (`cost`, `solver`, `anchor`, ...; `auto` choices are decided as `fuse`
            decides them); default: exact OT with permutations only, on activations when data is given and on
            weights otherwise.
        spec: an alignment spec, as for `fuse`.
        maps: transport maps already solved for these parents (`FusionResult.maps` of an OT fusion), reused
            instead of solving again; the report then describes the alignment that fusion used.

    Raises:
        FusionError: and its subclasses for parents that cannot be compared.
    """
    if config is None:  # permutations: a unit OT leaves in place then counts exactly (a rotation near the identity
        # leaves a fraction just under 1)
        cost = "activations" if data is not None else "weights"
        config = FusionConfig(cost=cost, solver="exact", residual="shared", within_heads="permutation")
    anchor = config.anchor
    prepared = prepare([skeleton(model) for model in models], config, spec)  # checkpoints load one at a time
    plans = prepared.plans
    # `auto` decided as `fuse` decides it, so that the maps (and maps reused from a fusion) match its own; with a
    # rotated residual, distances are between the reparameterised tensors, which the rotation is exact for
    config = prepared.resolved(config)
    rotates = config.residual == "orthogonal"
    anchor_model = load_parent(models[anchor])
    check_finite([anchor_model], [anchor])
    anchor_params = fusion_tensors(anchor_model, plans[anchor], rotates)

    keys = statistics_keys(plans[anchor], per_hook_spaces(plans[anchor], config))
    layers, overall, units = [], [], []
    shapes_differ = False
    for k in range(len(models)):
        if k == anchor:
            continue
        parent = load_parent(models[k])  # the anchor and this parent are all that is held
        check_finite([parent], [k])
        params = fusion_tensors(parent, plans[k], rotates)
        stats = None
        if data is not None:
            stats = collect_statistics(
                [anchor_model, parent],
                [plans[anchor], plans[k]],
                data,
                anchor=0,
                keys=keys,
                progress=progress,
                **config.statistics_options(),
            )[1]
        if maps is not None and k in maps:
            parent_maps = maps[k]
        else:
            given = dict(stats) if stats else None  # a copy: compute_maps consumes it, unit_matches needs it
            parent_maps, _ = compute_maps(k, plans[k], plans[anchor], params, anchor_params, given, config, progress)
        rows, total = weight_distances(k, plans[k], plans[anchor], params, anchor_params, parent_maps)
        layers += rows
        overall.append(total)
        units += unit_matches(k, plans[anchor], parent_maps, stats, keys)
        shapes_differ |= any(params[name].shape != tensor.shape for name, tensor in anchor_params.items())
        del parent, params, stats
    identity, correlation = {}, {}
    for row in overall:
        mine = [match for match in units if match.parent == row.parent and match.space in plans[anchor].spaces]
        sized = [(m.identity_fraction, m.units[1]) for m in mine if m.identity_fraction is not None]
        identity[row.parent] = (
            float(sum(f * n for f, n in sized) / sum(n for _, n in sized)) if sized and not shapes_differ else None
        )
        correlated = [m for m in mine if m.correlation_after is not None]
        correlation[row.parent] = {
            "before": _unit_mean([(m.correlation_before, m.units[1]) for m in correlated]),
            "after": _unit_mean([(m.correlation_after, m.units[1]) for m in correlated]),
        }
    recommendation, methods, reason = recommend(overall, identity, shapes_differ)
    reused = maps is not None and all(k in maps for k in range(len(models)) if k != anchor)
    alignment = {"cost": config.cost if data is not None or reused else "weights", "solver": config.solver}
    return ReadinessReport(
        anchor, alignment, layers, overall, units, recommendation, methods, reason, identity, correlation
    )


def _unit_mean(values: list[tuple[float | None, int]]) -> float | None:
    """Unit-weighted mean, `None` when any value is missing or there are none."""
    known = [(value, n) for value, n in values if value is not None]
    if not values or len(known) < len(values):
        return None
    return float(sum(value * n for value, n in known) / sum(n for _, n in known))
