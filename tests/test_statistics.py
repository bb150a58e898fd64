"""Sufficient statistics: exact, padding-free, additive over shards, and constant in memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from conftest import build, inputs_for

from hf_otfusion.engine.passes import token_selection
from hf_otfusion.engine.plan import resolve_plan
from hf_otfusion.engine.statistics import UnitStatistics, collect_statistics


def _collect(models, batches, **kwargs):
    plans = [resolve_plan(m) for m in models]
    return collect_statistics(models, plans, batches, anchor=0, progress=False, **kwargs)


def _hooked(model, name, inputs):
    """Activations of one module, recorded the plain way: (batch, seq, units)."""
    recorded = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: recorded.append(o.detach()))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return recorded[0].double()


def test_statistics_equal_sums_over_non_padding_tokens():
    anchor, parent = build("bert-seqcls", seed=0), build("bert-seqcls", seed=1)
    inputs = inputs_for(anchor, batch=6)
    stats = _collect([anchor, parent], [inputs])[1]
    hook = "bert.encoder.layer.1.intermediate.dense"
    keep = inputs["attention_mask"].bool()
    b = _hooked(anchor, hook, inputs)[keep]
    a = _hooked(parent, hook, inputs)[keep]
    s = stats[hook]
    assert s.count == int(keep.sum()) < keep.numel()
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    comoment = (centred_a.T @ centred_b).numpy()  # the pass multiplies in float32 per batch, merges in float64
    np.testing.assert_allclose(s.comoment, comoment, rtol=1e-5, atol=1e-6 * np.abs(comoment).max())
    np.testing.assert_allclose(s.m2_a, (centred_a**2).sum(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(s.mean_b, b.mean(0).numpy(), rtol=1e-9, atol=1e-12)
    expected_cost = ((a[:, :, None] - b[:, None, :]) ** 2).mean(0).numpy()
    np.testing.assert_allclose(s.cost("euclidean"), expected_cost, rtol=1e-5, atol=1e-6 * expected_cost.max())
    corr = np.corrcoef(a.numpy().T, b.numpy().T)[: a.shape[1], a.shape[1] :]
    np.testing.assert_allclose(s.cost("correlation"), 1 - corr, rtol=1e-5, atol=1e-6)


def test_padding_tokens_do_not_change_the_statistics():
    anchor, parent = build("bert-seqcls", seed=0), build("bert-seqcls", seed=1)
    inputs = inputs_for(anchor, batch=6)
    garbage = dict(inputs, input_ids=inputs["input_ids"].where(inputs["attention_mask"].bool(), 7))
    first = _collect([anchor, parent], [inputs])[1]
    second = _collect([anchor, parent], [garbage])[1]
    for hook in first:
        np.testing.assert_allclose(first[hook].comoment, second[hook].comoment, rtol=1e-5, atol=1e-6)


def test_statistics_of_shards_add_up_to_those_of_the_whole():
    anchor, parent = build("vit-cls", seed=0), build("vit-cls", seed=1)
    batches = [inputs_for(anchor, batch=4, seed=s) for s in range(3)]
    whole = _collect([anchor, parent], batches)[1]
    shard_a = _collect([anchor, parent], batches[:1])[1]
    shard_b = _collect([anchor, parent], batches[1:])[1]
    for hook, stats in whole.items():
        summed = shard_a[hook] + shard_b[hook]
        assert summed.count == stats.count
        np.testing.assert_allclose(summed.comoment, stats.comoment, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(summed.m2_b, stats.m2_b, rtol=1e-12)
        np.testing.assert_allclose(summed.mean_a, stats.mean_a, rtol=1e-12, atol=1e-15)


def test_first_token_filter_keeps_one_token_per_sample():
    anchor, parent = build("vit-cls", seed=0), build("vit-cls", seed=1)
    stats = _collect([anchor, parent], [inputs_for(anchor, batch=5)], tokens="first")[1]
    assert stats["vit.layers.0.mlp.fc1"].count == 5


def test_token_subsampling_keeps_evenly_spaced_non_padding_tokens_from_the_first():
    mask = torch.tensor([[1] * 9 + [0] * 3, [1] * 12, [1, 1, 1] + [0] * 9, [0, 0] + [1] * 10])
    keep = token_selection((4, 12), mask, "all", 4)
    assert keep[0].nonzero().flatten().tolist() == [0, 3, 5, 8]  # ranks round(j * 8 / 3)
    assert keep[1].nonzero().flatten().tolist() == [0, 4, 7, 11]
    assert keep[2].nonzero().flatten().tolist() == [0, 1, 2]  # shorter than 4: every token
    assert keep[3].nonzero().flatten().tolist() == [2, 5, 8, 11]  # left padding: from the first real token
    assert not (keep & ~mask.bool()).any()
    assert torch.equal(token_selection((4, 12), mask, "all", None), mask.bool())
    assert token_selection((4, 12), mask, "all", 1).sum(1).tolist() == [1, 1, 1, 1]


def test_token_subsampling_counts_k_tokens_per_sample_whatever_the_batching():
    anchor, parent = build("vit-cls", seed=0), build("vit-cls", seed=1)
    whole = inputs_for(anchor, batch=6, seed=3)
    halves = [{key: value[:3] for key, value in whole.items()}, {key: value[3:] for key, value in whole.items()}]
    one = _collect([anchor, parent], [whole], tokens_per_sample=5)[1]
    two = _collect([anchor, parent], halves, tokens_per_sample=5)[1]
    assert one["vit.layers.0.mlp.fc1"].count == two["vit.layers.0.mlp.fc1"].count == 6 * 5
    for hook, stats in one.items():
        np.testing.assert_allclose(two[hook].comoment, stats.comoment, rtol=1e-5, atol=1e-5)


def test_num_samples_caps_the_data():
    anchor, parent = build("vit-cls", seed=0), build("vit-cls", seed=1)
    batches = [inputs_for(anchor, batch=4, seed=s) for s in range(3)]
    stats = _collect([anchor, parent], batches, num_samples=6, tokens="first")[1]
    assert stats["vit.layers.0.mlp.fc1"].count == 6


def _peak_bytes(models, num_samples: int) -> tuple[int, int]:
    batches = (inputs_for(models[0], batch=50, seed=s) for s in range(num_samples // 50))
    tracemalloc.start()
    stats = _collect(models, batches)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = sum(s.comoment.nbytes + s.mean_a.nbytes * 4 for s in stats[1].values())
    return peak, held


@pytest.mark.parametrize("family", ["bert-seqcls"])
def test_statistics_memory_does_not_grow_with_the_number_of_samples(family):
    models = [build(family, seed=0), build(family, seed=1)]
    peak_100, held_100 = _peak_bytes(models, 100)
    peak_1000, held_1000 = _peak_bytes(models, 1000)
    assert held_100 == held_1000
    # keeping the hooked activations of the 900 extra samples would take this much (float32)
    hooked_width = sum(s.mean_a.size for s in _collect(models, [inputs_for(models[0])])[1].values())
    stored = 900 * 12 * hooked_width * 4
    assert peak_1000 - peak_100 < 0.05 * stored, (peak_100, peak_1000, stored)


def test_unit_statistics_start_empty_and_refuse_a_cost():
    from hf_otfusion.errors import EmptyAlignmentDataError

    with pytest.raises(EmptyAlignmentDataError, match="No token"):
        UnitStatistics.zeros(3, 3).cost()
