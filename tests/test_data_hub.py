"""Hub copies of every dataset family, read through ``datasets.load_dataset`` from local clones in the hub's own
layout (``OFA_HUB_ROOT``; built from mirror rows by ``hub_fixtures``), against the mirror loaders; the
resolution rule and its error; ``ofa-data fetch`` / ``check`` round trip. No test touches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import datasets
import pytest
from hub_fixtures import build_hub_root

from ofa_lib.data import catalog, features, hub, loading, locate
from ofa_lib.data import cli as datacli
from ofa_lib.paths import REPO_ROOT
from ofa_lib.train import config

# One unit per dataset family (and both hub layouts): None = every row of the mirror split.
UNITS = {
    ("xnli", "de", "validation"): None, ("xnli", "de", "test"): None, ("xnli", "en", "validation"): None,
    ("multinli", "en", "train"): 400,
    ("wikiann", "en", "train"): 300, ("wikiann", "de", "validation"): 300,
    ("masakhaner", "hau", "validation"): None, ("masakhaner", "swa", "test"): None,
    ("masakhaner2", "zul", "validation"): None,
    ("conll2003", "en", "validation"): 200,
    ("tydiqa_goldp", "en", "train"): 200, ("tydiqa_goldp", "fi", "validation"): None,
    ("tydiqa_goldp", "en", "validation"): None,
    ("xquad", "de", "test"): 60,
    ("sib200", "eng_Latn", "train"): None, ("sib200", "deu_Latn", "test"): None,
    ("umsab", "english", "validation"): None,
}
FAMILIES = ["xnli", "multinli", "wikiann", "masakhaner", "masakhaner2", "conll2003", "tydiqa_goldp", "xquad",
            "sib200", "umsab"]


@pytest.fixture(scope="session")
def hub_root(tmp_path_factory):
    """Every family's hub repository under one folder (built once; ~3 s), and a private datasets cache."""
    root = tmp_path_factory.mktemp("hub")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", catalog.MalformedDataWarning)
        written = build_hub_root(root, UNITS)
    return root, written


@pytest.fixture
def hub_only(hub_root, tmp_path, monkeypatch):
    """The mirror hidden (an empty OFA_DATA_DIR), offline, OFA_HUB_ROOT at the fixture clones."""
    root, written = hub_root
    empty = tmp_path / "no-mirror"
    empty.mkdir()
    monkeypatch.setenv("OFA_DATA_DIR", str(empty))
    monkeypatch.setenv("OFA_HUB_ROOT", str(root))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return root, written


def _mirror(dataset: str, lang: str, split: str, n: int) -> datasets.Dataset:
    """The real mirror's first ``n`` rows (what the fixture clone was built from)."""
    saved = os.environ.pop("OFA_DATA_DIR")
    try:
        return loading.load_split("mnli15k" if dataset == "multinli" else dataset, lang, split, source="mirror").select(range(n))
    finally:
        os.environ["OFA_DATA_DIR"] = saved


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_copy_gives_the_mirror_rows_labels_and_features(hub_only, family, tiny_tokenizer):
    """For every family: identical examples, label spaces and featurized inputs on the same rows."""
    _, written = hub_only
    for (dataset, lang, split), n in written.items():
        if dataset != family:
            continue
        assert locate.locate(dataset, lang, split).kind == "hub-local"
        got = loading.load_split(dataset, lang, split)
        ref = _mirror(dataset, lang, split, n)
        assert len(got) == n and got.features == ref.features
        for column in ref.column_names:
            if not (dataset == "xquad" and column == "title"):  # google/xquad has no titles
                assert got[column] == ref[column], (dataset, lang, split, column)
        task = "sentiment" if catalog.task_of(dataset) == "sentiment" else catalog.task_of(dataset)
        head = range(min(n, 80))  # featurizing is the slow part: the first rows show the inputs agree
        a = features.featurize(task, got.select(head), tiny_tokenizer, max_length=192, doc_stride=32, train=True)
        b = features.featurize(task, ref.select(head), tiny_tokenizer, max_length=192, doc_stride=32, train=True)
        assert a[:] == b[:]


def test_hub_xnli_clone_in_its_own_layout_loads_like_the_mirror(hub_only):
    """facebook/xnli: README with configs per language and ClassLabel features; full splits, real counts."""
    root, _ = hub_only
    readme = (root / "facebook/xnli/README.md").read_text()
    assert "config_name: de" in readme and "class_label" in readme and "contradiction" in readme
    for split, n in (("validation", 2490), ("test", 5010)):
        got = loading.load_split("xnli", "de", split)
        assert len(got) == n and got["label"] == _mirror("xnli", "de", split, n)["label"]
    assert locate.languages("xnli") == sorted(hub.XNLI_LANGS)  # the hub copy's languages, no mirror
    src = loading.source_of("xnli", "de", "validation")
    assert src["source"] == "hub-local" and src["repo"] == "facebook/xnli" and src["config"] == "de"
    assert src["path"] == str(root / "facebook/xnli")


