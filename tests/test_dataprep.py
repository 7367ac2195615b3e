"""ofa_lib.analysis.dataprep on the real data (small subsets) and one headless run of 01_data_prep."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from ofa_lib import models
from ofa_lib.analysis import dataprep
from ofa_lib.data import locate
from ofa_lib.paths import REPO_ROOT
from ofa_lib.train.config import ConfigError

NOTEBOOK = REPO_ROOT / "notebooks" / "01_data_prep.ipynb"


# --------------------------------------------------------------------------- parameters


def test_defaults_follow_task_data():
    cfg = dataprep.make_prep_config("nli")
    assert cfg.datasets == ["mnli15k", "xnli"]
    assert cfg.languages["mnli15k"] == ["en"] and len(cfg.languages["xnli"]) == 15
    assert cfg.max_length == 128 and cfg.subsample == 2000
    assert cfg.output_dir.parts[-2:] == ("data", "nli")
    assert ("xnli", "sw", "test") in cfg.units() and ("mnli15k", "en", "train") in cfg.units()

    sib = dataprep.make_prep_config("sib")
    assert sib.datasets == ["sib200"] and len(sib.languages["sib200"]) == 12
    assert "eng_Latn" in sib.languages["sib200"]
    assert len(dataprep.make_prep_config("sib", languages="all").languages["sib200"]) == len(locate.languages("sib200"))

    qa = dataprep.make_prep_config("qa")
    assert qa.max_length == 384 and qa.datasets == ["tydiqa_goldp", "xquad"]
    # TyDiQA has train only for en/ko/sw: units follow the files
    assert ("tydiqa_goldp", "en", "train") in qa.units() and ("tydiqa_goldp", "fi", "train") not in qa.units()


def test_language_selection_forms():
    cfg = dataprep.make_prep_config("nli", languages=["sw", "en"])
    assert cfg.languages == {"mnli15k": ["en"], "xnli": ["sw", "en"]}
    cfg = dataprep.make_prep_config("nli", languages=["de"])
    assert cfg.datasets == ["xnli"]  # mnli15k has no German: left out
    cfg = dataprep.make_prep_config("nli", languages={"xnli": ["de"]})
    assert cfg.languages == {"mnli15k": ["en"], "xnli": ["de"]}


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(task="pos"), r"parameter task='pos'"),
        (dict(task="nli", datasets=["nope"]), r"parameter datasets=.*dataset='nope' is unknown"),
        (dict(task="nli", datasets=["wikiann"]), r"parameter datasets=.*ner dataset"),
        (dict(task="nli", languages=["xx"]), r"parameter languages=.*lang='xx'"),
        (dict(task="nli", languages={"xnli": ["xx"]}), r"parameter languages\['xnli'\].*lang='xx' is unknown for dataset='xnli'"),
        (dict(task="nli", languages={"sib200": ["eng_Latn"]}), r"parameter languages="),
        (dict(task="nli", max_length=4), r"parameter max_length=4"),
        (dict(task="nli", subsample=0), r"parameter subsample=0"),
        (dict(task="qa", doc_stride=384), r"parameter doc_stride=384"),
        (dict(task="nli", examples_per_language=-1), r"parameter examples_per_language=-1"),
    ],
)
def test_invalid_parameters_name_the_parameter(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        dataprep.make_prep_config(**kwargs)


# --------------------------------------------------------------------------- counts, examples


def test_counts_are_full_splits_whatever_the_subsample():
    cfg = dataprep.make_prep_config("nli", languages=["en", "sw"], subsample=10)
    counts = dataprep.count_table(cfg)
    got = {(r.dataset, r.lang, r.split): r.examples for r in counts.itertuples()}
    assert got == {  # the data README
        ("mnli15k", "en", "train"): 15_001,
        ("xnli", "en", "validation"): 2_490, ("xnli", "en", "test"): 5_010,
        ("xnli", "sw", "validation"): 2_490, ("xnli", "sw", "test"): 5_010,
    }
    wide = dataprep.counts_wide(counts)
    assert list(wide.columns) == ["train", "validation", "test", "total"]
    assert pd.isna(wide.loc[("mnli15k", "en"), "test"]) and wide.loc[("xnli", "sw"), "total"] == 7_500


def test_samples_and_examples():
    cfg = dataprep.make_prep_config("ner", datasets=["masakhaner"], languages=["luo"], subsample=20,
                                    examples_per_language=3)
    samples = dataprep.load_samples(cfg)
    assert {k: len(v) for k, v in samples.items()} == {
        ("masakhaner", "luo", s): 20 for s in ("train", "validation", "test")}
    ex = dataprep.examples_table(cfg, samples)
    assert len(ex) == 3 and set(ex["split"]) == {"test"}
    assert ex["input"].str.len().max() <= 100


def test_iob_spans_and_shorten():
    tokens = "Barack Obama visited New York and I-only".split()
    tags = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "I-ORG"]
    assert dataprep.iob_spans(tokens, tags) == [("Barack Obama", "PER"), ("New York", "LOC"), ("I-only", "ORG")]
    assert dataprep.iob_spans(["a", "b"], ["B-PER", "I-LOC"]) == [("a", "PER"), ("b", "LOC")]
    assert dataprep.shorten("a  b\n c", 10) == "a b c"
    assert dataprep.shorten("这是一个没有空格的很长的句子" * 5, 10) == "这是一个没有空格的…"


# --------------------------------------------------------------------------- lengths, vocabulary


def test_token_lengths_nli_are_pair_lengths(tiny_tokenizer):
    cfg = dataprep.make_prep_config("nli", datasets=["xnli"], languages=["en"], subsample=30, max_length=20)
    samples = dataprep.load_samples(cfg)
    lengths = dataprep.token_lengths(cfg, samples, tiny_tokenizer)
    assert len(lengths) == 60 and list(lengths.columns) == ["dataset", "lang", "split", "tokens", "truncated"]
    ds = samples[("xnli", "en", "test")]
    row = ds[0]
    one = len(tiny_tokenizer(row["premise"], row["hypothesis"])["input_ids"])
    assert lengths[lengths.split == "test"]["tokens"].iloc[0] == one
    assert (lengths["truncated"] == (lengths["tokens"] > 20)).all() and lengths["truncated"].any()
    stats = dataprep.length_stats(lengths)
    assert list(stats["split"]) == ["validation", "test"] and (stats["examples"] == 30).all()
    share = 100 * lengths[lengths.split == "test"]["truncated"].mean()
    assert stats.set_index("split").loc["test", "% truncated"] == pytest.approx(share, abs=0.01)


def test_qa_windows_match_featurize(tiny_tokenizer, tmp_outputs):
    cfg = dataprep.make_prep_config("qa", datasets=["xquad"], languages=["de"], subsample=8,
                                    max_length=160, doc_stride=32)
    samples = dataprep.load_samples(cfg)
    lengths = dataprep.token_lengths(cfg, samples, tiny_tokenizer)
    assert (lengths["windows"] >= 1).all() and lengths["windows"].max() > 1
    assert (lengths["truncated"] == (lengths["windows"] > 1)).all()
    assert ((lengths["windows"] > 1) == (lengths["tokens"] > 160)).all()
    table = dataprep.windows_table(lengths)
    assert table.loc[0, "questions"] == 8 and table.loc[0, "windows"] == lengths["windows"].sum()
    assert table.filter(like="%").sum(axis=1).iloc[0] == pytest.approx(100, abs=0.2)


def test_pieces_union_is_used_token_ids(tiny_tokenizer):
    cfg = dataprep.make_prep_config("sib", languages=["eng_Latn", "deu_Latn"], subsample=25)
    samples = dataprep.load_samples(cfg)
    table, ids = dataprep.pieces_per_language(samples, tiny_tokenizer)
    texts = [t for ds in samples.values() for t in ds["text"]]
    assert ids == models.used_token_ids(tiny_tokenizer, texts)
    assert list(table["lang"]) == ["eng_Latn", "deu_Latn"]
    assert (table["pieces used"] <= len(ids)).all()
    assert (table["pieces only this language uses"] < table["pieces used"]).all()


# --------------------------------------------------------------------------- the notebook


def _executed(tmp_path, **params):
    import papermill as pm

    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out), parameters=params, kernel_name="python3",
                        progress_bar=False, cwd=str(tmp_path))
    return out


def test_notebook_structure():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    for knob in ("task", "datasets", "languages", "model_name", "max_length", "doc_stride", "subsample",
                 "examples_per_language", "seed", "output_dir"):
        assert re.search(rf"^{knob} = ", first.source, re.M), knob
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_notebook_headless_nli(tmp_path):
    from nbconvert import HTMLExporter

    out_dir = tmp_path / "data_nli"
    executed = _executed(tmp_path, task="nli", languages=["en", "sw"], subsample=60, output_dir=str(out_dir))

    counts = pd.read_csv(out_dir / "counts.csv")
    assert counts.equals(pd.read_parquet(out_dir / "counts.parquet"))
    got = {(r.dataset, r.lang, r.split): r.examples for r in counts.itertuples()}
    assert got[("xnli", "sw", "test")] == 5_010 and got[("xnli", "en", "validation")] == 2_490
    assert got[("mnli15k", "en", "train")] == 15_001 and len(got) == 5

    stats = pd.read_parquet(out_dir / "length_stats.parquet")
    assert len(stats) == 5 and (stats["examples"] == 60).all()
    assert len(pd.read_parquet(out_dir / "token_lengths.parquet")) == 300
    assert len(pd.read_csv(out_dir / "examples.csv")) == 3 * 2

    vocab = pd.read_csv(out_dir / "vocabulary.csv").set_index("model")
    full, trimmed = vocab.loc["full"], vocab.loc["trimmed"]
    assert full["tokenizer pieces"] == 250_002 and full["embedding rows"] == 250_037
    assert 1_000 < trimmed["tokenizer pieces"] < 30_000
    assert trimmed["embedding rows"] == trimmed["tokenizer pieces"]
    assert full["parameters"] - trimmed["parameters"] == (full["embedding rows"] - trimmed["embedding rows"]) * 384
    assert full["other parameters"] == trimmed["other parameters"]
    assert full["fp32 checkpoint (MB)"] == pytest.approx(full["parameters"] * 4 / 1e6, abs=0.1)
    for stem in ("token_lengths", "truncation"):
        for ext in ("png", "svg"):
            assert (out_dir / f"{stem}.{ext}").stat().st_size > 5_000, f"{stem}.{ext}"
    assert not list(out_dir.glob(".*.tmp"))  # atomic writes left no temp files

    exporter = HTMLExporter()
    exporter.exclude_input = True
    html, _ = exporter.from_filename(str(executed))
    assert len(re.findall(r'<img[^>]*src="data:image/png', html)) >= 2
    assert html.count("<table") >= 5 and "15,001" in html and "Traceback" not in html


def test_notebook_fails_early_naming_the_parameter(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError, match="languages"):
        _executed(tmp_path, task="nli", languages=["xx"], output_dir=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
