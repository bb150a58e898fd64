"""Fusion across widths: parents of other hidden, FFN and head sizes, and compression into a narrower target.

The ground truth is a copy widened by duplicating units (Net2Net): every residual dim, head (or head dim) and FFN
unit appears twice, held tensors are copied and the columns that read a duplicated unit are halved, so the copy
computes the same function. Fusing it back into the narrow shape must give the narrow model's outputs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
import yaml
from conftest import build, inputs_for, outputs, relative_error

from hf_otfusion import FusionConfig, compress, fuse, fuse_with_diagnostics, permute_model
from hf_otfusion.cli import main
from hf_otfusion.engine.align import align_parameters
from hf_otfusion.engine.plan import resolve_plan
from hf_otfusion.engine.transport import TransportMap, uniform
from hf_otfusion.errors import FusionError, IncompatibleModelsError, TargetShapeError
from hf_otfusion.methods.target import select_centres

NARROW = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4}  # conftest's tiny models


def _duplication(units: int, blocks: int, block: int, copies_of_blocks: int, copies_in_block: int) -> TransportMap:
    """Narrow unit (b, i) of `blocks` x `block` -> every (copy x b, copy x i) of the wide space, uniform mass."""
    wide_block = block * copies_in_block
    plan = np.zeros((units, blocks * copies_of_blocks * wide_block))
    for outer in range(copies_of_blocks):
        for b in range(blocks):
            for inner in range(copies_in_block):
                rows = b * block + np.arange(block)
                plan[rows, (outer * blocks + b) * wide_block + inner * block + np.arange(block)] = 1.0
    plan /= plan.sum()
    return TransportMap(plan, uniform(units), uniform(plan.shape[1]))


def widen(model: T.PreTrainedModel, family: str, mode: str) -> T.PreTrainedModel:
    """`model` with hidden and FFN sizes doubled by duplication, and twice the heads (`heads`) or head size (`dims`).

    Moving the narrow model through duplication maps with the engine's two normalisations copies held tensors and
    halves reading columns. With doubled head size, Q·Kᵀ doubles and the temperature 1/√d shrinks by √2, so Q and K
    are scaled by 2^(-1/4) each; the function is then unchanged (checked by the tests, not assumed).
    """
    config = model.config
    heads, copies_of_heads, copies_in_head = config.num_attention_heads, *((2, 1) if mode == "heads" else (1, 2))
    wide = build(family, seed=99, hidden_size=2 * config.hidden_size, num_attention_heads=heads * copies_of_heads,
                 intermediate_size=2 * config.intermediate_size)  # fmt: skip
    plan = resolve_plan(model)
    maps = {}
    for name, space in plan.spaces.items():
        if space.heads is not None:
            maps[name] = _duplication(space.size, heads, space.head_dim, copies_of_heads, copies_in_head)
            if space.scaled_dot_product:
                maps[name].output_scale = copies_in_head**-0.25
        elif not plan.nested_in(name):
            maps[name] = _duplication(space.size, 1, space.size, 1, 2)
    widened = align_parameters({k: v.detach() for k, v in model.named_parameters()}, plan, maps)
    with torch.no_grad():
        for name, param in wide.named_parameters():
            param.copy_(widened[name].to(param.dtype))
    return wide


WIDENED = [("vit-cls", "heads"), ("bert-seqcls", "heads"), ("deit-teacher", "dims"), ("bert-seqcls", "dims")]


@pytest.mark.parametrize("cost", ["weights", "activations"])
@pytest.mark.parametrize(("family", "mode"), WIDENED)
def test_copy_widened_in_every_space_fuses_back_to_the_narrow_anchor(family, mode, cost):
    anchor = build(family)
    wide = widen(anchor, family, mode)
    inputs = inputs_for(anchor, seed=5)
    expected = outputs(anchor, inputs)
    assert relative_error(outputs(wide, inputs), expected) < 1e-5  # the widening preserves the function
    assert wide.config.hidden_size == 64 and wide.config.intermediate_size == 96
    config = FusionConfig(cost=cost, solver="exact")
    result = fuse_with_diagnostics([anchor, wide], data=[inputs_for(anchor, seed=s) for s in range(2)], config=config,
                                   progress=False)  # fmt: skip
    assert result.model.config.hidden_size == 32 and result.model.config.num_attention_heads == 4
    assert relative_error(outputs(result.model, inputs), expected) < 1e-4
    assert result.maps[1]["residual"].shape == (64, 32)
    assert result.maps[1]["qk.0"].output_scale == pytest.approx(2**0.25 if mode == "dims" else 1.0)


@pytest.mark.parametrize(("heads", "residual"), [("cross", "mean"), ("aware", "mean"), ("cross", "shared")])
def test_widened_copy_fuses_back_under_every_head_and_residual_policy(heads, residual):
    anchor = build("bert-seqcls")
    wide = widen(anchor, "bert-seqcls", "dims")
    inputs = inputs_for(anchor, seed=5)
    config = FusionConfig(cost="activations", heads=heads, residual=residual)
    fused = fuse([anchor, wide], data=[inputs_for(anchor)], config=config, progress=False)
    assert relative_error(outputs(fused, inputs), outputs(anchor, inputs)) < 1e-4


@pytest.mark.parametrize(("solver", "cost"), [("exact", "weights"), ("sinkhorn", "activations")])
def test_narrow_parent_fused_into_a_widened_anchor_keeps_the_anchors_function(solver, cost):
    narrow = build("vit-cls")
    wide = widen(narrow, "vit-cls", "dims")
    inputs = inputs_for(narrow, seed=5)
    config = FusionConfig(cost=cost, solver=solver, reg=0.01)
    fused = fuse([wide, narrow], data=[inputs_for(narrow)], config=config, progress=False)
    assert fused.config.hidden_size == 64
    assert relative_error(outputs(fused, inputs), outputs(wide, inputs)) < 1e-4


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_importance_marginals_keep_widened_and_permuted_copies_exact(cost):
    anchor = build("deit-teacher")
    wide = permute_model(widen(anchor, "deit-teacher", "heads"), seed=3)
    inputs = inputs_for(anchor, seed=5)
    config = FusionConfig(cost=cost, marginals="importance")
    result = fuse_with_diagnostics([anchor, wide], data=[inputs_for(anchor)], config=config, progress=False)
    assert relative_error(outputs(result.model, inputs), outputs(anchor, inputs)) < 1e-4
    mlp = result.maps[1]["mlp.0"]
    assert not np.allclose(mlp.mu, uniform(96))  # the masses really are importances
    np.testing.assert_allclose(mlp.plan.sum(axis=1), mlp.mu, atol=1e-12)


def test_parents_of_different_widths_fuse_into_a_target_that_from_pretrained_loads(tmp_path):
    a = build("bert-seqcls", seed=0)
    b = build("bert-seqcls", seed=1, hidden_size=48, num_attention_heads=6, intermediate_size=64)
    target = {"hidden_size": 24, "intermediate_size": 32, "num_attention_heads": 3}
    data = [inputs_for(a, seed=s) for s in range(2)]
    for cost in ("weights", "activations"):
        fused = fuse([a, b], data=data, config=FusionConfig(cost=cost, target=target), progress=False)
        reference = T.BertForSequenceClassification(T.BertConfig(**{**a.config.to_dict(), **target}))
        shapes = {name: tuple(p.shape) for name, p in reference.named_parameters()}
        assert {name: tuple(p.shape) for name, p in fused.named_parameters()} == shapes
        fused.save_pretrained(tmp_path / cost)
        loaded = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / cost).eval()
        assert {key: getattr(loaded.config, key) for key in target} == target
        inputs = inputs_for(a, seed=5)
        logits = outputs(loaded, inputs)
        assert torch.isfinite(logits).all() and logits.std() > 1e-3
        assert relative_error(logits, outputs(fused, inputs)) < 1e-6


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_target_equal_to_the_anchor_shape_is_ordinary_fusion(cost):
    a = build("vit-cls", seed=0)
    b = build("vit-cls", seed=1, hidden_size=48, num_attention_heads=6, intermediate_size=64)
    data = [inputs_for(a, seed=s) for s in range(2)]
    plain = fuse([a, b], data=data, config=FusionConfig(cost=cost), progress=False)
    targeted = fuse_with_diagnostics([a, b], data=data, config=FusionConfig(cost=cost, target=NARROW), progress=False)
    for (name, expected), (_, actual) in zip(plain.named_parameters(), targeted.model.named_parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)
    compression = [d for d in targeted.diagnostics if d.space.startswith("target:")]
    assert compression and all(d.transport_cost < 1e-6 for d in compression)  # every unit is its own centre


@pytest.mark.parametrize("marginals", ["uniform", "importance"])
@pytest.mark.parametrize(
    ("family", "mode", "cost"), [("vit-cls", "dims", "activations"), ("bert-seqcls", "heads", "weights")]
)
def test_compressing_a_widened_copy_recovers_the_narrow_model(family, mode, cost, marginals):
    narrow = build(family)
    wide = permute_model(widen(narrow, family, mode), seed=2)
    inputs = inputs_for(narrow, seed=5)
    config = FusionConfig(cost=cost, marginals=marginals)
    compressed = compress(wide, NARROW, data=[inputs_for(narrow)], config=config, progress=False)
    assert type(compressed) is type(narrow) and compressed.config.hidden_size == 32
    assert relative_error(outputs(compressed, inputs), outputs(narrow, inputs)) < 1e-4


def test_two_wide_copies_fuse_into_the_narrow_target_exactly():
    narrow = build("deit-teacher")
    wide_heads = widen(narrow, "deit-teacher", "heads")
    wide_dims = permute_model(widen(narrow, "deit-teacher", "dims"), seed=4)
    inputs = inputs_for(narrow, seed=5)
    fused = fuse([wide_heads, wide_dims], data=[inputs_for(narrow)], config=FusionConfig(target=NARROW), progress=False)
    assert relative_error(outputs(fused, inputs), outputs(narrow, inputs)) < 1e-4


def test_centres_skip_duplicates_while_distinct_units_remain():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(4, 3))
    units = np.concatenate([points, points])  # units 4..7 duplicate 0..3
    cost = ((units[:, None] - units[None]) ** 2).sum(-1)
    importance = (units**2).sum(1)
    centres = select_centres(cost, importance, 4)
    assert sorted(centres % 4) == [0, 1, 2, 3]
    assert np.argmax(importance[:4]) in centres % 4
    np.testing.assert_array_equal(select_centres(cost, importance, 8), np.arange(8))


def test_bad_targets_fail_early_with_the_fix():
    a, b = build("vit-cls", seed=0), build("vit-cls", seed=1)
    with pytest.raises(TargetShapeError, match="cannot widen"):
        fuse([a, b], config=FusionConfig(cost="weights", target={"intermediate_size": 96}), progress=False)
    with pytest.raises(TargetShapeError, match="head"):
        fuse([a, b], config=FusionConfig(cost="weights", target={"num_attention_heads": 2}), progress=False)
    with pytest.raises(TargetShapeError, match="num_hidden_layers"):
        fuse([a, b], config=FusionConfig(cost="weights", target={"num_hidden_layers": 1}), progress=False)
    with pytest.raises(TargetShapeError, match="multiple of num_attention_heads"):
        fuse([a, b], config=FusionConfig(cost="weights", target={"hidden_size": 30}), progress=False)
    with pytest.raises(FusionError, match="KEY=INT"):
        FusionConfig(target="hidden_size:24")
    with pytest.raises(FusionError, match="needs method='ot'"):
        FusionConfig(method="vanilla", target={"hidden_size": 24})
    wide = build("vit-cls", seed=1, intermediate_size=64)
    with pytest.raises(IncompatibleModelsError, match="space 'mlp.0'.*method='ot'"):
        fuse([a, wide], config=FusionConfig(method="vanilla"), progress=False)


def test_cli_target_flag_writes_the_target_config(tmp_path):
    paths = [tmp_path / "a", tmp_path / "b"]
    build("vit-cls", seed=0).save_pretrained(paths[0])
    build("vit-cls", seed=1, hidden_size=48, num_attention_heads=6).save_pretrained(paths[1])
    out = tmp_path / "fused"
    target = "hidden_size=24,intermediate_size=32,num_attention_heads=4"
    assert main(["fuse", *map(str, paths), "--out", str(out), "--cost", "weights", "--target", target, "-q"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["hidden_size"], saved["intermediate_size"], saved["num_attention_heads"]) == (24, 32, 4)
    assert yaml.safe_load((out / "fusion_config.yaml").read_text())["target"] == {
        "hidden_size": 24, "intermediate_size": 32, "num_attention_heads": 4,
    }  # fmt: skip
    assert T.AutoModelForImageClassification.from_pretrained(out).config.hidden_size == 24


def test_cli_evaluation_of_parents_of_different_widths_has_no_vanilla_row(tmp_path):
    from datasets import Dataset, DatasetDict

    paths = [tmp_path / "a", tmp_path / "b"]
    anchor = build("vit-cls", seed=0)
    anchor.save_pretrained(paths[0])
    build("vit-cls", seed=1, hidden_size=48, num_attention_heads=6).save_pretrained(paths[1])
    inputs = inputs_for(anchor, batch=6)
    labels = [i % anchor.config.num_labels for i in range(6)]
    rows = Dataset.from_dict({"pixel_values": inputs["pixel_values"].numpy(), "labels": labels})
    DatasetDict({"test": rows}).save_to_disk(str(tmp_path / "eval"))  # --eval-data reads the test split
    out = tmp_path / "fused"
    args = ["fuse", *map(str, paths), "--out", str(out), "--cost", "weights", "--eval-data", str(tmp_path / "eval")]
    assert main([*args, "-q"]) == 0
    rows = [row["name"] for row in json.loads((out / "fusion_provenance.json").read_text())["evaluation"]["rows"]]
    assert len(rows) == 3 and rows[-1] == "fused" and not any("vanilla" in name for name in rows)
