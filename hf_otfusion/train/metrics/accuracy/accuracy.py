"""Accuracy: the fraction of predictions equal to their references (an `evaluate` metric module)."""

import datasets
import evaluate
import numpy as np

from hf_otfusion.errors import MetricInputError

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions, optionally weighted per example:
accuracy = sum(w_i * [p_i == r_i]) / sum(w_i).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
    normalize (`bool`): if False, return the (weighted) number of correct predictions instead of the fraction.
    sample_weight (`list` of `float`): optional per-example weights.
Returns:
    accuracy (`float`): in [0, 1] when `normalize` is True.
Examples:
    >>> accuracy = load_metric("accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise MetricInputError(
                f"predictions {predictions.shape} and references {references.shape} differ in shape",
                metric="accuracy",
                value=(predictions.shape, references.shape),
            )
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if len(references) == 0:
            raise MetricInputError(
                "accuracy of an empty set is undefined; pass at least one prediction", metric="accuracy", value=0
            )
        correct = float(np.sum(weights * (predictions == references)))
        return {"accuracy": correct / float(np.sum(weights)) if normalize else correct}
