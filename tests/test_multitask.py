"""Multi-task merging: one merged encoder for fine-tunes with different heads, each task keeping its own head."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import build, inputs_for
from huggingface_hub import ModelCard
from test_merging import bare_encoder_of, finetune_of

from hf_otfusion import FusionConfig, fuse, merge_tasks
from hf_otfusion.errors import (
    DepthMismatchError,
    IncompatibleModelsError,
    InvalidConfigError,
    LabelSetMismatchError,
    NonFiniteWeightsError,
)
from hf_otfusion.multitask import encoder_view

LABELS = {"nli": ["entailment", "neutral", "contradiction"], "stars": ["1", "2", "3", "4", "5"]}


def task_model(base: T.BertForSequenceClassification, labels: list[str], seed: int) -> T.BertForSequenceClassification:
    """A stand-in for a fine-tune for a task: the base's encoder with a small update, a new random head."""
    config = copy.deepcopy(base.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    model = T.BertForSequenceClassification(config).eval()
    model.bert.load_state_dict(finetune_of(base, seed=seed).bert.state_dict())
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def tuned():
    return build("bert-seqcls", seed=5)


@pytest.fixture(scope="module")
def tasks(tuned):
    return [task_model(tuned, LABELS["nli"], seed=1), task_model(tuned, LABELS["stars"], seed=2)]


def encoder_of(model: T.PreTrainedModel) -> dict[str, torch.Tensor]:
    return {name: param for name, param in model.bert.named_parameters()}


def test_each_task_keeps_its_head_byte_for_byte_and_shares_one_encoder(tasks):
    result = merge_tasks(tasks, FusionConfig(method="interpolate"), task_names=["nli", "stars"], progress=False)
    assert result.task_names == ["nli", "stars"]
    assert result.heads == {"nli": ["classifier.weight", "classifier.bias"], "stars": ["classifier.weight",
                                                                                        "classifier.bias"]}  # fmt: skip
    for (name, model), parent in zip(result.models.items(), tasks, strict=True):
        assert type(model) is T.BertForSequenceClassification and model is not parent
        assert model.config.id2label == parent.config.id2label and model.config.num_labels == parent.config.num_labels
        for head in result.heads[name]:
            assert torch.equal(model.get_parameter(head), parent.get_parameter(head)), (name, head)
    first, second = (encoder_of(model) for model in result.models.values())
    assert first.keys() == second.keys() and len(first) == len(list(tasks[0].bert.parameters()))
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert first[name].data_ptr() != second[name].data_ptr()  # each task model owns its tensors
    # the parents the caller holds are unchanged
    assert not torch.equal(encoder_of(tasks[0])["encoder.layer.0.output.dense.weight"],
                           first["encoder.layer.0.output.dense.weight"])  # fmt: skip


def test_interpolated_encoder_is_the_weighted_average_of_the_parents(tasks):
    weights = [1.0, 3.0]
    result = merge_tasks(tasks, FusionConfig(method="interpolate", weights=weights), progress=False)
    merged = encoder_of(next(iter(result.models.values())))
    parents = [encoder_of(model) for model in tasks]
    for name, tensor in merged.items():
        expected = 0.25 * parents[0][name].double() + 0.75 * parents[1][name].double()
        assert (tensor.double() - expected).abs().max() <= 1e-6, name
    # and the logits are each task's own head on the merged encoder
    inputs = inputs_for(tasks[0])
    for model, parent in zip(result.models.values(), tasks, strict=True):
        with torch.no_grad():
            logits = model(**inputs).logits
            pooled = model.bert(**inputs).pooler_output
        assert logits.shape[-1] == parent.config.num_labels
        torch.testing.assert_close(logits, parent.classifier(pooled), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bare_base", [True, False])
def test_task_arithmetic_encoder_is_base_plus_scaled_task_vectors(tuned, tasks, bare_base):
    base = bare_encoder_of(tuned) if bare_base else tuned  # a 3-label classifier base: its head is ignored
    config = FusionConfig(method="task-arithmetic", scale=0.4, weights=[1.0, 0.5])
    result = merge_tasks(tasks, config, base=base, progress=False)
    start = {name: param.double() for name, param in (base if bare_base else base.bert).named_parameters()}
    parents = [encoder_of(model) for model in tasks]
    for model in result.models.values():
        for name, tensor in encoder_of(model).items():
            vectors = [w * (p[name].double() - start[name]) for w, p in zip(config.weights, parents, strict=True)]
            assert (tensor.double() - (start[name] + 0.4 * sum(vectors))).abs().max() <= 1e-6, name
    for model, parent in zip(result.models.values(), tasks, strict=True):
        assert torch.equal(model.classifier.weight, parent.classifier.weight)


def test_ties_options_reach_the_encoder_merge(tuned, tasks):
    base = bare_encoder_of(tuned)
    ties = merge_tasks(tasks, FusionConfig(method="task-arithmetic", task_vector="ties", density=0.2), base=base,
                       progress=False)  # fmt: skip
    plain = merge_tasks(tasks, FusionConfig(method="task-arithmetic"), base=base, progress=False)
    name = "encoder.layer.1.intermediate.dense.weight"
    trimmed = encoder_of(next(iter(ties.models.values())))[name]
    moved = (trimmed != base.get_parameter(name)).float().mean().item()
    assert 0.2 <= moved <= 0.45  # each vector keeps 20 % of the entries; their union is what moves
    assert not torch.equal(trimmed, encoder_of(next(iter(plain.models.values())))[name])


def test_regmean_measures_each_parent_on_its_own_data(tasks):
    own = [[inputs_for(model, seed=s + 10 * k) for s in range(6)] for k, model in enumerate(tasks)]
    result = merge_tasks(tasks, FusionConfig(method="regmean"), data=own, progress=False)
    swapped = merge_tasks(tasks, FusionConfig(method="regmean"), data=own[::-1], progress=False)
    same = merge_tasks(tasks, FusionConfig(method="regmean"), data=[own[0], own[0]], progress=False)
    name = "encoder.layer.0.intermediate.dense.weight"
    merged = [encoder_of(next(iter(r.models.values())))[name] for r in (result, swapped, same)]
    assert not torch.allclose(merged[0], merged[1], atol=1e-4) and not torch.allclose(merged[0], merged[2], atol=1e-4)
    # the same data for both parents is what fuse's RegMean does on that data (the head is not merged here)
    reference = fuse([encoder_view(model) for model in tasks], data=own[0], config=FusionConfig(method="regmean"),
                     progress=False)  # fmt: skip
    torch.testing.assert_close(merged[2], reference.get_parameter(name), rtol=0, atol=1e-6)
    for model, parent in zip(result.models.values(), tasks, strict=True):
        assert torch.equal(model.classifier.bias, parent.classifier.bias)
    with pytest.raises(InvalidConfigError, match="one entry per parent"):
        merge_tasks(tasks, FusionConfig(method="regmean"), data=own[0], progress=False)


def test_written_tasks_load_with_their_labels_and_cards_parse(tmp_path, tuned, tasks):
    sources = []
    for name, model in zip(("nli-model", "stars-model"), tasks, strict=True):
        model.save_pretrained(tmp_path / name)
        sources.append(str(tmp_path / name))
    out = tmp_path / "merged"
    result = merge_tasks(sources, FusionConfig(method="task-arithmetic", scale=0.5), base=bare_encoder_of(tuned),
                         out=out, progress=False)  # fmt: skip
    assert result.out == out and result.task_names == ["nli-model", "stars-model"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "nli-model", "stars-model"]
    overview = (out / "README.md").read_text()
    assert "[nli-model](nli-model/)" in overview and "[stars-model](stars-model/)" in overview
    loaded = []
    for name, parent in zip(result.task_names, tasks, strict=True):
        model = T.AutoModelForSequenceClassification.from_pretrained(out / name).eval()
        assert type(model) is T.BertForSequenceClassification
        assert model.config.num_labels == parent.config.num_labels and model.config.id2label == parent.config.id2label
        assert torch.equal(model.classifier.weight, parent.classifier.weight)
        card = ModelCard.load(out / name / "README.md")
        assert card.data.pipeline_tag == "text-classification" and "multi-task" in card.data.tags
        assert f"Task **{name}** of a multi-task merge" in card.text and "task arithmetic" in card.text
        assert all(source in card.text for source in sources)
        assert (out / name / "fusion_config.yaml").is_file()
        loaded.append(model)
    for (key, a), (_, b) in zip(encoder_of(loaded[0]).items(), encoder_of(loaded[1]).items(), strict=True):
        assert torch.equal(a, b), key
    with pytest.raises(Exception, match="exists and is not empty"):
        merge_tasks(sources, FusionConfig(method="interpolate"), out=out, progress=False)


def test_task_names_default_unique_and_are_checked(tasks):
    result = merge_tasks([tasks[0], tasks[0]], FusionConfig(method="interpolate"), progress=False)
    assert len(set(result.task_names)) == 2
    for names, message in ((["a"], "1 task names for 2 parents"), (["a", "a"], "repeat a name"),
                           (["a", "../b"], "not a plain folder name")):  # fmt: skip
        with pytest.raises(InvalidConfigError, match=message):
            merge_tasks(tasks, FusionConfig(method="interpolate"), task_names=names, progress=False)


def test_parents_whose_encoders_differ_are_refused(tasks):
    wide = T.BertForSequenceClassification(T.BertConfig(**{**tasks[0].config.to_dict(), "hidden_size": 48,
                                                           "num_labels": 5}))  # fmt: skip
    with pytest.raises(IncompatibleModelsError, match="needs parents of one shape|axis"):
        merge_tasks([tasks[0], wide], FusionConfig(method="interpolate"), progress=False)
    deep = build("bert-seqcls", seed=3, num_hidden_layers=3)
    with pytest.raises(DepthMismatchError):
        merge_tasks([tasks[0], deep], FusionConfig(method="interpolate"), progress=False)
    with pytest.raises(IncompatibleModelsError, match="bare encoder"):
        merge_tasks([tasks[0], tasks[1].bert], FusionConfig(method="interpolate"), progress=False)
    with pytest.raises(InvalidConfigError, match="same-base method"):
        merge_tasks(tasks, FusionConfig(method="ot", cost="weights"), progress=False)
    broken = copy.deepcopy(tasks[1])
    with torch.no_grad():
        broken.classifier.bias[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="classifier.bias"):
        merge_tasks([tasks[0], broken], FusionConfig(method="interpolate"), progress=False)


def test_fuse_still_refuses_different_label_sets_and_points_to_merge_tasks(tasks):
    with pytest.raises(LabelSetMismatchError, match=r"merge_tasks.*--multi-task"):
        fuse(tasks, config=FusionConfig(method="interpolate"), progress=False)


def test_aligned_multi_task_merge_recovers_a_permuted_copy(tasks):
    from hf_otfusion import permute_model

    permuted = permute_model(tasks[1], seed=4)
    config = FusionConfig(method="interpolate", align="ot", cost="weights")
    result = merge_tasks([tasks[0], permuted], config, task_names=["a", "b"], progress=False)
    assert set(result.encoder.maps) == {1}
    unpermuted = merge_tasks(tasks, FusionConfig(method="interpolate"), task_names=["a", "b"], progress=False)
    unaligned = merge_tasks([tasks[0], permuted], FusionConfig(method="interpolate"), task_names=["a", "b"],
                            progress=False)  # fmt: skip
    inputs = inputs_for(tasks[0])
    with torch.no_grad():
        # the permuted parent's head was moved with its maps: task b reads the aligned encoder correctly
        got, expected, wrong = (r.models["b"](**inputs).logits for r in (result, unpermuted, unaligned))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (wrong - expected).abs().max() > 0.1
    assert not torch.equal(result.models["b"].classifier.weight, permuted.classifier.weight)


def test_cli_multi_task_writes_one_checkpoint_per_task(tmp_path, tuned, tasks, capsys, monkeypatch):
    import hf_otfusion.job.preflight as preflight_module
    from hf_otfusion.cli import main

    paths = []
    for name, model in (("base", bare_encoder_of(tuned)), ("ft-nli", tasks[0]), ("ft-stars", tasks[1])):
        model.save_pretrained(tmp_path / name)
        paths.append(str(tmp_path / name))
    out = tmp_path / "merged"
    common = ["fuse", *paths[1:], "--out", str(out), "--method", "task-arithmetic", "--base", paths[0], "-q"]
    assert main([*common, "--multi-task", "--dry-run"]) == 0  # the pre-flight checks encoders, not label sets
    assert main([*common, "--multi-task", "--task-names", "nli", "stars", "--scale", "0.5"]) == 0
    assert "Multi-task merge written to" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "fusion_job.yaml", "nli", "stars"]
    expected = merge_tasks(tasks, FusionConfig(method="task-arithmetic", scale=0.5), base=bare_encoder_of(tuned),
                           task_names=["nli", "stars"], progress=False)  # fmt: skip
    for name, parent in zip(("nli", "stars"), tasks, strict=True):
        model = T.AutoModelForSequenceClassification.from_pretrained(out / name)
        assert model.config.id2label == parent.config.id2label
        assert torch.equal(model.classifier.weight, parent.classifier.weight)
        for (key, a), (_, b) in zip(encoder_of(model).items(), encoder_of(expected.models[name]).items(), strict=True):
            assert torch.equal(a, b), key
        assert "multi-task" in ModelCard.load(out / name / "README.md").data.tags
    # the plain command (no --multi-task): a same-base method on parents with different label sets merges per task,
    # with each parent resolved once (the pre-flight checks the same resolved parents again as tasks)
    resolved = []
    resolve = preflight_module.resolve_parent
    monkeypatch.setattr(preflight_module, "resolve_parent", lambda s, **kw: resolved.append(s) or resolve(s, **kw))
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert resolved == paths[1:]
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["README.md", "ft-nli", "ft-stars",
                                                                      "fusion_job.yaml"]  # fmt: skip
    plain = {name: T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain" / name)
             for name in ("ft-nli", "ft-stars")}  # fmt: skip
    assert torch.equal(plain["ft-nli"].classifier.weight, tasks[0].classifier.weight)
    for (key, a), (_, b) in zip(
        encoder_of(plain["ft-nli"]).items(), encoder_of(plain["ft-stars"]).items(), strict=True
    ):
        assert torch.equal(a, b), key
    # OT fusion averages the heads too, so different label sets are refused, with the hint; limits fail before work
    assert main(["fuse", *paths[1:], "--out", str(tmp_path / "ot"), "--cost", "weights", "-q"]) == 2
    assert "--multi-task" in capsys.readouterr().err
    assert main(["fuse", *paths[1:], "--out", str(tmp_path / "x"), "--multi-task", "--cost", "weights", "-q"]) == 2
    assert "same-base --method" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "y"), "--task-names", "a", "b"]) == 2
    assert "add --multi-task" in capsys.readouterr().err
    assert not (tmp_path / "ot").exists() and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_multi_task_job_fields_round_trip_as_flags():
    from hf_otfusion import FuseJob

    job = FuseJob.from_dict({"parents": ["a", "b"], "out": "m", "multi_task": True, "task_names": ["x", "y"],
                             "method": "interpolate"})  # fmt: skip
    assert "--multi-task --task-names x y" in job.command_line()
    assert FuseJob.from_dict(job.to_dict()).task_names == ["x", "y"]
    # one data source is a string in a job file, as for a single fusion; one per parent, a list
    single = FuseJob.from_dict({"parents": ["a", "b"], "out": "m", "data": "d", "eval_data": "e"})
    assert (single.data, single.eval_data) == (["d"], ["e"])
    assert (single.to_dict()["data"], single.to_dict()["eval_data"]) == ("d", "e")
    several = FuseJob.from_dict({**job.to_dict(), "data": ["d1", "d2"], "eval_data": ["e1", "e2"]})
    assert FuseJob.from_dict(several.to_dict()).data == ["d1", "d2"]
    assert "--data d1 d2 --eval-data e1 e2" in several.command_line()


