"""RegMean on the fused model's own inputs: every linear layer refitted, in flow order, to its parents' outputs.

RegMean (`methods.gram`) fits each linear layer of the merge on the inputs that reach it *in each parent*. The fused
model never sees those inputs: every layer below it is already a compromise, and the error compounds with depth.
Here each layer instead reads what the fused model itself gives it, with the layers below it already refitted,
and is fitted to what its aligned parents output on the same tokens:

    min_{W, b} Σ_k c_k ||X Wᵀ + b − Y_k||² + λ ||W − W₀||²,   X: the fused model's inputs to the layer,
                                                              Y_k: aligned parent k's outputs of the layer,

whose solution is `[W b]ᵀ = (G + λD)⁻¹ (Xᵀ Ȳ + λD [W₀ b₀]ᵀ)` with `G = Σ [x; 1][x; 1]ᵀ`, `Ȳ = Σ_k c_k Y_k` and D the
identity on the weight rows (zero on the bias row). The ridge pulls towards the layer's averaged weights W₀: an
input direction the data never excites keeps the average, and a copy of one parent (whose inputs and outputs are
that parent's) is refitted to itself exactly. λ is `RIDGE` times the mean diagonal entry of G, a fixed choice
from a one-off sweep of a prototype on the committed pairs (one-shot test accuracy at 1e-4 / 1e-3 / 1e-2 / 1e-1:
DeiT 83.46 / 83.45 / 82.71 / 81.96 %, BERT 95.05 / 95.05 / 95.27 / 94.82 %).

It is the idea of RegMean++ (Nguyen et al., 2025: feed each layer the merged model's own activations) for parents
trained apart: with one shared dataset, RegMean++'s targets (the parents' weights applied to the merged model's
inputs) reduce to the plain average, so the targets here are the parents' own outputs, as layer-wise
reconstruction does in post-training quantisation. Layers fed the same tensor (query, key and value) are fitted
from one pass. Inside the layer stack the passes start from each batch's kept input to the layer's block
(`engine.replay`), and the parents' outputs of a block are taken once for all of its layers, so the fit costs
about four block runs of the fused model and two of each parent per block, instead of a pass from the
embeddings per layer (`layers / 2` whole passes of every model); a layer after the stack (the pooler, the
classifier) still costs a whole pass of each model. The passes distribute like the Gram pass (each process runs
its share of the batches, the sums are added). Written here because no library refits a merged transformer
layer by layer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..engine import replay as block_replay
from ..engine.distributed import all_reduce_sum_, models_on
from ..engine.passes import DataPass, StopForward, TokenSelection, evaluating, forward_hooks, token_selection
from ..engine.replay import BlockReplay, block_index, keep_block_inputs, layer_stack
from ..errors import EmptyAlignmentDataError
from .gram import mergeable_linears

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import PartialState

logger = logging.getLogger(__name__)

#: the ridge λ as a multiple of the mean diagonal entry of the layer's input Gram matrix
RIDGE = 1e-3


@dataclass
class LayerRefit:
    """One refitted layer: its relative output error ||X Wᵀ + b − Ȳ||² / ||Ȳ||² before (the averaged weights) and
    after the fit, on the alignment tokens."""

    layer: str
    error_before: float
    error_after: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Sums:
    """The sums one layer's fit needs: `Σ [x;1][x;1]ᵀ` (one tensor shared by the layers of a group), `Σ [x;1] ȳᵀ`
    and `Σ ||ȳ||²` (float64, weighted by c_k)."""

    gram: torch.Tensor
    cross: torch.Tensor
    energy: torch.Tensor


def refit_linears(
    fused: PreTrainedModel,
    sources: Sequence[tuple[Iterable, Sequence[tuple[PreTrainedModel, float]]]],
    statistics_options: dict,
    *,
    progress: bool = True,
    device: torch.device | None = None,
    process: PartialState | None = None,
    ridge: float = RIDGE,
    replay: bool = True,
) -> list[LayerRefit]:
    """Refits every linear layer of `fused` (`gram.mergeable_linears`) in place, in the order a forward pass runs them.

    Args:
        fused: the merged model, in the anchor's basis, holding the averaged weights the ridge pulls towards.
        sources: (data, [(aligned parent, c_k), ...]) pairs: the fused model and those parents are run on that data.
            One pair holding every parent for a fusion; one pair per parent, on its own task's data, for a
            multi-task merge. The weights c_k sum to 1 over all pairs.
        statistics_options: the token selection, batching and sample cap of the statistics pass
            (`FusionConfig.statistics_options`): padding never counts.
        process: the accelerate state of a multi-process launch (each process runs its share; a collective call).
        ridge: λ over the mean diagonal entry of each layer's Gram matrix (`RIDGE`); must be positive.
        replay: run the layers of the layer stack from each batch's kept input to their block
            (`engine.replay`) rather than from the embeddings; the same sums, in far fewer block runs.

    Raises:
        EmptyAlignmentDataError: no token reached the layers.
    """
    groups = _layer_groups(fused, sources[0][0], statistics_options)
    modules = dict(fused.named_modules())
    models = [fused, *(model for _, parents in sources for model, _ in parents)]
    reports = []
    with models_on(models, device, changed=[fused]), evaluating(models):
        runs = [_SourceRuns(fused, data, parents, statistics_options, process, replay) for data, parents in sources]
        stack = runs[0].stack
        block_layers: dict[int | None, list[str]] = {}  # the layers of each block of the stack (None: outside it)
        for name in (name for group in groups for name in group):
            block_layers.setdefault(block_index(stack, name) if stack is not None else None, []).append(name)
        for group in tqdm(groups, desc="RegMean on the fused inputs", unit="layer group", disable=not progress):
            block = block_index(stack, group[0]) if stack is not None else None
            for source in runs:
                source.start_at(group[0], block_layers.get(block, []) if block is not None else [])
            sums = _group_sums(fused, group, runs, process)
            reports += _solve_group({name: modules[name] for name in group}, sums, ridge)
    before = sum(r.error_before for r in reports) / max(len(reports), 1)
    after = sum(r.error_after for r in reports) / max(len(reports), 1)
    logger.info("Refitted %d linear layers on the fused model's inputs: mean relative output error %.4f -> %.4f.",
                len(reports), before, after)  # fmt: skip
    return reports


def _layer_groups(model: PreTrainedModel, data: Iterable, statistics_options: dict) -> list[list[str]]:
    """The mergeable linear layers in the order one forward pass of `model` on a batch of `data` runs them, consecutive
    layers fed the very same tensor (query, key, value) in one group. A layer the batch never reaches comes last."""
    names = set(mergeable_linears(model))
    modules = dict(model.named_modules())
    order: list[tuple[str, torch.Tensor]] = []

    def record(name: str):
        def hook(module, args, kwargs):
            order.append((name, args[0] if args else kwargs["input"]))

        return hook

    probe = DataPass(data, model, batch_size=statistics_options.get("batch_size", 8), num_samples=1)
    with forward_hooks([(modules[n], record(n)) for n in names], before=True), evaluating([model]):
        with torch.inference_mode():
            for batch in probe:
                model(**batch)
                break
    groups: list[list[str]] = []
    placed: set[str] = set()
    previous = None
    for name, tensor in order:
        if name in placed:
            continue  # a layer run twice keeps its first place
        if previous is not None and tensor is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        placed.add(name)
        previous = tensor
    order.clear()  # the batch's tensors are not held past the probe
    groups += [[name] for name in modules if name in names and name not in placed]
    return groups


class _SourceRuns:
    """One source's data and models (the fused model, its aligned parents) and how a group's pass runs them on
    each batch: whole forward passes, or, for a group inside the layer stack, from every batch's kept input to
    the group's block (`engine.replay.BlockReplay`), which gives the same activations.

    Inside the stack, the parents' weighted outputs Ȳ of every layer of the current block are taken once, when
    the passes reach the block, since the parents never change; the fused model's inputs are taken anew for
    every group, each on the layers refitted before it. Ȳ is kept only while it fits in `replay.MAX_BYTES`;
    beyond that, the parents run again for each group.
    """

    def __init__(
        self,
        fused: PreTrainedModel,
        data: Iterable,
        parents: Sequence[tuple[PreTrainedModel, float]],
        statistics_options: dict,
        process: PartialState | None,
        replay: bool,
    ) -> None:
        self.fused, self.parents = fused, list(parents)
        self.parent_modules = [dict(model.named_modules()) for model, _ in self.parents]
        self.data, self.options, self.process = data, statistics_options, process
        self.weight = sum(c for _, c in parents)
        self.selection = TokenSelection(
            statistics_options.get("tokens", "all"), statistics_options.get("tokens_per_sample")
        )
        self.stack = layer_stack(fused) if replay else None
        self.replays: list[BlockReplay] | None = None  # the fused model's, then each parent's
        self.block: int | None = None  # the block the kept inputs are at; None: whole passes
        self.targets: dict[str, list[torch.Tensor]] | None = None  # Ȳ of the block's layers, per batch
        self.seen = 0  # the samples the last `batches()` ran
        self.samples = 0  # the samples of the kept inputs
        self.rows = 0  # the token rows they select (what the parents' outputs of a block hold per unit)

    def _data_pass(self) -> DataPass:
        return DataPass(
            self.data, self.fused, batch_size=self.options.get("batch_size", 8),
            num_samples=self.options.get("num_samples"), process=self.process, selection=self.selection,
        )  # fmt: skip

    def start_at(self, layer: str, block_layers: list[str]) -> None:
        """Gets ready for a pass up to `layer`, of the layers `block_layers` of its block: inside the layer stack,
        the kept inputs moved to its block (kept first when this is the stack's first pass) and, on a new block,
        the parents' outputs taken; past the stack, the kept inputs moved past its last block."""
        block = block_index(self.stack, layer) if self.stack is not None else None
        if block is None and self.block is None:  # before the stack, or no replay: whole passes
            return
        if self.replays is None:
            self.replays = self._kept_inputs()
            if self.replays is None:
                self.stack = None
                return
        if block is None:  # past the stack (the pooler, the classifier)
            block = len(self.replays[0].blocks)
        for kept in self.replays:
            kept.advance(block)
        if block != self.block:
            self.block = block
            self.targets = self._block_targets(block, block_layers) if block < len(self.replays[0].blocks) else None

    def _kept_inputs(self) -> list[BlockReplay] | None:
        """Each model's input to the first block on every batch (`replay.keep_block_inputs`)."""
        data_pass = self._data_pass()
        replays = keep_block_inputs([self.fused, *(m for m, _ in self.parents)], data_pass, self.selection)
        self.samples = data_pass.seen
        if replays is not None:
            for hidden, mask in zip(replays[0].hidden, replays[0].masks, strict=True):
                shape = (int(hidden.shape[0]), int(hidden.shape[1]))
                selected = token_selection(shape, mask, self.selection.tokens, self.selection.tokens_per_sample)
                self.rows += int(selected.sum())
        return replays

    def _block_targets(self, block: int, names: list[str]) -> dict[str, list[torch.Tensor]] | None:
        """Ȳ of each layer of `names` (those of `block`) on every kept batch, taken while the parents' kept inputs
        move through the block; None (the parents left at the block) when Ȳ would pass `replay.MAX_BYTES`."""
        assert self.replays is not None
        fused = self.replays[0]
        width = sum(self.fused.get_submodule(name).out_features for name in names)
        if self.rows * width * 8 > block_replay.MAX_BYTES:
            return None
        targets: dict[str, list[torch.Tensor]] = {name: [] for name in names}

        def record(name: str, c: float):
            def hook(module, inputs, output):
                y = c * self.selection(output).double()
                batch = targets[name]
                if len(batch) == index[0]:
                    batch.append(y)
                else:
                    batch[index[0]] += y

            return hook

        index = [0]

        def before_batch(i: int) -> None:
            index[0] = i
            self.selection.new_batch(fused.masks[i])

        for (_, c), modules, kept in zip(self.parents, self.parent_modules, self.replays[1:], strict=True):
            with forward_hooks([(modules[name], record(name, c)) for name in names]):
                kept.advance(block + 1, before_batch)
        return targets

    def _parent_outputs(self, names: list[str], runs: list[Callable[[], object]]) -> dict[str, torch.Tensor]:
        """Ȳ = Σ_k c_k Y_k of each layer of `names` on one batch, `runs[k]` running parent k on it (float64)."""
        targets: dict[str, torch.Tensor] = {}
        for (_, c), modules, run in zip(self.parents, self.parent_modules, runs, strict=True):
            for name, output in _outputs_of({n: modules[n] for n in names}, run, self.selection).items():
                targets[name] = targets[name] + c * output.double() if name in targets else c * output.double()
        return targets

    def batches(self, group: list[str]) -> Iterator[tuple[Callable[[], object], dict[str, torch.Tensor]]]:
        """For each batch of this process: a call that runs the fused model on it (hooks installed by the caller)
        and Ȳ of each layer of `group`; the batch's attention mask is set on `selection` first. Afterwards `seen`
        is the number of samples run."""
        if self.block is None or self.replays is None:  # whole passes
            data_pass = self._data_pass()
            for batch in data_pass:
                runs = [functools.partial(model, **batch) for model, _ in self.parents]
                yield functools.partial(self.fused, **batch), self._parent_outputs(group, runs)
            self.seen = data_pass.seen
            return
        fused, parents = self.replays[0], self.replays[1:]
        if self.block == len(fused.blocks):  # past the stack: whole passes with the stack skipped
            for index, batch in enumerate(self._data_pass()):
                runs = [functools.partial(kept.run_past_stack, index, batch) for kept in parents]
                yield functools.partial(fused.run_past_stack, index, batch), self._parent_outputs(group, runs)
        else:
            for index, mask in enumerate(fused.masks):
                self.selection.new_batch(mask)
                if self.targets is not None:
                    targets = {name: self.targets[name][index] for name in group}
                else:
                    targets = self._parent_outputs(group, [functools.partial(kept.run, index) for kept in parents])
                yield functools.partial(fused.run, index), targets
        self.seen = self.samples


def _group_sums(
    fused: PreTrainedModel, group: list[str], sources: Sequence[_SourceRuns], process: PartialState | None
) -> dict[str, _Sums]:
    """The sums of each layer of `group` over every source's data: the fused model's inputs of the group (one
    tensor for all of it) against each aligned parent's outputs of every layer in it."""
    modules = dict(fused.named_modules())
    sums: dict[str, _Sums] = {}
    seen = 0
    for source in sources:
        weight = source.weight
        for run, targets in source.batches(group):
            inputs = _augmented(_input_of(modules[group[0]], run, source.selection), modules[group[0]].bias is not None)
            if not sums:  # the layers of a group read one input: they share one Gram matrix
                gram = torch.zeros(inputs.shape[1], inputs.shape[1], dtype=torch.float64)
                for name in group:
                    m = targets[name].shape[1]
                    sums[name] = _Sums(gram, torch.zeros(inputs.shape[1], m, dtype=torch.float64),
                                       torch.zeros((), dtype=torch.float64))  # fmt: skip
            sums[group[0]].gram += weight * (inputs.T @ inputs).cpu()
            for name in group:
                y = targets[name]
                sums[name].cross += (inputs.T @ y).cpu()
                sums[name].energy += (y.square().sum() / max(weight, 1e-300)).cpu()
        seen += source.seen
    if process is not None and process.num_processes > 1:  # raw sums: adding them over processes is exact
        count = torch.tensor([float(seen)], dtype=torch.float64)
        shared = [sums[group[0]].gram] if sums else []  # the one Gram matrix, summed once
        all_reduce_sum_([count, *shared, *(t for s in sums.values() for t in (s.cross, s.energy))], process)
        seen = int(count.item())
    if seen == 0 or not sums:
        raise EmptyAlignmentDataError(
            "RegMean on the fused model's inputs needs alignment data that reaches every linear layer, but the data "
            "yielded no token. Pass a non-empty dataset with the model's input columns."
        )
    return sums


def _input_of(layer: torch.nn.Module, run: Callable[[], object], selection: TokenSelection) -> torch.Tensor:
    """The (tokens, in_features) input of `layer` when `run` runs its model on a batch; the pass stops there."""
    captured = []

    def hook(module, args, kwargs):
        captured.append(selection(args[0] if args else kwargs["input"]))
        raise StopForward

    with forward_hooks([(layer, hook)], before=True), torch.inference_mode():
        try:
            run()
        except StopForward:
            pass
    return captured[0].double()


def _outputs_of(layers: dict[str, torch.nn.Module], run: Callable[[], object], selection: TokenSelection) -> dict:
    """Each of `layers`' (tokens, out_features) output when `run` runs their model on a batch; the pass stops after
    the last of them runs."""
    captured: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, inputs, output):
            captured[name] = selection(output)
            if len(captured) == len(layers):
                raise StopForward

        return hook

    with forward_hooks([(layer, record(name)) for name, layer in layers.items()]), torch.inference_mode():
        try:
            run()
        except StopForward:
            pass
    return captured


