"""`finetune`: the Trainer recipe learns, writes a loadable checkpoint, and extends the fused model's card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from conftest import FAMILIES, build
from datasets import Dataset, DatasetDict
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_otfusion.cli import main
from hf_otfusion.errors import IncompatibleModelsError, InvalidConfigError, OutputExistsError, UnsupportedTaskError
from hf_otfusion.train.evaluation import evaluate_model
from hf_otfusion.train.finetune import FinetuneConfig, finetune

RECIPE = dict(learning_rate=3e-3, batch_size=16, warmup=2, logging_steps=4)
FUSED_TEXT = "# fused-vit\n\nFused from 2 parents with hf_otfusion.\n\n## Parents\n\n| parent | commit |\n|---|---|\n"


def bars(n: int, seed: int) -> Dataset:
    """A task a tiny ViT learns in a few steps: the class is which band of rows is bright."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    for i, label in enumerate(labels):
        images[i, 0, 3 * label : 3 * label + 2, :] += 3.0
    return Dataset.from_dict({"pixel_values": images, "labels": labels})


def fresh_vit(seed: int = 0) -> T.ViTForImageClassification:
    model_class, make_config = FAMILIES["vit-cls"]
    torch.manual_seed(seed)
    return model_class(make_config())


def fused_checkpoint(directory: Path) -> Path:
    """A directory shaped like `otfusion-hub fuse` output: weights, processor, card, provenance."""
    fresh_vit().save_pretrained(directory)
    processor = dict(image_processor_type="ViTImageProcessor", do_resize=False, do_rescale=False, image_mean=[0.0],
                     image_std=[1.0])  # fmt: skip
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    data = ModelCardData(
        model_name="fused-vit", base_model=["ns/a", "ns/b"], base_model_relation="merge", tags=["merge", "hf-otfusion"],
        eval_results=[EvalResult(task_type="image-classification", dataset_type="ns/bars", dataset_name="ns/bars",
                                 metric_type="accuracy", metric_value=0.5)],
    )  # fmt: skip
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{FUSED_TEXT}").save(directory / "README.md")
    (directory / "fusion_provenance.json").write_text(json.dumps({"parents": ["ns/a", "ns/b"], "anchor": 0}))
    (directory / "fusion_config.yaml").write_text("method: ot\ncost: activations\n")
    return directory


def test_finetune_lowers_the_eval_loss_on_a_learnable_task():
    result = finetune(fresh_vit(), bars(160, 0), bars(64, 1), FinetuneConfig(max_steps=20, **RECIPE), progress=False)
    before, after = result.metrics_before, result.metrics_after
    assert result.steps == 20 and [e["step"] for e in result.log_history] == [4, 8, 12, 16, 20]
    assert before["loss"] == pytest.approx(np.log(3), abs=0.1) and before["accuracy"] < 0.45
    assert after["loss"] < 0.8 * before["loss"]
    assert after["accuracy"] > 0.6
    assert result.log_history[-1]["loss"] < 0.8 * result.log_history[0]["loss"]
    # the Trainer's accuracy is the shipped metric on the same rows as evaluate_model
    assert evaluate_model(result.model, bars(64, 1))["accuracy"] == pytest.approx(after["accuracy"])


