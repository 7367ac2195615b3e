"""SQuAD v1.1 span F1 and exact match, as fractions in [0, 1] (ofa local evaluate module).

Definitions of the SQuAD v1.1 evaluation (Rajpurkar et al. 2016), written from the spec:
- normalise an answer: lowercase; delete every ASCII punctuation character; replace the
  whole words ``a``, ``an``, ``the`` by a space; collapse whitespace runs to one space;
- exact match of a prediction: 1 if its normalised text equals the normalised text of any
  gold answer, else 0;
- F1 of a prediction against one gold answer: bag-of-tokens overlap of the whitespace tokens
  of both normalised texts (precision = common / predicted tokens, recall = common / gold
  tokens, F1 their harmonic mean; 0 when nothing is shared); the question's F1 is the max
  over its gold answers;
- the scores are means over questions (the official script reports them x100; we do not).
Every reference question must have a prediction and every prediction a reference question.
Tokens are whitespace-separated, so for scripts written without spaces (zh, th, ja) F1
degenerates to a character-run match, as in the official script.
"""

import re
import string
from collections import Counter
from typing import Any, Dict, List, Mapping, Sequence

import datasets
import evaluate

_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
  title = {{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text},
  author = {Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle = {Proceedings of EMNLP},
  year = {2016},
  pages = {2383--2392}
}
"""

_DESCRIPTION = "SQuAD v1.1 token-overlap F1 and exact match (max over gold answers), in [0, 1]."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": [str, ...], "answer_start": [int, ...]}},
        the Hugging Face SQuAD layout (both keys required by the schema; answer_start is unused).
Returns:
    {"f1": float, "exact_match": float}, means over questions, in [0, 1].
Examples:
    >>> metric = evaluate.load("path/to/ofa_lib/train/metric_modules/squad_v1")
    >>> metric.compute(predictions=[{"id": "q1", "prediction_text": "The Cat"}],
    ...                references=[{"id": "q1", "answers": {"text": ["cat"], "answer_start": [0]}}])
    {'f1': 1.0, 'exact_match': 1.0}
"""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 if both normalise to the same string, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised texts (SQuAD v1.1)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> Dict[str, float]:
    """Mean over questions of max-over-gold F1 and exact match; ids of both must be the same set."""
    if not references:
        raise ValueError("squad_v1: no questions to score")
    missing = [qid for qid in references if qid not in predictions]
    extra = [qid for qid in predictions if qid not in references]
    if missing or extra:
        raise ValueError(
            f"squad_v1: prediction ids differ from reference ids: {len(missing)} without a "
            f"prediction (first: {missing[:5]}), {len(extra)} without a reference (first: {extra[:5]})"
        )
    f1_total = 0.0
    em_total = 0.0
    for qid, golds in references.items():
        if isinstance(golds, str) or len(golds) == 0:
            raise ValueError(f"squad_v1: question {qid!r} needs a non-empty list of gold answers")
        prediction = predictions[qid]
        f1_total += max(f1_score(prediction, gold) for gold in golds)
        em_total += max(exact_match_score(prediction, gold) for gold in golds)
    n = len(references)
    return {"f1": f1_total / n, "exact_match": em_total / n}


def _unique_by_id(rows: Sequence[Mapping[str, Any]], value_of, what: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for row in rows:
        qid = row["id"]
        if qid in out:
            raise ValueError(f"squad_v1: duplicate id {qid!r} in {what}")
        out[qid] = value_of(row)
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadV1(evaluate.Metric):
    """SQuAD v1.1 F1 / exact match (fractions) as an ``evaluate.Metric``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                    },
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
        )

    def _compute(
        self, predictions: List[Mapping[str, Any]], references: List[Mapping[str, Any]]
    ) -> Dict[str, float]:
        preds = _unique_by_id(predictions, lambda row: row["prediction_text"], "predictions")
        golds: Dict[str, List[str]] = _unique_by_id(
            references, lambda row: list(row["answers"]["text"]), "references"
        )
        return squad_scores(preds, golds)