def _augmented(inputs: torch.Tensor, bias: bool) -> torch.Tensor:
    """The inputs with a constant 1 appended when the layer has a bias (fitted jointly with the weight)."""
    return torch.cat([inputs, inputs.new_ones(len(inputs), 1)], 1) if bias else inputs


def _solve_group(layers: dict[str, torch.nn.Linear], sums: dict[str, _Sums], ridge: float) -> list[LayerRefit]:
    """Solves the ridge regression of each layer of one group (one input, so one Gram matrix and one Cholesky
    factor) towards its current weights and writes the results into the layers."""
    first = next(iter(layers))
    gram = sums[first].gram
    n = layers[first].in_features
    scale = gram.diagonal()[:n].mean()
    penalty = torch.zeros(len(gram), dtype=torch.float64)
    penalty[:n] = ridge * scale
    system = gram + torch.diag(penalty)  # positive definite: the ridge on the weights, every token on the bias
    factor, info = torch.linalg.cholesky_ex(system)
    reports = []
    for name, module in layers.items():
        layer = sums[name]
        start = module.weight.detach().double().T.cpu()
        if module.bias is not None:
            start = torch.cat([start, module.bias.detach().double().cpu()[None]], 0)
        energy = max(float(layer.energy), 1e-300)
        # ||X̃ S − Ȳ||² relative to ||Ȳ||², from the sums: Σ S∘(G S) − 2 Σ S∘(X̃ᵀȲ) + ||Ȳ||²
        before = float(((start * (gram @ start)).sum() - 2 * (start * layer.cross).sum() + layer.energy).clamp_min(0))
        if not scale > 0:  # the data never excites this layer: it keeps the average
            reports.append(LayerRefit(name, before / energy, before / energy))
            continue
        rhs = layer.cross + penalty[:, None] * start
        solution = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(system, rhs)
        # G S = rhs − P S at the solution, which spares a second product with G
        after = (solution * (rhs - penalty[:, None] * solution)).sum() - 2 * (solution * layer.cross).sum()
        after = float((after + layer.energy).clamp_min(0))
        with torch.no_grad():
            module.weight.copy_(solution[:n].T.to(module.weight.dtype))
            if module.bias is not None:
                module.bias.copy_(solution[n].to(module.bias.dtype))
        reports.append(LayerRefit(name, before / energy, after / energy))
    return reports
