"""Streaming Gram matrices of the inputs of every linear layer: the statistics RegMean merges with.

RegMean solves each linear layer's merge in closed form from `G = Σ x xᵀ` over the tokens that reach the layer
in each parent. The layer's bias is fitted jointly by appending a constant 1 to every input, so each layer
keeps the token count, the input sums and `Σ x xᵀ` (float64). Sums over data shards add up exactly
(`GramStatistics.__add__`), so the pass distributes like the activation statistics: run it on each shard and
reduce by summation.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from ..engine.distributed import all_reduce_sum_
from ..engine.passes import DataPass, TokenSelection, evaluating, forward_hooks
from ..errors import EmptyAlignmentDataError

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import PartialState

logger = logging.getLogger(__name__)


@dataclass
class LayerGram:
    """Token count, input sums and uncentred input Gram `Σ x xᵀ` of one linear layer (float64)."""

    count: int
    total: torch.Tensor  # (in_features,)
    gram: torch.Tensor  # (in_features, in_features)

    @classmethod
    def zeros(cls, in_features: int, device: torch.device | None = None) -> LayerGram:
        total = torch.zeros(in_features, dtype=torch.float64, device=device)
        return cls(0, total, torch.zeros(in_features, in_features, dtype=torch.float64, device=device))

    @classmethod
    def of_batch(cls, inputs: torch.Tensor) -> LayerGram:
        """The sums of one (tokens, in_features) batch, in float64.

        The product, the dominant cost, runs in float32 on the inputs centred on their batch mean, and the
        mean's part `n m mᵀ` is added back in float64: inputs with large means (GELU outputs, saturated
        tanh) would otherwise lose the small covariance that the least-squares solve depends on.
        """
        total = inputs.double().sum(0)
        mean = total / max(inputs.shape[0], 1)
        centred = inputs - mean.to(inputs.dtype)
        return cls(inputs.shape[0], total, (centred.T @ centred).double().addr_(mean, total))

    def merge_(self, other: LayerGram) -> None:
        """Adds `other`'s tokens in place."""
        self.count += other.count
        self.total += other.total
        self.gram += other.gram

    def __add__(self, other: LayerGram) -> LayerGram:
        return LayerGram(self.count + other.count, self.total + other.total, self.gram + other.gram)

    def augmented(self) -> torch.Tensor:
        """`Σ [x; 1][x; 1]ᵀ`, the Gram of the inputs with a constant 1 appended (the bias's input)."""
        n = self.gram.shape[0]
        result = torch.empty(n + 1, n + 1, dtype=torch.float64)
        result[:n, :n] = self.gram
        result[:n, n] = result[n, :n] = self.total
        result[n, n] = float(self.count)
        return result


@dataclass
class GramStatistics:
    """`layers[name]`: the `LayerGram` of each linear layer of one model, keyed by module name."""

    layers: dict[str, LayerGram] = field(default_factory=dict)

    def __add__(self, other: GramStatistics) -> GramStatistics:
        merged = {}
        for name in sorted(set(self.layers) | set(other.layers)):
            mine, theirs = self.layers.get(name), other.layers.get(name)
            merged[name] = mine + theirs if mine is not None and theirs is not None else copy.deepcopy(mine or theirs)
        return GramStatistics(merged)


def mergeable_linears(model: PreTrainedModel) -> dict[str, torch.nn.Linear]:
    """The linear layers whose weight is a parameter of its own (under `<module>.weight`).

    A linear whose weight is tied to another parameter (the MLM decoder shares the word embeddings) is left
    out: its weight is merged where it is owned, so the tie survives.
    """
    params = dict(model.named_parameters())
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and params.get(f"{name}.weight") is module.weight
    }


def collect_gram_statistics(
    model: PreTrainedModel,
    data: Iterable,
    *,
    layers: Iterable[str] | None = None,
    tokens: str = "all",
    tokens_per_sample: int | None = None,
    batch_size: int = 8,
    num_samples: int | None = None,
    progress: bool = True,
    description: str = "Gram statistics",
    process: PartialState | None = None,
) -> GramStatistics:
    """Runs `model` over the alignment data and accumulates the input Gram of each linear layer.

    Token positions are chosen as for the activation statistics (padding never counts; see
    `passes.token_selection`); inputs of shape (batch, features), such as a pooler's, count one row per
    sample. Layers fed the same tensor (query, key and value) share one product per batch.

    Args:
        data: a `datasets.Dataset` of model inputs, a DataLoader or an iterable of batch dicts.
        layers: module names to record; default: every layer of `mergeable_linears(model)`.
        process: the accelerate state of a multi-process launch: this process runs only its share of the
            batches and the sums are then added over processes (identical on all of them). A collective call.

    The batches run on the model's device; the sums accumulate there and come back to the host at the end.

    Raises:
        EmptyAlignmentDataError: no token reached the layers.
    """
    modules = dict(model.named_modules())
    names = sorted(mergeable_linears(model) if layers is None else layers)
    device = next(model.parameters()).device
    stats = GramStatistics({name: LayerGram.zeros(modules[name].in_features, device) for name in names})
    selection = TokenSelection(tokens, tokens_per_sample)
    last: dict = {"input": None, "gram": None}  # the latest layer input and its product

    def record(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            # query, key and value read one tensor in a row: one product for the three. Holding the tensor
            # keeps its memory from being reused, so identity is a safe test.
            if last["input"] is not x:
                last["input"], last["gram"] = x, LayerGram.of_batch(selection(x))
            stats.layers[name].merge_(last["gram"])

        return hook

    data_pass = DataPass(
        data, model, batch_size=batch_size, num_samples=num_samples, process=process, selection=selection,
        progress=progress, description=description,
    )  # fmt: skip
    try:
        with (
            forward_hooks([(modules[name], record(name)) for name in names], before=True),
            evaluating([model]),
            torch.inference_mode(),
        ):
            for batch in data_pass:
                model(**batch)
    finally:
        last.clear()  # the last batch's input is not held after the pass
    seen = data_pass.seen
    for layer in stats.layers.values():
        layer.total, layer.gram = layer.total.cpu(), layer.gram.cpu()
    if process is not None and process.num_processes > 1:  # raw sums: adding them over processes is exact
        counts = torch.tensor([seen, *(layer.count for layer in stats.layers.values())], dtype=torch.float64)
        all_reduce_sum_([counts, *(t for layer in stats.layers.values() for t in (layer.total, layer.gram))], process)
        seen = int(counts[0])
        for layer, count in zip(stats.layers.values(), counts[1:].tolist(), strict=True):
            layer.count = int(count)
    if seen == 0 or not any(layer.count for layer in stats.layers.values()):
        raise EmptyAlignmentDataError(
            "RegMean needs alignment data to measure each linear layer's inputs, but the data yielded no token. "
            "Pass a non-empty dataset with the model's input columns, or choose method='interpolate'."
        )
    logger.info("Gram statistics of %d linear layers from %d samples.", len(names), seen)
    return stats
