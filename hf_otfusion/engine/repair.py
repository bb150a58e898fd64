"""Repair: give each fused unit back the activation mean and standard deviation of its aligned parent units.

Averaging two matched units that are not perfectly correlated shrinks the variance of the result by about
(1 + ρ)/2, and the shrinkage compounds layer after layer (REPAIR, Jordan et al., ICLR 2023). After averaging,
each repair site (a module the spec's `repair` section lists: the embeddings and the modules writing into the
residual stream, and the FFN pre-activations) gets, per output unit, the target mean μ* = Σ_k α_k μ_k and
standard deviation σ* = Σ_k α_k σ_k of the aligned parents' same unit. The fused unit's own μ̂, σ̂ are
measured on the alignment data, and the affine correction y ← s (y − μ̂) + μ* with s = σ*/σ̂ is folded into
the module's parameters: every parameter of the module that holds the unit is scaled by s, and the spec's
shift parameter (a bias, or the position embeddings of an embedding module) takes μ* − s μ̂.

Sites are repaired one at a time in flow order, each measured with the sites before it already corrected,
so every correction sees the inputs it will get; a pass stops at the site it measures. Inside the layer stack
the passes start from each batch's kept input to the site's block (`engine.replay`), which moves on once the
block's sites are corrected: about two block runs per block instead of a pass from the embeddings per site,
the same activations. The targets come from one pass of each aligned parent (exact for hard and orthogonal
maps, whose aligned parents compute their parents' functions). Written here because no library does this for
transformers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .distributed import models_on
from .passes import DataPass, StopForward, TokenSelection, evaluating, forward_hooks
from .plan import FusionPlan
from .replay import BlockReplay, block_index, keep_block_inputs, layer_stack

# a unit whose fused standard deviation is below this keeps its scale (nothing to restore from a dead unit)
DEAD_UNIT_STD = 1e-8


@dataclass
class UnitMoments:
    """Token count, per-unit mean and centred sum of squares of one module's outputs, merged with Chan's formula."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def update(self, values: torch.Tensor) -> None:
        """Folds one batch of (tokens, units) activations in."""
        if values.shape[0] == 0:
            return
        values = values.double()
        n, mean = values.shape[0], values.mean(0)
        m2 = ((values - mean) ** 2).sum(0)
        mean, m2 = mean.cpu().numpy(), m2.cpu().numpy()
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


@dataclass
class SiteRepair:
    """What repair did at one site: the mean scale applied and how far the fused std was below its target."""

    site: str
    units: int
    mean_scale: float
    std_ratio_before: float  # mean over units of σ̂ / σ*

    def to_dict(self) -> dict:
        return asdict(self)


def repair_sites(plan: FusionPlan, scope: str) -> list[str]:
    """The sites to repair, in flow order: those writing into the residual stream (`residual`) or every one (`all`)."""
    return [site for site in plan.repair_sites if scope == "all" or _site_space(plan, site) == plan.stream]


def repair_model(
    fused: PreTrainedModel,
    plan: FusionPlan,
    aligned_parents: Iterable[tuple[PreTrainedModel, float]],
    data,
    scope: str,
    statistics_options: dict,
    progress: bool = True,
    device: torch.device | None = None,
    replay: bool = True,
) -> list[SiteRepair]:
    """Repairs `fused` in place on `data` and returns one `SiteRepair` per site.

    Args:
        fused: the averaged model, in the anchor's basis.
        plan: its plan (the anchor's), which lists the repair sites.
        aligned_parents: (model in the anchor's basis, averaging weight) pairs, consumed one at a time so that
            only one aligned parent needs to exist at once.
        scope: `residual` or `all` (see `repair_sites`).
        statistics_options: the token selection, batching and sample cap of the statistics pass
            (`FusionConfig.statistics_options`), so repair measures the same tokens the maps were solved on.
        replay: measure the sites inside the layer stack from each batch's kept input to their block
            (`engine.replay`) rather than from the embeddings; the same moments, in far fewer block runs.
    """
    sites = repair_sites(plan, scope)
    if not sites:
        return []
    target_mean = {site: 0.0 for site in sites}
    target_std = {site: 0.0 for site in sites}
    for model, weight in aligned_parents:
        moments = site_moments(model, sites, data, statistics_options, device=device)
        for site in sites:
            target_mean[site] = target_mean[site] + weight * moments[site].mean
            target_std[site] = target_std[site] + weight * moments[site].std
    reports = []
    with models_on([fused], device, changed=[fused]), evaluating([fused]):
        passes = _FusedPasses(fused, data, statistics_options, replay)
        for site in tqdm(sites, desc="repair", unit="site", disable=not progress):
            measured = passes.moments(site)
            std = measured.std
            alive = std > DEAD_UNIT_STD
            scale = np.where(alive, target_std[site] / np.where(alive, std, 1.0), 1.0)
            shift = target_mean[site] - scale * measured.mean
            _fold(fused, plan, site, scale, shift)
            ratio = 1.0
            if alive.any():
                ratio = float(np.mean(std[alive] / np.maximum(target_std[site][alive], DEAD_UNIT_STD)))
            reports.append(SiteRepair(site, len(std), float(scale.mean()), ratio))
    return reports


