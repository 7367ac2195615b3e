"""ofa_lib.data.features with a tiny real fast tokenizer (tests/conftest.py) and real data."""

from __future__ import annotations

import copy
import math

import datasets
import numpy as np
import pytest
import torch

from ofa_lib.data import features as F
from ofa_lib.data.catalog import NER_LABELS
from ofa_lib.data.loading import load_split

# "John lives in New York ." with the tiny tokenizer:
TOKENS = ["<s>", "▁J", "o", "h", "n", "▁l", "i", "v", "e", "s", "▁in",
          "▁N", "e", "w", "▁Y", "o", "r", "k", "▁.", "</s>"]
X = -100


@pytest.fixture
def ner_sentence():
    feats = datasets.Features(
        {"tokens": datasets.List(datasets.Value("string")),
         "ner_tags": datasets.List(datasets.ClassLabel(names=NER_LABELS))}
    )
    # B-PER O O B-LOC I-LOC O
    return datasets.Dataset.from_dict(
        {"tokens": [["John", "lives", "in", "New", "York", "."]], "ner_tags": [[1, 0, 0, 5, 6, 0]]},
        features=feats,
    )


def test_ner_labels_on_first_subtoken(tiny_tokenizer, tmp_outputs, ner_sentence):
    out = F.featurize("ner", ner_sentence, tiny_tokenizer, 128, train=True)
    row = out[0]
    assert tiny_tokenizer.convert_ids_to_tokens(row["input_ids"]) == TOKENS
    assert row["labels"] == [X, 1, X, X, X, 0, X, X, X, X, 0, 5, X, X, 6, X, X, X, 0, X]
    assert row["word_index"] == [-1, 0, -1, -1, -1, 1, -1, -1, -1, -1, 2, 3, -1, -1, 4, -1, -1, -1, 5, -1]
    assert set(out.column_names) == {"input_ids", "attention_mask", "labels", "word_index"}


def test_ner_label_all_subtokens(tiny_tokenizer, tmp_outputs, ner_sentence):
    out = F.featurize("ner", ner_sentence, tiny_tokenizer, 128, train=True, label_all_subtokens=True)
    # Continuations of B-PER get I-PER (2), of B-LOC I-LOC (6); specials stay -100.
    assert out[0]["labels"] == [X, 1, 2, 2, 2, 0, 0, 0, 0, 0, 0, 5, 6, 6, 6, 6, 6, 6, 0, X]
    assert out[0]["word_index"] == F.featurize("ner", ner_sentence, tiny_tokenizer, 128, train=True)[0]["word_index"]


def test_ner_truncation_drops_trailing_words(tiny_tokenizer, tmp_outputs, ner_sentence):
    row = F.featurize("ner", ner_sentence, tiny_tokenizer, 12, train=False)[0]
    assert len(row["input_ids"]) == 12
    assert [w for w in row["word_index"] if w >= 0] == [0, 1, 2]  # words 3..5: predicted "O"


def test_ner_on_real_data_aligns(tiny_tokenizer, tmp_outputs):
    ds = load_split("masakhaner2", "yor", "validation", subsample=40)
    out = F.featurize("ner", ds, tiny_tokenizer, 128, train=True)
    assert len(out) == len(ds)
    for ex, row in zip(ds, out):
        firsts = [(w, lab) for w, lab in zip(row["word_index"], row["labels"]) if w >= 0]
        assert [lab for _, lab in firsts] == [ex["ner_tags"][w] for w, _ in firsts]
        assert [w for w, _ in firsts] == list(range(len(firsts)))


