"""Streaming activation statistics: the sufficient statistics of the activation-based ground costs.

For each hooked module and each non-anchor parent we accumulate, in float64, the token count, per-unit sums
and sums of squares of both models, and the cross Gram sum a_parent a_anchor^T. Euclidean and correlation
costs follow exactly from these, memory is O(n_a * n_b) whatever the number of samples, and statistics from
several data shards simply add up (`UnitStatistics.__add__`), which is what makes the pass distributable.
"""

from __future__ import annotations

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
    """Sums over tokens of one hook's activations in a parent (a) and the anchor (b)."""

    count: int
    sum_a: np.ndarray
    sum_b: np.ndarray
    sumsq_a: np.ndarray
    sumsq_b: np.ndarray
    gram: np.ndarray

    @classmethod
    def zeros(cls, n_a: int, n_b: int) -> UnitStatistics:
        return cls(0, np.zeros(n_a), np.zeros(n_b), np.zeros(n_a), np.zeros(n_b), np.zeros((n_a, n_b)))

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Adds one batch of token activations, shapes (tokens, n_a) and (tokens, n_b)."""
        a, b = a.double(), b.double()
        self.count += a.shape[0]
        self.sum_a += a.sum(0).numpy()
        self.sum_b += b.sum(0).numpy()
        self.sumsq_a += (a * a).sum(0).numpy()
        self.sumsq_b += (b * b).sum(0).numpy()
        self.gram += (a.T @ b).numpy()

    def __add__(self, other: UnitStatistics) -> UnitStatistics:
        return UnitStatistics(
            self.count + other.count,
            self.sum_a + other.sum_a,
            self.sum_b + other.sum_b,
            self.sumsq_a + other.sumsq_a,
            self.sumsq_b + other.sumsq_b,
            self.gram + other.gram,
        )

    def cost(self, kind: str = "euclidean") -> np.ndarray:
        """Ground cost between units: mean squared difference, or 1 - Pearson correlation."""
        if self.count == 0:
            raise EmptyAlignmentDataError("No token reached this hook; check the alignment data and token filter.")
        n = float(self.count)
        if kind == "euclidean":
            cost = (self.sumsq_a[:, None] + self.sumsq_b[None, :] - 2.0 * self.gram) / n
            return np.maximum(cost, 0.0)
        if kind == "correlation":
            mean_a, mean_b = self.sum_a / n, self.sum_b / n
            cov = self.gram / n - np.outer(mean_a, mean_b)
            std_a = np.sqrt(np.maximum(self.sumsq_a / n - mean_a**2, 0.0))
            std_b = np.sqrt(np.maximum(self.sumsq_b / n - mean_b**2, 0.0))
            return 1.0 - cov / (np.outer(std_a, std_b) + 1e-12)
        raise ValueError(f"Unknown activation cost {kind!r}; use 'euclidean' or 'correlation'.")


# statistics[parent_index][hook_module_name]
ActivationStatistics = dict[int, dict[str, UnitStatistics]]


def collect_statistics(
    models: list[PreTrainedModel],
    plans: list[FusionPlan],
    data: Iterable,
    *,
    anchor: int,
    tokens: str = "all",
    batch_size: int = 16,
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
        tokens: `all` non-padding tokens (padding excluded through `attention_mask`) or only the `first`.

    Raises:
        EmptyAlignmentDataError: the data yielded no token.
    """
    hook_names = {name for names in plans[anchor].hooks.values() for name in names}
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
            target = anchor_outputs[name]
            if name not in stats[k]:
                stats[k][name] = UnitStatistics.zeros(acts.shape[1], target.shape[1])
            stats[k][name].update(acts, target)

        return hook

    handles = []
    try:
        for k, model in enumerate(models):
            modules = dict(model.named_modules())
            for name in sorted(hook_names):
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


def _batch_size(batch: dict) -> int:
    return len(next(iter(batch.values())))