class _FusedPasses:
    """The fused model's passes up to one site at a time: whole passes before the layer stack (and without a
    replay), and inside it from every batch's kept input to the site's block (`replay.BlockReplay`), taken at
    the stack's first site, once the sites before the stack are corrected."""

    def __init__(self, fused: PreTrainedModel, data, statistics_options: dict, replay: bool) -> None:
        self.fused, self.data, self.options = fused, data, statistics_options
        self.selection = TokenSelection(
            statistics_options.get("tokens", "all"), statistics_options.get("tokens_per_sample")
        )
        self.stack = layer_stack(fused) if replay else None
        self.kept: BlockReplay | None = None

    def moments(self, site: str) -> UnitMoments:
        """The moments of `site`'s outputs over the data, on the model as it is now."""
        block = block_index(self.stack, site) if self.stack is not None else None
        if block is not None and self.kept is None:
            data_pass = DataPass(
                self.data, self.fused, batch_size=self.options.get("batch_size", 8),
                num_samples=self.options.get("num_samples"), selection=self.selection,
            )  # fmt: skip
            found = keep_block_inputs([self.fused], data_pass, self.selection)
            if found is None:
                self.stack = None  # whole passes from here on
            else:
                self.kept = found[0]
        if block is None or self.kept is None or block < self.kept.position:  # (a site listed out of flow order)
            return site_moments(self.fused, [site], self.data, self.options, stop_after=site)[site]
        self.kept.advance(block)
        moments = UnitMoments(0, np.zeros(0), np.zeros(0))

        def record(module, inputs, output):
            moments.update(self.selection(output))
            raise StopForward

        with forward_hooks([(self.fused.get_submodule(site), record)]):
            for index, mask in enumerate(self.kept.masks):
                self.selection.new_batch(mask)
                self.kept.run(index)
        return moments


def site_moments(
    model: PreTrainedModel,
    sites: list[str],
    data,
    statistics_options: dict,
    device: torch.device | None = None,
    stop_after: str | None = None,
) -> dict[str, UnitMoments]:
    """Per-unit moments of each site's outputs over the data (padding excluded, the statistics' token selection)."""
    moments = {site: UnitMoments(0, np.zeros(0), np.zeros(0)) for site in sites}
    selection = TokenSelection(statistics_options.get("tokens", "all"), statistics_options.get("tokens_per_sample"))

    def record(site: str):
        def hook(module, inputs, output):
            moments[site].update(selection(output))
            if site == stop_after:
                raise StopForward

        return hook

    modules = dict(model.named_modules())
    hooks = [(modules[site], record(site)) for site in sites]
    with models_on([model], device), forward_hooks(hooks), evaluating([model]):
        data_pass = DataPass(
            data, model, batch_size=statistics_options.get("batch_size", 8),
            num_samples=statistics_options.get("num_samples"), selection=selection,
        )  # fmt: skip
        with torch.inference_mode():
            for batch in data_pass:
                try:
                    model(**batch)
                except StopForward:
                    pass
    return moments


def _site_space(plan: FusionPlan, site: str) -> str | None:
    """The space of the units a site outputs: the output-side axis of its shift parameter."""
    axes = plan.parameters[plan.repair_sites[site]]
    return next((axis.space for axis in axes if axis is not None and not axis.reads), None)


def _fold(model: PreTrainedModel, plan: FusionPlan, site: str, scale: np.ndarray, shift: np.ndarray) -> None:
    """Folds y ← scale ⊙ y + shift into the site's parameters (scale on every tensor holding its units)."""
    space = _site_space(plan, site)
    shift_name = plan.repair_sites[site]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if not name.startswith(site + "."):
                continue
            for dim, axis in enumerate(plan.parameters[name]):
                if axis is not None and axis.space == space and not axis.reads:
                    shape = [1] * param.ndim
                    shape[dim] = -1
                    factor = torch.from_numpy(scale).to(param.device).reshape(shape)  # a GPU's, in a device run
                    updated = param.double() * factor
                    if name == shift_name:
                        updated = updated + torch.from_numpy(shift).to(param.device).reshape(shape)
                    param.copy_(updated.to(param.dtype))
