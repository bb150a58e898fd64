"""Specs are strict data: every parameter bound exactly once, unknown keys and unknown classes rejected."""

from __future__ import annotations

import copy

import pytest
import transformers as T
import yaml
from conftest import FAMILIES, build

from hf_otfusion import available_specs, load_spec
from hf_otfusion.engine.plan import resolve_plan
from hf_otfusion.engine.spec import AlignmentSpec
from hf_otfusion.errors import SpecError, UncoveredParameterError, UnsupportedArchitectureError


def _raw(model_type: str) -> dict:
    from importlib import resources

    return yaml.safe_load((resources.files("hf_otfusion.engine") / "specs" / f"{model_type}.yaml").read_text())


def test_shipped_specs():
    assert available_specs() == ["bert", "deit", "roberta", "vit"]


def test_every_listed_architecture_resolves_with_full_coverage(family):
    model = build(family)
    plan = resolve_plan(model)
    assert set(plan.parameters) == {name for name, _ in model.named_parameters()}
    assert plan.spaces["residual"].size == 32
    assert plan.spaces["qk.1"].num_heads == 4 and plan.spaces["qk.1"].head_dim == 8
    assert list(plan.spaces)[:5] == ["residual", "heads.0", "qk.0", "vo.0", "mlp.0"]
    assert all(plan.hooks.get(space) for space in plan.spaces if not space.startswith("heads"))


def test_spec_lists_exactly_the_supported_classes():
    listed = {name for model_type in available_specs() for name in load_spec(model_type).architectures}
    assert {model_class.__name__ for model_class, _ in FAMILIES.values()} | {"ViTModel"} == listed


def test_unknown_keys_are_rejected():
    raw = _raw("bert")
    raw["spaces"]["residual"]["sise"] = "hidden_size"
    with pytest.raises(SpecError, match=r"space 'residual': unknown key\(s\) \['sise'\]"):
        AlignmentSpec.from_dict(raw)
    raw = _raw("bert")
    raw["hook"] = {}
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['hook'\]"):
        AlignmentSpec.from_dict(raw)


def test_modality_is_required_and_is_text_or_image():
    raw = _raw("bert")
    del raw["modality"]
    with pytest.raises(SpecError, match=r"missing key\(s\) \['modality'\]"):
        AlignmentSpec.from_dict(raw)
    raw["modality"] = "audio"
    with pytest.raises(SpecError, match=r"modality must be one of \['image', 'text'\].*got 'audio'"):
        AlignmentSpec.from_dict(raw)


def test_undeclared_space_is_rejected():
    raw = _raw("vit")
    raw["parameters"]["classifier.weight"] = [None, "in:residul"]
    with pytest.raises(SpecError, match="undeclared space 'residul'"):
        AlignmentSpec.from_dict(raw)


def test_uncovered_parameter_is_named():
    raw = copy.deepcopy(_raw("bert"))
    del raw["parameters"]["classifier.weight"]
    spec = AlignmentSpec.from_dict(raw)
    with pytest.raises(UncoveredParameterError, match=r"classifier\.weight.*Add an entry"):
        resolve_plan(build("bert-seqcls"), spec)


def test_parameter_bound_twice_is_named():
    raw = _raw("bert")
    raw["parameters"]["bert.pooler.dense.bias"] = ["pooler"]
    spec = AlignmentSpec.from_dict(raw)
    with pytest.raises(UncoveredParameterError, match=r"bert\.pooler\.dense\.bias is bound twice"):
        resolve_plan(build("bert-seqcls"), spec)


def test_wrong_axis_size_is_caught():
    raw = _raw("bert")
    raw["parameters"]["classifier.weight"] = ["in:pooler", None]
    with pytest.raises(SpecError, match=r"classifier\.weight axis 0 has 3 units"):
        resolve_plan(build("bert-seqcls"), AlignmentSpec.from_dict(raw))


def test_class_outside_the_spec_is_unsupported():
    model = T.BertForTokenClassification(T.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=8))  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="BertForTokenClassification is not covered"):
        resolve_plan(model)


def test_model_type_without_spec_is_unsupported():
    model = T.GPT2Model(T.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=8))
    with pytest.raises(UnsupportedArchitectureError, match=r"No alignment spec for model_type 'gpt2'.*write a spec"):
        resolve_plan(model)


def test_spec_file_given_by_path_is_used(tmp_path):
    raw = _raw("vit")
    raw["architectures"] = ["ViTForImageClassification"]
    path = tmp_path / "my_vit.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    assert spec.architectures == ("ViTForImageClassification",)
    with pytest.raises(UnsupportedArchitectureError):
        resolve_plan(build("vit-base"), spec)
