"""Passes that start at a block of the layer stack: each batch's input to the current block is kept and replayed.

RegMean on the fused inputs changes the fused model one layer at a time, in flow order, and after each change
measures the next layer on the changed model. A plain pass up to layer ℓ reruns every block below it, so the
whole fit costs about `blocks² / 2` block runs of every model. Keeping, for every batch, the hidden state that
enters the block being worked on turns that into a few block runs per block: a pass up to a layer of block j runs
part of block j alone, and once block j is done the kept states move through it once (`advance`).

The replay relies on what Hugging Face encoders do: the layer stack is the model's longest `ModuleList`, each
block takes the previous block's output as its first argument, and its other arguments (the attention mask, ...)
are the same objects for every block. `BlockReplay.for_model` checks this, and that replaying the blocks gives
the model's own result, on one batch, and answers `None` when it does not hold; the caller then runs whole
passes. The kept states cost samples × positions × hidden size × the dtype's bytes per model (ViT-B on 1000
images: 0.6 GB), on the model's device, bounded by `MAX_BYTES`. Written here because neither transformers nor
accelerate runs a model from a block's cached input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from .passes import DataPass, StopForward, TokenSelection, forward_hooks

logger = logging.getLogger(__name__)

#: the most bytes one model's kept block inputs may take before the caller falls back to whole passes
MAX_BYTES = 4 * 2**30


class BlockReplay:
    """One model's kept inputs to one block of its layer stack, for every batch of a pass, in batch order.

    `add` keeps a batch's input to the first block; `run` runs batch i from the current block on (the caller's
    hooks raise `StopForward` once they have what they came for); `advance` moves every kept input through the
    blocks up to a later one. `masks` holds each batch's attention mask, for the token selection.
    """

    def __init__(self, model: PreTrainedModel, stack: str, blocks: torch.nn.ModuleList) -> None:
        self.model, self.stack, self.blocks = model, stack, blocks
        self.position = 0  # the block whose inputs are kept
        self.hidden: list[torch.Tensor] = []
        self.arguments: list[tuple[tuple, dict[str, Any]]] = []  # the blocks' other arguments, per batch
        self.masks: list[torch.Tensor | None] = []
        self.nbytes = 0

    @classmethod
    def for_model(cls, model: PreTrainedModel, batch: dict) -> BlockReplay | None:
        """A replay for `model`, or `None` when its layer stack cannot be replayed (checked on `batch`)."""
        stack = layer_stack(model)
        if stack is None:
            return None
        blocks = model.get_submodule(stack)
        assert isinstance(blocks, torch.nn.ModuleList)
        calls: list[tuple[tuple, dict]] = []
        outputs: list[Any] = []
        hooks = [(block, lambda module, args, kwargs: calls.append((args, kwargs))) for block in blocks]
        with torch.inference_mode():
            with forward_hooks(hooks, before=True), forward_hooks([(b, _recorder(outputs)) for b in blocks]):
                model(**batch)
            if len(calls) != len(blocks) or not all(args and isinstance(args[0], torch.Tensor) for args, _ in calls):
                return None
            first_args, first_kwargs = calls[0]
            for (args, kwargs), previous in zip(calls[1:], outputs[:-1], strict=True):
                if args[0] is not previous or not _same(args[1:], first_args[1:]) or not _same(kwargs, first_kwargs):
                    return None
            hidden = first_args[0]
            for block in blocks:
                hidden = block(hidden, *first_args[1:], **first_kwargs)
            if not isinstance(hidden, torch.Tensor) or not torch.allclose(hidden, outputs[-1], rtol=1e-5, atol=1e-6):
                return None
        return cls(model, stack, blocks)

    def add(self, batch: dict, attention_mask: torch.Tensor | None) -> bool:
        """Keeps the batch's input to the first block (a pass that stops there); False once past `MAX_BYTES`."""
        captured = []

        def keep(module, args, kwargs):
            captured.append((args, kwargs))
            raise StopForward

        with forward_hooks([(self.blocks[0], keep)], before=True), torch.inference_mode():
            try:
                self.model(**batch)
            except StopForward:
                pass
        args, kwargs = captured[0]
        self.hidden.append(args[0])
        self.arguments.append((args[1:], kwargs))
        self.masks.append(attention_mask)
        self.nbytes += args[0].numel() * args[0].element_size()
        return self.nbytes <= MAX_BYTES

    def run(self, index: int) -> None:
        """Runs batch `index` from the current block to the end of the stack, or until a hook raises `StopForward`."""
        args, kwargs = self.arguments[index]
        hidden = self.hidden[index]
        with torch.inference_mode():
            try:
                for block in self.blocks[self.position :]:
                    hidden = block(hidden, *args, **kwargs)
            except StopForward:
                pass

    def advance(self, position: int, before_batch: Callable[[int], None] | None = None) -> None:
        """Moves every kept input through the blocks before `position`, which becomes the current block (no block
        runs when it already is, or lies before it); `before_batch(i)` is called before batch i runs."""
        with torch.inference_mode():
            for index, (args, kwargs) in enumerate(self.arguments):
                hidden = self.hidden[index]
                if before_batch is not None and self.position < position:
                    before_batch(index)
                for block in self.blocks[self.position : position]:
                    hidden = block(hidden, *args, **kwargs)
                self.hidden[index] = hidden
        self.position = max(self.position, position)

    def run_past_stack(self, index: int, batch: dict) -> None:
        """Runs the model on `batch` (batch `index`'s inputs) with its stack skipped, for a module after the stack
        (a pooler, a classifier): every block hands on the kept output of the last block, so only the modules
        before and after the stack compute. The kept inputs must have been advanced past the last block; a hook
        may stop the pass with `StopForward`."""
        assert self.position == len(self.blocks), "advance past the last block first"
        kept = self.hidden[index]
        own = [block.__dict__.get("forward") for block in self.blocks]  # a wrapper some library set, put back
        for block in self.blocks:
            block.forward = lambda *args, **kwargs: kept
        try:
            with torch.inference_mode():
                self.model(**batch)
        except StopForward:
            pass
        finally:
            for block, forward in zip(self.blocks, own, strict=True):
                del block.forward
                if forward is not None:
                    block.forward = forward


