"""Streaming activation statistics: the sufficient statistics of the activation-based ground costs.

For each hooked module (or space) and each non-anchor parent we accumulate, in float64, the token count, the
per-unit means and centred sums of squares of both models, and the centred cross Gram (co-moment) between
parent and anchor units. Euclidean and correlation costs follow exactly from these, memory is O(n_a * n_b)
whatever the number of samples, and statistics from several data shards combine exactly
(`UnitStatistics.__add__`), which is what makes the pass distributable.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel

from ..errors import EmptyAlignmentDataError, InvalidConfigError
from .distributed import all_reduce_sum_, gather_objects
from .passes import DataPass, TokenSelection, evaluating, forward_hooks
from .plan import FusionPlan

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import PartialState

logger = logging.getLogger(__name__)


@dataclass
class UnitStatistics:
    """Token count, means and centred second moments of one hook's activations in a parent (a) and the anchor (b).

    Moments are kept centred (sums of products of deviations from the running means) and merged with Chan's
    formula, so that large activation means never cancel against the quantities the costs need; batches and
    data shards combine with `+` in any order.
    """

    count: int
    mean_a: np.ndarray
    mean_b: np.ndarray
    m2_a: np.ndarray  # sum over tokens of (a - mean_a)^2, per unit
    m2_b: np.ndarray
    comoment: np.ndarray  # sum over tokens of (a - mean_a)(b - mean_b)^T, shape (n_a, n_b); float32 tensor per batch

    @classmethod
    def zeros(cls, n_a: int, n_b: int, device: torch.device | None = None) -> UnitStatistics:
        """Empty statistics: numpy arrays, or float64 tensors on `device` when it is a GPU (see `to_host`)."""
        if device is None or torch.device(device).type == "cpu":
            return cls(0, np.zeros(n_a), np.zeros(n_b), np.zeros(n_a), np.zeros(n_b), np.zeros((n_a, n_b)))
        zeros = [torch.zeros(shape, dtype=torch.float64, device=device) for shape in (n_a, n_b, n_a, n_b, (n_a, n_b))]
        return cls(0, *zeros)

    @classmethod
    def of_batch(cls, a: torch.Tensor, b: torch.Tensor) -> UnitStatistics:
        """Statistics of one batch of token activations, shapes (tokens, n_a) and (tokens, n_b).

        The centred cross product, the dominant cost of the pass, is one float32 matrix product (about twice
        as fast as float64); centring first keeps its rounding relative to the covariance itself. The
        product stays a float32 tensor until `merge_` adds it into float64 sums, which saves a full-size copy.
        """
        mean_a, mean_b = a.double().mean(0), b.double().mean(0)
        centred_a, centred_b = a - mean_a.float(), b - mean_b.float()
        return cls(
            a.shape[0],
            _host(mean_a),
            _host(mean_b),
            _host((centred_a.double() ** 2).sum(0)),
            _host((centred_b.double() ** 2).sum(0)),
            centred_a.T @ centred_b,
        )

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Folds one batch of token activations into these statistics, in place."""
        if a.shape[0]:
            self.merge_(UnitStatistics.of_batch(a, b))

    def merge_(self, other: UnitStatistics) -> None:
        """Adds `other`'s tokens in place (Chan's parallel formula, the co-moment updated without temporaries)."""
        if other.count == 0:
            return
        n = self.count + other.count
        delta_a, delta_b = other.mean_a - self.mean_a, other.mean_b - self.mean_b
        weight = self.count * other.count / n
        self.mean_a += delta_a * (other.count / n)
        self.mean_b += delta_b * (other.count / n)
        self.m2_a += other.m2_a + delta_a**2 * weight
        self.m2_b += other.m2_b + delta_b**2 * weight
        comoment = torch.as_tensor(self.comoment)  # a view: the in-place ops below write self.comoment
        comoment.add_(torch.as_tensor(other.comoment))
        comoment.addr_(torch.as_tensor(delta_a * weight), torch.as_tensor(delta_b))
        self.count = n

    def __add__(self, other: UnitStatistics) -> UnitStatistics:
        merged = copy.deepcopy(self)
        merged.merge_(other)
        return merged

    def to_host(self) -> UnitStatistics:
        """These statistics as float64 numpy arrays (GPU accumulators are copied back once, at the end)."""
        fields = [self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.comoment]
        if all(isinstance(field, np.ndarray) for field in fields):
            return self
        return UnitStatistics(self.count, *(np.asarray(torch.as_tensor(f).double().cpu()) for f in fields))

    def cross_moment(self) -> np.ndarray:
        """E[a bᵀ], the raw (uncentred) cross moment of the parent's and the anchor's units, shape (n_a, n_b)."""
        if self.count == 0:
            raise EmptyAlignmentDataError("No token reached this hook; check the alignment data and token filter.")
        return self.comoment / float(self.count) + np.outer(self.mean_a, self.mean_b)

    def cost(self, kind: str = "euclidean") -> np.ndarray:
        """Ground cost between units: mean squared difference, or 1 - Pearson correlation."""
        if self.count == 0:
            raise EmptyAlignmentDataError("No token reached this hook; check the alignment data and token filter.")
        n = float(self.count)
        var_a, var_b = self.m2_a / n, self.m2_b / n
        # built in place, two arrays the size of the cost at most: large spaces are costed several at once
        if kind == "euclidean":  # E[(a - b)^2] = var_a + var_b - 2 cov + (mean_a - mean_b)^2
            cost = self.comoment * (-2.0 / n)
            cost += var_a[:, None]
            cost += var_b[None, :]
            gap = self.mean_a[:, None] - self.mean_b[None, :]
            gap **= 2
            cost += gap
            return np.maximum(cost, 0.0, out=cost)
        if kind == "correlation":
            std = np.outer(np.sqrt(np.maximum(var_a, 0.0)), np.sqrt(np.maximum(var_b, 0.0)))
            std += 1e-12
            cost = self.comoment / n
            cost /= std
            return np.subtract(1.0, cost, out=cost)
        raise InvalidConfigError(
            f"Unknown activation cost {kind!r}; use 'euclidean' or 'correlation'.", field="activation_cost", value=kind
        )


