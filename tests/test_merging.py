"""Same-base merging: interpolation, task arithmetic and RegMean, alone and after OT alignment."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import transformers as T
import yaml
from conftest import build, inputs_for, outputs, relative_error

from hf_otfusion import FusionConfig, fuse, fuse_with_diagnostics, permute_model
from hf_otfusion.cli import main
from hf_otfusion.errors import EmptyAlignmentDataError, FusionError, IncompatibleModelsError
from hf_otfusion.methods.gram import collect_gram_statistics, mergeable_linears
from hf_otfusion.methods.same_base import dare_vector, ties_merge
from hf_otfusion.output.provenance import CONFIG_FILE


def finetune_of(base: T.PreTrainedModel, seed: int, scale: float = 0.05) -> T.PreTrainedModel:
    """A stand-in for a fine-tune: the base with a small random update on every parameter."""
    child = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in child.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return child


def bare_encoder_of(model: T.BertForSequenceClassification) -> T.BertModel:
    """The `BertModel` inside a classifier, as its own checkpoint (the usual base of fine-tunes)."""
    bare = T.BertModel(model.config).eval()
    bare.load_state_dict(model.bert.state_dict())
    return bare


def _inputs_of_layer(model: T.PreTrainedModel, name: str, batches: list[dict]) -> torch.Tensor:
    """The inputs a linear layer sees over `batches`, padding tokens dropped: (tokens, in_features) float64."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            x = seen.pop()
            seen.append(x if x.ndim == 2 else x[batch["attention_mask"].bool()])
    handle.remove()
    return torch.cat(seen).double()


@pytest.fixture(scope="module")
def pair():
    return build("bert-seqcls", seed=0), build("bert-seqcls", seed=1)


@pytest.fixture(scope="module")
def batches(pair):
    return [inputs_for(pair[0], seed=s) for s in range(6)]  # 48 samples: more rows than any layer has inputs


def test_regmean_of_a_model_with_itself_returns_that_model(pair, batches):
    parent = pair[0]
    fused = fuse([parent, parent], data=batches, config=FusionConfig(method="regmean"), progress=False)
    for (name, a), (_, b) in zip(parent.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_repair_after_regmean_of_a_model_with_itself_changes_nothing_and_needs_shared_data(pair, batches):
    parent = pair[0]
    config = FusionConfig(method="regmean", repair="all")
    result = fuse_with_diagnostics([parent, parent], data=batches, config=config, progress=False)
    assert result.repair  # it ran, site by site
    inputs = inputs_for(parent, seed=9)
    assert relative_error(outputs(result.model, inputs), outputs(parent, inputs)) < 1e-5
    # each parent's own data serves its Gram matrices; repair measures every parent on the same rows
    with pytest.raises(EmptyAlignmentDataError, match="repair needs alignment data"):
        fuse_with_diagnostics([parent, parent], config=config, parent_data=[batches, batches], progress=False)


def test_regmean_linear_layers_are_the_least_squares_fit_on_the_alignment_inputs(pair, batches):
    first, second = pair
    fused = fuse(
        [first, second], data=batches, config=FusionConfig(method="regmean", regmean_alpha=1.0), progress=False
    )
    layers = mergeable_linears(first)
    assert len(layers) == 2 * 6 + 2  # q, k, v, attention output, intermediate, output per layer; pooler; classifier
    for name in layers:
        xs = [_inputs_of_layer(model, name, batches) for model in pair]
        # min_{W,b} Σ_k ||X_k Wᵀ + b − (X_k W_kᵀ + b_k)||², solved directly on the stacked inputs
        design = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) for x in xs])
        layer_of = [model.get_submodule(name) for model in pair]
        targets = torch.cat([x @ m.weight.double().T + m.bias.double() for m, x in zip(layer_of, xs, strict=True)])
        solution = torch.linalg.lstsq(design, targets.detach()).solution.T  # float64 throughout
        merged = fused.get_submodule(name)
        got = torch.cat([merged.weight.double(), merged.bias.double()[:, None]], 1)
        # float32 Gram products on inputs with cond up to 2e4 leave ~6e-5; alpha=0.99 instead of 1 gives > 0.2
        assert relative_error(got, solution) < 3e-4, name
    # the non-linear parameters (embeddings, LayerNorms) are plain averages
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.LayerNorm.bias"):
        expected = (first.get_parameter(name) + second.get_parameter(name)) / 2
        torch.testing.assert_close(fused.get_parameter(name), expected, rtol=1e-6, atol=1e-6)