def keep_block_inputs(
    models: Sequence[PreTrainedModel], data_pass: DataPass, selection: TokenSelection
) -> list[BlockReplay] | None:
    """One `BlockReplay` per model, holding its input to the first block on every batch of `data_pass` (which
    sets each batch's attention mask on `selection`); `None` when a model's stack cannot be replayed or the kept
    inputs outgrow `MAX_BYTES`, and the caller runs whole passes. The models run in their current state: take
    the inputs once every change before the stack (an embedding's) is made."""
    replays: list[BlockReplay] = []
    for batch in data_pass:
        if not replays:
            one = {key: value[:1] for key, value in batch.items()}  # the check needs one sample
            found = [BlockReplay.for_model(model, one) for model in models]
            if any(r is None for r in found):
                logger.info("The layer stack cannot be replayed from kept inputs: whole passes instead.")
                return None
            replays = [r for r in found if r is not None]
        if not all([r.add(batch, selection.attention_mask) for r in replays]):
            logger.info("The kept block inputs would pass %.1f GB per model: whole passes instead (cap the "
                        "alignment data with num_samples to keep them).", MAX_BYTES / 1e9)  # fmt: skip
            return None
    return replays or None


def layer_stack(model: torch.nn.Module) -> str | None:
    """The name of the model's longest `ModuleList` (`vit.layers`, `bert.encoder.layer`); `None` without one."""
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return max(lists, key=lambda item: item[1])[0] if lists else None


def block_index(stack: str, module_name: str) -> int | None:
    """The index of the block of `stack` that holds `module_name`; `None` for a module outside the stack."""
    prefix = f"{stack}."
    if not module_name.startswith(prefix):
        return None
    index = module_name[len(prefix) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _recorder(outputs: list):
    def hook(module, inputs, output):
        outputs.append(output)

    return hook


def _same(a: Any, b: Any) -> bool:
    """Whether two argument tuples or dicts hold the very same objects (tensors by identity, the rest by value)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a is b or a == b