# statistics[parent_index][key]; a key is a space (its hooks pooled) or a single hook module
ActivationStatistics = dict[int, dict[str, UnitStatistics]]


def statistics_keys(plan: FusionPlan, per_hook_spaces: set[str] = frozenset()) -> dict[str, str]:
    """Where each hook's statistics accumulate: into its space's pooled sums, or on their own.

    Pooling the hooks of a space (Q and K outputs, the many writers of the residual stream) into one set of
    sums is exactly what the pooled cost needs and keeps one Gram matrix per space instead of one per hook;
    spaces in `per_hook_spaces` (the residual stream under the `mean` policy) keep one per hook.
    """
    return {hook: hook if space in per_hook_spaces else space for space, hooks in plan.hooks.items() for hook in hooks}


def collect_statistics(
    models: list[PreTrainedModel],
    plans: list[FusionPlan],
    data: Iterable,
    *,
    anchor: int,
    keys: dict[str, str] | None = None,
    tokens: str = "all",
    tokens_per_sample: int | None = None,
    batch_size: int = 8,
    num_samples: int | None = None,
    progress: bool = True,
    process: PartialState | None = None,
) -> ActivationStatistics:
    """Runs every parent over the alignment data and accumulates per-hook statistics against the anchor.

    Each batch runs the anchor first, keeping its hooked activations for that batch only; every other parent
    then runs on the same batch and folds its activations into the statistics at once, so nothing grows with
    the number of samples.

    Args:
        data: a `datasets.Dataset` (model-input columns, e.g. `input_ids`/`attention_mask` or
            `pixel_values`; other columns are ignored), a `torch.utils.data.DataLoader`, or any iterable of
            batch dicts.
        keys: hook module -> statistics key (see `statistics_keys`); default: one key per hook.
        tokens, tokens_per_sample: which token positions count (see `passes.token_selection`).
        process: the accelerate state of a multi-process launch: this process runs only its share of the
            batches (`distributed.owned_batches`) and the statistics returned are the sums over every
            process, identical on all of them. A collective call: every process must make it.

    The batches run on the anchor's device (move the models first to use a GPU); statistics accumulate
    there and come back to the host once, at the end.

    Raises:
        EmptyAlignmentDataError: the data yielded no token (on any process).
    """
    keys = keys or statistics_keys(plans[anchor], per_hook_spaces=set(plans[anchor].hooks))
    stats: ActivationStatistics = {k: {} for k in range(len(models)) if k != anchor}
    anchor_outputs: dict[str, torch.Tensor] = {}
    selection = TokenSelection(tokens, tokens_per_sample)

    def record_anchor(name: str):
        def hook(module, inputs, output):
            anchor_outputs[name] = selection(output)

        return hook

    def record_parent(k: int, name: str):
        def hook(module, inputs, output):
            acts = selection(output)
            target, key = anchor_outputs[name], keys[name]
            if key not in stats[k]:
                stats[k][key] = UnitStatistics.zeros(acts.shape[1], target.shape[1], acts.device)
            stats[k][key].update(acts, target)

        return hook

    hooks = []
    for k, model in enumerate(models):
        modules = dict(model.named_modules())
        for name in sorted(keys):
            hooks.append((modules[name], record_anchor(name) if k == anchor else record_parent(k, name)))
    order = [anchor] + [k for k in range(len(models)) if k != anchor]
    data_pass = DataPass(
        data, models[anchor], batch_size=batch_size, num_samples=num_samples, process=process, selection=selection,
        progress=progress, description="activation statistics",
    )  # fmt: skip
    with forward_hooks(hooks), evaluating(models), torch.inference_mode():
        for batch in data_pass:
            for k in order:
                models[k](**batch)
            anchor_outputs.clear()
    seen = data_pass.seen
    stats = {k: {key: stat.to_host() for key, stat in per_parent.items()} for k, per_parent in stats.items()}
    if process is not None and process.num_processes > 1:
        seen = reduce_statistics(stats, seen, process)
    if seen == 0 or not any(stat.count for per_parent in stats.values() for stat in per_parent.values()):
        raise EmptyAlignmentDataError(
            "Activation-based alignment needs data, but the alignment data yielded no usable token. Pass a "
            "non-empty dataset with the model's input columns, or use cost='weights' for data-free fusion."
        )
    logger.info("Activation statistics from %d samples.", seen)
    return stats


