"""Bad input fails early with a specific exception whose message names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import build, inputs_for

from hf_otfusion import (
    DepthMismatchError,
    EmptyAlignmentDataError,
    FusionConfig,
    FusionError,
    IncompatibleModelsError,
    LabelSetMismatchError,
    ModelTypeMismatchError,
    NonFiniteWeightsError,
    VocabularyMismatchError,
    fuse,
)


def test_different_model_types():
    with pytest.raises(ModelTypeMismatchError, match=r"different model types \['vit', 'deit'\].*share a model_type"):
        fuse([build("vit-cls"), build("deit-cls")], config=FusionConfig(cost="weights"))


def test_different_depths():
    with pytest.raises(DepthMismatchError, match="Parent 1 has 3 layers but the anchor .* has 2.*same depth"):
        fuse([build("vit-cls"), build("vit-cls", num_hidden_layers=3)], config=FusionConfig(cost="weights"))


def test_different_vocabularies():
    with pytest.raises(VocabularyMismatchError, match="vocabulary of 61 tokens but the anchor has 60.*share one"):
        fuse([build("bert-mlm"), build("bert-mlm", vocab_size=61)], config=FusionConfig(cost="weights"))


def test_different_label_sets():
    other = build("bert-seqcls")
    other.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    with pytest.raises(LabelSetMismatchError, match="predicts labels .*'neg'.*remap the classifier rows"):
        fuse([build("bert-seqcls"), other], config=FusionConfig(cost="weights"))


def test_different_model_classes():
    with pytest.raises(IncompatibleModelsError, match="same model class"):
        fuse([build("vit-cls"), build("vit-base")], config=FusionConfig(cost="weights", anchor=0))


def test_nan_weights():
    broken = build("vit-cls", seed=1)
    with torch.no_grad():
        broken.vit.layers[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"Parent 1 has NaN .* vit\.layers\.1\.mlp\.fc1\.weight"):
        fuse([build("vit-cls"), broken], config=FusionConfig(cost="weights"))


def test_activation_cost_without_data():
    with pytest.raises(EmptyAlignmentDataError, match="needs alignment data.*cost='weights'"):
        fuse([build("vit-cls"), build("vit-cls", seed=1)], data=None)


def test_activation_cost_with_empty_dataset():
    from datasets import Dataset

    empty = Dataset.from_dict({"pixel_values": []})
    with pytest.raises(EmptyAlignmentDataError, match="yielded no usable token"):
        fuse([build("vit-cls"), build("vit-cls", seed=1)], data=empty, progress=False)


def test_activation_cost_with_all_padding():
    parent = build("bert-seqcls")
    inputs = inputs_for(parent)
    inputs["attention_mask"] = torch.zeros_like(inputs["attention_mask"])
    with pytest.raises(EmptyAlignmentDataError):
        fuse([parent, build("bert-seqcls", seed=1)], data=[inputs], progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"solver": "hungarian"}, r"solver='hungarian' is not one of \['exact', 'sinkhorn'\]"),
        ({"reg": 0.0}, "reg must be > 0"),
        ({"weights": [1.0, -1.0]}, "non-negative"),
        ({"weights": [float("nan"), 1.0]}, r"FusionConfig.weights\[0\] must be finite, got nan"),
        ({"reg": "abc"}, r"FusionConfig.reg must be a number, got 'abc' \(str\)"),
        ({"sinkhorn_max_iter": -5}, "FusionConfig.sinkhorn_max_iter must be >= 1, got -5"),
        ({"batch_size": 2.5}, r"FusionConfig.batch_size must be an integer, got 2.5 \(float\)"),
        ({"num_samples": True}, "FusionConfig.num_samples must be an integer or None, got True"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(FusionError, match=message):
        FusionConfig(**kwargs)


def test_config_round_trips_and_rejects_unknown_keys():
    config = FusionConfig(solver="sinkhorn", reg=0.1, weights=[1, 3])
    assert FusionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(FusionError, match=r"Unknown FusionConfig key\(s\) \['regularisation'\]"):
        FusionConfig.from_dict({"regularisation": 0.1})


def test_weights_must_match_the_number_of_parents():
    with pytest.raises(FusionError, match="3 entries for 2 parents"):
        fuse(
            [build("vit-cls"), build("vit-cls", seed=1)],
            config=FusionConfig(cost="weights", weights=[1, 1, 1]),
        )


def test_single_parent():
    with pytest.raises(FusionError, match="at least 2 parents"):
        fuse([build("vit-cls")], config=FusionConfig(cost="weights"))


def test_the_readme_error_table_lists_every_fusion_error_with_its_exit_code():
    import inspect
    from pathlib import Path

    import hf_otfusion
    from hf_otfusion import errors

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, FusionError):
            row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}`")), None)
            assert row is not None, f"README error table has no row for {name}"
            assert row.split(" | ")[-2] in ("2", "3"), row  # the exit column
            assert getattr(hf_otfusion, name) is cls  # and it is public
