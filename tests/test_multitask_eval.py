"""`otfusion-hub eval MERGED --data D1 D2 ...`: each task of a multi-task merge next to its own fine-tune and base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_multitask
import torch
import transformers as T
from datasets import load_from_disk
from test_merging import bare_encoder_of
from test_multitask import saved_parents, saved_rows

from hf_otfusion import FusionConfig, merge_tasks
from hf_otfusion.cli import main
from hf_otfusion.multitask import base_with_head
from hf_otfusion.output.provenance import Provenance

TASKS = ("nli", "stars")

tuned, tasks = test_multitask.tuned, test_multitask.tasks  # its module-scoped fixtures, shared


def direct_scores(model: T.PreTrainedModel, rows: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on `rows`, computed here, without hf_otfusion's evaluation."""
    with torch.no_grad():
        logits = model.eval()(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits.float()
    return {
        "accuracy": (logits.argmax(-1) == rows["labels"]).float().mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits, rows["labels"]).item(),
    }


def test_eval_scores_each_task_as_its_models_evaluated_directly(tmp_path, tuned, tasks, capsys):
    base, *parents = saved_parents(tmp_path, tuned, tasks)
    # labels: each fine-tune's own predictions, so that it scores 1.0 and the other rows their agreement with it
    evals = [saved_rows(tmp_path / f"eval-{k}", model, seed=30 + k, labels=True) for k, model in enumerate(tasks)]
    out = tmp_path / "merged"
    # a large scale moves the merge away from both fine-tunes, so that each row scores a different model
    assert main(["fuse", *parents, "--out", str(out), "--method", "task-arithmetic", "--base", base, "--scale", "6",
                 "--multi-task", "--task-names", *TASKS, "--eval-data", *evals, "-q"]) == 0  # fmt: skip
    capsys.readouterr()

    scores = tmp_path / "scores.json"
    assert main(["eval", str(out), "--data", *evals, "--markdown", "--json", str(scores), "-q"]) == 0
    printed = capsys.readouterr().out
    found = json.loads(scores.read_text())["tasks"]
    assert list(found) == list(TASKS)
    fused_accuracies = []
    for k, task in enumerate(TASKS):
        rows = load_from_disk(evals[k]).with_format("torch")[:]
        own_name = f"own fine-tune: {Path(parents[k]).resolve()}"
        expected = {
            own_name: direct_scores(tasks[k], rows),
            "base + this head": direct_scores(base_with_head(base, tasks[k]), rows),
            "fused": direct_scores(T.AutoModelForSequenceClassification.from_pretrained(out / task), rows),
        }
        table = found[task]
        recorded = Provenance.load(out / task).evaluation
        assert recorded is not None and table["data"] == evals[k] and table["split"] == recorded["split"]
        assert [row["name"] for row in table["rows"]] == list(expected)
        for row in table["rows"]:
            assert row["num_examples"] == 16
            assert row["accuracy"] == pytest.approx(expected[row["name"]]["accuracy"], abs=1e-9), (task, row["name"])
            assert row["loss"] == pytest.approx(expected[row["name"]]["loss"], rel=1e-5), (task, row["name"])
        print(task, {name: round(value["accuracy"], 4) for name, value in expected.items()})
        # the same table, on the same rows, as the one `fuse --eval-data` recorded in the task's provenance
        assert [(r["name"], r["accuracy"]) for r in recorded["rows"]] == [
            (r["name"], r["accuracy"]) for r in table["rows"]
        ]
        assert f"Task {task} (" in printed and f"| fused | {100 * expected['fused']['accuracy']:.2f} |" in printed
        fused_accuracies.append(expected["fused"]["accuracy"])
    assert expected[own_name]["accuracy"] == 1.0 and min(fused_accuracies) < 1.0  # the merge was scored, not a parent


def test_eval_of_a_multi_task_merge_refuses_a_wrong_data_count_naming_the_tasks(tmp_path, tuned, tasks, capsys):
    base, *parents = saved_parents(tmp_path, tuned, tasks)
    evals = [saved_rows(tmp_path / f"eval-{k}", model, seed=30 + k, labels=True) for k, model in enumerate(tasks)]
    out = tmp_path / "merged"
    assert main(["fuse", *parents, "--out", str(out), "--method", "interpolate", "--multi-task", "--task-names",
                 *TASKS, "-q"]) == 0  # fmt: skip
    capsys.readouterr()
    for data in ([evals[0]], [*evals, evals[0]]):
        assert main(["eval", str(out), "--data", *data, "-q"]) == 2
        error = capsys.readouterr().err
        assert f"is a multi-task merge of 2 tasks (nli, stars) but {len(data)} --data sources were given; give one " \
            "per task, in that order: --data <nli-data> <stars-data>." in error  # fmt: skip
    # with other models, or for plain models, one --data; a Python merge_tasks output records no parents
    assert main(["eval", str(out), parents[0], "--data", *evals, "-q"]) == 2
    assert "is a multi-task merge; evaluate it alone" in capsys.readouterr().err
    assert main(["eval", parents[0], "--data", *evals, "-q"]) == 2
    assert "2 --data sources for models scored on the same rows; give one" in capsys.readouterr().err
    python_out = tmp_path / "from-python"
    merge_tasks(tasks, FusionConfig(method="interpolate"), base=bare_encoder_of(tuned), out=python_out, progress=False)
    assert main(["eval", str(python_out), "--data", *evals, "-q"]) == 2
    error = capsys.readouterr().err
    assert "from-python is a folder of checkpoints, not one, and not a multi-task merge" in error
    assert f"otfusion-hub eval {python_out}/<name> [PARENT ...] --data DATA" in error
