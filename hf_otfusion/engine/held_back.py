"""Held-back alignment data: which batches judge a fusion, and how far its outputs are from the parents' ensemble.

Refinement trains on four of every five alignment batches and keeps the maps that do best on the fifth;
`quality="best"` fits its two candidates (refinement and the closed form) on the same four and keeps the one
that does best on the same fifth. One split and one measure serve both, so the numbers they report compare.
The measure is the KL divergence from the parents' ensemble (the weighted mean of their output distributions)
to the fused model's, per sample: it needs no labels, and the ensemble is what fusion tries to compress.
Written here because the split and the target are this package's definitions, not a library's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import FusionError
from .passes import batch_size_of

HELD_BACK_EVERY = 5  # every fifth batch of the alignment data judges; the other four fit

#: a model's logits on one batch (a model, or a model called with other tensors)
LogitsOf = Callable[[dict], torch.Tensor]


def split(loaded: list[dict]) -> tuple[list[dict], list[dict]]:
    """(fitting batches, held-back batches): every `HELD_BACK_EVERY`-th batch is held back.

    Raises:
        FusionError: too few batches to hold one back and fit on another (`check_enough_batches`).
    """
    check_enough_batches(len(loaded))
    held_back = loaded[HELD_BACK_EVERY - 1 :: HELD_BACK_EVERY]
    fitting = [batch for i, batch in enumerate(loaded) if i % HELD_BACK_EVERY != HELD_BACK_EVERY - 1]
    return fitting, held_back


def check_enough_batches(count: int) -> None:
    """Raises `FusionError` unless `count` batches are enough to hold one back: pre-flight calls it on the row
    count before any download, `split` on the batches themselves."""
    if count < HELD_BACK_EVERY:
        raise FusionError(
            f"refine_steps and quality='best' need at least {HELD_BACK_EVERY} batches of alignment data (every "
            f"{HELD_BACK_EVERY}th is held back to judge the fusion); got {count}. Pass more data or lower "
            "batch_size."
        )


def logits(output) -> torch.Tensor:
    """The logits of a model's output.

    Raises:
        FusionError: the model has no task head.
    """
    found = getattr(output, "logits", None)
    if found is None:
        raise FusionError(
            "refine_steps and quality='best' compare the fused model's output distribution with the parents' "
            "ensemble, so they need a model with a task head (logits); this one returns none. Fuse classification "
            "checkpoints, or drop those options."
        )
    return found


def ensemble(parents: Sequence[LogitsOf], weights: Sequence[float], batch: dict) -> torch.Tensor:
    """The weighted mean of the parents' output distributions on one batch."""
    with torch.no_grad():
        return sum(weight * logits_of(batch).softmax(-1) for weight, logits_of in zip(weights, parents, strict=True))


def divergence(fused: LogitsOf, held_back: list[dict], targets: list[torch.Tensor]) -> float:
    """The mean per-sample KL divergence from each batch's target distribution to `fused`'s on `held_back`."""
    with torch.no_grad():
        total = sum(
            torch.nn.functional.kl_div(fused(batch).log_softmax(-1), target, reduction="batchmean").item()
            * batch_size_of(batch)
            for batch, target in zip(held_back, targets, strict=True)
        )
    return float(total / sum(map(batch_size_of, held_back)))


def labelled(held_back: list[dict]) -> bool:
    """Whether every held-back batch carries class labels (`labels`, one integer per sample) to score on."""
    return all(
        "labels" in batch and batch["labels"].ndim == 1 and not batch["labels"].is_floating_point()
        for batch in held_back
    )


def label_loss(fused: LogitsOf, held_back: list[dict]) -> float:
    """The mean per-sample cross-entropy of `fused` on the held-back batches' labels (see `labelled`)."""
    total = 0.0
    with torch.no_grad():
        for batch in held_back:
            found = fused({key: value for key, value in batch.items() if key != "labels"}).float()
            labels = batch["labels"].to(found.device)
            total += torch.nn.functional.cross_entropy(found, labels, reduction="sum").item()
    return total / sum(map(batch_size_of, held_back))


def model_logits(model: torch.nn.Module, device: torch.device | None = None) -> LogitsOf:
    """`model`'s logits on a batch, the batch moved to `device` first when one is given."""

    def logits_of(batch: dict) -> torch.Tensor:
        if device is not None:
            batch = {key: value.to(device) for key, value in batch.items()}
        return logits(model(**batch))

    return logits_of


@dataclass
class QualityChoice:
    """What `quality="best"` weighed: each candidate's held-back loss (the anchor alone included, as the bar fusion
    has to clear), on what (`criterion`), and the candidate kept.

    `criterion` is `labels` (cross-entropy) when the held-back batches carry class labels, else `ensemble` (the KL
    divergence from the parents' ensemble). Labels decide when there are any because the two can disagree: the
    closed form's least-squares layers can beat the ensemble's accuracy and loss while being further from its
    outputs than refinement, which is trained towards them (`benchmarks/results/quality.md`, BERT).
    """

    criterion: str
    held_back_loss: dict[str, float]  # candidate -> loss: "refined", "closed-form", "anchor"
    kept: str
    held_back_samples: int

    @property
    def worse_than_anchor(self) -> bool:
        return self.held_back_loss[self.kept] > self.held_back_loss["anchor"]

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "held_back_loss": dict(self.held_back_loss),
            "kept": self.kept,
            "held_back_samples": self.held_back_samples,
        }
