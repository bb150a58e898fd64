"""Invariant 1: fusing a parent with a function-preserving permuted copy of itself gives the parent back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build, inputs_for, outputs, relative_error

from hf_otfusion import FusionConfig, fuse, fuse_with_diagnostics, permute_model, random_permutations


def test_permuted_copy_computes_the_same_function_with_different_weights(family):
    parent = build(family)
    permuted = permute_model(parent, seed=1)
    inputs = inputs_for(parent)
    expected = outputs(parent, inputs)
    if family.endswith("-base"):  # a bare encoder returns hidden states, in the permuted residual basis
        expected = expected[..., random_permutations(parent, seed=1)["residual"]]
    assert relative_error(outputs(permuted, inputs), expected) < 1e-5
    changed = [
        name
        for (name, a), (_, b) in zip(parent.named_parameters(), permuted.named_parameters(), strict=True)
        if a.shape == b.shape and a.ndim and not torch.equal(a, b)
    ]
    assert len(changed) >= 0.8 * len(list(parent.parameters()))


def test_permutations_move_heads_as_blocks():
    parent = build("bert-seqcls")
    permutations = random_permutations(parent, seed=3)
    head_dim = 32 // 4
    for space in ("qk.0", "vo.0"):
        blocks = permutations[space].reshape(4, head_dim) // head_dim
        assert (blocks == blocks[:, :1]).all(), "a head's dims must stay together"
        assert sorted(blocks[:, 0]) == [0, 1, 2, 3]
    assert not np.array_equal(permutations["qk.0"], permutations["vo.0"])


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_permuted_copy_fuses_back_to_parent_exact(family, cost):
    parent = build(family)
    permuted = permute_model(parent, seed=1)
    inputs = inputs_for(parent, seed=5)
    data = [inputs_for(parent, seed=s) for s in range(3)]
    fused = fuse([parent, permuted], data=data, config=FusionConfig(cost=cost, solver="exact"), progress=False)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_permuted_copy_fuses_back_with_soft_alignment_at_small_reg(cost):
    parent = build("vit-cls")
    permuted = permute_model(parent, seed=2)
    inputs = inputs_for(parent, seed=5)
    config = FusionConfig(cost=cost, solver="sinkhorn", reg=0.01)
    result = fuse_with_diagnostics([parent, permuted], data=[inputs_for(parent)], config=config, progress=False)
    assert relative_error(outputs(result.model, inputs), outputs(parent, inputs)) < 1e-3
    assert max(d.softness for d in result.diagnostics) < 0.05


def test_permuted_copy_fuses_back_from_a_token_subsample():
    parent = build("bert-mlm")
    permuted = permute_model(parent, seed=3)
    inputs = inputs_for(parent, seed=5)
    config = FusionConfig(cost="activations", tokens_per_sample=3)
    fused = fuse([parent, permuted], data=[inputs_for(parent, seed=s) for s in range(3)], config=config, progress=False)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4


@pytest.mark.parametrize("residual", ["shared", "mean"])
@pytest.mark.parametrize("heads", ["aware", "cross"])
def test_every_residual_and_head_policy_recovers_the_parent(residual, heads):
    parent = build("deit-teacher")
    permuted = permute_model(parent, seed=4)
    inputs = inputs_for(parent, seed=5)
    config = FusionConfig(cost="activations", residual=residual, heads=heads)
    fused = fuse([parent, permuted], data=[inputs_for(parent)], config=config, progress=False)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4


def test_vanilla_average_of_permuted_copy_is_far_off(family):
    parent = build(family)
    permuted = permute_model(parent, seed=1)
    inputs = inputs_for(parent, seed=5)
    fused = fuse([parent, permuted], config=FusionConfig(method="vanilla"), progress=False)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) > 0.1


def test_recovered_maps_are_the_inverse_permutations():
    parent = build("bert-seqcls")
    permuted = permute_model(parent, seed=7)
    truth = random_permutations(parent, seed=7)
    result = fuse_with_diagnostics([parent, permuted], config=FusionConfig(cost="weights"), progress=False)
    for space, permutation in truth.items():
        plan = result.maps[1][space].plan
        # the copy's unit j is the parent's unit permutation[j]; the anchor is the parent
        assert np.array_equal(plan.argmax(axis=1), permutation), space
