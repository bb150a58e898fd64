"""F1 score for single-label classification: binary, macro, micro or weighted (an `evaluate` metric module)."""

import datasets
import evaluate
import numpy as np

from hf_otfusion.errors import MetricInputError

_DESCRIPTION = """
F1 is the harmonic mean of precision and recall, 2 * P * R / (P + R), per class from the confusion matrix.
`macro` averages the per-class F1 over every class seen in predictions or references, `weighted` weights them
by each class's number of references, `micro` pools all decisions (equal to accuracy for single-label data),
and `binary` reports the class `pos_label` only. A class with no true and no predicted example is skipped; a
class with P + R = 0 counts as F1 = 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
    average (`str`): one of "macro" (default), "micro", "weighted", "binary".
    pos_label (`int`): the positive class for `average="binary"` (default 1).
Returns:
    f1 (`float`): in [0, 1].
Examples:
    >>> f1 = load_metric("f1")
    >>> f1.compute(predictions=[0, 1, 1], references=[0, 1, 0], average="macro")
    {'f1': 0.6666666666666666}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", pos_label=1):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if average not in ("macro", "micro", "weighted", "binary"):
            raise MetricInputError(
                f"average={average!r} is not one of 'macro', 'micro', 'weighted', 'binary'", metric="f1", value=average
            )
        classes = np.union1d(predictions, references)
        true_pos = np.array([np.sum((predictions == c) & (references == c)) for c in classes], dtype=np.float64)
        predicted = np.array([np.sum(predictions == c) for c in classes], dtype=np.float64)
        actual = np.array([np.sum(references == c) for c in classes], dtype=np.float64)
        if average == "micro":
            return {"f1": float(true_pos.sum() / max(len(references), 1))}
        denominator = predicted + actual
        per_class = np.divide(2 * true_pos, denominator, out=np.zeros_like(true_pos), where=denominator > 0)
        if average == "binary":
            hits = np.flatnonzero(classes == pos_label)
            return {"f1": float(per_class[hits[0]]) if len(hits) else 0.0}
        if average == "weighted":
            return {"f1": float(np.sum(per_class * actual) / max(actual.sum(), 1))}
        return {"f1": float(per_class.mean()) if len(classes) else 0.0}
