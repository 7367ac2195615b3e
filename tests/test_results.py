"""Tidy results schema, atomic append/read, and the importer of the released results."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ofa_lib import results as R
from ofa_lib.paths import data_dir
from ofa_lib.results import released as RR


def _released_dir():
    try:
        path = data_dir() / RR.RELEASED_SUBDIR
    except FileNotFoundError as exc:  # no shared data on this machine
        pytest.skip(str(exc))
    if not path.is_dir():
        pytest.skip(f"released results not found at {path}")
    return path


@pytest.fixture(scope="module")
def released_dir():
    return _released_dir()


@pytest.fixture(scope="module")
def released(released_dir):
    return {t: RR.import_released(t) for t in ("nli", "tydiqa", "ner")}


# ---------------------------------------------------------------- schema


def _rows(n=3, **over):
    base = {
        "run_id": [f"run{i}" for i in range(n)],
        "task": "nli",
        "model": "m",
        "kind": "variant",
        "name": "last",
        "dataset": "xnli",
        "split": "test",
        "lang": "de",
        "metric": "acc",
        "value": np.linspace(0.1, 0.9, n),
    }
    base.update(over)
    return pd.DataFrame(base)


def test_empty_frame_matches_schema():
    df = R.empty_frame()
    assert list(df.columns) == list(R.SCHEMA)
    R.validate(df)
    assert {c: str(df[c].dtype) for c in df} == R.SCHEMA


def test_validate_names_missing_and_extra_columns():
    df = R.conform(_rows()).drop(columns=["lang"]).assign(oops=1)
    with pytest.raises(ValueError, match=r"missing columns \['lang'\].*extra columns \['oops'\]"):
        R.validate(df)


def test_validate_bad_dtype_and_range_and_kind():
    df = R.conform(_rows())
    with pytest.raises(ValueError, match="bad dtypes.*batch_size"):
        R.validate(df.assign(batch_size=df["batch_size"].astype("float64")))
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        R.validate(df.assign(value=df["value"] * 100))
    with pytest.raises(ValueError, match="unknown kind"):
        R.validate(df.assign(kind="bogus"))
    with pytest.raises(ValueError, match="without a value"):
        R.validate(df.assign(value=np.nan))


def test_conform_fills_optional_columns_and_casts():
    df = R.conform(_rows(lr=2e-5, batch_size=32, seed=1))
    assert str(df["batch_size"].dtype) == "Int64" and df["members"].eq("").all()
    assert df["step"].isna().all() and df["epoch"].isna().all()


def test_members_roundtrip_and_comma_rejected():
    assert R.members_list(R.join_members(["a", "b"])) == ["a", "b"]
    assert R.members_list("") == []
    with pytest.raises(ValueError):
        R.join_members(["a,b"])


def test_cross_name_roundtrip():
    name = R.cross_name("acc_avg", "ca", 3, 2)
    assert name == "acc_avg:ca:r=3:sampling=2"
    assert R.parse_cross_name(name) == ("acc_avg", "ca", 3, 2)
    with pytest.raises(ValueError):
        R.parse_cross_name("acc_avg:ca:3:2")


def test_append_dedupes_keeping_newest_and_read_dir(tmp_path):
    path = tmp_path / "results" / "a.parquet"
    R.append(path, _rows(3))
    out = R.append(path, _rows(2, value=[0.5, 0.55]))  # run0, run1 updated
    assert len(out) == 3
    got = R.read(path).set_index("run_id")["value"]
    assert got["run0"] == 0.5 and got["run1"] == 0.55 and got["run2"] == 0.9
    assert not list(path.parent.glob(".*.tmp"))  # no temp files left
    R.append(tmp_path / "results" / "sub" / "b.parquet", _rows(1, run_id=["other"]))
    both = R.read(tmp_path / "results")
    assert sorted(both["run_id"]) == ["other", "run0", "run1", "run2"]
    R.validate(both)


def test_append_rejects_bad_rows_and_leaves_file(tmp_path):
    path = tmp_path / "a.parquet"
    R.append(path, _rows(2))
    with pytest.raises(ValueError):
        R.append(path, _rows(1, value=[42.0]))
    assert len(R.read(path)) == 2


def test_read_empty_dir(tmp_path):
    assert R.read(tmp_path).empty
    with pytest.raises(FileNotFoundError):
        R.read(tmp_path / "missing.parquet")


# ---------------------------------------------------------------- released results


def test_released_file_row_counts(released_dir):
    counts = {
        "nli_zs": {"xlm-roberta-large": 63, "xlm-v-base": 63},
        "ner_zs": {"xlm-roberta-base": 63, "xlm-roberta-large": 62, "xlm-v-base": 62},
        "tydiqa_zs": {"xlm-roberta-large": 63, "xlm-v-base": 63},
    }
    for name, per_model in counts.items():
        df = pd.read_parquet(released_dir / f"{name}.parquet", columns=["model"])
        assert df["model"].value_counts().to_dict() == per_model, name
        assert len(df) == sum(per_model.values())


def test_import_runs_and_targets(released):
    assert {t: len(r.run_table) for t, r in released.items()} == {"nli": 63, "tydiqa": 63, "ner": 62}
    assert {t: len(r.targets) for t, r in released.items()} == {"nli": 25, "tydiqa": 8, "ner": 54}
    assert {d for d, _ in released["nli"].targets} == {"xnli", "indicxnli"}
    assert {d for d, _ in released["ner"].targets} == {"wikiann", "masakhaner", "masakhaner2"}
    for r in released.values():
        assert all(lang != "en" for _, lang in r.targets)
        rt = r.run_table
        assert list(rt.columns) == R.RUN_TABLE_COLUMNS
        assert rt["run_id"].is_unique
        for c in ("test_last", "test_src_dev", "test_ca", "test_trg_dev", "dev_src_last",
                  "dev_src_src_dev", "dev_src_ca", "dev_trg_trg_dev"):
            assert rt[c].between(0, 1).all(), (r.task, c)
        assert len(rt[["lr", "batch_size"]].drop_duplicates()) == 21


def test_flat_mean_by_hand(released):
    nli = released["nli"]
    cols = [c for c in nli.runs.columns
            if c.startswith(("xnli_", "indicxnli_")) and c.endswith("_acc_avg-ckpt")
            and not c.startswith("xnli_en_")]
    assert len(cols) == 25
    np.testing.assert_allclose(nli.run_table["test_ca"], nli.runs[cols].mean(axis=1), rtol=1e-12)


def test_tydiqa_ydiqa_quirk_and_percentages(released):
    ty = released["tydiqa"]
    ra_cols = ty._columns_ra
    assert ra_cols["column"].str.startswith("ydiqa_").all()
    assert set(ra_cols["dataset"]) == {"tydiqa"}
    assert set(ra_cols["metric"]) == {"f1"}  # exact_match ignored
    assert sorted(lang for _, lang in ty.targets) == ["ar", "bn", "fi", "id", "ko", "ru", "sw", "te"]
    # released percentages are divided by 100
    raw = ty.cross[[f"ydiqa_{lang}_f1" for _, lang in ty.targets]].mean(axis=1) / 100
    np.testing.assert_allclose(ty.averages.sort_index()["score"].sort_values().values,
                               np.sort(raw.values), rtol=1e-12)
    assert ty.averages["score"].between(0, 1).all()


def test_cross_rows(released):
    for task, r in released.items():
        av = r.averages
        seeds = set(av["sampling"])
        assert seeds == (set(range(10)) - {8} if task == "ner" else set(range(10)))
        assert set(av["r"]) == set(range(1, 11))
        assert {"last", "src_dev", "ca", "top5"} <= set(av["variant"])
        assert (av["ids"].map(len) == av["r"]).all()
        # the ids of r are the first r of the sampling's 10 (accumulative)
        full = av[av["r"] == 10].set_index(["variant", "sampling"])["ids"]
        for rec in av.itertuples():
            assert rec.ids == full.loc[(rec.variant, rec.sampling)][: rec.r]
        # one run per distinct (lr, batch) configuration
        cfg = r.run_table.set_index("run_id")[["lr", "batch_size"]]
        for ids in full:
            assert len({tuple(cfg.loc[i]) for i in ids}) == 10


def test_to_tidy_roundtrips_run_table(released):
    for task, r in released.items():
        tidy = r.to_tidy()
        R.validate(tidy)
        assert set(tidy["kind"]) == {"variant", "average", "soup"}
        test = tidy[(tidy["kind"] == "variant") & (tidy["split"] == "test") & (tidy["lang"] != "en")]
        per_run = test.groupby(["run_id", "name"]).size()
        assert (per_run == RR.N_TARGETS[task]).all()
        rt = R.run_table_from_tidy(tidy, task=task).set_index("run_id")
        ref = r.run_table.set_index("run_id").loc[rt.index]
        pd.testing.assert_frame_equal(rt, ref, check_exact=False, rtol=1e-12, atol=1e-14)


def test_unknown_model_and_task(released_dir):
    with pytest.raises(ValueError, match="no released nli runs"):
        RR.import_released("nli", model="nope")
    with pytest.raises(ValueError, match="unknown task"):
        RR.import_released("pos")


def test_other_model_imports(released_dir):
    r = RR.import_released("ner", model="xlm-roberta-base")
    assert len(r.run_table) == 63 and r.averages.empty