def reduce_statistics(stats: ActivationStatistics, seen: int, process: PartialState) -> int:
    """Sums the partial statistics of every process into those of all their tokens, in place, on every process.

    Each process centred its moments on its own means, so they cannot simply be added, and adding raw sums
    (sum a^2, sum a b^T) instead would cancel catastrophically when activation means are large. This is Chan's
    merge written as two float64 sums over processes: the counts and count-weighted means give the global
    means; each process then re-centres its moments on them (m2 + n (mean - global)^2, comoment + n d_a d_b^T,
    exact) and the re-centred moments are summed.

    Returns:
        The number of samples seen by all processes together.
    """
    # every process needs the same keys and shapes, including one whose share of the data was empty
    shapes = {(k, key): stat.comoment.shape for k, per_parent in stats.items() for key, stat in per_parent.items()}
    for gathered in gather_objects(shapes, process):
        for (k, key), (n_a, n_b) in gathered.items():
            stats[k].setdefault(key, UnitStatistics.zeros(n_a, n_b))
    entries = [stats[k][key] for k in sorted(stats) for key in sorted(stats[k])]
    first = np.concatenate(
        [[float(seen)]] + [np.concatenate([[s.count], s.count * s.mean_a, s.count * s.mean_b]) for s in entries]
    )
    all_reduce_sum_([first], process)
    seen, offset = int(first[0]), 1
    for s in entries:
        n_a, n_b = len(s.mean_a), len(s.mean_b)
        total = int(first[offset])
        mean_a = first[offset + 1 : offset + 1 + n_a] / max(total, 1)
        mean_b = first[offset + 1 + n_a : offset + 1 + n_a + n_b] / max(total, 1)
        offset += 1 + n_a + n_b
        if s.count:  # re-centre this process's moments on the global means
            delta_a, delta_b = s.mean_a - mean_a, s.mean_b - mean_b
            s.m2_a += s.count * delta_a**2
            s.m2_b += s.count * delta_b**2
            torch.from_numpy(s.comoment).addr_(torch.from_numpy(s.count * delta_a), torch.from_numpy(delta_b))
        s.count, s.mean_a, s.mean_b = total, mean_a, mean_b
    second = np.concatenate([np.concatenate([s.m2_a, s.m2_b]) for s in entries])  # one sum for all small moments
    all_reduce_sum_([second], process)
    offset = 0
    for s in entries:
        n_a, n_b = len(s.mean_a), len(s.mean_b)
        s.m2_a, s.m2_b = second[offset : offset + n_a], second[offset + n_a : offset + n_a + n_b]
        offset += n_a + n_b
    all_reduce_sum_([s.comoment for s in entries], process)  # the large ones one at a time, in place
    return seen


def _host(tensor: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A CPU tensor as numpy (a view, no copy); a GPU tensor stays on its device so the pass never waits on a copy."""
    return tensor.numpy() if tensor.device.type == "cpu" else tensor
