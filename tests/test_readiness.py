"""The merge-readiness report: distances before and after alignment, and the method it recommends."""

from __future__ import annotations

import json

import pytest
from conftest import build, inputs_for
from test_merging import finetune_of

from hf_otfusion import FusionConfig, fuse_with_diagnostics, permute_model, readiness_report
from hf_otfusion.cli import main
from hf_otfusion.methods.readiness import ReadinessReport


@pytest.fixture(scope="module")
def parent():
    return build("bert-seqcls", seed=0)


def test_permuted_copy_is_far_before_alignment_and_identical_after(parent):
    data = [inputs_for(parent, seed=s) for s in range(3)]
    report = readiness_report([parent, permute_model(parent, seed=5)], data=data, progress=False)
    (overall,) = report.overall
    assert overall.relative_l2_before > 1.0 and abs(overall.cosine_before) < 0.2
    assert 0.3 < overall.sign_disagreement_before < 0.7
    assert overall.relative_l2_after < 1e-6 and overall.cosine_after > 1 - 1e-9
    assert overall.sign_disagreement_after == 0.0
    assert {row.group for row in report.layers} == {"embeddings", "layer 0", "layer 1", "head"}
    for row in report.layers:
        assert row.relative_l2_after < 1e-6, row.group
    assert report.identity_fraction[1] < 0.2  # random permutations leave few units in place
    correlation = report.correlation[1]
    assert correlation["after"] > 1 - 1e-6 and correlation["before"] < 0.5
    assert report.recommendation == "ot" and "permuted" in report.reason
    assert ReadinessReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report  # as the card stores it


def test_finetunes_of_one_base_get_a_same_base_method(parent):
    report = readiness_report([finetune_of(parent, 1, scale=0.02), finetune_of(parent, 2, scale=0.02)], progress=False)
    (overall,) = report.overall
    assert report.identity_fraction[1] == 1.0  # OT leaves every unit where it is
    assert overall.relative_l2_after == pytest.approx(overall.relative_l2_before, rel=1e-9)
    assert overall.relative_l2_before < 0.2 and overall.cosine_before > 0.95
    assert report.recommendation == "same-base"
    assert report.methods == ["interpolate", "task-arithmetic", "regmean"]


def test_independently_trained_parents_get_ot(parent):
    report = readiness_report([parent, build("bert-seqcls", seed=1)], progress=False)
    (overall,) = report.overall
    assert overall.relative_l2_after < 0.95 * overall.relative_l2_before
    assert overall.cosine_after > overall.cosine_before + 0.05
    assert report.recommendation == "ot"


def test_report_reuses_the_maps_of_a_fusion_and_serialises(parent):
    parents = [parent, permute_model(parent, seed=2), finetune_of(parent, 3, scale=0.02)]
    config = FusionConfig(cost="weights")
    result = fuse_with_diagnostics(parents, config=config, progress=False)
    reused = readiness_report(parents, config=config, maps=result.maps, progress=False)
    fresh = readiness_report(parents, config=config, progress=False)
    assert [row.parent for row in reused.overall] == [1, 2]
    assert reused.to_dict() == fresh.to_dict()
    assert reused.recommendation == "ot"  # parent 1 is permuted: one parent that needs alignment decides
    json.dumps(reused.to_dict())
    markdown = reused.to_markdown()
    assert "**Recommendation: `ot`**" in markdown
    assert markdown.count("| 1 | layer ") == 2 and markdown.count("| 2 | layer ") == 2


def test_cli_inspect_prints_the_report_and_writes_json(parent, tmp_path, capsys):
    parent.save_pretrained(tmp_path / "a")
    finetune_of(parent, 4, scale=0.02).save_pretrained(tmp_path / "b")
    report = tmp_path / "report.json"
    assert main(["inspect", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(report), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "**Recommendation: `same-base`**" in printed and "| 1 | layer 1 |" in printed
    saved = json.loads(report.read_text())
    assert saved["recommendation"] == "same-base" and saved["alignment"]["cost"] == "weights"


def test_cli_inspect_reads_data_as_fuse_does_a_dataset_dict_on_its_train_split(parent, tmp_path):
    from datasets import Dataset, DatasetDict

    parent.save_pretrained(tmp_path / "a")
    permute_model(parent, seed=2).save_pretrained(tmp_path / "b")
    rows = {key: value.numpy() for key, value in inputs_for(parent, batch=6).items()}
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}).save_to_disk(tmp_path / "dd")
    report = tmp_path / "report.json"
    args = ["inspect", str(tmp_path / "a"), str(tmp_path / "b"), "--data", str(tmp_path / "dd"), "-q"]
    assert main([*args, "--json", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert saved["alignment"]["cost"] == "activations" and saved["recommendation"] == "ot"
    assert main([*args, "--split", "dev"]) == 2  # named splits are checked as for fuse
