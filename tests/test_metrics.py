"""The `evaluate` metric modules shipped in hf_otfusion load offline by path and agree with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from hf_otfusion.errors import FusionError
from hf_otfusion.train.metrics import METRICS_DIR, available_metrics, load_metric


@pytest.fixture(scope="module")
def predictions():
    rng = np.random.default_rng(0)
    references = rng.integers(0, 5, 300)
    predictions = np.where(rng.random(300) < 0.6, references, rng.integers(0, 4, 300))  # class 4 never predicted
    return predictions, references, rng.random(300)


def test_shipped_metrics_live_in_the_package_and_load_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert available_metrics() == ["accuracy", "f1"]
    for name in available_metrics():
        assert (METRICS_DIR / name / f"{name}.py").is_file()
        assert load_metric(name).name == name


def test_accuracy_equals_scikit_learn_plain_weighted_and_unnormalised(predictions):
    pred, ref, weights = predictions
    accuracy = load_metric("accuracy")
    assert accuracy.compute(predictions=pred, references=ref)["accuracy"] == pytest.approx(accuracy_score(ref, pred))
    weighted = accuracy.compute(predictions=pred, references=ref, sample_weight=weights)["accuracy"]
    assert weighted == pytest.approx(accuracy_score(ref, pred, sample_weight=weights), rel=1e-12)
    count = accuracy.compute(predictions=pred, references=ref, normalize=False)["accuracy"]
    assert count == float((pred == ref).sum())


def test_accuracy_accumulates_batches_like_one_call(predictions):
    pred, ref, _ = predictions
    accuracy = load_metric("accuracy")
    for start in range(0, len(ref), 64):
        accuracy.add_batch(predictions=pred[start : start + 64], references=ref[start : start + 64])
    assert accuracy.compute()["accuracy"] == pytest.approx(float((pred == ref).mean()))


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_f1_equals_scikit_learn(predictions, average):
    pred, ref, _ = predictions
    got = load_metric("f1").compute(predictions=pred, references=ref, average=average)["f1"]
    assert got == pytest.approx(f1_score(ref, pred, average=average), rel=1e-12)


def test_binary_f1_equals_scikit_learn():
    ref = np.array([0, 1, 1, 0, 1, 1, 0, 0])
    pred = np.array([0, 1, 0, 0, 1, 1, 1, 0])
    got = load_metric("f1").compute(predictions=pred, references=ref, average="binary")["f1"]
    assert got == pytest.approx(f1_score(ref, pred)) == pytest.approx(0.75)


def test_unknown_metric_names_the_shipped_ones():
    with pytest.raises(FusionError, match=r"ships \['accuracy', 'f1'\]"):
        load_metric("bleu")


def test_metric_modules_are_package_data():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((METRICS_DIR.parents[2] / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]  # each metric folder ships as a package of its own
    assert {f"hf_otfusion.train.metrics.{name}" for name in available_metrics()} <= set(packages)
