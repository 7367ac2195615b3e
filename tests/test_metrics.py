"""Metrics on hand-computed cases, and agreement with the local evaluate modules."""

from __future__ import annotations

import math
import socket
import warnings

import pytest

from ofa_lib.train import metrics
from ofa_lib.train.metrics import (
    AVAILABLE_METRICS,
    METRICS_BY_TASK,
    PRIMARY_METRIC,
    accuracy,
    load_metric,
    ner_f1,
    normalize_answer,
    squad_f1_em,
)

# --------------------------------------------------------------------------- hand-made cases

ACC_PRED = [0, 1, 2, 2]
ACC_REF = [0, 1, 1, 2]  # 3 of 4 right

# Gold entities: PER(0-1), ORG(3-5), LOC(7). Predicted: PER(0-1) right, ORG(3-4) wrong
# boundary, LOC missed. Sentence 2: MISC right. => 2 correct of 3 predicted, of 4 gold.
NER_REF = [
    ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "I-ORG", "O", "B-LOC"],
    ["O", "B-MISC", "I-MISC"],
]
NER_PRED = [
    ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "O", "O", "O"],
    ["O", "B-MISC", "I-MISC"],
]
NER_P, NER_R = 2 / 3, 2 / 4
NER_F1 = 2 * NER_P * NER_R / (NER_P + NER_R)  # = 4/7

SQUAD_PRED = {
    "q1": "The Cat",  # normalises to "cat": EM 1, F1 1
    "q2": "a cat sat on the mat",  # "cat sat on mat" vs "cat on mat": P 3/4, R 1, F1 6/7
    "q3": "the the cat cat",  # "cat cat" vs "cat": common 1, P 1/2, R 1, F1 2/3
    "q4": "Paris!",  # "paris" == "paris": EM 1
}
SQUAD_REF = {
    "q1": ["cat"],
    "q2": ["dog", "the cat on mat"],
    "q3": ["cat"],
    "q4": ["paris", "Paris, France"],
}
SQUAD_F1 = (1 + 6 / 7 + 2 / 3 + 1) / 4
SQUAD_EM = (1 + 0 + 0 + 1) / 4


def test_task_tables() -> None:
    assert set(METRICS_BY_TASK) == set(PRIMARY_METRIC) == {"nli", "sib", "sentiment", "ner", "qa"}
    for task, primary in PRIMARY_METRIC.items():
        assert primary in METRICS_BY_TASK[task]
    assert METRICS_BY_TASK["ner"] == ["f1", "precision", "recall"]
    assert METRICS_BY_TASK["qa"] == ["f1", "exact_match"]


def test_accuracy_by_hand() -> None:
    assert accuracy(ACC_PRED, ACC_REF) == {"accuracy": 0.75}
    assert accuracy(["a", "b"], ["a", "c"]) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="3 predictions but 2"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])


def test_ner_by_hand() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ner_f1(NER_PRED, NER_REF)
    assert out.keys() == {"precision", "recall", "f1"}
    assert out["precision"] == pytest.approx(NER_P)
    assert out["recall"] == pytest.approx(NER_R)
    assert out["f1"] == pytest.approx(4 / 7)
    assert NER_F1 == pytest.approx(4 / 7)


def test_ner_entity_rules() -> None:
    # wrong type on the right span is wrong
    assert ner_f1([["B-ORG", "I-ORG"]], [["B-PER", "I-PER"]])["f1"] == 0.0
    # conlleval (default) mode: an I- after O starts an entity, so this matches B-PER
    assert ner_f1([["O", "I-PER"]], [["O", "B-PER"]])["f1"] == 1.0
    # entities do not run across sentences
    two = ner_f1([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]])
    assert two["precision"] == 1.0 and two["recall"] == 1.0
    # nothing predicted: precision defined as 0 (no warning), recall 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none = ner_f1([["O", "O"]], [["B-LOC", "O"]])
    assert none == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_ner_subtoken_sequences_are_the_same_metric() -> None:
    # "Angela Merkel visited Paris": word level, and the same with Merkel split in 2 sub-tokens
    words_ref = [["B-PER", "I-PER", "O", "B-LOC"]]
    words_pred = [["B-PER", "O", "O", "B-LOC"]]
    sub_ref = [["B-PER", "I-PER", "I-PER", "O", "B-LOC"]]
    sub_pred = [["B-PER", "O", "O", "O", "B-LOC"]]
    assert ner_f1(words_pred, words_ref) == ner_f1(sub_pred, sub_ref)


