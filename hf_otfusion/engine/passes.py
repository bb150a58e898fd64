"""Forward passes over alignment data: batches from any data source, the token positions that count, and hooks.

The activation statistics, the Gram statistics of RegMean, the repair moments and the refinement all run
models over the same alignment data in the same way: batches of the model's input columns (capped at
`num_samples`, a process's share under torchrun), moved to the model's device, with the token positions of
each batch chosen once (padding never counts) and hooks that are always removed. This module is that loop;
each pass supplies only what its hooks record.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .distributed import owned_batches

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import PartialState


def token_selection(
    shape: tuple[int, int], attention_mask: torch.Tensor | None, tokens: str, tokens_per_sample: int | None
) -> torch.Tensor:
    """Boolean (batch, sequence) mask of the token positions whose activations enter the statistics.

    Padding (zeros of `attention_mask`) never counts. `tokens="first"` keeps position 0; otherwise every
    non-padding token, or, with `tokens_per_sample=k`, k of each sample's non-padding tokens evenly spaced
    from its first to its last. The choice depends on each sample alone, so it is the same in any batching.
    """
    batch, length = shape
    if attention_mask is not None and tuple(attention_mask.shape) == (batch, length):
        valid = attention_mask.bool()
    else:
        valid = torch.ones(batch, length, dtype=torch.bool)
    if tokens == "first":
        keep = torch.zeros(batch, length, dtype=torch.bool)
        keep[:, 0] = True
        return keep
    if tokens_per_sample is None:
        return valid
    rank = valid.long().cumsum(1) - 1  # each token's index among its sample's non-padding tokens
    last = (valid.sum(1, keepdim=True) - 1).clamp(min=0)
    steps = torch.arange(tokens_per_sample) / max(tokens_per_sample - 1, 1)
    targets = torch.round(steps[None, :] * last).long()  # (batch, k) ranks; covers every rank when count <= k
    chosen = torch.zeros(batch, length, dtype=torch.bool).scatter_(1, targets, True)
    return valid & chosen.gather(1, rank.clamp(min=0))


@dataclass
class TokenSelection:
    """The token positions of the current batch that count, applied to hooked activations.

    One mask is computed per sequence shape and batch (the hooks of one batch share it); `DataPass` sets the
    batch's attention mask before the models run.
    """

    tokens: str = "all"
    tokens_per_sample: int | None = None
    attention_mask: torch.Tensor | None = None
    _masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def new_batch(self, attention_mask: torch.Tensor | None) -> None:
        self.attention_mask, self._masks = attention_mask, {}

    def __call__(self, output: Any) -> torch.Tensor:
        """The hooked activations as (tokens, units); a (batch, units) output (a pooler's) counts one row per sample."""
        if isinstance(output, tuple | list):
            output = output[0]
        output = output.detach().float()
        if output.ndim == 2:
            return output
        shape = (int(output.shape[0]), int(output.shape[1]))
        if shape not in self._masks:
            self._masks[shape] = token_selection(shape, self.attention_mask, self.tokens, self.tokens_per_sample)
        return output[self._masks[shape]]


@contextmanager
def evaluating(models: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Runs the block with every model in eval mode (no dropout), then gives each its own mode back: the parents
    are often the caller's models, and a pass must leave them as it found them."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)


def batches(
    data,
    model: PreTrainedModel,
    batch_size: int,
    num_samples: int | None,
    shard: tuple[int, int] | None = None,
    labels: bool = False,
) -> Iterator[dict]:
    """Yields model-input batches, truncated to `num_samples` samples in total.

    With `shard=(process_index, num_processes)`, only this process's batches (`distributed.owned_batches`):
    a Dataset selects their rows before loading; other iterables are read in full and the rest skipped.
    Labels are dropped (no pass needs the model's loss), unless `labels` asks to keep them: then a `label`
    column is given as `labels`, the name the model takes, as transformers' data collators rename it.
    """
    accepted = set(inspect.signature(model.forward).parameters)
    if not labels:
        accepted.discard("labels")
    if hasattr(data, "column_names") and hasattr(data, "with_format"):  # a datasets.Dataset
        columns = [c for c in data.column_names if c in accepted or (labels and c == "label")]
        if num_samples is not None:
            data = data.select(range(min(num_samples, len(data))))
        if shard is not None:
            owned = owned_batches(-(-len(data) // batch_size), *shard)
            data = data.select([i for b in owned for i in range(b * batch_size, min((b + 1) * batch_size, len(data)))])
            shard = None
        data = torch.utils.data.DataLoader(data.with_format("torch", columns=columns), batch_size=batch_size)
    remaining = num_samples
    for index, batch in enumerate(data):
        batch = dict(batch)
        if labels and "label" in batch and "labels" not in batch:
            batch["labels"] = batch.pop("label")
        batch = {key: value for key, value in batch.items() if key in accepted}
        if remaining is not None:
            if remaining <= 0:
                return
            size = batch_size_of(batch)
            if size > remaining:
                batch = {key: value[:remaining] for key, value in batch.items()}
            remaining -= min(size, remaining)
        if shard is None or index % shard[1] == shard[0]:
            yield batch


def num_batches(data, batch_size: int, num_samples: int | None, shard: tuple[int, int] | None = None) -> int | None:
    """How many batches `batches` will yield, when the data knows its length (for the progress bar)."""
    if not hasattr(data, "__len__"):
        return None
    if hasattr(data, "column_names"):  # a datasets.Dataset: counted in samples
        samples = len(data) if num_samples is None else min(len(data), num_samples)
        total = -(-samples // batch_size)
    elif num_samples is None:
        total = len(data)
    else:
        return None
    return total if shard is None else len(owned_batches(total, *shard))


def batch_size_of(batch: dict) -> int:
    """The number of samples in a batch dict."""
    return len(next(iter(batch.values())))


class DataPass:
    """One pass over the alignment data for `model`: iterate it to get each batch, on the model's device.

    Before each batch is yielded, `selection` (if given) takes the batch's attention mask, which stays on the
    host so that selecting tokens never waits on a GPU. After the pass, `seen` is the number of samples this
    process ran. Run the models inside `torch.inference_mode()` and `forward_hooks`.
    """

    def __init__(
        self,
        data: Iterable,
        model: PreTrainedModel,
        *,
        batch_size: int = 8,
        num_samples: int | None = None,
        process: PartialState | None = None,
        selection: TokenSelection | None = None,
        progress: bool = False,
        description: str = "alignment data",
    ) -> None:
        self.data, self.model, self.batch_size, self.num_samples = data, model, batch_size, num_samples
        self.shard = (process.process_index, process.num_processes) if process is not None else None
        self.selection, self.progress, self.description = selection, progress, description
        self.seen = 0

    def __iter__(self) -> Iterator[dict]:
        device = next(self.model.parameters()).device
        for batch in tqdm(
            batches(self.data, self.model, self.batch_size, self.num_samples, self.shard),
            desc=self.description,
            unit="batch",
            total=num_batches(self.data, self.batch_size, self.num_samples, self.shard),
            disable=not self.progress,
        ):
            if self.selection is not None:
                self.selection.new_batch(batch.get("attention_mask"))
            if device.type != "cpu":
                batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            yield batch
            self.seen += batch_size_of(batch)


class StopForward(Exception):
    """Raised by a hook once a pass has what it came for (the site it measures ran): the rest of the forward pass
    is not needed, and the caller catches it around the model call."""


@contextmanager
def forward_hooks(hooks: Iterable[tuple[torch.nn.Module, Callable]], *, before: bool = False) -> Iterator[None]:
    """Registers each `(module, callback)` as a forward hook (a pre-hook with kwargs when `before`), and removes
    them all when the block ends, however it ends."""
    handles = []
    try:
        for module, callback in hooks:
            if before:
                handles.append(module.register_forward_pre_hook(callback, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(callback))
        yield
    finally:
        for handle in handles:
            handle.remove()
