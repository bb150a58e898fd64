"""Invariants 2 and 4: fuse(A, A) == A, and every fused parameter is the alpha-weighted mix of the aligned parents."""

from __future__ import annotations

import pytest
import torch
from conftest import build, inputs_for, outputs, relative_error

from hf_otfusion import FusionConfig, fuse, fuse_with_diagnostics, permute_model
from hf_otfusion.engine.align import align_parameters
from hf_otfusion.engine.plan import resolve_plan


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_model_fused_with_itself_is_unchanged(cost):
    parent = build("bert-seqcls")
    fused = fuse([parent, parent], data=[inputs_for(parent)], config=FusionConfig(cost=cost), progress=False)
    for (name, a), (_, b) in zip(parent.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_three_parents_mix_with_weights_summing_to_one_on_every_parameter():
    parents = [build("deit-teacher", seed=s) for s in (0, 1, 2)]
    # normalised to 1/8, 2/8, 5/8; the residual permuted, so that every parameter is the parents' own, moved
    config = FusionConfig(cost="weights", residual="shared", weights=[1.0, 2.0, 5.0])
    result = fuse_with_diagnostics(parents, config=config, progress=False)
    alphas = [1 / 8, 2 / 8, 5 / 8]
    plan = resolve_plan(parents[0])
    aligned = [{n: p.detach().double() for n, p in parents[0].named_parameters()}]
    for k in (1, 2):
        params = {n: p.detach() for n, p in parents[k].named_parameters()}
        aligned.append(align_parameters(params, plan, result.maps[k]))
    fused = dict(result.model.named_parameters())
    checked = [
        "deit.embeddings.cls_token",
        "deit.embeddings.distillation_token",
        "deit.embeddings.patch_embeddings.projection.weight",
        "deit.layers.1.attention.q_proj.weight",
        "deit.layers.0.mlp.fc2.bias",
        "deit.layernorm.weight",
        "cls_classifier.weight",
        "distillation_classifier.bias",
    ]
    for name in fused:
        expected = sum(alpha * tensors[name] for alpha, tensors in zip(alphas, aligned, strict=True))
        torch.testing.assert_close(fused[name].double(), expected, rtol=1e-6, atol=1e-6, msg=name)
    # the unaligned label axis shows the weights directly: the classifier bias is a plain weighted mean
    bias = sum(a * p.get_parameter("cls_classifier.bias").double() for a, p in zip(alphas, parents, strict=True))
    torch.testing.assert_close(fused["cls_classifier.bias"].double(), bias, rtol=1e-6, atol=1e-6)
    assert all(name in fused for name in checked)


def test_vanilla_weights_apply_to_every_parameter():
    parents = [build("bert-mlm", seed=s) for s in (0, 1, 2)]
    fused = fuse(parents, config=FusionConfig(method="vanilla", weights=[0.2, 0.3, 0.5]), progress=False)
    for name, param in fused.named_parameters():
        expected = sum(w * p.get_parameter(name) for w, p in zip([0.2, 0.3, 0.5], parents, strict=True))
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_anchor_choice_sets_the_basis_and_keeps_the_function():
    parent = build("vit-cls")
    permuted = permute_model(parent, seed=3)
    inputs = inputs_for(parent, seed=9)
    shared = FusionConfig(cost="weights", residual="shared", anchor=1)  # permutations: the anchor's own tensors
    fused = fuse([parent, permuted], config=shared, progress=False)
    for (name, a), (_, b) in zip(permuted.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4
    rotated = fuse([parent, permuted], config=FusionConfig(cost="weights", anchor=1), progress=False)  # data-free auto
    assert relative_error(outputs(rotated, inputs), outputs(parent, inputs)) < 1e-4


def test_mlm_decoder_stays_tied_to_the_word_embeddings():
    parents = [build("bert-mlm", seed=0), build("bert-mlm", seed=1)]
    fused = fuse(parents, config=FusionConfig(cost="weights"), progress=False)
    assert fused.cls.predictions.decoder.weight is fused.bert.embeddings.word_embeddings.weight
    assert fused.cls.predictions.decoder.weight.data_ptr() == fused.bert.embeddings.word_embeddings.weight.data_ptr()


def test_same_inputs_give_identical_weights():
    parents = [build("bert-seqcls", seed=0), build("bert-seqcls", seed=1)]
    data = [inputs_for(parents[0], seed=s) for s in range(2)]
    config = FusionConfig(cost="activations", solver="sinkhorn", reg=0.1)
    first = fuse(parents, data=data, config=config, progress=False)
    second = fuse(parents, data=data, config=config, progress=False)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("cost", "solver", "residual"),
    [("weights", "exact", "shared"), ("weights", "sinkhorn", "mean"), ("activations", "exact", "mean")],
)
def test_concurrent_solves_give_the_maps_of_one_by_one_solves(cost, solver, residual):
    from hf_otfusion.engine.maps import compute_maps, per_hook_spaces
    from hf_otfusion.engine.statistics import collect_statistics, statistics_keys

    models = [build("bert-seqcls", seed=0), build("bert-seqcls", seed=1)]
    plans = [resolve_plan(m) for m in models]
    config = FusionConfig(cost=cost, solver=solver, residual=residual)
    params = [{n: p.detach() for n, p in m.named_parameters()} for m in models]
    keys = statistics_keys(plans[0], per_hook_spaces(plans[0], config))
    data = [inputs_for(models[0], seed=s) for s in range(2)]

    def solved(workers):
        stats = collect_statistics(models, plans, data, anchor=0, keys=keys, progress=False)[1]
        solution = compute_maps(1, plans[1], plans[0], params[1], params[0], stats, config, workers=workers)
        assert cost != "activations" or stats == {}  # consumed: each co-moment is freed once its cost is built
        return solution

    (one_by_one, diagnostics), (concurrent, concurrent_diagnostics) = solved(1), solved(4)
    assert set(concurrent) == set(one_by_one)
    assert [d.space for d in concurrent_diagnostics] == [d.space for d in diagnostics]
    for space, transport in one_by_one.items():
        assert (transport.permutation is None) == (concurrent[space].permutation is None)
        torch.testing.assert_close(torch.from_numpy(concurrent[space].plan), torch.from_numpy(transport.plan))


PARENT_SAFETY_CONFIGS = {
    "default": {},
    "data-free": dict(cost="weights"),
    "repair": dict(repair="all"),
    "refine with layer weights and norms": dict(refine_steps=3, refine_weights=True, refine_norms=True),
    "best": dict(quality="best", refine_steps=3),
    "closed-form": dict(quality="closed-form"),
    "vanilla": dict(method="vanilla"),
}


@pytest.mark.parametrize("family", ["vit-cls", "bert-seqcls"])
@pytest.mark.parametrize("option", list(PARENT_SAFETY_CONFIGS))
def test_fusion_leaves_the_callers_parents_as_they_were(family, option):
    """Parents given as models are the caller's: no option may write into them (the anchor is copied before it is
    averaged, reparameterised and repaired) or leave them in another mode (the passes run them in eval mode), so a
    caller can score or finetune them after fusing."""
    parents = [build(family), build(family, seed=1).train()]  # one in eval mode, one training
    before = [{name: tensor.clone() for name, tensor in p.state_dict().items()} for p in parents]
    data = [inputs_for(parents[0], batch=8, seed=s) for s in range(8)]
    fields = dict(PARENT_SAFETY_CONFIGS[option], batch_size=8)
    fuse(parents, data=data, config=FusionConfig(**fields), progress=False)
    for k, parent in enumerate(parents):
        for name, tensor in parent.state_dict().items():
            assert torch.equal(tensor, before[k][name]), f"parent {k}: {name} changed"
    assert [{module.training for module in parent.modules()} for parent in parents] == [{False}, {True}]