def test_ner_errors() -> None:
    with pytest.raises(ValueError, match="sequence 0 has 1 predicted tags but 2"):
        ner_f1([["O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="2 predicted sequences but 1"):
        ner_f1([["O"], ["O"]], [["O"]])


def test_squad_normalisation() -> None:
    assert normalize_answer("The  Anatomy, of a Banana!") == "anatomy of banana"
    assert normalize_answer("An apple") == "apple"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_squad_by_hand() -> None:
    assert squad_f1_em({"a": "The Cat"}, {"a": ["cat"]}) == {"f1": 1.0, "exact_match": 1.0}
    out = squad_f1_em(SQUAD_PRED, SQUAD_REF)
    assert out["f1"] == pytest.approx(SQUAD_F1)
    assert out["exact_match"] == pytest.approx(SQUAD_EM)
    assert squad_f1_em({"a": ""}, {"a": ["x"]}) == {"f1": 0.0, "exact_match": 0.0}


def test_squad_errors() -> None:
    with pytest.raises(ValueError, match="1 without a prediction"):
        squad_f1_em({"a": "x"}, {"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match="1 without a reference"):
        squad_f1_em({"a": "x", "z": "y"}, {"a": ["x"]})
    with pytest.raises(ValueError, match="non-empty list of gold"):
        squad_f1_em({"a": "x"}, {"a": []})


# --------------------------------------------------------------------------- evaluate modules


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline env vars, and any socket connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_load_metric_offline_and_cached(no_network: None) -> None:
    load_metric.cache_clear()
    modules = {name: load_metric(name) for name in AVAILABLE_METRICS}
    for name, module in modules.items():
        assert load_metric(name) is module  # cached per process
        assert callable(module.compute)


def test_load_metric_unknown_name() -> None:
    with pytest.raises(ValueError) as err:
        load_metric("bleu")
    for name in AVAILABLE_METRICS:
        assert name in str(err.value)


def test_evaluate_load_by_folder(no_network: None) -> None:
    import evaluate

    folder = metrics.METRIC_MODULES_DIR / "accuracy"
    module = evaluate.load(str(folder), keep_in_memory=True)
    assert module.compute(predictions=ACC_PRED, references=ACC_REF) == {"accuracy": 0.75}


def test_modules_agree_with_functions(no_network: None) -> None:
    acc = load_metric("accuracy").compute(predictions=ACC_PRED, references=ACC_REF)
    assert acc == accuracy(ACC_PRED, ACC_REF)

    ner = load_metric("seqeval_f1").compute(predictions=NER_PRED, references=NER_REF)
    assert ner == ner_f1(NER_PRED, NER_REF)

    preds = [{"id": qid, "prediction_text": text} for qid, text in SQUAD_PRED.items()]
    refs = [
        {"id": qid, "answers": {"text": golds, "answer_start": [0] * len(golds)}}
        for qid, golds in reversed(list(SQUAD_REF.items()))  # order must not matter
    ]
    qa = load_metric("squad_v1").compute(predictions=preds, references=refs)
    assert qa == squad_f1_em(SQUAD_PRED, SQUAD_REF)
    assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in {**acc, **ner, **qa}.values())


def test_squad_module_rejects_duplicate_ids(no_network: None) -> None:
    preds = [{"id": "a", "prediction_text": "x"}, {"id": "a", "prediction_text": "y"}]
    refs = [{"id": "a", "answers": {"text": ["x"], "answer_start": [0]}}] * 2
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        load_metric("squad_v1").compute(predictions=preds, references=refs)
