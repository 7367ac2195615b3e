"""ofa_lib.data on the real benchmark copies in ../shared/data (counts from its README)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ofa_lib.data import catalog, loading, locate
from ofa_lib.data.catalog import MalformedDataWarning
from ofa_lib.data.loading import load_split

# (dataset, lang, split) -> examples, as the data README states them.
COUNTS = {
    ("mnli15k", "en", "train"): 15_001,
    ("xnli", "en", "test"): 5_010,
    ("xnli", "sw", "test"): 5_010,
    ("xnli", "en", "validation"): 2_490,
    ("xnli", "zh", "validation"): 2_490,
    ("tydiqa_goldp", "en", "train"): 3_696,
    ("tydiqa_goldp", "ko", "train"): 1_625,
    ("tydiqa_goldp", "sw", "train"): 2_755,
    **{
        ("tydiqa_goldp", lang, "validation"): n
        for lang, n in dict(ar=921, bn=113, en=440, fi=782, id=565, ko=276, ru=812, sw=499, te=669).items()
    },
    ("xquad", "en", "test"): 1_190,
    ("xquad", "th", "test"): 1_190,
    ("masakhaner", "hau", "train"): 1_912,
    ("masakhaner", "hau", "validation"): 276,
    ("masakhaner", "hau", "test"): 552,
    ("masakhaner", "luo", "train"): 644,
    ("masakhaner", "luo", "validation"): 92,
    ("masakhaner", "luo", "test"): 186,
    ("masakhaner2", "yor", "train"): 6_876,
    ("masakhaner2", "yor", "validation"): 983,
    ("masakhaner2", "yor", "test"): 1_964,
    ("wikiann", "en", "train"): 20_000,
    ("wikiann", "en", "validation"): 10_000,
    ("wikiann", "de", "test"): 10_000,
    ("conll2003", "en", "train"): 14_042,
    ("conll2003", "en", "validation"): 3_250,
    ("conll2003", "en", "test"): 3_453,
    ("sib200", "eng_Latn", "train"): 701,
    ("sib200", "eng_Latn", "validation"): 99,
    ("sib200", "nqo_Nkoo", "test"): 204,
    ("umsab", "english", "train"): 1_839,
    ("umsab", "english", "validation"): 324,
    ("umsab", "hindi", "test"): 870,
}


@pytest.mark.parametrize("key", sorted(COUNTS), ids=lambda k: "-".join(k))
def test_counts_match_readme(key):
    assert len(load_split(*key)) == COUNTS[key]


MIRROR_SIZES = {
    "mnli15k": 1, "xnli": 15, "wikiann": 6, "masakhaner": 10, "masakhaner2": 20,
    "conll2003": 1, "tydiqa_goldp": 9, "xquad": 12, "sib200": 205, "umsab": 8,
}


def test_registry():
    assert set(catalog.DATASETS) == set(MIRROR_SIZES) | {"multinli", "indicxnli"}
    assert {catalog.task_of(d) for d in catalog.DATASETS} == set(catalog.TASKS)
    assert catalog.task_of("umsab") == "sentiment" and catalog.task_of("sib200") == "sib"
    # offline (the test environment) only the mirror's languages are available
    assert {d: len(locate.languages(d)) for d in MIRROR_SIZES} == MIRROR_SIZES
    # known languages add the hub copies' (IndicXNLI's 11, WikiANN's XTREME languages …)
    assert len(locate.known_languages("indicxnli")) == 11 and len(locate.known_languages("wikiann")) == 46
    assert locate.known_languages("sib200") == locate.languages("sib200")
    assert "nqo_Nkoo.zip" not in locate.languages("sib200")
    assert locate.available_splits("tydiqa_goldp", "fi") == ["validation"]
    assert locate.available_splits("tydiqa_goldp", "en") == ["train", "validation"]


def test_columns_per_task():
    assert load_split("xnli", "de", "validation").column_names == ["premise", "hypothesis", "label"]
    assert load_split("wikiann", "nl", "validation").column_names == ["tokens", "ner_tags"]
    assert load_split("xquad", "de", "test").column_names == ["id", "title", "context", "question", "answers"]
    assert load_split("sib200", "deu_Latn", "validation").column_names == ["text", "label"]
    assert load_split("umsab", "german", "train").column_names == ["text", "label"]


def test_nli_labels_agree_between_mnli_and_xnli():
    mnli = load_split("mnli15k", "en", "train")
    xnli = load_split("xnli", "en", "validation")
    assert mnli.features["label"].names == xnli.features["label"].names == catalog.NLI_LABELS
    # File counts of the words entailment / neutral / contradictory.
    assert Counter(mnli["label"]) == {0: 5100, 1: 4397, 2: 5504}
    first = mnli[0]
    assert first["hypothesis"] == "Product and geography are what make cream skimming work ."
    assert first["label"] == 1  # "neutral"
    # QUOTE_NONE: quote characters stay in the text, no row swallows the next one.
    assert any('"' in p for p in mnli["premise"])
    assert set(Counter(xnli["label"]).values()) == {830}


def test_label_names():
    assert catalog.label_names("wikiann") == catalog.NER_LABELS
    assert catalog.ner_labels(True) == catalog.NER_LABELS + ["B-DATE", "I-DATE"]
    assert catalog.ner_labels(False) == catalog.NER_LABELS
    topics = catalog.label_names("sib200")
    assert topics == sorted(topics) and len(topics) == 7 and "science/technology" in topics
    assert load_split("sib200", "yor_Latn", "train").features["label"].names == topics
    assert catalog.label_names("umsab") == ["negative", "neutral", "positive"]
    assert catalog.label_names("xquad") == []


def test_masakhaner_date_maps_to_o_by_default():
    default = load_split("masakhaner", "hau", "train")
    dated = load_split("masakhaner", "hau", "train", map_date_to_o=False)
    assert default.features["ner_tags"].feature.names == catalog.NER_LABELS
    assert dated.features["ner_tags"].feature.names == catalog.ner_labels(with_date=True)
    tags_default, tags_dated = default["ner_tags"], dated["ner_tags"]
    flat_dated = [t for s in tags_dated for t in s]
    assert {7, 8} <= set(flat_dated)  # B-DATE / I-DATE exist in the file
    assert max(t for s in tags_default for t in s) <= 6
    for a, b in zip(tags_default, tags_dated):
        assert [x if x < 7 else 0 for x in b] == a
    assert default["tokens"] == dated["tokens"]


def test_xho_malformed_sentences_are_reported_and_skipped():
    with pytest.warns(MalformedDataWarning, match=r"masakhaner2/xho/train\.txt.*line 44520.*line 74513"):
        ds = load_split("masakhaner2", "xho", "train")
    assert len(ds) == 5_716  # 5,718 sentences in the file minus the 2 malformed ones
    for tokens, tags in zip(ds["tokens"], ds["ner_tags"]):
        assert len(tokens) == len(tags) > 0
        assert all(t.strip() for t in tokens)
    # No tag is shifted: an independent naive reading of the file, minus the sentences that
    # hold a line with an empty token, gives exactly the loaded sentences.
    path = locate.mirror_root() / "ner" / "masakhaner2" / "xho" / "train.txt"
    names = catalog.ner_labels(with_date=True)
    expected, sentence = [], []
    for line in path.read_text(encoding="utf-8").split("\n") + [""]:
        if line.strip():
            sentence.append(line)
            continue
        if sentence and not any(x.startswith(" ") for x in sentence):
            pairs = [x.split(" ") for x in sentence]
            tags = [names.index("O" if g.endswith("DATE") else g) for _, g in pairs]
            expected.append(([t for t, _ in pairs], tags))
        sentence = []
    assert len(expected) == 5_716
    assert list(zip(ds["tokens"], ds["ner_tags"])) == expected
    assert len(load_split("masakhaner2", "xho", "validation")) == 817
    assert len(load_split("masakhaner2", "xho", "test")) == 1_633


def test_qa_answers_point_into_context():
    ds = load_split("tydiqa_goldp", "bn", "validation")
    for ex in ds:
        for text, start in zip(ex["answers"]["text"], ex["answers"]["answer_start"]):
            assert ex["context"][start : start + len(text)] == text
    assert len(set(ds["id"])) == len(ds)


def test_subsample_is_seeded_and_deterministic():
    a = load_split("xnli", "fr", "validation", subsample=50, seed=1)
    b = load_split("xnli", "fr", "validation", subsample=50, seed=1)
    c = load_split("xnli", "fr", "validation", subsample=50, seed=2)
    assert len(a) == 50
    assert a["premise"] == b["premise"] and a["label"] == b["label"]
    assert a._fingerprint == b._fingerprint
    assert a["premise"] != c["premise"]
    assert len(load_split("xnli", "fr", "validation", subsample=10**6)) == 2_490
    assert loading.subsample_indices(10, 3, seed=0) == loading.subsample_indices(10, 3, seed=0)


def test_returned_datasets_are_independent():
    a = load_split("umsab", "french", "validation")
    a.set_format("numpy")
    assert load_split("umsab", "french", "validation").format["type"] is None


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        (("xnl1", "en", "test"), {}, r"dataset='xnl1' is unknown; available: mnli15k, multinli, xnli, .*umsab"),
        (("xnli", "xx", "test"), {}, r"lang='xx' is unknown for dataset='xnli'; available: ar, bg, .*zh"),
        (("xnli", "en", "dev"), {}, r"split='dev' is unknown for dataset='xnli'; available: validation, test"),
        (("tydiqa_goldp", "fi", "train"), {},
         r"split='train' does not exist for .*lang='fi'.*available for this language: validation"),
        (("xnli", "en", "test"), {"subsample": 0}, r"subsample=0"),
    ],
)
def test_errors_name_the_parameter(args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_split(*args, **kwargs)


def test_missing_data_dir_says_how_to_set_it(monkeypatch, tmp_path):
    monkeypatch.setenv("OFA_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="OFA_DATA_DIR"):
        load_split("xnli", "en", "test")
    with pytest.raises(FileNotFoundError, match="OFA_DATA_DIR"):
        locate.languages("xnli")
    # An unknown dataset is reported before the data directory is looked at.
    with pytest.raises(ValueError, match="dataset='nope'"):
        load_split("nope", "en", "test")


# --------------------------------------------------------------------------- corrupt user files (issue 13, item 4)
REAL_MIRROR = locate.mirror_root()


def _copy_mirror_file(tmp_path, monkeypatch, rel: str, n_lines: int | None = None) -> "Path":
    """A one-file mirror in ``tmp_path`` (a copy of the real file's first lines) used as OFA_DATA_DIR."""
    src = REAL_MIRROR / rel
    dst = tmp_path / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    lines = src.read_bytes().split(b"\n")
    dst.write_bytes(b"\n".join(lines[:n_lines] if n_lines else lines))
    monkeypatch.setenv("OFA_DATA_DIR", str(tmp_path))
    return dst


def test_non_utf8_byte_is_named_with_file_and_line(tmp_path, monkeypatch):
    path = _copy_mirror_file(tmp_path, monkeypatch, "nli/xnli/validation/de.tsv", 20)
    raw = path.read_bytes().split(b"\n")
    raw[6] = raw[6].replace(b"e", b"\xe9", 1)  # a Latin-1 byte on line 7
    path.write_bytes(b"\n".join(raw))
    with pytest.raises(catalog.DataError, match=r"validation/de\.tsv:7: byte 0xe9 .* not UTF-8; expected UTF-8"):
        load_split("xnli", "de", "validation")


def test_bad_label_word_is_named_with_file_and_line(tmp_path, monkeypatch):
    path = _copy_mirror_file(tmp_path, monkeypatch, "nli/multinli.train.en.15k.tsv", 30)
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[11] = lines[11].rsplit("\t", 1)[0] + "\tmaybe"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(catalog.DataError, match=r"multinli\.train\.en\.15k\.tsv:12: label 'maybe' is not one of"):
        load_split("mnli15k", "en", "train")
    path = _copy_mirror_file(tmp_path, monkeypatch, "nli/xnli/test/de.tsv", 10)
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\tneutral"  # a word where XNLI has ids
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(catalog.DataError, match=r"test/de\.tsv:4: label 'neutral' is not one of the ids \[0, 1, 2\]"):
        load_split("xnli", "de", "test")


def test_truncated_json_is_named_with_file_line_and_column(tmp_path, monkeypatch):
    path = _copy_mirror_file(tmp_path, monkeypatch, "qa/xquad/de.json")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(catalog.DataError, match=r"xquad/de\.json:\d+:\d+: invalid JSON .*truncated"):
        load_split("xquad", "de", "test")
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c"}]}]}))
    loading._load_full.cache_clear()
    with pytest.raises(catalog.DataError, match=r"xquad/de\.json: not SQuAD v1\.1 JSON: KeyError 'qas'"):
        load_split("xquad", "de", "test")


def test_ner_file_with_the_wrong_separator_is_an_error_not_zero_rows(tmp_path, monkeypatch):
    path = _copy_mirror_file(tmp_path, monkeypatch, "ner/masakhaner/hau/dev.txt", 200)
    path.write_text(path.read_text(encoding="utf-8").replace(" ", "\t"), encoding="utf-8")
    with pytest.raises(catalog.DataError, match=r"hau/dev\.txt:1: no sentence could be read: expected 'token tag' "
                                             r"lines \(one space\) — its lines are tab-separated"):
        load_split("masakhaner", "hau", "validation")
    path = _copy_mirror_file(tmp_path / "w", monkeypatch, "ner/wikiann/de/test.conllu", 200)
    path.write_text(path.read_text(encoding="utf-8").replace("\t", " "), encoding="utf-8")
    with pytest.raises(catalog.DataError, match=r"de/test\.conllu:1: .*tab-separated\) — its lines are space-separated"):
        load_split("wikiann", "de", "test")


def test_header_only_split_is_an_error_in_load_split(tmp_path, monkeypatch):
    _copy_mirror_file(tmp_path, monkeypatch, "cls/sib200/deu_Latn/test.tsv", 1)
    with pytest.raises(catalog.DataError, match=r"cls/sib200/deu_Latn/test\.tsv: sib200/deu_Latn/test has no examples"):
        load_split("sib200", "deu_Latn", "test")