@pytest.mark.parametrize(
    ("family", "auto_class", "tag"),
    [
        ("vit-cls", T.AutoModelForImageClassification, "image-classification"),
        ("roberta-seqcls", T.AutoModelForSequenceClassification, "text-classification"),
        ("deit-teacher", None, "image-classification"),
    ],
)
def test_other_families_keep_every_head_parameter_outside_the_base_model(tmp_path, family, auto_class, tag):
    parents = [build(family, seed=0, num_labels=3), build(family, seed=1, num_labels=4)]
    result = merge_tasks(parents, FusionConfig(method="interpolate"), task_names=["a", "b"], out=tmp_path / "m",
                         progress=False)  # fmt: skip
    prefix = parents[0].base_model_prefix + "."
    expected_head = [name for name, _ in parents[0].named_parameters() if not name.startswith(prefix)]
    assert result.heads["a"] == expected_head and expected_head  # RoBERTa: classifier.dense too; DeiT: two heads
    shared = [name for name, _ in parents[0].named_parameters() if name.startswith(prefix)]
    for name in shared:
        a, b = (model.get_parameter(name) for model in result.models.values())
        average = (parents[0].get_parameter(name).double() + parents[1].get_parameter(name).double()) / 2
        assert torch.equal(a, b) and (a.double() - average).abs().max() <= 1e-6, name
    for model, parent in zip(result.models.values(), parents, strict=True):
        assert all(torch.equal(model.get_parameter(n), parent.get_parameter(n)) for n in expected_head)
    for name, parent in zip("ab", parents, strict=True):
        assert ModelCard.load(tmp_path / "m" / name / "README.md").data.pipeline_tag == tag
        if auto_class is not None:
            loaded = auto_class.from_pretrained(tmp_path / "m" / name)
            assert type(loaded) is type(parent) and loaded.config.num_labels == parent.config.num_labels