def test_finetuned_checkpoint_keeps_the_fusion_card_and_provenance_and_adds_the_run(tmp_path):
    source = fused_checkpoint(tmp_path / "fused")
    out = tmp_path / "finetuned"
    config = FinetuneConfig(max_steps=4, **RECIPE)
    result = finetune(source, bars(64, 0), bars(32, 1), config, output_dir=out, data_name="bars", eval_name="bars-test",
                      progress=False)  # fmt: skip

    saved = T.AutoModelForImageClassification.from_pretrained(out).state_dict()
    for name, tensor in result.model.state_dict().items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
    assert (out / "preprocessor_config.json").is_file() and not (out / "training_args.bin").exists()
    for name in ("fusion_provenance.json", "fusion_config.yaml"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert not list(tmp_path.glob(".*partial"))

    card = ModelCard.load(out / "README.md")
    # a local source has no Hub id to name: the card keeps the lineage its source's card gave
    assert card.data.base_model == ["ns/a", "ns/b"] and card.data.base_model_relation == "merge"
    assert card.data.tags == ["merge", "hf-otfusion", "finetuned"]
    assert card.data.pipeline_tag == "image-classification"
    results = {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert ("accuracy", None) not in results  # the fused model's result is not this model's: only in the text
    assert len(results) == 2
    assert results[("accuracy", "accuracy after finetuning")] == pytest.approx(result.metrics_after["accuracy"])
    assert results[("loss", "loss after finetuning")] == pytest.approx(result.metrics_after["loss"], abs=1e-6)
    assert FUSED_TEXT.strip() in card.text
    section = card.text.split("## Finetuning", 1)[1]
    assert "Training data: bars (64 examples)" in section and "bars-test (32 examples)" in section
    assert "4 optimiser steps of 16 examples (1 process), learning rate 0.003" in section
    before = result.metrics_before
    assert f"| before finetuning | {100 * before['accuracy']:.2f} % | {before['loss']:.4f} |" in section
    runs = json.loads((out / "finetune_runs.json").read_text())
    assert len(runs) == 1 and runs[0]["steps"] == 4 and runs[0]["source"] == str(source)

    again = tmp_path / "again"
    finetune(out, bars(64, 2), None, FinetuneConfig(max_steps=2, **RECIPE), output_dir=again, progress=False)
    card = ModelCard.load(again / "README.md")
    assert card.text.count("## Finetuning") == 2 and "## Finetuning (run 2)" in card.text
    assert card.data.tags == ["merge", "hf-otfusion", "finetuned"]
    assert [r["steps"] for r in json.loads((again / "finetune_runs.json").read_text())] == [4, 2]


def test_a_non_empty_output_is_refused_before_training(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not empty.*overwrite"):
        finetune(fresh_vit(), bars(16, 0), config=FinetuneConfig(max_steps=1), output_dir=out, progress=False)
    assert (out / "keep.txt").read_text() == "keep me"
    finetune(fresh_vit(), bars(16, 0), config=FinetuneConfig(max_steps=1), output_dir=out, overwrite=True,
             progress=False)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "finetune_runs.json",
        "model.safetensors",
    ]


def test_models_that_take_no_labels_are_refused_with_the_fix():
    with pytest.raises(UnsupportedTaskError, match="DeiTForImageClassification.from_pretrained"):
        finetune(build("deit-teacher"), bars(16, 0), progress=False)
    with pytest.raises(UnsupportedTaskError, match="no classification head"):
        finetune(build("vit-base"), bars(16, 0), progress=False)


def test_finetune_config_rejects_unknown_keys_and_bad_values():
    from hf_otfusion.errors import FusionError

    with pytest.raises(FusionError, match=r"Unknown FinetuneConfig key\(s\) \['lr'\]"):
        FinetuneConfig.from_dict({"lr": 1e-3})
    with pytest.raises(FusionError, match="max_steps must be >= 1"):
        FinetuneConfig(max_steps=0)
    args = FinetuneConfig(max_steps=7, warmup=0.1, seed=3).training_arguments("unused", progress=False)
    assert (args.max_steps, args.seed, args.get_warmup_steps(7), args.save_strategy) == (7, 3, 1, "no")


@pytest.fixture
def saved_task(tmp_path):
    source = fused_checkpoint(tmp_path / "fused")
    data = tmp_path / "bars"
    DatasetDict({"train": bars(96, 0), "test": bars(48, 1)}).save_to_disk(str(data))
    return source, data


def test_cli_finetune_then_eval_reports_the_finetuned_model(saved_task, tmp_path, capsys):
    source, data = saved_task
    out = tmp_path / "ft"
    args = ["finetune", str(source), "--data", str(data), "--split", "train", "--eval-split", "test", "--out", str(out)]
    assert main([*args, "--max-steps", "12", "--learning-rate", "3e-3", "--batch-size", "16", "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"Finetuned model written to {out}" in printed and "after 12 steps" in printed
    run = json.loads((out / "finetune_runs.json").read_text())[0]
    assert run["train_data"] == f"{data} (split train)" and run["config"]["learning_rate"] == 3e-3
    assert main(args + ["-q"]) == 2  # the output exists now
    assert "not empty" in capsys.readouterr().err

    table = tmp_path / "table.json"
    assert main(["eval", str(source), str(out), "--data", str(data), "--json", str(table), "-q"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(table.read_text())["rows"]
    assert [r["name"] for r in rows] == [str(source), str(out)] and rows[0]["num_examples"] == 48
    test_split = bars(48, 1)
    for row, model in zip(rows, (source, out), strict=True):
        direct = evaluate_model(T.AutoModelForImageClassification.from_pretrained(model), test_split)
        assert row["accuracy"] == pytest.approx(direct["accuracy"]) and row["loss"] == pytest.approx(direct["loss"])
        assert f"{row['accuracy']:.4f}" in printed
    assert rows[1]["accuracy"] == pytest.approx(run["after"]["accuracy"])
    assert rows[1]["loss"] < rows[0]["loss"]


def test_cli_finetune_under_torchrun_equals_one_process_with_the_global_batch(saved_task, tmp_path):
    """2 gloo processes x batch 8 take the steps 1 process takes with batch 16: gradients are really averaged."""
    source, data = saved_task
    args = ["finetune", str(source), "--data", str(data), "--split", "train", "--eval-split", "test", "--max-steps",
            "3", "--learning-rate", "3e-3", "-q"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "hf_otfusion.cli"]  # fmt: skip
    command = [*torchrun, *args, "--out", str(tmp_path / "ft"), "--batch-size", "8"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    assert process.stdout.count("Finetuned model written to") == 1
    run = json.loads((tmp_path / "ft" / "finetune_runs.json").read_text())[0]
    assert (run["processes"], run["global_batch_size"], run["steps"]) == (2, 16, 3)
    assert "3 optimiser steps of 16 examples (2 processes)" in (tmp_path / "ft" / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars", "ft", "fused"]  # no staging left behind

    assert main([*args, "--out", str(tmp_path / "single"), "--batch-size", "16"]) == 0
    start, distributed, single = (
        T.AutoModelForImageClassification.from_pretrained(path).state_dict()
        for path in (source, tmp_path / "ft", tmp_path / "single")
    )
    moved = max((single[name] - start[name]).abs().max().item() for name in single)
    assert moved > 1e-3
    for name, tensor in single.items():
        torch.testing.assert_close(distributed[name], tensor, rtol=0, atol=1e-3 * moved, msg=name)


FINETUNE_ON_HUB = r"""
import json
from pathlib import Path
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from test_finetune import bars, fused_checkpoint
from hf_otfusion.cli import main

api = HfApi()
fused_checkpoint(Path("fused"))
api.create_repo("ns/fused")
commit = api.upload_folder(repo_id="ns/fused", folder_path="fused").oid
api.create_repo("ns/bars", repo_type="dataset")
for split, rows in (("train", bars(64, 0)), ("test", bars(32, 1))):
    rows.to_parquet(f"{split}.parquet")
    api.upload_file(path_or_fileobj=f"{split}.parquet", path_in_repo=f"data/{split}-0.parquet", repo_id="ns/bars",
                    repo_type="dataset")
code = main(["finetune", "ns/fused", "--data", "ns/bars", "--split", "train", "--eval-split", "test", "--out", "ft",
             "--max-steps", "3", "--push-to-hub", "ns/fused-ft", "-q"])
card = ModelCard.load("ns/fused-ft")
print("RESULT " + json.dumps({
    "code": code, "commit": commit, "text": card.text, "base_model": card.data.base_model,
    "relation": card.data.base_model_relation, "dataset_commit": api.dataset_info("ns/bars").sha,
    "results": [(r.dataset_type, r.dataset_split, r.dataset_revision, r.metric_type, r.metric_name)
                for r in card.data.eval_results or []],
    "datasets": card.data.datasets, "files": sorted(api.list_repo_files("ns/fused-ft")),
    "provenance": open(hf_hub_download("ns/fused-ft", "fusion_provenance.json")).read(),
}))
"""


def test_cli_finetunes_a_fused_model_from_the_hub_and_pushes_it_with_its_card(tmp_path):
    from hub_utils import client_env, run_python

    from hf_otfusion.hub.server import HubServer

    with HubServer(tmp_path / "store") as server:
        work = tmp_path / "work"
        work.mkdir()
        process = run_python(FINETUNE_ON_HUB, client_env(server.url, tmp_path / "home"), work)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
    result = json.loads(process.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["code"] == 0
    assert {"model.safetensors", "README.md", "preprocessor_config.json", "fusion_provenance.json",
            "fusion_config.yaml", "finetune_runs.json"} <= set(result["files"])  # fmt: skip
    assert result["provenance"] == (work / "fused" / "fusion_provenance.json").read_text()
    # the finetuned model's parent is the fused checkpoint; its model-index holds only its own results
    assert result["base_model"] == "ns/fused" and result["relation"] == "finetune"
    assert result["datasets"] == ["ns/bars"]
    assert [r[3] for r in result["results"]] == ["accuracy", "loss"]
    for dataset_type, split, revision, _, name in result["results"]:
        assert (dataset_type, split, revision) == ("ns/bars", "test", result["dataset_commit"])
        assert name.endswith("after finetuning")
    assert FUSED_TEXT.strip() in result["text"]
    assert f"from `ns/fused@{result['commit']}`" in result["text"]
    assert "Training data: ns/bars@" in result["text"] and "(split train) (64 examples)" in result["text"]


def kl_to(model, teachers, data) -> float:
    """KL(teachers' mean softmax || the model's softmax) over `data`, at temperature 1."""
    with torch.no_grad():
        inputs = torch.tensor(np.array(data["pixel_values"]))
        target = sum(t(pixel_values=inputs).logits.softmax(-1) for t in teachers) / len(teachers)
        log_probs = model(pixel_values=inputs).logits.log_softmax(-1)
    return float(torch.nn.functional.kl_div(log_probs, target, reduction="batchmean"))


def test_distillation_pulls_the_model_towards_the_teachers_and_alpha_zero_is_the_plain_loss():
    teachers = [
        finetune(fresh_vit(s), bars(160, s), config=FinetuneConfig(max_steps=20, **RECIPE), progress=False).model
        for s in (1, 2)
    ]
    shuffled = bars(160, 0)
    shuffled = shuffled.add_column("noise", list(range(160))).map(lambda r: {"labels": r["noise"] % 3})
    shuffled = shuffled.remove_columns("noise")  # labels unrelated to the images: only the teachers teach
    held_out = bars(64, 5)
    plain = finetune(fresh_vit(), shuffled, config=FinetuneConfig(max_steps=40, **RECIPE), progress=False)
    taught = finetune(
        fresh_vit(), shuffled, config=FinetuneConfig(max_steps=40, distill_alpha=0.9, **RECIPE), teachers=teachers,
        progress=False,
    )  # fmt: skip
    start = kl_to(fresh_vit(), teachers, held_out)
    assert kl_to(taught.model, teachers, held_out) < 0.25 * start  # measured: 0.015 from 0.153
    assert kl_to(taught.model, teachers, held_out) < 0.25 * kl_to(plain.model, teachers, held_out)  # 0.132
    # it learned the task from the teachers alone (they score 0.61 and 0.66 here; the shuffled labels teach ~chance)
    taught_accuracy = evaluate_model(taught.model, held_out)["accuracy"]
    assert taught_accuracy > 0.5 and taught_accuracy > evaluate_model(plain.model, held_out)["accuracy"] + 0.15
    # with no teachers the Trainer's own loss runs: two identical runs give identical weights
    again = finetune(fresh_vit(), shuffled, config=FinetuneConfig(max_steps=40, **RECIPE), progress=False)
    for (name, a), b in zip(plain.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_distillation_options_are_checked_before_training():
    config = FinetuneConfig(max_steps=2, distill_alpha=0.5)
    with pytest.raises(InvalidConfigError, match="needs teachers"):
        finetune(fresh_vit(), bars(16, 0), config=config, progress=False)
    with pytest.raises(InvalidConfigError, match="teachers need distill_alpha"):
        finetune(fresh_vit(), bars(16, 0), config=FinetuneConfig(max_steps=2), teachers=[fresh_vit(1)], progress=False)
    other = fresh_vit(1)
    other.config.id2label = {0: "x", 1: "y", 2: "z"}
    with pytest.raises(IncompatibleModelsError, match="Teacher 0 predicts"):
        finetune(fresh_vit(), bars(16, 0), config=config, teachers=[other], progress=False)
    with pytest.raises(InvalidConfigError, match="distill_alpha"):
        FinetuneConfig(distill_alpha=1.5)


def test_cli_finetune_with_the_parents_as_teachers_records_them(saved_task, tmp_path):
    source, data = saved_task
    teachers = []
    for seed in (1, 2):
        teacher = tmp_path / f"teacher{seed}"
        fresh_vit(seed).save_pretrained(teacher)
        teachers.append(str(teacher))
    out = tmp_path / "ft"
    args = ["finetune", str(source), "--data", str(data), "--split", "train", "--out", str(out), "-q"]
    assert main([*args, "--max-steps", "3", "--teachers", *teachers]) == 2  # no --distill-alpha
    assert not out.exists()
    assert main([*args, "--max-steps", "3", "--teachers", *teachers, "--distill-alpha", "0.5"]) == 0
    run = json.loads((out / "finetune_runs.json").read_text())[0]
    assert run["teachers"] == teachers and run["config"]["distill_alpha"] == 0.5
