"""RegMean on the fused model's own inputs (`regmean_inputs="fused"`): every linear layer refitted in flow order."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build, inputs_for, outputs, relative_error

from hf_otfusion import FusionConfig, fuse, fuse_with_diagnostics, permute_model
from hf_otfusion.errors import InvalidConfigError
from hf_otfusion.methods.fused_inputs import RIDGE, refit_linears
from hf_otfusion.methods.gram import mergeable_linears

OPTIONS = FusionConfig(batch_size=8).statistics_options()


def _captured(model, name: str, batches: list[dict], output: bool) -> torch.Tensor:
    """The input (or output) of layer `name` over `batches`, padding tokens dropped: (tokens, features) float64."""
    seen = []

    def keep(batch):
        def hook(module, args, result):
            x = (result if output else args[0]).detach()
            seen.append(x if x.ndim == 2 else x[batch["attention_mask"].bool()] if "attention_mask" in batch else
                        x.reshape(-1, x.shape[-1]))  # fmt: skip

        return hook

    module = model.get_submodule(name)
    with torch.no_grad():
        for batch in batches:
            handle = module.register_forward_hook(keep(batch))
            model(**batch)
            handle.remove()
    return torch.cat(seen).double()


def _augmented(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


@pytest.mark.parametrize(("family", "sources"), [("bert-seqcls", 1), ("vit-cls", 1), ("bert-seqcls", 2)])
def test_each_layer_solves_its_least_squares_on_the_inputs_the_refitted_model_gives_it(family, sources):
    """After the refit, every layer's weights satisfy the normal equations of
    Σ_s w_s ||[X_s 1] S − Ȳ_s / w_s||² + λ ||S − S₀||² (the bias row unpenalised), with X_s the *final* model's inputs
    to that layer on source s's data, padding dropped: this holds only if the layers were fitted in flow order, each on
    the refitted layers below it, on the right tokens and towards the right targets. Two sources stand for a
    multi-task merge, each parent judged on its own data."""
    parents = [build(family, seed=0), build(family, seed=1)]
    fused = fuse(parents, config=FusionConfig(method="vanilla"), progress=False)  # the average the ridge pulls to
    start = copy.deepcopy(fused)
    if sources == 1:
        data = [[inputs_for(parents[0], seed=s) for s in range(6)]]
        given = [(data[0], [(parents[0], 0.5), (parents[1], 0.5)])]
    else:
        data = [
            [inputs_for(parents[0], seed=s) for s in range(4)],
            [inputs_for(parents[0], seed=10 + s) for s in range(5)],
        ]
        given = [(data[0], [(parents[0], 0.5)]), (data[1], [(parents[1], 0.5)])]
    reports = refit_linears(fused, given, OPTIONS, progress=False)
    layers = mergeable_linears(fused)
    assert [r.layer for r in reports if r.layer in layers] == [r.layer for r in reports]
    assert sorted(r.layer for r in reports) == sorted(layers)
    for report in reports:
        name = report.layer
        module, original = layers[name], start.get_submodule(name)
        solution = torch.cat([module.weight.detach().double().T, module.bias.detach().double()[None]])
        prior = torch.cat([original.weight.detach().double().T, original.bias.detach().double()[None]])
        gram = torch.zeros(len(solution), len(solution), dtype=torch.float64)
        cross = torch.zeros_like(solution)
        energy = residual_energy = 0.0
        for batches, pairs in zip(data, given, strict=True):
            x = _augmented(_captured(fused, name, batches, output=False))
            target = sum(c * _captured(p, name, batches, output=True) for p, c in pairs[1])
            weight = sum(c for _, c in pairs[1])
            gram += weight * x.T @ x
            cross += x.T @ target
            energy += target.square().sum().item() / weight
            residual_energy += (weight * x @ solution - target).square().sum().item() / weight
        n = module.in_features
        penalty = torch.zeros(len(solution), dtype=torch.float64)
        penalty[:n] = RIDGE * gram.diagonal()[:n].mean()
        normal = gram @ solution - cross + penalty[:, None] * (solution - prior)
        assert normal.norm() < 1e-6 * cross.norm(), name
        assert report.error_after <= report.error_before + 1e-12, name
        assert report.error_after == pytest.approx(residual_energy / energy, rel=1e-6, abs=1e-12), name
    assert sum(r.error_after for r in reports) < 0.8 * sum(r.error_before for r in reports)  # the fit did something


@pytest.mark.parametrize("family", ["bert-seqcls", "vit-cls", "deit-teacher"])
def test_a_permuted_copy_refits_to_its_parent_also_on_each_parents_own_data(family):
    """The parent's own inputs and outputs reach every layer of the fusion of a copy, so each layer refits to itself
    (the ridge pulls towards the same weights); so too with `parent_data`, each parent on its own task's data."""
    model = build(family)
    copy_of = permute_model(model, seed=3)
    config = FusionConfig(method="regmean", align="ot", cost="weights", regmean_inputs="fused", batch_size=8)
    shared = [inputs_for(model, seed=s) for s in range(4)]
    own = [[inputs_for(model, seed=s) for s in range(3)], [inputs_for(model, seed=20 + s) for s in range(3)]]
    inputs = inputs_for(model, seed=7)
    for data, parent_data in ((shared, None), (None, own)):
        result = fuse_with_diagnostics([model, copy_of], data=data, parent_data=parent_data, config=config,
                                       progress=False)  # fmt: skip
        assert relative_error(outputs(result.model, inputs), outputs(model, inputs)) < 1e-5
        assert len(result.refit) == len(mergeable_linears(model)) and "refit" in result.timings
        assert max(r.error_after for r in result.refit) < 1e-9


def test_fused_inputs_need_regmean_and_do_not_read_its_alpha():
    with pytest.raises(InvalidConfigError, match="regmean_inputs='fused' chooses the inputs of RegMean's least"):
        FusionConfig(regmean_inputs="fused")
    with pytest.raises(InvalidConfigError, match="regmean_alpha=0.5 shapes RegMean on the parents' inputs"):
        FusionConfig(method="regmean", regmean_inputs="fused", regmean_alpha=0.5)
    with pytest.raises(InvalidConfigError, match=r"regmean_inputs='nearest' is not one of \['parents', 'fused'\]"):
        FusionConfig(method="regmean", regmean_inputs="nearest")
