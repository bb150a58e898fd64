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
from one pass. Each layer costs a pass of the fused model and of every aligned parent up to that layer, so the
whole fit costs about `layers / 2` passes of every model over the alignment data; the passes distribute like
the Gram pass (each process runs its share of the batches, the sums are added). Written here because no library
refits a merged transformer layer by layer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..engine.distributed import all_reduce_sum_, models_on
from ..engine.passes import DataPass, StopForward, TokenSelection, evaluating, forward_hooks
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
    """The sums one layer's fit needs: `Σ [x;1][x;1]ᵀ`, `Σ [x;1] ȳᵀ` and `Σ ||ȳ||²` (float64, weighted by c_k)."""

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

    Raises:
        EmptyAlignmentDataError: no token reached the layers.
    """
    groups = _layer_groups(fused, sources[0][0], statistics_options)
    modules = dict(fused.named_modules())
    models = [fused, *(model for _, parents in sources for model, _ in parents)]
    reports = []
    with models_on(models, device), evaluating(models):
        for group in tqdm(groups, desc="RegMean on the fused inputs", unit="layer group", disable=not progress):
            sums = _group_sums(fused, group, sources, statistics_options, process)
            for name in group:
                reports.append(_solve_into(modules[name], name, sums[name], ridge))
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


def _group_sums(
    fused: PreTrainedModel,
    group: list[str],
    sources: Sequence[tuple[Iterable, Sequence[tuple[PreTrainedModel, float]]]],
    statistics_options: dict,
    process: PartialState | None,
) -> dict[str, _Sums]:
    """The sums of each layer of `group` over every source's data: the fused model's inputs of the group (one
    tensor for all of it) against each aligned parent's outputs of every layer in it."""
    selection = TokenSelection(statistics_options.get("tokens", "all"), statistics_options.get("tokens_per_sample"))
    modules = dict(fused.named_modules())
    sums: dict[str, _Sums] = {}
    seen = 0
    for data, parents in sources:
        data_pass = DataPass(
            data, fused, batch_size=statistics_options.get("batch_size", 8),
            num_samples=statistics_options.get("num_samples"), process=process, selection=selection,
        )  # fmt: skip
        weight = sum(c for _, c in parents)
        for batch in data_pass:
            inputs = _augmented(_inputs_of(fused, group[0], batch, selection), modules[group[0]].bias is not None)
            targets = {name: 0.0 for name in group}
            for model, c in parents:
                for name, output in _outputs_of(model, group, batch, selection).items():
                    targets[name] = targets[name] + c * output.double()
            for name in group:
                y = targets[name]
                assert isinstance(y, torch.Tensor)
                if name not in sums:
                    n, m = inputs.shape[1], y.shape[1]
                    zeros = torch.zeros
                    sums[name] = _Sums(zeros(n, n, dtype=torch.float64), zeros(n, m, dtype=torch.float64),
                                       zeros((), dtype=torch.float64))  # fmt: skip
                sums[name].gram += weight * (inputs.T @ inputs).cpu()
                sums[name].cross += (inputs.T @ y).cpu()
                sums[name].energy += (y.square().sum() / max(weight, 1e-300)).cpu()
        seen += data_pass.seen
    if process is not None and process.num_processes > 1:  # raw sums: adding them over processes is exact
        count = torch.tensor([float(seen)], dtype=torch.float64)
        all_reduce_sum_([count, *(t for s in sums.values() for t in (s.gram, s.cross, s.energy))], process)
        seen = int(count.item())
    if seen == 0 or not sums:
        raise EmptyAlignmentDataError(
            "RegMean on the fused model's inputs needs alignment data that reaches every linear layer, but the data "
            "yielded no token. Pass a non-empty dataset with the model's input columns."
        )
    return sums


def _inputs_of(model: PreTrainedModel, name: str, batch: dict, selection: TokenSelection) -> torch.Tensor:
    """The (tokens, in_features) input of layer `name` on `batch`; the pass stops there."""
    captured = []

    def hook(module, args, kwargs):
        captured.append(selection(args[0] if args else kwargs["input"]))
        raise StopForward

    with forward_hooks([(dict(model.named_modules())[name], hook)], before=True), torch.inference_mode():
        try:
            model(**batch)
        except StopForward:
            pass
    return captured[0].double()


def _outputs_of(model: PreTrainedModel, names: list[str], batch: dict, selection: TokenSelection) -> dict:
    """Each layer's (tokens, out_features) output on `batch`; the pass stops after the last of `names` runs."""
    captured: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, inputs, output):
            captured[name] = selection(output)
            if len(captured) == len(names):
                raise StopForward

        return hook

    modules = dict(model.named_modules())
    with forward_hooks([(modules[n], record(n)) for n in names]), torch.inference_mode():
        try:
            model(**batch)
        except StopForward:
            pass
    return captured


def _augmented(inputs: torch.Tensor, bias: bool) -> torch.Tensor:
    """The inputs with a constant 1 appended when the layer has a bias (fitted jointly with the weight)."""
    return torch.cat([inputs, inputs.new_ones(len(inputs), 1)], 1) if bias else inputs


def _solve_into(module: torch.nn.Linear, name: str, sums: _Sums, ridge: float) -> LayerRefit:
    """Solves the ridge regression of one layer towards its current weights and writes the result into it."""
    has_bias = module.bias is not None
    start = module.weight.detach().double().T.cpu()
    if has_bias:
        assert module.bias is not None
        start = torch.cat([start, module.bias.detach().double().cpu()[None]], 0)
    n = module.in_features
    scale = sums.gram.diagonal()[:n].mean()
    energy = max(float(sums.energy), 1e-300)

    def error(solution: torch.Tensor) -> float:  # ||X̃ S − Ȳ||² from the sums, relative to ||Ȳ||²
        value = (solution * (sums.gram @ solution)).sum() - 2 * (solution * sums.cross).sum() + sums.energy
        return float(value.clamp_min(0)) / energy

    before = error(start)
    if not scale > 0:  # the data never excites this layer: it keeps the average
        return LayerRefit(name, before, before)
    penalty = torch.zeros(len(sums.gram), dtype=torch.float64)
    penalty[:n] = ridge * scale
    solution = torch.linalg.solve(sums.gram + torch.diag(penalty), sums.cross + penalty[:, None] * start)
    with torch.no_grad():
        module.weight.copy_(solution[:n].T.to(module.weight.dtype))
        if has_bias:
            assert module.bias is not None
            module.bias.copy_(solution[n].to(module.bias.dtype))
    return LayerRefit(name, before, error(solution))
