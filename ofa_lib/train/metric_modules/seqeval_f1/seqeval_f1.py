"""Entity-level micro precision / recall / F1 with seqeval (ofa local evaluate module).

Entities are read from IOB2 tag sequences by seqeval's default (conlleval-compatible) mode:
an entity is a maximal chunk ``B-X I-X ...``; as in conlleval, an ``I-X`` that does not
continue an ``X`` chunk starts a new one. A predicted entity counts as correct only when its
type, start and end all match a gold entity in the same sentence. Micro-averaged over all
entities of all sentences; 0.0 (not a warning) when a denominator is zero.

The metric is agnostic to what a position is: scoring word-level tags (label of the first
sub-token) or sub-token-level tags (every sub-token labelled, as the OFA authors did) is the
same call; the caller builds the sequences.
"""

from typing import Dict, List, Sequence

import datasets
import evaluate
from seqeval.metrics.sequence_labeling import precision_recall_fscore_support

_CITATION = """\
@misc{seqeval,
  title={{seqeval}: A Python framework for sequence labeling evaluation},
  author={Hiroki Nakayama},
  year={2018},
  url={https://github.com/chakki-works/seqeval}
}
"""

_DESCRIPTION = (
    "Entity-level micro precision, recall and F1 (seqeval, default/conlleval mode, IOB2 tags), "
    "floats in [0, 1]."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of tag sequences (one list of str per sentence), e.g. [["B-PER", "O"]].
    references: list of gold tag sequences, same number of sentences and same lengths.
Returns:
    {"precision": float, "recall": float, "f1": float}, all in [0, 1].
Examples:
    >>> metric = evaluate.load("path/to/ofa_lib/train/metric_modules/seqeval_f1")
    >>> metric.compute(predictions=[["B-PER", "I-PER", "O"]], references=[["B-PER", "I-PER", "O"]])
    {'precision': 1.0, 'recall': 1.0, 'f1': 1.0}
"""


def entity_scores(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> Dict[str, float]:
    """Micro entity-level precision, recall and F1 of IOB2 tag sequences (seqeval default mode)."""
    y_pred: List[List[str]] = [list(seq) for seq in predictions]
    y_true: List[List[str]] = [list(seq) for seq in references]
    if len(y_pred) != len(y_true):
        raise ValueError(f"seqeval_f1: {len(y_pred)} predicted sequences but {len(y_true)} references")
    if not y_true:
        raise ValueError("seqeval_f1: no sequences to score")
    for i, (p, t) in enumerate(zip(y_pred, y_true)):
        if len(p) != len(t):
            raise ValueError(
                f"seqeval_f1: sequence {i} has {len(p)} predicted tags but {len(t)} reference tags"
            )
    # seqeval's default-mode (conlleval) implementation; its ``mode="strict"`` is not used.
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="micro", zero_division=0
    )
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SeqevalF1(evaluate.Metric):
    """Entity-level micro P/R/F1 as an ``evaluate.Metric``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(
        self, predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
    ) -> Dict[str, float]:
        return entity_scores(predictions, references)
