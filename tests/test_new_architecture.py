"""A new architecture is a spec file: RoBERTa ships as `specs/roberta.yaml` alone and passes BERT's invariants.

The shared invariants (full coverage, a permuted copy fuses back exactly, permutations preserve the function) run
over the `roberta-*` families in conftest; these tests check what is RoBERTa's own and the task knowledge that
comes from the spec and transformers' auto tables rather than from code.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import build, inputs_for, outputs, relative_error
from huggingface_hub import ModelCard

from hf_otfusion import FusionConfig, fuse, load_spec
from hf_otfusion.cli import main
from hf_otfusion.engine.plan import resolve_plan
from hf_otfusion.engine.tasks import modality_of, task_of, trainable_sibling
from hf_otfusion.output.card import pipeline_and_auto_class
from hf_otfusion.output.provenance import Provenance


@pytest.fixture
def two_robertas(tmp_path):
    """Two independently initialised tiny RobertaForSequenceClassification checkpoints, saved."""
    paths = [tmp_path / "a", tmp_path / "b"]
    for seed, path in enumerate(paths):
        build("roberta-seqcls", seed=seed).save_pretrained(path)
    return [str(p) for p in paths]


def test_roberta_classifier_has_no_pooler_and_its_head_reads_the_residual_stream():
    plan = resolve_plan(build("roberta-seqcls"))
    assert not any("pooler" in name for name in plan.parameters)  # built with add_pooling_layer=False
    assert "pooler" not in plan.spaces and plan.spaces["classifier"].size == 32
    assert [a.space if a else None for a in plan.parameters["classifier.dense.weight"]] == ["classifier", "residual"]
    assert plan.parameters["classifier.out_proj.weight"][0] is None  # labels are not aligned
    assert plan.hooks["classifier"] == ["classifier.dense"]
    assert "pooler" in resolve_plan(build("roberta-base")).spaces  # the bare encoder keeps its pooler


def test_spec_keys_replace_the_code_tables():
    assert [load_spec(t).modality for t in ("bert", "roberta", "vit", "deit")] == ["text", "text", "image", "image"]
    assert load_spec("roberta").space_kinds == ("residual", "heads", "qk", "vo", "mlp", "pooler", "classifier")
    assert modality_of("gpt2") == "text"  # no spec: text, as before
    expected = {
        ("RobertaForSequenceClassification", "roberta"): ("text-classification", "AutoModelForSequenceClassification"),
        ("RobertaForMaskedLM", "roberta"): ("fill-mask", "AutoModelForMaskedLM"),
        ("RobertaModel", "roberta"): ("feature-extraction", "AutoModel"),
        ("BertForSequenceClassification", "bert"): ("text-classification", "AutoModelForSequenceClassification"),
        ("BertForMaskedLM", "bert"): ("fill-mask", "AutoModelForMaskedLM"),
        ("BertModel", "bert"): ("feature-extraction", "AutoModel"),
        ("ViTForImageClassification", "vit"): ("image-classification", "AutoModelForImageClassification"),
        ("ViTModel", "vit"): ("image-feature-extraction", "AutoModel"),
        ("DeiTForImageClassificationWithTeacher", "deit"): ("image-classification", "AutoModelForImageClassification"),
        ("DeiTModel", "deit"): ("image-feature-extraction", "AutoModel"),
    }
    for (architecture, model_type), tags in expected.items():
        assert pipeline_and_auto_class(architecture, model_type) == tags
    assert task_of("RobertaForSequenceClassification", "roberta").classifier
    assert not task_of("RobertaForMaskedLM", "roberta").classifier
    assert trainable_sibling("DeiTForImageClassificationWithTeacher", "deit") == "DeiTForImageClassification"


@pytest.mark.parametrize("family", ["bert-seqcls", "bert-mlm", "vit-cls", "deit-teacher", "roberta-seqcls"])
def test_layer_groups_come_from_the_layer_patterns(family):
    plan = resolve_plan(build(family))
    groups = [plan.parameter_group(name) for name in plan.parameters]
    assert set(groups) == {"embeddings", "layer 0", "layer 1", "head"}
    assert all(plan.parameter_group(n) == "embeddings" for n in plan.parameters if ".embeddings." in f".{n}")
    assert all(plan.parameter_group(n) == "head" for n in plan.parameters if n.startswith(("classifier", "lm_head")))


def test_two_independent_robertas_fuse_into_a_loadable_classifier(two_robertas, tmp_path):
    parents = [T.RobertaForSequenceClassification.from_pretrained(p) for p in two_robertas]
    data = [inputs_for(parents[0], seed=s) for s in range(3)]
    fused = fuse(parents, data=data, config=FusionConfig(cost="activations"), progress=False)
    fused.save_pretrained(tmp_path / "fused")
    loaded = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "fused").eval()
    assert type(loaded) is T.RobertaForSequenceClassification
    inputs = inputs_for(parents[0], seed=7)
    assert torch.isfinite(outputs(loaded, inputs)).all()
    assert relative_error(outputs(loaded, inputs), outputs(fused, inputs)) < 1e-6


def test_roberta_cli_fuse_writes_the_card_from_spec_and_auto_tables(two_robertas, tmp_path):
    out = tmp_path / "fused"
    assert main(["fuse", *two_robertas, "--out", str(out), "--cost", "weights", "--solver", "exact", "-q"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["pipeline_tag"] == "text-classification"
    assert "AutoModelForSequenceClassification" in card.text
    assert "| parent | layer | residual | heads | qk | vo | mlp | classifier |" in card.text  # spec order
    groups = {row["group"] for row in Provenance.load(out).readiness["layers"]}
    assert groups == {"embeddings", "layer 0", "layer 1", "head"}
    assert type(T.AutoModelForSequenceClassification.from_pretrained(out)) is T.RobertaForSequenceClassification
