"""`evaluate_models`: accuracy and loss equal a direct computation from the logits, for every classifier head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
from conftest import build, inputs_for
from datasets import ClassLabel, Dataset

from hf_otfusion.errors import TrainingDataError, UnsupportedTaskError
from hf_otfusion.train.evaluation import EvaluationTable, evaluate_model, evaluate_models

NUM_EXAMPLES = 23  # not a multiple of the batch size


def labelled(model, seed: int = 0, num_labels: int = 3) -> Dataset:
    inputs = inputs_for(model, batch=NUM_EXAMPLES, seed=seed)
    labels = np.random.default_rng(seed).integers(0, num_labels, NUM_EXAMPLES)
    return Dataset.from_dict({**{k: v.numpy() for k, v in inputs.items()}, "labels": labels})


def direct_scores(model, dataset) -> tuple[float, float]:
    batch = dataset.with_format("torch")[:]
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    accuracy = (logits.argmax(-1) == labels).double().mean().item()
    return accuracy, torch.nn.functional.cross_entropy(logits.double(), labels).item()


@pytest.mark.parametrize("family", ["vit-cls", "bert-seqcls", "deit-teacher"])
def test_accuracy_and_loss_equal_a_direct_computation(family):
    model = build(family)
    dataset = labelled(model)
    scores = evaluate_model(model, dataset, batch_size=5)
    accuracy, loss = direct_scores(model, dataset)
    assert scores["num_examples"] == NUM_EXAMPLES
    assert scores["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert scores["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0 < scores["accuracy"] < 1 and scores["loss"] > 0.5  # random models on random labels: not degenerate


def test_table_holds_one_row_per_model_in_order_and_loads_paths(tmp_path):
    models = [build("vit-cls", seed=0), build("vit-cls", seed=1)]
    models[1].save_pretrained(tmp_path / "second")
    dataset = labelled(models[0])
    table = evaluate_models({"first": models[0], "second": str(tmp_path / "second")}, dataset, progress=False)
    expected = [direct_scores(m, dataset) for m in models]
    assert [row.name for row in table.rows] == ["first", "second"]
    for row, (accuracy, loss) in zip(table.rows, expected, strict=True):
        assert row.accuracy == pytest.approx(accuracy) and row.loss == pytest.approx(loss, rel=1e-5)
    text, markdown = str(table), table.to_markdown()
    assert f"{expected[1][0]:.4f}" in text.splitlines()[-1] and text.splitlines()[-1].startswith("second")
    assert f"| first | {100 * expected[0][0]:.2f} | {expected[0][1]:.4f} |" in markdown
    again = json.loads(table.to_json())
    assert again["rows"][1]["loss"] == pytest.approx(expected[1][1], rel=1e-5) and again["split"] == "test"
    assert isinstance(table, EvaluationTable)


def test_extra_f1_metric_is_macro_f1_of_the_predictions():
    from sklearn.metrics import f1_score

    model = build("bert-seqcls")
    dataset = labelled(model, seed=2)
    scores = evaluate_model(model, dataset, metrics=["f1"])
    batch = dataset.with_format("torch")[:]
    labels = batch.pop("labels")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    assert scores["f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))


def test_data_that_does_not_fit_the_model_is_refused_with_the_fix():
    model = build("vit-cls")
    dataset = labelled(model)
    with pytest.raises(TrainingDataError, match="no 'labels' column") as caught:
        evaluate_model(model, dataset.remove_columns("labels"))
    assert caught.value.columns == ["pixel_values"]
    with pytest.raises(TrainingDataError, match="reads 'pixel_values'"):
        evaluate_model(model, dataset.rename_column("pixel_values", "image"))
    with pytest.raises(TrainingDataError, match=r"Labels span \[0, 4\] but the model's head has 3 classes") as caught:
        evaluate_model(model, labelled(model, num_labels=5))
    assert caught.value.labels == (0, 4)
    model.config.id2label = {0: "cat", 1: "dog", 2: "fish"}
    swapped = dataset.cast_column("labels", ClassLabel(names=["dog", "cat", "fish"]))
    with pytest.raises(TrainingDataError, match="label names.*differ"):
        evaluate_model(model, swapped)
    same = dataset.cast_column("labels", ClassLabel(names=["cat", "dog", "fish"]))
    assert evaluate_model(model, same)["num_examples"] == NUM_EXAMPLES


def test_models_without_a_classification_head_are_refused():
    encoder = build("bert-base")
    with pytest.raises(UnsupportedTaskError, match="BertModel has no classification head") as caught:
        evaluate_model(encoder, labelled(encoder))
    assert isinstance(caught.value, TypeError) and caught.value.model_class == "BertModel"
    assert isinstance(encoder, T.BertModel)


def test_eval_cli_scores_a_single_file_on_its_only_split(tmp_path, capsys):
    from hub_utils import REPO_ROOT

    from hf_otfusion.cli import main

    model = REPO_ROOT / "examples" / "digits-vit-seed0"
    rows = labelled(T.AutoModelForImageClassification.from_pretrained(model)).to_list()
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["eval", str(model), "--data", str(path), "--json", str(tmp_path / "t.json"), "-q"]) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["split"] == "train" and table["rows"][0]["num_examples"] == NUM_EXAMPLES
