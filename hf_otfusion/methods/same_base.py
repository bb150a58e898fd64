"""Merging methods for parents whose units already correspond: fine-tunes of one base model.

Following "An Empirical Study of Multimodal Model Merging" (Sung et al., 2023), three methods are offered
beside OT fusion, each applied tensor by tensor in the anchor's basis (after OT alignment when
`FusionConfig.align="ot"`):
- `interpolate`: θ = Σ_k α_k θ_k, with per-parent weights α summing to 1;
- `task-arithmetic`: θ = θ_base + λ Σ_k w_k (θ_k − θ_base), with the shared ancestor `base`, the scaling
  λ = `scale` and w_k = `weights` (1 when not given); parameters the base lacks (a new classification
  head) are interpolated. `task_vector` reshapes the task vectors τ_k = θ_k − θ_base first, against the
  interference between parents that plain addition suffers when they move an entry in opposite directions or
  when many small, redundant updates pile up:
  - `ties` (TIES-Merging, Yadav et al. 2023): each w_k τ_k keeps its ⌈`density` · n⌉ largest magnitudes
    (trim), each entry's sign is elected as the sign of the trimmed sum, and the merged vector is the mean
    of the trimmed entries that agree with it (disjoint mean: zeros and dissenters do not dilute it), so
    θ = θ_base + λ · that mean;
  - `dare` (DARE, Yu et al. 2024): each entry of τ_k is dropped with probability 1 − `density` and the rest
    rescaled by 1/`density`, which keeps its expectation, before the plain sum; the masks are drawn per
    (parent, parameter) from `seed`, so a merge is reproducible whatever the iteration order;
- `regmean` (Jin et al., 2023): every linear layer gets W = (Σ_k G_k)⁻¹ Σ_k G_k W_k, the least-squares fit
  of the parents' outputs on their own inputs, with G_k the Gram matrix of the layer's inputs in parent k
  (bias fitted jointly through a constant input, off-diagonal entries scaled by `regmean_alpha`); other
  parameters are interpolated.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from ..config import FusionConfig
from ..engine.align import align_tensor
from ..engine.compatibility import check_same_widths
from ..engine.distributed import models_on
from ..engine.plan import FusionPlan, base_prefix, model_with_tensors
from ..engine.transport import TransportMap
from ..errors import FusionError, IncompatibleModelsError
from .gram import GramStatistics, LayerGram, collect_gram_statistics, mergeable_linears

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import PartialState

logger = logging.getLogger(__name__)

SAME_BASE_METHODS = ("interpolate", "task-arithmetic", "regmean")


@dataclass
class BaseModel:
    """The shared ancestor of task arithmetic, held in the anchor's class so that names and plans match.

    Attributes:
        model: a copy of the anchor carrying the base's values wherever the base has the parameter.
        present: names (in the anchor's naming) of the parameters the base provided.
    """

    model: PreTrainedModel
    present: set[str]


def base_in_anchor_class(base: PreTrainedModel, anchor: PreTrainedModel) -> BaseModel:
    """Carries `base`'s parameters into a copy of the anchor, matching names across head classes.

    A bare `BertModel` base and a `BertForSequenceClassification` parent share every encoder parameter once
    the base-model prefix (`bert.`) is set aside; the parent's new head has no base value.

    Raises:
        IncompatibleModelsError: a different model type, an encoder parameter of another shape, or no
            parameter in common.
    """
    if base.config.model_type != anchor.config.model_type:
        raise IncompatibleModelsError(
            f"The base model is a {base.config.model_type!r} model but the parents are {anchor.config.model_type!r}. "
            "Task arithmetic needs the parents' shared ancestor; pass the checkpoint they were fine-tuned from."
        )
    anchor_prefix, own_prefix = base_prefix(anchor), base_prefix(base)
    base_params = {_strip(name, own_prefix): param for name, param in base.named_parameters()}
    model, present, other_head = copy.deepcopy(anchor), set(), []
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = base_params.get(_strip(name, anchor_prefix))
            if value is None:
                continue
            if value.shape != param.shape:
                if anchor_prefix and not name.startswith(anchor_prefix):  # a head trained for other labels
                    other_head.append(name)
                    continue
                raise IncompatibleModelsError(
                    f"{name} has shape {tuple(value.shape)} in the base model but {tuple(param.shape)} in the "
                    "parents, so the parents were not fine-tuned from this base; pass their real ancestor."
                )
            param.copy_(value)
            present.add(name)
    if not present:
        raise IncompatibleModelsError(
            "The base model shares no parameter name with the parents; pass the checkpoint they were fine-tuned from."
        )
    missing = [name for name, _ in model.named_parameters() if name not in present]
    if missing:
        logger.info("Base model lacks %d parameter(s) (%s%s); they are interpolated.", len(missing),
                    ", ".join(missing[:3]), ", ..." if len(missing) > 3 else "")  # fmt: skip
    return BaseModel(model, present)


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def aligned_model(
    template: PreTrainedModel, params: dict[str, torch.Tensor], plan: FusionPlan, maps: dict[str, TransportMap]
) -> PreTrainedModel:
    """A copy of `template` (the anchor) holding a parent's parameters moved into the anchor's basis."""
    model = copy.deepcopy(template)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(align_tensor(params[name], plan.parameters[name], maps).to(param.dtype))
    return model


def parent_grams(
    parents: list[PreTrainedModel],
    params: list[dict[str, torch.Tensor]],
    plans: list[FusionPlan],
    maps: dict[int, dict[str, TransportMap]],
    data: Iterable,
    config: FusionConfig,
    progress: bool = True,
    *,
    device: torch.device | None = None,
    process: PartialState | None = None,
    parent_data: list[Iterable] | None = None,
    rewritten: bool = False,
) -> list[GramStatistics]:
    """The input Gram matrices of every mergeable linear layer of each parent, in the anchor's basis.

    A parent with transport maps is first rebuilt in the anchor's basis and its Gram matrices measured there,
    which is exact for soft maps too (a soft map does not act on inputs as a simple change of basis).

    Args:
        data: the inputs every parent is measured on.
        device: where the forward passes run (`None`: where the models are).
        process: the accelerate state of a multi-process launch (see `collect_gram_statistics`).
        parent_data: each parent's own inputs instead of `data`, one per parent (a multi-task merge measures
            each task's model on its task's data).
        rewritten: `params` are not the parents' own tensors but an exact rewrite of them (reparameterised for
            a rotating residual): a parent without maps is then measured on a copy holding them too, since its
            layers read other inputs there (a norm folded into its readers hands them its input unscaled).
    """
    anchor_model = parents[config.anchor]
    layers = sorted(mergeable_linears(anchor_model))
    grams = []
    for k, parent in enumerate(parents):
        if k in maps:
            model = aligned_model(anchor_model, params[k], plans[k], maps[k])
        else:
            model = model_with_tensors(parent, params[k]) if rewritten else parent
        with models_on([model], device):
            grams.append(
                collect_gram_statistics(
                    model,
                    data if parent_data is None else parent_data[k],
                    layers=layers,
                    progress=progress,
                    description=f"Gram statistics, parent {k}",
                    process=process,
                    **config.statistics_options(),
                )
            )
        del model
    return grams


def regmean_linear(
    weights: list[torch.Tensor],
    biases: list[torch.Tensor] | None,
    grams: list[LayerGram],
    alpha: float = 0.9,
    parent_weights: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RegMean's closed-form merge of one linear layer (y = W x + b) from its parents.

    Solves min_{W,b} Σ_k c_k ||X_k Wᵀ + b − (X_k W_kᵀ + b_k)||² on each parent's inputs X_k, i.e.
    [W b]ᵀ = (Σ_k c_k G_k)⁻¹ Σ_k c_k G_k [W_k b_k]ᵀ with G_k the Gram of [x; 1], its off-diagonal entries
    scaled by `alpha` (1 = plain least squares; below 1 shrinks towards per-input averaging and keeps the
    system well conditioned). Inputs that are zero in every parent carry no information: their weight
    columns are plain averages.

    Args:
        weights, biases: the parents' (out, in) weights and (out,) biases (`None` for a layer without bias).
        grams: each parent's `LayerGram` of the layer's inputs.
        parent_weights: c_k, the parents' averaging weights (uniform when None).

    Returns:
        The merged weight and bias (float64).
    """
    count = len(weights)
    parent_weights = parent_weights or [1.0 / count] * count
    stacked = [
        w.double() if biases is None else torch.cat([w, biases[k][:, None]], 1).double() for k, w in enumerate(weights)
    ]
    lhs = torch.zeros(stacked[0].shape[1], stacked[0].shape[1], dtype=torch.float64)
    rhs = torch.zeros(stacked[0].shape[1], stacked[0].shape[0], dtype=torch.float64)
    for c, layer, params in zip(parent_weights, grams, stacked, strict=True):
        gram = layer.augmented() if biases is not None else layer.gram.clone()
        diagonal = gram.diagonal().clone()
        gram.mul_(alpha).diagonal().copy_(diagonal)
        lhs += c * gram
        rhs += c * (gram @ params.T)
    silent = lhs.diagonal() <= 0  # no parent ever fed this input: its row and column are zero in every Gram
    if silent.any():
        lhs.diagonal()[silent] = 1.0
        rhs[silent] = sum(c * params.T[silent] for c, params in zip(parent_weights, stacked, strict=True))
    factor, info = torch.linalg.cholesky_ex(lhs)  # the shrunk Gram is positive definite: Cholesky is half of LU
    try:
        solution = (torch.cholesky_solve(rhs, factor) if info == 0 else torch.linalg.solve(lhs, rhs)).T
    except torch.linalg.LinAlgError as error:
        raise FusionError(
            "RegMean's Gram system is singular (fewer alignment tokens than layer inputs, or collinear inputs). "
            "Use more alignment data or regmean_alpha < 1 (the default 0.9 regularises it)."
        ) from error
    if biases is None:
        return solution, None
    return solution[:, :-1], solution[:, -1]


