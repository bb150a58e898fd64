"""Transport maps: the two normalisations, soft plans and their diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build, inputs_for, outputs, relative_error

from hf_otfusion import FusionConfig, fuse, fuse_with_diagnostics
from hf_otfusion.engine.transport import TransportMap, cost_scale, solve_transport


def test_identity_cost_gives_the_identity_permutation():
    cost = 1.0 - np.eye(5)
    transport, info = solve_transport(cost, solver="exact")
    np.testing.assert_allclose(transport.plan, np.eye(5) / 5)
    assert info.transport_cost == 0 and info.softness == pytest.approx(0, abs=1e-12)


def test_output_and_input_normalisations_for_different_widths():
    # parent units 0,1 are two halves of anchor unit 0; unit 2 is anchor unit 1
    plan = np.array([[1 / 3, 0], [1 / 3, 0], [0, 1 / 3]])
    transport = TransportMap(plan, np.full(3, 1 / 3), np.array([2 / 3, 1 / 3]))
    np.testing.assert_allclose(transport.output_matrix().sum(axis=0), [1, 1])  # convex combinations
    np.testing.assert_allclose(transport.input_matrix().sum(axis=1), [1, 1, 1])  # rows of the map sum to 1
    solved, _ = solve_transport(np.array([[0.0, 1], [0, 1], [1, 0]]), solver="exact", nu=transport.nu)
    np.testing.assert_allclose(solved.plan, [[1 / 3, 0], [1 / 3, 0], [0, 1 / 3]])


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_copy_widened_by_duplicating_ffn_units_fuses_back_to_the_narrow_anchor(cost):
    anchor = build("vit-cls")
    wide = build("vit-cls", intermediate_size=96)
    with torch.no_grad():
        for param in wide.parameters():
            param.zero_()
        wide.load_state_dict({k: v for k, v in anchor.state_dict().items() if "mlp" not in k}, strict=False)
        for narrow_layer, wide_layer in zip(anchor.vit.layers, wide.vit.layers, strict=True):
            wide_layer.mlp.fc1.weight.copy_(narrow_layer.mlp.fc1.weight.repeat(2, 1))
            wide_layer.mlp.fc1.bias.copy_(narrow_layer.mlp.fc1.bias.repeat(2))
            wide_layer.mlp.fc2.weight.copy_(narrow_layer.mlp.fc2.weight.repeat(1, 2) / 2)  # outgoing weights split
            wide_layer.mlp.fc2.bias.copy_(narrow_layer.mlp.fc2.bias)
    inputs = inputs_for(anchor, seed=3)
    assert relative_error(outputs(wide, inputs), outputs(anchor, inputs)) < 1e-5
    fused = fuse([anchor, wide], data=[inputs_for(anchor)], config=FusionConfig(cost=cost), progress=False)
    assert fused.config.intermediate_size == 48
    assert relative_error(outputs(fused, inputs), outputs(anchor, inputs)) < 1e-4


def test_relative_reg_sets_softness_independently_of_cost_scale():
    rng = np.random.default_rng(0)
    cost = rng.random((20, 20))
    _, small = solve_transport(cost, solver="sinkhorn", reg=0.5)
    _, scaled = solve_transport(cost * 1000, solver="sinkhorn", reg=0.5)
    assert scaled.softness == pytest.approx(small.softness, abs=1e-6)
    assert cost_scale(cost * 1000) == pytest.approx(1000 * cost_scale(cost))


def test_larger_reg_gives_softer_plans_and_the_diagnostics_record_it():
    parents = [build("vit-cls", seed=0), build("vit-cls", seed=1)]
    data = [inputs_for(parents[0])]
    softness = []
    for reg in (0.05, 1.0, 20.0):
        config = FusionConfig(solver="sinkhorn", reg=reg)
        result = fuse_with_diagnostics(parents, data=data, config=config, progress=False)
        residual = next(d for d in result.diagnostics if d.space == "residual")
        assert residual.reg is not None and residual.entropy > 0
        softness.append(residual.softness)
    assert softness[0] < softness[1] < softness[2]
    assert softness[2] > 0.5
    for transport in result.maps[1].values():
        np.testing.assert_allclose(transport.plan.sum(axis=0), transport.nu, rtol=1e-6)
        assert transport.plan.sum() == pytest.approx(1.0)
