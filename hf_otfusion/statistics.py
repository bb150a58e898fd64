"""Streaming activation statistics: the sufficient statistics of the activation-based ground costs.

For each hooked module (or space) and each non-anchor parent we accumulate, in float64, the token count, the
per-unit means and centred sums of squares of both models, and the centred cross Gram (co-moment) between
parent and anchor units. Euclidean and correlation costs follow exactly from these, memory is O(n_a * n_b)
whatever the number of samples, and statistics from several data shards combine exactly
(`UnitStatistics.__add__`), which is what makes the pass distributable.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .errors import EmptyAlignmentDataError
from .plan import FusionPlan

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
    comoment: np.ndarray  # sum over tokens of (a - mean_a)(b - mean_b)^T, shape (n_a, n_b)

    @classmethod
    def zeros(cls, n_a: int, n_b: int) -> UnitStatistics:
        return cls(0, np.zeros(n_a), np.zeros(n_b), np.zeros(n_a), np.zeros(n_b), np.zeros((n_a, n_b)))

    @classmethod
    def of_batch(cls, a: torch.Tensor, b: torch.Tensor) -> UnitStatistics:
        """Statistics of one batch of token activations, shapes (tokens, n_a) and (tokens, n_b).

        The centred cross product, the dominant cost of the pass, is one float32 matrix product (about twice
        as fast as float64); centring first keeps its rounding relative to the covariance itself.
        """
        mean_a, mean_b = a.double().mean(0), b.double().mean(0)
        centred_a, centred_b = a - mean_a.float(), b - mean_b.float()
        return cls(
            a.shape[0],
            mean_a.numpy(),
            mean_b.numpy(),
            (centred_a.double() ** 2).sum(0).numpy(),
            (centred_b.double() ** 2).sum(0).numpy(),
            (centred_a.T @ centred_b).double().numpy(),
        )

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Folds one batch of token activations into these statistics, in place."""
        if a.shape[0]:
            self.merge_(UnitStatistics.of_batch(a, b))

    def merge_(self, other: UnitStatistics) -> None:
        """Adds `other`'s tokens in place (Chan's parallel formula; no full-size temporaries but one outer product)."""
        if other.count == 0:
            return
        n = self.count + other.count
        delta_a, delta_b = other.mean_a - self.mean_a, other.mean_b - self.mean_b
        weight = self.count * other.count / n
        self.mean_a += delta_a * (other.count / n)
        self.mean_b += delta_b * (other.count / n)
        self.m2_a += other.m2_a + delta_a**2 * weight
        self.m2_b += other.m2_b + delta_b**2 * weight
        self.comoment += other.comoment
        self.comoment += np.outer(delta_a * weight, delta_b)
        self.count = n

    def __add__(self, other: UnitStatistics) -> UnitStatistics:
        merged = copy.deepcopy(self)
        merged.merge_(other)
        return merged

    def cost(self, kind: str = "euclidean") -> np.ndarray:
        """Ground cost between units: mean squared difference, or 1 - Pearson correlation."""
        if self.count == 0:
            raise EmptyAlignmentDataError("No token reached this hook; check the alignment data and token filter.")
        n = float(self.count)
        cov = self.comoment / n
        var_a, var_b = self.m2_a / n, self.m2_b / n
        if kind == "euclidean":  # E[(a - b)^2] = var_a + var_b - 2 cov + (mean_a - mean_b)^2
            gap = self.mean_a[:, None] - self.mean_b[None, :]
            return np.maximum(var_a[:, None] + var_b[None, :] - 2.0 * cov + gap**2, 0.0)
        if kind == "correlation":
            std = np.outer(np.sqrt(np.maximum(var_a, 0.0)), np.sqrt(np.maximum(var_b, 0.0)))
            return 1.0 - cov / (std + 1e-12)
        raise ValueError(f"Unknown activation cost {kind!r}; use 'euclidean' or 'correlation'.")


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
    batch_size: int = 8,
    num_samples: int | None = None,
    progress: bool = True,
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
        tokens: `all` non-padding tokens (padding excluded through `attention_mask`) or only the `first`.

    Raises:
        EmptyAlignmentDataError: the data yielded no token.
    """
    keys = keys or statistics_keys(plans[anchor], per_hook_spaces=set(plans[anchor].hooks))
    stats: ActivationStatistics = {k: {} for k in range(len(models)) if k != anchor}
    anchor_outputs: dict[str, torch.Tensor] = {}
    token_mask: dict[str, torch.Tensor | None] = {"mask": None}

    def record_anchor(name: str):
        def hook(module, inputs, output):
            anchor_outputs[name] = _select_tokens(output, token_mask["mask"], tokens)

        return hook

    def record_parent(k: int, name: str):
        def hook(module, inputs, output):
            acts = _select_tokens(output, token_mask["mask"], tokens)
            target, key = anchor_outputs[name], keys[name]
            if key not in stats[k]:
                stats[k][key] = UnitStatistics.zeros(acts.shape[1], target.shape[1])
            stats[k][key].update(acts, target)

        return hook

    handles = []
    try:
        for k, model in enumerate(models):
            modules = dict(model.named_modules())
            for name in sorted(keys):
                callback = record_anchor(name) if k == anchor else record_parent(k, name)
                handles.append(modules[name].register_forward_hook(callback))
            model.eval()
        order = [anchor] + [k for k in range(len(models)) if k != anchor]
        seen = 0
        with torch.inference_mode():
            for batch in tqdm(
                _batches(data, models[anchor], batch_size, num_samples),
                desc="activation statistics",
                unit="batch",
                total=_num_batches(data, batch_size, num_samples),
                disable=not progress,
            ):
                token_mask["mask"] = batch.get("attention_mask")
                for k in order:
                    models[k](**batch)
                anchor_outputs.clear()
                seen += _batch_size(batch)
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0 or not any(stat.count for per_parent in stats.values() for stat in per_parent.values()):
        raise EmptyAlignmentDataError(
            "Activation-based alignment needs data, but the alignment data yielded no usable token. Pass a "
            "non-empty dataset with the model's input columns, or use cost='weights' for data-free fusion."
        )
    logger.info("Activation statistics from %d samples.", seen)
    return stats


def _select_tokens(output, mask: torch.Tensor | None, tokens: str) -> torch.Tensor:
    """The hooked activations as (tokens, units): padding dropped, token filter applied."""
    if isinstance(output, tuple | list):
        output = output[0]
    output = output.detach().float()
    if output.ndim == 2:  # (batch, units), e.g. a pooler
        return output
    if tokens == "first":
        return output[:, 0]
    if mask is not None and mask.shape == output.shape[:2]:
        return output[mask.bool()]
    return output.reshape(-1, output.shape[-1])


def _batches(data, model: PreTrainedModel, batch_size: int, num_samples: int | None) -> Iterator[dict]:
    """Yields model-input batches, truncated to `num_samples` samples in total."""
    accepted = set(inspect.signature(model.forward).parameters)
    if hasattr(data, "column_names") and hasattr(data, "with_format"):  # a datasets.Dataset
        columns = [c for c in data.column_names if c in accepted]
        if num_samples is not None:
            data = data.select(range(min(num_samples, len(data))))
        data = torch.utils.data.DataLoader(data.with_format("torch", columns=columns), batch_size=batch_size)
    remaining = num_samples
    for batch in data:
        batch = {key: value for key, value in dict(batch).items() if key in accepted and key != "labels"}
        if remaining is not None:
            if remaining <= 0:
                return
            size = _batch_size(batch)
            if size > remaining:
                batch = {key: value[:remaining] for key, value in batch.items()}
            remaining -= min(size, remaining)
        yield batch


def _num_batches(data, batch_size: int, num_samples: int | None) -> int | None:
    """How many batches `_batches` will yield, when the data knows its length (for the progress bar)."""
    if not hasattr(data, "__len__"):
        return None
    if hasattr(data, "column_names"):  # a datasets.Dataset: counted in samples
        samples = len(data) if num_samples is None else min(len(data), num_samples)
        return -(-samples // batch_size)
    return len(data) if num_samples is None else None


def _batch_size(batch: dict) -> int:
    return len(next(iter(batch.values())))