def test_regmean_alpha_zero_weights_each_input_column_by_its_energy(pair, batches):
    fused = fuse(list(pair), data=batches, config=FusionConfig(method="regmean", regmean_alpha=0.0), progress=False)
    name = "bert.encoder.layer.0.output.dense"
    energy = [(_inputs_of_layer(model, name, batches) ** 2).sum(0) for model in pair]
    weights = [model.get_submodule(name).weight.double() for model in pair]
    expected = (weights[0] * energy[0] + weights[1] * energy[1]) / (energy[0] + energy[1])
    torch.testing.assert_close(fused.get_submodule(name).weight.double(), expected, rtol=1e-4, atol=1e-5)


def test_gram_statistics_of_shards_add_up_and_skip_padding(pair, batches):
    model = pair[0]
    layers = ["bert.encoder.layer.1.output.dense", "bert.pooler.dense"]
    whole = collect_gram_statistics(model, batches, layers=layers, progress=False)
    parts = [collect_gram_statistics(model, part, layers=layers, progress=False) for part in (batches[:2], batches[2:])]
    summed = parts[0] + parts[1]
    for name in layers:
        x = _inputs_of_layer(model, name, batches)
        assert whole.layers[name].count == summed.layers[name].count == len(x)
        torch.testing.assert_close(whole.layers[name].gram, x.T @ x, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(summed.layers[name].gram, whole.layers[name].gram, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(summed.layers[name].total, x.sum(0), rtol=1e-5, atol=1e-5)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert whole.layers[layers[0]].count == tokens < sum(b["attention_mask"].numel() for b in batches)


def test_task_arithmetic_with_zero_scale_returns_the_base():
    base = build("bert-seqcls", seed=5)
    parents = [finetune_of(base, seed=s) for s in (1, 2)]
    fused = fuse(parents, config=FusionConfig(method="task-arithmetic", scale=0.0), base=base, progress=False)
    for (name, a), (_, b) in zip(base.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=name)


def test_task_arithmetic_adds_scaled_task_vectors_and_averages_what_the_base_lacks():
    tuned = build("bert-seqcls", seed=5)
    base = bare_encoder_of(tuned)  # no classifier: the parents' heads have no ancestor
    parents = [finetune_of(tuned, seed=s) for s in (1, 2, 3)]
    config = FusionConfig(method="task-arithmetic", scale=0.4, weights=[1.0, 0.5, 2.0])
    fused = fuse(parents, config=config, base=base, progress=False)
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.LayerNorm.bias"):
        start = base.get_parameter(name.removeprefix("bert.")).double()
        vectors = [w * (p.get_parameter(name).double() - start) for w, p in zip(config.weights, parents, strict=True)]
        torch.testing.assert_close(fused.get_parameter(name).double(), start + 0.4 * sum(vectors), rtol=1e-6, atol=1e-6)
    alphas = np.array(config.weights) / sum(config.weights)
    head = sum(a * p.classifier.weight.double() for a, p in zip(alphas, parents, strict=True))
    torch.testing.assert_close(fused.classifier.weight.double(), head, rtol=1e-6, atol=1e-6)


def test_interpolate_is_vanilla_averaging_with_the_parent_weights():
    parents = [build("vit-cls", seed=s) for s in (0, 1, 2)]
    interpolated = fuse(parents, config=FusionConfig(method="interpolate", weights=[1.0, 1.0, 2.0]), progress=False)
    vanilla = fuse(parents, config=FusionConfig(method="vanilla", weights=[1.0, 1.0, 2.0]), progress=False)
    for (name, a), (_, b) in zip(interpolated.named_parameters(), vanilla.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    bias = sum(w * p.classifier.bias for w, p in zip([0.25, 0.25, 0.5], parents, strict=True))
    torch.testing.assert_close(interpolated.classifier.bias, bias, rtol=1e-6, atol=1e-7)


def test_regmean_keeps_the_mlm_decoder_tied_to_the_word_embeddings():
    parents = [build("bert-mlm", seed=0), build("bert-mlm", seed=1)]
    data = [inputs_for(parents[0], seed=s) for s in range(2)]
    fused = fuse(parents, data=data, config=FusionConfig(method="regmean"), progress=False)
    assert fused.cls.predictions.decoder.weight is fused.bert.embeddings.word_embeddings.weight
    average = (
        parents[0].bert.embeddings.word_embeddings.weight + parents[1].bert.embeddings.word_embeddings.weight
    ) / 2
    torch.testing.assert_close(fused.cls.predictions.decoder.weight, average, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(
        fused.cls.predictions.transform.dense.weight, parents[0].cls.predictions.transform.dense.weight
    )


@pytest.mark.parametrize("method", ["regmean", "interpolate"])
def test_ot_alignment_first_merges_a_permuted_copy_back_into_its_parent(pair, batches, method):
    parent = pair[0]
    permuted = permute_model(parent, seed=4)
    inputs = inputs_for(parent, seed=11)
    config = FusionConfig(method=method, align="ot", cost="weights")
    fused = fuse([parent, permuted], data=batches, config=config, progress=False)
    unaligned = fuse([parent, permuted], data=batches, config=FusionConfig(method=method), progress=False)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4
    assert relative_error(outputs(unaligned, inputs), outputs(parent, inputs)) > 0.1


def test_aligned_regmean_merges_a_copy_of_another_width_back_into_the_anchor(batches):
    from test_heterogeneous import widen  # a copy with every space doubled by duplicating units (Net2Net)

    anchor = build("bert-seqcls")
    wide = widen(anchor, "bert-seqcls", "heads")
    inputs = inputs_for(anchor, seed=5)
    fused = fuse([anchor, wide], data=batches, config=FusionConfig(method="regmean", align="ot"), progress=False)
    assert fused.config.intermediate_size == 48
    assert relative_error(outputs(fused, inputs), outputs(anchor, inputs)) < 1e-4


def test_task_arithmetic_aligns_a_permuted_base_onto_the_anchor():
    tuned = build("bert-seqcls", seed=3)
    parents = [finetune_of(tuned, seed=1, scale=0.02), finetune_of(tuned, seed=2, scale=0.02)]
    base = permute_model(tuned, seed=8)
    inputs = inputs_for(tuned, seed=2)
    config = FusionConfig(method="task-arithmetic", align="ot", cost="weights", scale=0.5)
    result = fuse_with_diagnostics(parents, config=config, base=base, progress=False)
    assert set(result.maps) == {1, 2}  # parent 1 and the base (index 2)
    average = fuse(parents, config=FusionConfig(method="interpolate"), progress=False)
    # with scale 1/2 and two parents, an aligned base cancels out: the result is the average of the parents
    assert relative_error(outputs(result.model, inputs), outputs(average, inputs)) < 1e-4
    unaligned = fuse(parents, config=FusionConfig(method="task-arithmetic", scale=0.6), base=base, progress=False)
    assert relative_error(outputs(unaligned, inputs), outputs(average, inputs)) > 0.1


def shifted_by(base: T.PreTrainedModel, shifts: list[float], seed: int = 0) -> list[T.PreTrainedModel]:
    """Parents base + s_k · D with one random direction D: every entry moves the same way in every parent."""
    direction = finetune_of(base, seed=seed)
    children = []
    for shift in shifts:
        child = copy.deepcopy(base)
        with torch.no_grad():
            for param, moved, start in zip(child.parameters(), direction.parameters(), base.parameters(), strict=True):
                param.copy_(start.double() + shift * (moved.double() - start.double()))
        children.append(child)
    return children


def test_ties_without_trimming_or_sign_conflict_is_task_arithmetic_of_the_mean():
    tuned = build("bert-seqcls", seed=5)
    base = bare_encoder_of(tuned)  # the classifier has no ancestor: interpolated, as for plain task arithmetic
    parents = shifted_by(tuned, [1.0, 0.5, 2.0])
    weights = [1.0, 3.0, 0.5]
    ties = FusionConfig(method="task-arithmetic", task_vector="ties", scale=0.9, weights=weights)
    # no entry is trimmed and every parent agrees, so the disjoint mean is Σ_k w_k τ_k / 3
    plain = FusionConfig(method="task-arithmetic", scale=0.3, weights=weights)
    merged = fuse(parents, config=ties, base=base, progress=False)
    expected = fuse(parents, config=plain, base=base, progress=False)
    for (name, a), (_, b) in zip(merged.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    head = sum(w * p.classifier.weight.double() for w, p in zip(np.array(weights) / 4.5, parents, strict=True))
    torch.testing.assert_close(merged.classifier.weight.double(), head, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("weights", "mean"), [(None, 2.0), ([0.5, 1.0, 1.0], 1.25), ([1.0, 5.0, 1.0], -5.0)])
def test_ties_elects_the_sign_of_the_sum_and_averages_only_the_agreeing_entries(weights, mean):
    base = build("vit-cls", seed=2)
    parents = []
    for delta in (3.0, -1.0, 1.0):
        child = copy.deepcopy(base)
        with torch.no_grad():
            for param in child.parameters():
                param.add_(delta)
        parents.append(child)
    # w τ = (3, −1, 1): sign +, mean of 3 and 1 = 2; (1.5, −1, 1): +, 1.25; (3, −5, 1): sign −, the lone −5
    config = FusionConfig(method="task-arithmetic", task_vector="ties", scale=0.5, weights=weights)
    merged = fuse(parents, config=config, base=base, progress=False)
    for (name, a), (_, b) in zip(merged.named_parameters(), base.named_parameters(), strict=True):
        torch.testing.assert_close(a.double(), b.double() + 0.5 * mean, rtol=0, atol=2e-6, msg=name)


def test_ties_merge_on_hand_built_vectors_with_a_tie_a_draw_and_trimming():
    vectors = [torch.tensor(v, dtype=torch.float64) for v in ([3, -2, 0.5, 4], [-1, 1, 0.5, -4], [1, 1, -2, 0])]
    # density 1: columns (3, −1, 1) → 2; (−2, 1, 1) sums to 0, no sign → 0; (½, ½, −2) → −2; (4, −4, 0) → 0
    assert ties_merge(vectors, 1.0).tolist() == [2.0, 0.0, -2.0, 0.0]
    # density ½ keeps the 2 largest magnitudes of 4, and any tied with the 2nd: vector 0 keeps 3, 4; vector 1
    # keeps −4 and both entries of magnitude 1; vector 2 keeps −2 and both 1s
    trimmed = ties_merge(vectors, 0.5)
    # columns: (3, −1, 1) → 2; (0, 1, 1) → 1; (0, 0, −2) → −2; (4, −4, 0) → 0
    assert trimmed.tolist() == [2.0, 1.0, -2.0, 0.0]


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5])
def test_ties_keeps_the_ceil_of_density_times_size_largest_entries_of_each_tensor(density):
    base = build("bert-seqcls", seed=4)
    child = finetune_of(base, seed=9)
    # two identical parents agree everywhere: the merged vector is the trimmed task vector itself
    config = FusionConfig(method="task-arithmetic", task_vector="ties", density=density)
    merged = fuse([child, child], config=config, base=base, progress=False)
    for name, param in merged.named_parameters():
        start, tuned = base.get_parameter(name), child.get_parameter(name)
        vector = (tuned.double() - start.double()).flatten()
        kept = (param != start).flatten()
        # ⌈density · n⌉, and 0.3 · 10 counts as 3: the rounding in ties_merge
        assert int(kept.sum()) == math.ceil(round(density * vector.numel(), 6)), name
        assert vector.abs()[kept].min() > vector.abs()[~kept].max(), name  # the largest magnitudes
        assert torch.equal(param.flatten()[kept], tuned.flatten()[kept]), name


def test_dare_with_density_one_is_plain_task_arithmetic_exactly():
    base = build("bert-seqcls", seed=5)
    parents = [finetune_of(base, seed=s) for s in (1, 2, 3)]
    options = dict(method="task-arithmetic", scale=0.7, weights=[1.0, 0.5, 2.0])
    dare = fuse(parents, config=FusionConfig(**options, task_vector="dare", seed=3), base=base, progress=False)
    plain = fuse(parents, config=FusionConfig(**options), base=base, progress=False)
    for (name, a), (_, b) in zip(dare.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_dare_keeps_a_density_fraction_rescaled_by_its_inverse_and_drops_the_rest_to_the_base():
    base = build("bert-seqcls", seed=5)
    child = finetune_of(base, seed=1)
    # the second parent is the base itself (a zero task vector), so the merge is base + DARE(τ_child)
    config = FusionConfig(method="task-arithmetic", task_vector="dare", density=0.25, seed=7)
    merged = fuse([child, copy.deepcopy(base)], config=config, base=base, progress=False)
    kept = total = 0
    for name, param in merged.named_parameters():
        start, tuned = base.get_parameter(name).double(), child.get_parameter(name).double()
        mask = param.double() != start
        rescaled = (start + (tuned - start) / 0.25).float()
        assert torch.equal(param[mask], rescaled[mask]), name
        kept, total = kept + int(mask.sum()), total + mask.numel()
    assert abs(kept / total - 0.25) < 0.02  # ~35k entries: the binomial spread is 0.0023
    # unbiased: averaged over seeds, the dropped-and-rescaled vector approaches the vector itself
    vector = torch.linspace(-1.0, 2.0, 2000, dtype=torch.float64)
    average = sum(dare_vector(vector, 0.25, seed, 0, "x") for seed in range(200)) / 200
    assert relative_error(average, vector) < 0.2 and abs(float((average - vector).mean())) < 0.02
    assert relative_error(dare_vector(vector, 0.25, 0, 0, "x"), vector) > 1.0  # a single draw is far from it


def test_dare_masks_are_reproducible_per_seed_and_change_with_it():
    base = build("bert-seqcls", seed=5)
    parents = [finetune_of(base, seed=s) for s in (1, 2)]

    def merged(seed: int) -> dict[str, torch.Tensor]:
        config = FusionConfig(method="task-arithmetic", task_vector="dare", density=0.5, seed=seed)
        return dict(fuse(parents, config=config, base=base, progress=False).named_parameters())

    first, again, other = merged(3), merged(3), merged(4)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert all(not torch.equal(first[name], other[name]) for name in first if first[name].numel() > 8)
    # each (parent, parameter) draws its own mask: the same seed gives different masks to different tensors
    ones = torch.ones(1000, dtype=torch.float64)
    masks = [dare_vector(ones, 0.5, 3, k, name) for k, name in ((0, "a"), (1, "a"), (0, "b"))]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert torch.equal(masks[0], dare_vector(ones, 0.5, 3, 0, "a"))


def test_task_vector_options_are_refused_outside_task_arithmetic_and_round_trip():
    with pytest.raises(FusionError, match="use method='task-arithmetic' or task_vector='plain'"):
        FusionConfig(method="interpolate", task_vector="ties")
    with pytest.raises(FusionError, match="use method='task-arithmetic' or task_vector='plain'"):
        FusionConfig(method="regmean", task_vector="dare", density=0.5)
    with pytest.raises(FusionError, match="density=0.5 is only read by task_vector='ties' or 'dare'"):
        FusionConfig(method="task-arithmetic", density=0.5)
    with pytest.raises(FusionError, match="seed=3 only seeds the drop masks of task_vector='dare'"):
        FusionConfig(method="task-arithmetic", task_vector="ties", seed=3)
    for density in (0, 1.5, -0.1):
        with pytest.raises(FusionError, match=r"FusionConfig.density must lie in \(0, 1\]"):
            FusionConfig(method="task-arithmetic", task_vector="ties", density=density)
    with pytest.raises(FusionError, match="is not one of"):
        FusionConfig(method="task-arithmetic", task_vector="magnitude")
    config = FusionConfig(method="task-arithmetic", task_vector="dare", density=0.3, seed=11)
    assert FusionConfig.from_dict(yaml.safe_load(config.to_json())) == config


def test_same_base_methods_fail_early_with_the_fix_in_the_message(pair):
    with pytest.raises(FusionError, match="shared ancestor"):
        fuse(list(pair), config=FusionConfig(method="task-arithmetic"), progress=False)
    with pytest.raises(FusionError, match="only used by method='task-arithmetic'"):
        FusionConfig(method="regmean", base="some/model")
    with pytest.raises(FusionError, match="use method='ot'"):
        FusionConfig(method="vanilla", align="ot")
    with pytest.raises(FusionError, match=r"regmean_alpha must lie in \[0, 1\]"):
        FusionConfig(method="regmean", regmean_alpha=1.5)
    with pytest.raises(EmptyAlignmentDataError, match="method=regmean needs alignment data"):
        fuse(list(pair), config=FusionConfig(method="regmean"), progress=False)
    wide = build("bert-seqcls", seed=1, intermediate_size=64)
    with pytest.raises(IncompatibleModelsError, match="needs parents of one shape"):
        fuse([pair[0], wide], config=FusionConfig(method="interpolate"), progress=False)
    with pytest.raises(IncompatibleModelsError, match="not fine-tuned from this base"):
        fuse(list(pair), config=FusionConfig(method="task-arithmetic"), base=wide, progress=False)


def test_cli_task_arithmetic_with_a_base_checkpoint(tmp_path):
    base = build("bert-seqcls", seed=5)
    paths = []
    for name, model in (("base", base), ("a", finetune_of(base, 1)), ("b", finetune_of(base, 2))):
        model.save_pretrained(tmp_path / name)
        paths.append(str(tmp_path / name))
    out = tmp_path / "merged"
    args = ["fuse", *paths[1:], "--out", str(out), "--method", "task-arithmetic", "--base", paths[0], "--scale", "0"]
    assert main([*args, "--task-vector", "dare", "--density", "0.5", "--seed", "2", "-q"]) == 0
    saved = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert saved["method"] == "task-arithmetic" and saved["base"] == paths[0] and saved["scale"] == 0.0
    assert (saved["task_vector"], saved["density"], saved["seed"]) == ("dare", 0.5, 2)
    merged = T.BertForSequenceClassification.from_pretrained(out).eval()
    inputs = inputs_for(base)
    assert relative_error(outputs(merged, inputs), outputs(base, inputs)) < 1e-6


def test_card_says_how_ties_and_dare_changed_the_task_vectors():
    from hf_otfusion.output.card import _task_arithmetic_text

    plain = _task_arithmetic_text({"scale": 0.7})
    ties = _task_arithmetic_text({"scale": 0.7, "task_vector": "ties", "density": 0.2})
    dare = _task_arithmetic_text({"scale": 0.7, "task_vector": "dare", "density": 0.5, "seed": 3})
    assert plain == "How: task arithmetic, base + 0.7 x the sum of the parents' task vectors."
    assert "disjoint mean" in ties and "largest 0.2 fraction" in ties
    assert "probability 0.5" in dare and "1/0.5" in dare and "seed 3" in dare
