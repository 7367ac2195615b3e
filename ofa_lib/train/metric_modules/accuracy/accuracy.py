"""Accuracy: the fraction of predictions equal to their reference (ofa local evaluate module).

Self-contained so that ``evaluate.load(<path to this file or its folder>)`` works offline;
``ofa_lib.train.metrics`` imports the plain function ``accuracy_score`` from this same file.
"""

from typing import Any, Dict, Sequence

import datasets
import evaluate

_CITATION = ""

_DESCRIPTION = (
    "Accuracy = (number of predictions equal to their reference) / (number of examples), "
    "a float in [0, 1]."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels, ints or strings.
    references: gold labels, the same length and type as predictions.
Returns:
    {"accuracy": float in [0, 1]}
Examples:
    >>> metric = evaluate.load("path/to/ofa_lib/train/metric_modules/accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""


def accuracy_score(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Fraction of positions where ``predictions[i] == references[i]``; both non-empty, same length."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"accuracy: {len(predictions)} predictions but {len(references)} references"
        )
    if not references:
        raise ValueError("accuracy: no examples to score")
    correct = sum(1 for p, r in zip(predictions, references) if p == r)
    return correct / len(references)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Accuracy as an ``evaluate.Metric``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
        )

    def _compute(self, predictions: Sequence[Any], references: Sequence[Any]) -> Dict[str, float]:
        return {"accuracy": accuracy_score(predictions, references)}