# ------------------------------------------------------------------------------ CLI runs: provenance, dtype, data
def saved_parents(tmp_path, tuned, tasks) -> list[str]:
    """The base and the two task fine-tunes as checkpoint directories: base, ft-nli, ft-stars."""
    paths = []
    for name, model in (("base", bare_encoder_of(tuned)), ("ft-nli", tasks[0]), ("ft-stars", tasks[1])):
        model.save_pretrained(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def saved_rows(path, model, seed: int, labels: bool = False) -> str:
    """16 rows of model inputs as a save_to_disk directory; with `labels`, the model's own predictions, so that
    the model scores exactly 1.0 on them and any other model its agreement with it."""
    from datasets import Dataset

    inputs = inputs_for(model, batch=16, seed=seed)
    columns = {name: tensor.numpy() for name, tensor in inputs.items()}
    if labels:
        with torch.no_grad():
            columns["labels"] = model(**inputs).logits.argmax(-1).numpy()
    Dataset.from_dict(columns).save_to_disk(str(path))
    return str(path)


def sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_multi_task_records_a_pinned_job_that_rebuilds_every_task_byte_for_byte(tmp_path, tuned, tasks):
    import yaml

    from hf_otfusion.cli import main
    from hf_otfusion.output.provenance import Provenance

    _, *parents = saved_parents(tmp_path, tuned, tasks)
    data = [saved_rows(tmp_path / f"rows-{k}", model, seed=10 + k) for k, model in enumerate(tasks)]
    out = tmp_path / "merged"
    # RegMean with one --data per parent: each task's Gram matrices from its own rows
    assert main(["fuse", *parents, "--out", str(out), "--method", "regmean", "--data", *data,
                 "--multi-task", "--task-names", "nli", "stars", "-q"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "fusion_job.yaml", "nli", "stars"]
    job_text = (out / "fusion_job.yaml").read_text()
    job = yaml.safe_load(job_text)
    assert job["parents"] == [str(Path(p).resolve()) for p in parents] and job["data"] == data
    assert job["multi_task"] is True and job["task_names"] == ["nli", "stars"] and job["config"]["method"] == "regmean"
    assert "fusion_job.yaml" in (out / "README.md").read_text()
    from datasets import load_from_disk

    own = [load_from_disk(path) for path in data]
    expected = merge_tasks(tasks, FusionConfig(method="regmean"), data=own, task_names=["nli", "stars"],
                           progress=False)  # fmt: skip
    swapped = merge_tasks(tasks, FusionConfig(method="regmean"), data=own[::-1], progress=False)
    name = "encoder.layer.0.intermediate.dense.weight"
    for k, task in enumerate(("nli", "stars")):
        folder = out / task
        assert (folder / "fusion_job.yaml").read_text() == job_text  # a task pushed alone keeps its recipe
        provenance = Provenance.load(folder)
        assert provenance.job == job and provenance.anchor == 0 and provenance.config["method"] == "regmean"
        assert provenance.architecture == "BertForSequenceClassification"
        for record, path in zip(provenance.parents, parents, strict=True):
            assert record["weight_files"][0]["sha256"] == sha256(Path(path) / "model.safetensors")
        assert provenance.outputs == {"model.safetensors": sha256(folder / "model.safetensors")}
        assert provenance.alignment_data["source"] == data[k]  # the task's own rows
        card = (folder / "README.md").read_text()
        assert "## Parents (pinned)" in card and provenance.parents[1]["weight_files"][0]["sha256"] in card
        assert "otfusion-hub fuse --config fusion_job.yaml --out" in card
        written = T.AutoModelForSequenceClassification.from_pretrained(folder)
        torch.testing.assert_close(written.bert.get_parameter(name), expected.models[task].bert.get_parameter(name),
                                   rtol=0, atol=1e-6)  # fmt: skip
    assert not torch.allclose(next(iter(swapped.models.values())).bert.get_parameter(name),
                              expected.models["nli"].bert.get_parameter(name), atol=1e-4)  # fmt: skip

    again = tmp_path / "again"
    assert main(["fuse", "--config", str(out / "fusion_job.yaml"), "--out", str(again), "-q"]) == 0
    for task in ("nli", "stars"):
        assert (again / task / "model.safetensors").read_bytes() == (out / task / "model.safetensors").read_bytes()
    # the pinned command of the provenance, run from a task folder (which holds fusion_config.yaml), also rebuilds
    import shlex

    words = shlex.split(Provenance.load(out / "nli").reproduce)
    words[words.index("--out") + 1] = str(tmp_path / "from-flags")
    words[words.index("--config") + 1] = str(out / "nli" / "fusion_config.yaml")
    assert main([*words[1:], "-q"]) == 0
    assert (tmp_path / "from-flags" / "stars" / "model.safetensors").read_bytes() == (
        out / "stars" / "model.safetensors"
    ).read_bytes()


def test_cli_multi_task_evaluates_each_task_against_its_fine_tune_and_base_head_in_dtype(
    tmp_path, tuned, tasks, capsys
):
    from safetensors import safe_open

    from hf_otfusion.cli import main
    from hf_otfusion.multitask import base_with_head
    from hf_otfusion.output.provenance import Provenance

    base, *parents = saved_parents(tmp_path, tuned, tasks)
    evals = [saved_rows(tmp_path / f"eval-{k}", model, seed=30 + k, labels=True) for k, model in enumerate(tasks)]
    out = tmp_path / "merged"
    common = ["fuse", *parents, "--method", "task-arithmetic", "--base", base, "--multi-task", "--task-names", "nli",
              "stars", "-q"]  # fmt: skip
    assert main([*common, "--out", str(out), "--dry-run", "--eval-data", *evals, "--push-to-hub", "ns/m"]) == 0
    dry = capsys.readouterr().out
    assert f"Evaluation data 0: {evals[0]}" in dry and f"Evaluation data 1: {evals[1]}" in dry
    assert "then pushed to ns/m-<task> (one repository per task)" in dry
    # a large scale moves the merge away from both fine-tunes, so that each row scores a different model
    assert main([*common, "--out", str(out), "--eval-data", *evals, "--dtype", "float16", "--scale", "6"]) == 0
    printed = capsys.readouterr().out
    from datasets import load_from_disk

    for k, task in enumerate(("nli", "stars")):
        with safe_open(str(out / task / "model.safetensors"), "pt") as weights:
            assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}
        rows = load_from_disk(evals[k]).with_format("torch")[:]
        inputs = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}
        merged = T.AutoModelForSequenceClassification.from_pretrained(out / task, dtype=torch.float16).eval()
        with torch.no_grad():
            expected = {
                "fused": (merged(**inputs).logits.argmax(-1) == rows["labels"]).float().mean().item(),
                "base + this head": (base_with_head(base, tasks[k])(**inputs).logits.argmax(-1) == rows["labels"])
                .float().mean().item(),
            }  # fmt: skip
        provenance = Provenance.load(out / task)
        scores = {row["name"]: row["accuracy"] for row in provenance.evaluation["rows"]}
        assert list(scores) == [f"own fine-tune: {Path(parents[k]).resolve()}", "base + this head", "fused"]
        assert scores[f"own fine-tune: {Path(parents[k]).resolve()}"] == 1.0  # the labels are its predictions
        assert scores["fused"] == pytest.approx(expected["fused"], abs=1e-9)
        assert scores["base + this head"] == pytest.approx(expected["base + this head"], abs=1e-9)
        assert provenance.eval_data["source"] == evals[k] and provenance.options["dtype"] == "float16"
        card = ModelCard.load(out / task / "README.md")
        (result,) = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
        assert result.metric_value == scores["fused"] and result.dataset_name == Path(evals[k]).name
        assert f"Task {task}: On `{evals[k]}`" in printed and f"| fused | {scores['fused']:.4f} |" in printed
    # the merge and the base were scored, not copies of the fine-tune: they disagree with it on some rows
    accuracies = [[row["accuracy"] for row in Provenance.load(out / t).evaluation["rows"]] for t in ("nli", "stars")]
    assert max(fused for _, _, fused in accuracies) < 1.0 and min(base_head for _, base_head, _ in accuracies) < 1.0

    # one source for two tasks with different labels, or a count that fits no parent list: refused before any work
    refused = ["fuse", "--out", str(tmp_path / "refused"), "-q"]
    for flags, message in (
        ([*common[1:], "--eval-data", evals[0]], "1 --eval-data sources for 2 tasks; give one per task"),
        ([*parents, "--multi-task", "--method", "regmean", "--data", *evals, evals[0]], "3 --data sources for 2 "
         "parents; give one per parent, in their order, or one for all"),
        ([parents[0], parents[0], "--cost", "weights", "--eval-data", *evals], "2 --eval-data sources for one fused "
         "model; give one (one per parent is for --multi-task)"),
    ):  # fmt: skip
        assert main([*refused, *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_base_with_head_is_the_base_encoder_under_the_parents_head(tuned, tasks):
    from hf_otfusion.multitask import base_with_head

    for base in (bare_encoder_of(tuned), tuned):  # a bare encoder, or a model whose own head is ignored
        model = base_with_head(base, tasks[1])
        assert model is not tasks[1] and torch.equal(model.classifier.weight, tasks[1].classifier.weight)
        for name, param in model.bert.named_parameters():
            assert torch.equal(param, tuned.bert.get_parameter(name)), name
    assert not torch.equal(tasks[1].bert.get_parameter("embeddings.word_embeddings.weight"),
                           tuned.bert.get_parameter("embeddings.word_embeddings.weight"))  # fmt: skip
    with pytest.raises(IncompatibleModelsError, match="does not hold the encoder"):
        base_with_head(build("bert-seqcls", seed=3, num_hidden_layers=3), tasks[1])


def test_cli_multi_task_push_makes_one_loadable_repository_per_task(tmp_path, tuned, tasks):
    """Through the local Hub server and the real huggingface_hub / transformers clients, in subprocesses."""
    import json
    import re

    from hub_utils import client_env, run_cli, run_python
    from safetensors.torch import load_file

    from hf_otfusion.hub.server import HubServer

    base, *parents = saved_parents(tmp_path, tuned, tasks)
    evals = [saved_rows(tmp_path / f"eval-{k}", model, seed=30 + k, labels=True) for k, model in enumerate(tasks)]
    with HubServer(tmp_path / "store") as server:
        env = client_env(server.url, tmp_path / "home")
        fuse = ["fuse", *parents, "--out", "merged", "--method", "task-arithmetic", "--base", base, "--multi-task",
                "--task-names", "nli", "stars", "--eval-data", *evals, "--push-to-hub", "ns/merged", "-q"]  # fmt: skip
        proc = run_cli(fuse, env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-6000:]
        shas = re.findall(r"^commit: ([0-9a-f]{40})$", proc.stdout, re.M)
        assert len(shas) == 2 and "Pushed merged/nli to" in proc.stdout and "Pushed merged/stars to" in proc.stdout
        check = f"""
            import json, torch
            from huggingface_hub import HfApi, ModelCard, hf_hub_download
            from transformers import AutoModelForSequenceClassification

            found = {{}}
            for task, sha in zip(("nli", "stars"), {shas!r}):
                repo = "ns/merged-" + task
                model = AutoModelForSequenceClassification.from_pretrained(repo, revision=sha)
                torch.save(model.state_dict(), task + ".pt")
                card = ModelCard.load(hf_hub_download(repo, "README.md", revision=sha))
                found[task] = {{"files": sorted(HfApi().list_repo_files(repo)), "card": card.data.to_dict(),
                               "text": card.text, "labels": model.config.id2label}}
            print("RESULT " + json.dumps(found))
            """
        pulled = run_python(check, env, tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-6000:]
    found = json.loads(pulled.stdout.split("RESULT ", 1)[1].splitlines()[0])
    encoders = []
    for task, parent in zip(("nli", "stars"), tasks, strict=True):
        local = load_file(str(tmp_path / "merged" / task / "model.safetensors"))
        hub = torch.load(tmp_path / f"{task}.pt")
        assert hub.keys() >= local.keys() and all(torch.equal(hub[key], local[key]) for key in local), task
        assert torch.equal(hub["classifier.weight"], parent.classifier.weight)
        assert {int(i): label for i, label in found[task]["labels"].items()} == parent.config.id2label
        encoders.append({key: value for key, value in hub.items() if key.startswith("bert.")})
        assert {"config.json", "model.safetensors", "README.md", "fusion_job.yaml", "fusion_config.yaml",
                "fusion_provenance.json"} <= set(found[task]["files"])  # fmt: skip
        card = found[task]["card"]
        assert "multi-task" in card["tags"] and card["pipeline_tag"] == "text-classification"
        provenance = json.loads((tmp_path / "merged" / task / "fusion_provenance.json").read_text())
        fused = next(row for row in provenance["evaluation"]["rows"] if row["name"] == "fused")
        metric = card["model-index"][0]["results"][0]["metrics"][0]
        assert metric["type"] == "accuracy" and metric["value"] == fused["accuracy"]
        other = "stars" if task == "nli" else "nli"
        assert f"({server.url}/ns/merged-{other})" in found[task]["text"]  # the sibling task, by its repository
        assert f'from_pretrained("ns/merged-{task}")' in found[task]["text"]
    assert all(torch.equal(encoders[0][key], encoders[1][key]) for key in encoders[0])


def test_cli_multi_task_push_that_fails_part_way_names_what_was_pushed_and_keeps_the_output(tmp_path, tuned, tasks):
    """The local Hub refuses the first task's commit (HTTP 500) and takes the second's: the user is told which task
    repositories hold their task and which do not, the output is intact, and the printed command pushes the rest."""
    import json
    import shlex

    from hub_utils import client_env, run_cli, run_python

    from hf_otfusion.hub.server import HubServer
    from hf_otfusion.output.provenance import weight_hashes

    base, *parents = saved_parents(tmp_path, tuned, tasks)
    with HubServer(tmp_path / "store") as server:
        env = client_env(server.url, tmp_path / "home")
        server.fail_next_commits = 1  # the first task's upload (nli) fails on the server; stars is pushed after it
        fuse = ["fuse", *parents, "--out", "merged", "--method", "task-arithmetic", "--base", base, "--multi-task",
                "--task-names", "nli", "stars", "--push-to-hub", "ns/merged", "--revision", "dev", "-q"]  # fmt: skip
        proc = run_cli(fuse, env, tmp_path)
        written = {path.relative_to(tmp_path / "merged"): path.read_bytes() for path in
                   sorted((tmp_path / "merged").rglob("*")) if path.is_file()}  # fmt: skip
        commits = [path for method, path in server.request_log if method == "POST" and "/commit/" in path]
        retry = proc.stderr.rsplit("push the rest with:\n", 1)[-1].strip().splitlines()
        retried = [run_cli(shlex.split(line)[1:], env, tmp_path) for line in retry]
        check = """
            import json
            from huggingface_hub import HfApi, hf_hub_download

            found = {}
            for task in ("nli", "stars"):
                repo = "ns/merged-" + task
                found[task] = {"files": sorted(HfApi().list_repo_files(repo, revision="dev")),
                               "weights": open(hf_hub_download(repo, "model.safetensors", revision="dev"), "rb")
                               .read().hex()}
            print("RESULT " + json.dumps(found))
            """
        pulled = run_python(check, env, tmp_path)
    assert proc.returncode == 3, proc.stderr[-6000:]
    assert "Multi-task merge written to merged" in proc.stdout
    assert "Pushed merged/stars to" in proc.stdout and "Pushed merged/nli" not in proc.stdout
    assert len(commits) == 2 and "merged-nli" in commits[0] and "merged-stars" in commits[1]  # both were tried
    # the upload's own error with its retry, then the summary: which repositories hold their task, which do not
    assert "Upload of merged/nli to ns/merged-nli failed" in proc.stderr
    assert (
        "error: 1 of 2 task repositories were not pushed: nli (ns/merged-nli). Pushed: stars (ns/merged-stars).\n"
        "Every task folder is kept in merged; push the rest with:\n"
        "  otfusion-hub push merged/nli ns/merged-nli --revision dev"
    ) in proc.stderr
    assert retry == ["otfusion-hub push merged/nli ns/merged-nli --revision dev"]
    # nothing local was lost: every file of the output, the weights as their provenance records them
    assert {str(path) for path in written} >= {"README.md", "fusion_job.yaml", "nli/model.safetensors",
                                               "stars/model.safetensors", "nli/fusion_provenance.json"}  # fmt: skip
    for task in ("nli", "stars"):
        recorded = json.loads(written[Path(task) / "fusion_provenance.json"])["outputs"]
        assert recorded == weight_hashes(tmp_path / "merged" / task)
    assert sorted(p.name for p in tmp_path.iterdir() if "merged" in p.name) == ["merged"]  # no staging left
    # the printed command pushed the rest: both repositories now hold the bytes written locally
    assert [r.returncode for r in retried] == [0], [r.stderr[-3000:] for r in retried]
    assert pulled.returncode == 0, pulled.stderr[-6000:]
    found = json.loads(pulled.stdout.split("RESULT ", 1)[1].splitlines()[0])
    for task in ("nli", "stars"):
        assert bytes.fromhex(found[task]["weights"]) == written[Path(task) / "model.safetensors"]
        assert "fusion_job.yaml" in found[task]["files"]


def test_different_label_sets_take_the_multi_task_mode_with_one_data_source_per_parent(tmp_path, tuned, tasks):
    import yaml

    from hf_otfusion.cli import main

    _, *parents = saved_parents(tmp_path, tuned, tasks)
    data = [saved_rows(tmp_path / f"rows-{k}", model, seed=10 + k) for k, model in enumerate(tasks)]
    out = tmp_path / "merged"
    # no --multi-task: the label sets differ, so the per-parent --data count is checked once pre-flight knows it
    assert main(["fuse", *parents, "--out", str(out), "--method", "regmean", "--data", *data, "-q"]) == 0
    job = yaml.safe_load((out / "fusion_job.yaml").read_text())
    assert job["multi_task"] is True and job["task_names"] == ["ft-nli", "ft-stars"] and job["data"] == data
    again = tmp_path / "again"
    assert main(["fuse", "--config", str(out / "fusion_job.yaml"), "--out", str(again), "-q"]) == 0
    assert (again / "ft-stars" / "model.safetensors").read_bytes() == (
        out / "ft-stars" / "model.safetensors"
    ).read_bytes()
