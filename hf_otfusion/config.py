"""`FusionConfig`: every choice that defines a fusion, serialisable so the checkpoint can record it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import FusionError

_CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("ot", "vanilla"),
    "cost": ("activations", "weights"),
    "solver": ("exact", "sinkhorn"),
    "reg_mode": ("relative", "absolute"),
    "residual": ("shared", "mean"),
    "heads": ("aware", "cross"),
    "activation_cost": ("euclidean", "correlation"),
    "tokens": ("all", "first"),
}


@dataclass
class FusionConfig:
    """How to align and average the parents.

    Args:
        method: `ot` aligns every parent onto the anchor before averaging; `vanilla` averages as they are.
        cost: `activations` compares units by their outputs on alignment data; `weights` is data-free and
            compares unit weight vectors after their inputs were aligned.
        solver: `exact` gives hard permutations (POT `emd`, or a linear assignment for equal widths);
            `sinkhorn` gives soft couplings regularised by `reg` (POT's Sinkhorn on the reduced cost; nearly
            hard plans need many iterations, capped by `sinkhorn_max_iter`, after which the anchor-side
            marginal is projected exactly).
        reg: Sinkhorn regularisation. With `reg_mode="relative"` it is a multiple of the cost's typical
            best-vs-second-best gap, so the same value gives similar softness on any cost scale.
        reg_mode: `relative` (default) or `absolute` (`reg` used as is, on the raw cost).
        residual: `shared` solves one residual map from all residual-stream sources pooled; `mean` solves one
            map per source and averages them (the paper's averaging of incoming maps).
        heads: `aware` matches whole heads first, then dimensions within matched heads (Q and K share a map,
            V and O share a map); `cross` aligns all H*d_head dimensions as one space, as the reference does.
        activation_cost: ground cost between unit activations: `euclidean` (mean squared difference) or
            `correlation` (1 - Pearson correlation).
        tokens: which token positions feed activation statistics: `all` non-padding tokens or only the
            `first` (CLS) token.
        anchor: index of the parent whose basis and config the fused model takes.
        weights: one averaging weight per parent (normalised to sum to 1); `None` means uniform.
        batch_size: batch size of the activation pass.
        num_samples: cap on the number of alignment samples used (`None` = all).
        sinkhorn_max_iter / emd_max_iter: solver iteration caps.
    """

    method: str = "ot"
    cost: str = "activations"
    solver: str = "exact"
    reg: float = 0.1
    reg_mode: str = "relative"
    residual: str = "shared"
    heads: str = "aware"
    activation_cost: str = "euclidean"
    tokens: str = "all"
    anchor: int = 0
    weights: list[float] | None = None
    batch_size: int = 8
    num_samples: int | None = None
    sinkhorn_max_iter: int = 1000
    emd_max_iter: int = 10_000_000

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise FusionError(f"FusionConfig.{name}={value!r} is not one of {list(allowed)}.")
        if not self.reg > 0:
            raise FusionError(f"FusionConfig.reg must be > 0, got {self.reg}.")
        if self.batch_size < 1:
            raise FusionError(f"FusionConfig.batch_size must be >= 1, got {self.batch_size}.")
        if self.num_samples is not None and self.num_samples < 1:
            raise FusionError(f"FusionConfig.num_samples must be >= 1 or None, got {self.num_samples}.")
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise FusionError(f"FusionConfig.weights must be non-negative with a positive sum: {self.weights}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON/YAML-safe), the form written next to the checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FusionConfig:
        """Builds a config from a dict, rejecting unknown keys so that typos do not pass silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FusionError(f"Unknown FusionConfig key(s) {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def normalised_weights(self, num_parents: int) -> list[float]:
        """The averaging weight of each parent, summing to 1."""
        if self.weights is None:
            return [1.0 / num_parents] * num_parents
        if len(self.weights) != num_parents:
            raise FusionError(
                f"FusionConfig.weights has {len(self.weights)} entries for {num_parents} parents; "
                "give one weight per parent or None for uniform weights."
            )
        total = sum(self.weights)
        return [w / total for w in self.weights]