def test_hub_labels_are_mapped_by_name_not_position(hub_root, tmp_path, monkeypatch):
    """A hub copy whose ClassLabel lists the names in another order still gives the study's label ids."""
    reordered = tmp_path / "hub"
    build_hub_root(reordered, {("xnli", "fr", "validation"): 120}, nli_names=["contradiction", "entailment", "neutral"])
    monkeypatch.setenv("OFA_DATA_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("OFA_HUB_ROOT", str(reordered))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    assert loading.load_split("xnli", "fr", "validation")["label"] == _mirror("xnli", "fr", "validation", 120)["label"]


def test_hub_is_used_only_where_the_mirror_lacks_the_data(hub_root, tmp_path, monkeypatch):
    root, _ = hub_root
    monkeypatch.setenv("OFA_HUB_ROOT", str(root))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    assert locate.locate("xnli", "de", "validation").kind == "mirror"  # mirror first
    assert locate.locate("multinli", "en", "train").kind == "hub-local"  # the mirror has only the slice
    assert "fi" in locate.languages("wikiann") and len(locate.languages("wikiann")) == len(hub.WIKIANN_LANGS)
    assert locate.available_splits("tydiqa_goldp", "fi") == ["train", "validation"]  # fi train: the hub has it
    assert loading.source_of("xnli", "de", "validation")["source"] == "mirror"


def test_hub_missing_everywhere_error_names_places_and_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("OFA_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.delenv("OFA_HUB_ROOT", raising=False)
    for call in (lambda: loading.load_split("xnli", "de", "test"), lambda: locate.languages("sib200"),
                 lambda: locate.require([("wikiann", "de", "train"), ("masakhaner", "hau", "test")])):
        with pytest.raises(catalog.DataUnavailableError) as err:
            call()
        msg = str(err.value)
        assert "ofa-data fetch" in msg and "OFA_DATA_DIR" in msg and "offline" in msg and "OFA_HUB_ROOT" in msg
    assert "ofa-data fetch masakhaner wikiann --langs de,hau --to" in msg and "unimelb-nlp/wikiann" in msg


def test_hub_paper_preset_uses_the_papers_data_and_refuses_the_slice(monkeypatch):
    cfg = config.make_config("nli", "paper")
    assert cfg.train_dataset == "multinli" and cfg.target_datasets == ["xnli", "indicxnli"]
    assert len(cfg.targets()) == 14 + 11
    ner = config.make_config("ner", "paper")
    assert len(ner.targets()) == 25 + 10 + 19  # the released results' 54 NER targets
    assert config.make_config("ner", "cpu").target_langs["wikiann"] == ["de", "ru"]  # cpu keeps the mirror
    assert config.make_config("nli", "cpu").train_dataset == "mnli15k"
    with pytest.raises(config.ConfigError, match="train_dataset='mnli15k'.*15k slice"):
        config.make_config("nli", "paper", train_dataset="mnli15k")
    monkeypatch.delenv("OFA_HUB_ROOT", raising=False)  # offline, only the mirror: the paper's data is missing
    with pytest.raises(catalog.DataUnavailableError, match="holds only the 15,001-pair MultiNLI slice.*ofa-data fetch"):
        locate.require([(cfg.train_dataset, "en", "train")] + cfg.test_sets())


def test_hub_grid_plan_without_data_fails_in_seconds_naming_the_fetch(tmp_path):
    env = dict(os.environ, OFA_DATA_DIR=str(tmp_path / "nowhere"), HF_DATASETS_OFFLINE="1", OFA_OUTPUTS=str(tmp_path))
    env.pop("OFA_HUB_ROOT", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ofa_lib.grid", "plan", "params/grids/demo.yaml"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "sib200/eng_Latn/train" in proc.stderr and "ofa-data fetch sib200" in proc.stderr
    assert "Traceback" not in proc.stderr and seconds < 90  # wall: mostly importing torch on a shared 2-core machine


def test_hub_fetch_check_round_trip(hub_only, tmp_path, capsys, monkeypatch):
    """fetch from the fixture hub -> a mirror -> check passes -> the loaders read it as the real mirror."""
    out = tmp_path / "mirror"
    names = ["xnli", "masakhaner", "sib200", "tydiqa_goldp", "umsab"]
    langs = ["de", "en", "hau", "eng_Latn", "fi", "english"]
    rows = datacli.fetch(names, out, langs, progress=False)
    fetched = {(r["dataset"], r["lang"], r["split"]): r["examples"] for r in rows if r["state"] == "fetched"}
    # what the fixture clones hold (others are reported as failed: the hub copy lacks them)
    expected = {k: n for k, n in hub_only[1].items() if k[0] in names and k[1] in langs}
    assert fetched == expected
    assert all(r["state"] == "failed" and r["error"] for r in rows if r["state"] != "fetched")
    assert datacli.main(["check", str(out)]) == 1  # tydiqa en train (200 of 3,696 questions) must not pass
    report = {(r["dataset"], r["lang"], r["split"]): r for r in datacli.check(out)}
    assert report[("tydiqa_goldp", "en", "train")]["state"] == "count"
    full = {k: r for k, r in report.items() if k != ("tydiqa_goldp", "en", "train")}
    assert full and all(r["state"] == "ok" and r["examples"] == r["expected"] for r in full.values()), full
    (out / "qa/tydiqa_goldp/en/train.json").unlink()
    manifest = json.loads((out / datacli.MANIFEST).read_text())
    del manifest["files"]["qa/tydiqa_goldp/en/train.json"]
    (out / datacli.MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert datacli.main(["check", str(out)]) == 0
    assert "match the known sizes" in capsys.readouterr().out
    # the loaders read the fetched mirror exactly like the real one
    monkeypatch.setenv("OFA_DATA_DIR", str(out))
    for key in full:
        got = loading.load_split(*key)
        assert locate.locate(*key).kind == "mirror"
        ref = _mirror(*key, len(got))
        assert {c: got[c] for c in ref.column_names} == {c: ref[c] for c in ref.column_names}
    # idempotent: a second fetch writes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = datacli.fetch(["xnli", "sib200"], out, ["de", "en", "eng_Latn"], progress=False)
    assert {r["state"] for r in again} <= {"present", "failed"}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_hub_check_names_a_changed_or_corrupt_file(hub_only, tmp_path):
    out = tmp_path / "mirror"
    datacli.fetch(["xnli"], out, ["de"], progress=False)
    path = out / "nli/xnli/validation/de.tsv"
    lines = path.read_text(encoding="utf-8").split("\n")
    path.write_text("\n".join(lines[:-100]), encoding="utf-8")  # 99 rows lost
    report = {(r["dataset"], r["lang"], r["split"]): r for r in datacli.check(out)}
    assert report[("xnli", "de", "validation")]["state"] == "hash"
    assert report[("xnli", "de", "test")]["state"] == "ok"
    (out / "nli/xnli/test/de.tsv").write_bytes(b"id\tpremise\n\xff\n")
    row = {(r["dataset"], r["lang"], r["split"]): r for r in datacli.check(out)}[("xnli", "de", "test")]
    assert row["state"] == "error" and "de.tsv:2" in row["error"]


def test_hub_list_says_where_each_dataset_is_read_from(hub_only, capsys):
    rows = {r["dataset"]: r for r in datacli.list_rows()}
    assert rows["xnli"]["read_from"] == "local clone" and rows["xnli"]["hub"] == "facebook/xnli"
    assert rows["indicxnli"]["hub"] == "Divyanshu/indicxnli@refs/convert/parquet"
    assert datacli.main(["list"]) == 0
    assert "masakhane/masakhaner2" in capsys.readouterr().out


def test_hub_sources_are_recorded_in_one_line(hub_only):
    mirror = {"nli/xnli/test/de.tsv": {"source": "mirror", "root": "/m", "files": [{"path": "x"}]}}
    local = loading.source_of("sib200", "eng_Latn", "train")
    assert local["repo"] == "Davlan/sib200" and local["revision"] == hub.PARQUET_BRANCH
    line = loading.describe_sources({**mirror, "sib200/eng_Latn/train": local})
    assert line == "mirror /m (1 files); hub Davlan/sib200@refs/convert/parquet (local clone)"
    beside = {"x": {"source": "mirror", "root": str(REPO_ROOT.parent / "shared" / "data"), "files": [{"path": "x"}]}}
    assert loading.describe_sources(beside) == "mirror ../shared/data (1 files)"  # the same on every clone


def test_hub_registry_covers_every_dataset():
    assert set(hub.SOURCES) == set(catalog.DATASETS)
    for name, src in hub.SOURCES.items():
        assert set(src.splits) <= set(catalog.DATASETS[name].splits), name
        assert src.licence and "/" in src.repo, name
    assert len(hub.SOURCES["indicxnli"].configs) == 11 and len(hub.SOURCES["masakhaner2"].configs) == 20
    assert set(hub.PAPER_LANGS["wikiann"]) <= set(hub.WIKIANN_LANGS) and len(hub.PAPER_LANGS["wikiann"]) == 26


def test_hub_that_does_not_answer_is_reported_before_any_run(tmp_path, monkeypatch):
    """Not offline by configuration, but no hub: one short probe per repository, then the same error."""
    monkeypatch.setenv("OFA_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("OFA_HUB_ROOT", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed local port: refused at once, no network
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    locate._probe_hub.cache_clear()
    assert locate.locate("xnli", "de", "test").kind == "hub"  # locating is cheap and does not ask the hub
    with pytest.raises(catalog.DataUnavailableError, match=r"facebook/xnli: did not answer: .*ofa-data fetch xnli"):
        locate.require([("xnli", "de", "test")])
    locate._probe_hub.cache_clear()