def ties_merge(vectors: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-Merging's merged task vector of one tensor: trim, elect signs, disjoint mean.

    Each vector keeps the entries whose magnitude is at least its k-th largest, k = ⌈density · n⌉ (so at least
    one entry of every tensor survives; an entry tied with the k-th is kept too, which keeps the trim
    deterministic). The elected sign of an entry is that of the trimmed vectors' sum, the mass-weighted vote of
    the paper; the result averages, entry by entry, the trimmed values of that sign (0 where none agrees).

    Args:
        vectors: the (weighted) task vectors of one parameter, one per parent, all of one shape.
        density: the kept fraction, in (0, 1].
    """
    stacked = torch.stack(vectors)
    flat = stacked.reshape(len(vectors), -1)
    n = flat.shape[1]
    keep = min(n, max(1, math.ceil(round(density * n, 6))))  # the rounding keeps 0.3 * 10 at 3, not 4
    if keep < n:
        magnitude = flat.abs()
        threshold = magnitude.kthvalue(n - keep + 1, dim=1, keepdim=True).values  # the keep-th largest
        flat = torch.where(magnitude >= threshold, flat, 0.0)
    trimmed = flat.reshape(stacked.shape)
    elected = torch.sign(trimmed.sum(0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agrees.sum(0)
    total = torch.where(agrees, trimmed, 0.0).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def dare_vector(vector: torch.Tensor, density: float, seed: int, parent: int, name: str) -> torch.Tensor:
    """DARE's drop-and-rescale of one parent's task vector for parameter `name`.

    Every entry is kept with probability `density` and the kept ones are divided by it, so the expectation is
    the vector itself. The mask comes from a generator seeded by a hash of (seed, parent, name), not from a
    shared stream, so that it is the same whichever order (or process) merges the parameters.
    """
    digest = hashlib.sha256(f"{seed}/{parent}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    kept = torch.rand(vector.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(kept.to(vector.device), vector / density, 0.0)


def merge_parameters(
    anchor_model: PreTrainedModel,
    params: list[dict[str, torch.Tensor]],
    plans: list[FusionPlan],
    maps: dict[int, dict[str, TransportMap]],
    config: FusionConfig,
    *,
    base: BaseModel | None = None,
    base_maps: dict[str, TransportMap] | None = None,
    grams: list[GramStatistics] | None = None,
) -> PreTrainedModel:
    """A copy of the anchor whose parameters are merged by `config.method`, tensor by tensor.

    Parent k's tensors are moved into the anchor's basis with `maps[k]` when it has maps (the base with
    `base_maps`), one tensor at a time, so the peak memory stays the parents plus one merged copy
    (`task_vector="ties"` adds every parent's float64 task vector of the one tensor being merged).

    Args:
        params: each parent's parameters by name.
        plans: each parent's resolved plan (how its axes map onto spaces).
        maps: transport maps onto the anchor, for the aligned parents only.
        base: the shared ancestor (`task-arithmetic`).
        grams: each parent's Gram statistics (`regmean`), from `parent_grams`; none for `regmean_inputs="fused"`,
            whose linear layers are averaged here and refitted by `fused_inputs.refit_linears`.
    """
    method, count = config.method, len(params)
    if method not in SAME_BASE_METHODS:
        raise FusionError(f"merge_parameters merges {SAME_BASE_METHODS}, not method={method!r}.")
    if method == "task-arithmetic" and base is None:
        raise FusionError("method='task-arithmetic' needs the parents' shared ancestor: set FusionConfig.base.")
    if method == "regmean" and grams is None and config.regmean_inputs == "parents":
        raise FusionError("method='regmean' needs the parents' Gram statistics (see parent_grams).")
    check_same_widths(plans, config.anchor, method, among=[k for k in range(count) if k not in maps])
    alphas = config.normalised_weights(count)
    task_weights = config.weights or [1.0] * count

    def aligned(k: int, name: str) -> torch.Tensor:
        tensor = params[k][name]
        return align_tensor(tensor, plans[k].parameters[name], maps[k]) if k in maps else tensor.double()

    base_plan = plans[config.anchor]  # the base lives in a copy of the anchor
    # RegMean on the fused inputs starts from the average and refits it afterwards (`methods.fused_inputs`)
    linears = mergeable_linears(anchor_model) if method == "regmean" and grams is not None else {}
    fitted: dict[str, torch.Tensor] = {}
    fused = copy.deepcopy(anchor_model)
    own = dict(fused.named_parameters())
    with torch.no_grad():
        for name, param in fused.named_parameters():
            module, _, kind = name.rpartition(".")
            if name in fitted:
                merged = fitted.pop(name)
            elif module in linears and kind == "weight":
                bias = f"{module}.bias" if f"{module}.bias" in own else None
                weight, fitted_bias = regmean_linear(
                    [aligned(k, name) for k in range(count)],
                    [aligned(k, bias) for k in range(count)] if bias else None,
                    [grams[k].layers[module] for k in range(count)],
                    alpha=config.regmean_alpha,
                    parent_weights=alphas,
                )
                merged = weight
                if bias:
                    fitted[bias] = fitted_bias
            elif method == "task-arithmetic" and name in base.present:
                start = base.model.get_parameter(name).detach()
                start = align_tensor(start, base_plan.parameters[name], base_maps) if base_maps else start.double()
                vectors = (w * (aligned(k, name) - start) for k, w in enumerate(task_weights))  # one at a time
                if config.task_vector == "ties":  # needs every parent's vector of this tensor at once
                    merged = start + config.scale * ties_merge(list(vectors), config.density)
                else:
                    if config.task_vector == "dare":
                        vectors = (dare_vector(v, config.density, config.seed, k, name) for k, v in enumerate(vectors))
                    merged = start + config.scale * sum(vectors)
            else:
                merged = sum(alpha * aligned(k, name) for k, alpha in enumerate(alphas))
            param.copy_(merged.to(param.dtype))
    return fused