def test_sequence_tasks(tiny_tokenizer, tmp_outputs):
    nli = load_split("xnli", "en", "validation", subsample=20)
    out = F.featurize("nli", nli, tiny_tokenizer, 64, train=True)
    assert out["labels"] == nli["label"]
    assert max(len(x) for x in out["input_ids"]) == 64  # premise + hypothesis truncated
    ids = out[0]["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and [2, 2] in [ids[i : i + 2] for i in range(len(ids) - 1)]
    sib = load_split("sib200", "eng_Latn", "test", subsample=10)
    out = F.featurize("sib", sib, tiny_tokenizer, 32, train=False)
    assert out["labels"] == sib["label"] and all(len(x) <= 32 for x in out["input_ids"])
    assert "text" not in out.column_names


def _tydiqa_example():
    """A real English TyDiQA dev question whose answer lies deep in its context."""
    ds = load_split("tydiqa_goldp", "en", "validation")
    for i, ex in enumerate(ds):
        if len(ex["question"]) < 50 and 300 < ex["answers"]["answer_start"][0] < len(ex["context"]) - 200:
            return ds.select([i])
    raise AssertionError("no suitable example")


def test_qa_windows_recover_the_answer(tiny_tokenizer, tmp_outputs):
    ex_ds = _tydiqa_example()
    ex = ex_ds[0]
    answer = ex["answers"]["text"][0]
    train = F.featurize("qa", ex_ds, tiny_tokenizer, 128, train=True, doc_stride=32)
    evalf = F.featurize("qa", ex_ds, tiny_tokenizer, 128, train=False, doc_stride=32)
    assert len(train) == len(evalf) >= 3  # several windows, the same in both modes
    assert set(evalf["example_id"]) == {ex["id"]}
    hits = 0
    for t_row, e_row in zip(train, evalf):
        assert t_row["input_ids"] == e_row["input_ids"] and len(t_row["input_ids"]) <= 128
        s, e = t_row["start_positions"], t_row["end_positions"]
        if s == 0:
            assert e == 0  # answer not (fully) inside this window: CLS
            continue
        hits += 1
        offsets = e_row["offset_mapping"]
        assert offsets[0] == [-1, -1]
        assert ex["context"][offsets[s][0] : offsets[e][1]].strip() == answer
    assert 1 <= hits < len(train)
    # Logits peaked on the gold positions give the answer back through post-processing.
    start = [np.eye(len(r["input_ids"]))[r["start_positions"]] for r in train]
    end = [np.eye(len(r["input_ids"]))[r["end_positions"]] for r in train]
    assert F.qa_postprocess(ex_ds, evalf, start, end, max_answer_length=200) == {ex["id"]: answer}


def test_qa_postprocess_hand_made():
    context = "The cat sat on the mat."
    examples = [{"id": "q1", "context": context}, {"id": "q2", "context": "Nothing."}]
    no = [-1, -1]
    # Two windows of q1 (tokens: <s> question </s></s> context </s>) and one of q2 without context.
    w1 = [no, no, no, no, [0, 3], [3, 7], [7, 11], no]  # "The", " cat", " sat"
    w2 = [no, no, no, no, [11, 14], [14, 18], [18, 22], [22, 23], no]  # " on", " the", " mat", "."
    w3 = [no, no, no]
    features = [{"example_id": "q1", "offset_mapping": w1},
                {"example_id": "q1", "offset_mapping": w2},
                {"example_id": "q2", "offset_mapping": w3}]
    s1 = np.array([9.0, 8, 0, 0, 1, 2, 0, 0])  # the top logits are on question tokens: invalid
    e1 = np.array([9.0, 0, 0, 0, 0, 0, 1, 0])  # best valid here: " cat sat" = 2 + 1
    s2 = np.array([0.0, 0, 0, 0, -5, 3, 0, 0, 0, 0])  # padded one longer than the feature
    e2 = np.array([0.0, 0, 0, 0, 5, 0, 4, 0, 0, 9])  # 9 sits on padding: ignored
    s3, e3 = np.array([5.0, 1, 1]), np.array([5.0, 1, 1])
    starts, ends = [s1, s2, s3], [e1, e2, e3]
    # " the mat" = 3 + 4 beats " on" = -5 + 5, " mat" = 0 + 4 and end-before-start (5, 4).
    assert F.qa_postprocess(examples, features, starts, ends) == {"q1": "the mat", "q2": ""}
    # One-token answers only: " mat" (0 + 4) is the best.
    assert F.qa_postprocess(examples, features, starts, ends, max_answer_length=1)["q1"] == "mat"
    # n_best=1 keeps only the top start and end of each window: none forms a valid span.
    assert F.qa_postprocess(examples, features, starts, ends, n_best=1)["q1"] == ""
    # Torch logits in a padded 2-d batch work too.
    padded = torch.zeros(3, 10)
    for i, row in enumerate(starts):
        padded[i, : len(row)] = torch.tensor(row)
    padded_e = torch.zeros(3, 10)
    for i, row in enumerate(ends):
        padded_e[i, : len(row)] = torch.tensor(row)
    assert F.qa_postprocess(examples, features, padded, padded_e)["q1"] == "the mat"


def test_featurize_cache_hit(tiny_tokenizer, tmp_outputs, monkeypatch):
    ds = load_split("umsab", "spanish", "validation", subsample=30)
    first = F.featurize("sentiment", ds, tiny_tokenizer, 64, train=True)
    files = list((tmp_outputs / "cache" / "features").glob("sentiment-*.arrow"))
    assert len(files) == 1 and first.cache_files[0]["filename"] == str(files[0])

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: the encoder ran again")

    monkeypatch.setattr(F, "_encode_single", boom)
    again = F.featurize("sentiment", load_split("umsab", "spanish", "validation", subsample=30),
                        tiny_tokenizer, 64, train=True)
    assert again.cache_files == first.cache_files and again["input_ids"] == first["input_ids"]
    with pytest.raises(AssertionError, match="cache miss"):  # another option: another key
        F.featurize("sentiment", ds, tiny_tokenizer, 32, train=True)


def test_a_truncated_cache_file_is_rebuilt(tiny_tokenizer, tmp_outputs, capsys):
    ds = load_split("umsab", "spanish", "validation", subsample=30)
    expected = F.featurize("sentiment", ds, tiny_tokenizer, 64, train=True).to_list()  # read before truncating
    (file,) = (tmp_outputs / "cache" / "features").glob("sentiment-*.arrow")
    content = file.read_bytes()
    file.unlink()  # a new inode: nothing of this process maps the old one
    file.write_bytes(content[: len(content) // 2])
    again = F.featurize("sentiment", ds, tiny_tokenizer, 64, train=True)
    assert again.to_list() == expected
    assert "is unreadable" in capsys.readouterr().out and str(file) in again.cache_files[0]["filename"]
    assert file.stat().st_size == len(content)  # rebuilt in place: the next run reads it


def test_featurize_errors(tiny_tokenizer, tmp_outputs, ner_sentence):
    with pytest.raises(ValueError, match="task='pos' is unknown"):
        F.featurize("pos", ner_sentence, tiny_tokenizer, 64, train=True)
    with pytest.raises(ValueError, match="lacks columns"):
        F.featurize("nli", ner_sentence, tiny_tokenizer, 64, train=True)
    qa = load_split("tydiqa_goldp", "en", "validation", subsample=3)
    with pytest.raises(ValueError, match=r"question id=.* raise max_length or lower doc_stride"):
        F.featurize("qa", qa, tiny_tokenizer, 48, train=True, doc_stride=16)
    with pytest.raises(ValueError, match="doc_stride=64"):
        F.featurize("qa", qa, tiny_tokenizer, 64, train=True, doc_stride=64)


def test_collate_pads_dynamically():
    rows = [
        {"input_ids": [0, 5, 2], "attention_mask": [1, 1, 1], "labels": [X, 3, X], "word_index": [-1, 0, -1]},
        {"input_ids": [0, 5, 6, 7, 2], "attention_mask": [1] * 5, "labels": [X, 1, 2, 0, X], "word_index": [0] * 5},
    ]
    batch = F.collate(rows, pad_token_id=1)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[0, 5, 2, 1, 1], [0, 5, 6, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[X, 3, X, X, X], [X, 1, 2, 0, X]]
    assert all(t.dtype == torch.long for t in batch.values())

    seq = F.collate([{"input_ids": [0, 2], "token_type_ids": [0, 0], "labels": 2},
                     {"input_ids": [0, 9, 9, 2], "token_type_ids": [0, 0, 1, 1], "labels": 0}], pad_token_id=1)
    assert seq["labels"].tolist() == [2, 0]
    assert seq["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert seq["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 1, 1]]

    qa = F.collate([{"input_ids": [0, 4, 2], "attention_mask": [1, 1, 1], "start_positions": 1,
                     "end_positions": 1, "example_id": "a", "offset_mapping": [[-1, -1]] * 3}], pad_token_id=1)
    assert set(qa) == {"input_ids", "attention_mask", "start_positions", "end_positions"}
    assert qa["start_positions"].tolist() == [1]


def test_length_sorted_batches_restore_order():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = F.length_sorted_batches(lengths, batch_size=3)
    assert batches == [[1, 3, 6], [4, 0, 5], [2]]
    outputs = [f"pred{i}" for b in batches for i in b]  # computed in batch order
    assert F.restore_order(batches, outputs) == [f"pred{i}" for i in range(len(lengths))]
    assert F.length_sorted_batches([], 4) == []


def test_length_grouped_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=701).tolist()
    batches = F.length_grouped_batches(lengths, batch_size=16, seed=7)
    assert sorted(i for b in batches for i in b) == list(range(701))  # every row once
    assert len(batches) == math.ceil(701 / 16) and all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 701 % 16
    assert batches == F.length_grouped_batches(lengths, batch_size=16, seed=7)  # a resumed epoch replays it
    assert batches != F.length_grouped_batches(lengths, batch_size=16, seed=8)

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs) / sum(lengths)

    order = rng.permutation(701).tolist()
    random_batches = [order[k:k + 16] for k in range(0, 701, 16)]
    assert padded(batches) < 1.2 < 1.5 < padded(random_batches)
    assert F.padded_tokens(lengths, batches) == round(padded(batches) * sum(lengths))
    # the batch order is shuffled: not longest-first across the epoch
    maxima = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert maxima != sorted(maxima, reverse=True)
    with pytest.raises(ValueError, match="batch_size"):
        F.length_grouped_batches(lengths, batch_size=0, seed=1)


def test_tokenizer_fingerprint_is_identity_not_call_state(tiny_tokenizer):
    before = F.tokenizer_fingerprint(tiny_tokenizer)
    tiny_tokenizer(["a b c"] * 2, truncation=True, max_length=4, padding="max_length")
    assert F.tokenizer_fingerprint(tiny_tokenizer) == before  # truncation/padding state ignored
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["zzz"])
    assert F.tokenizer_fingerprint(other) != before
