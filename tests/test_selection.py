"""Sampler, Max SRC-DEV / TRG-DEV selection, and Tables 1-3 (released and synthetic runs)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest

from ofa_lib import results as R
from ofa_lib.paths import data_dir
from ofa_lib.results import released as RR
from ofa_lib.results import selection as S


@pytest.fixture(scope="module")
def released():
    try:
        path = data_dir() / RR.RELEASED_SUBDIR
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    if not path.is_dir():
        pytest.skip(f"released results not found at {path}")
    return {t: S.CrossRunData.from_released(RR.import_released(t)) for t in ("nli", "tydiqa", "ner")}


def _grid_table(n_lr=7, n_bs=3, n_seed=3):
    rows = []
    rng = np.random.default_rng(0)
    for i, (lr, bs, seed) in enumerate(itertools.product(range(1, n_lr + 1), (16, 32, 64)[:n_bs],
                                                         range(n_seed))):
        row = {"run_id": f"r{i:03d}", "lr": lr * 1e-5, "batch_size": bs, "seed": seed}
        for v in R.VARIANTS:
            row[f"dev_src_{v}"] = rng.uniform()
            row[f"dev_trg_{v}"] = rng.uniform()
            row[f"test_{v}"] = rng.uniform()
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- primitives


def test_sample_runs_deterministic_distinct_configs():
    rt = _grid_table()
    a = S.sample_runs(rt, 10, seed=3)
    assert a == S.sample_runs(rt, 10, seed=3)
    assert a != S.sample_runs(rt, 10, seed=4)
    assert len(a) == 10 and len(set(a)) == 10
    cfg = rt.set_index("run_id")[["lr", "batch_size"]]
    assert len({tuple(cfg.loc[i]) for i in a}) == 10
    # independent of the row order of the run table
    assert a == S.sample_runs(rt.sample(frac=1, random_state=1), 10, seed=3)
    # every configuration can come first over seeds
    firsts = {tuple(cfg.loc[S.sample_runs(rt, 10, seed=s)[0]]) for s in range(200)}
    assert len(firsts) == 21


def test_sample_runs_too_few_configs():
    with pytest.raises(ValueError, match="only 6"):
        S.sample_runs(_grid_table(n_lr=2), 10, seed=0)


def test_max_src_dev_ties_keep_earlier_run():
    rt = pd.DataFrame({
        "run_id": ["a", "b", "c", "d"],
        "dev_src_last": [0.5, 0.8, 0.8, 0.7],
        "dev_trg_trg_dev": [0.9, 0.1, 0.9, 0.95],
    })
    assert S.max_src_dev(rt, ["a", "b", "c", "d"], "last") == "b"
    assert S.max_src_dev(rt, ["c", "b"], "last") == "c"
    assert S.max_src_dev(rt, ["a"], "last") == "a"
    assert S.max_trg_dev(rt, ["a", "b", "c"]) == "a"
    assert S.max_trg_dev(rt, ["c", "a", "d"]) == "d"
    with pytest.raises(KeyError):
        S.max_src_dev(rt, ["zzz"], "last")


def test_resolve_sampling_seeds():
    assert S.resolve_sampling_seeds("authors", range(10)) == [0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert S.resolve_sampling_seeds("authors", [0, 1, 2, 3, 4, 5, 6, 7, 9]) == [0, 2, 3, 4, 5, 6, 7, 9]
    assert S.resolve_sampling_seeds("all", [3, 1]) == [1, 3]
    assert S.resolve_sampling_seeds([4, 2], range(10)) == [4, 2]
    with pytest.raises(ValueError):
        S.resolve_sampling_seeds([8], [0, 9])
    with pytest.raises(ValueError):
        S.resolve_sampling_seeds("some", range(3))


# ---------------------------------------------------------------- released results


def test_table1_shape_and_counts(released):
    t1 = S.table1(list(released.values()))
    assert list(t1.columns) == ["task", "r", "selection", "variant", "mean", "std", "n"]
    assert len(t1) == 3 * 10 * 2 * 3
    assert list(dict.fromkeys(t1["task"])) == ["nli", "tydiqa", "ner"]
    n = t1.groupby("task")["n"].unique().map(list).to_dict()
    assert n == {"nli": [9], "tydiqa": [9], "ner": [8]}  # seed 1 skipped; NER has no seed 8
    assert (t1["mean"] == t1["mean"].round(1)).all()
    t_all = S.table1(released["ner"], sampling_seeds="all")
    assert set(t_all["n"]) == {9}


def test_r1_invariants(released):
    for task, d in released.items():
        ps = S.per_sampling(d, "all")
        rt = d.run_table.set_index("run_id")
        for rec in ps[ps["r"] == 1].itertuples():
            first = rec.ids[0]
            if rec.method == "max_src_dev":  # the only candidate, its test score
                assert rec.run_id == first and rec.score == rt.loc[first, f"test_{rec.variant}"]
            elif rec.method == "acc_avg":  # averaging one run = that run, re-evaluated
                assert abs(rec.score - rt.loc[first, f"test_{rec.variant}"]) < 5e-3


def test_max_src_dev_is_running_argmax(released):
    d = released["nli"]
    ps = S.per_sampling(d, "all")
    dev = d.run_table.set_index("run_id")
    sel = ps[ps["method"] == "max_src_dev"]
    for (s, v), g in sel.groupby(["sampling", "variant"]):
        g = g.sort_values("r")
        chosen_dev = dev.loc[g["run_id"], f"dev_src_{v}"].to_numpy()
        assert (np.diff(chosen_dev) >= 0).all()
        ids = g["ids"].iloc[-1]
        vals = dev.loc[list(ids), f"dev_src_{v}"].to_numpy()
        first_best = ids[int(np.argmax(vals))]  # argmax = first occurrence
        assert g["run_id"].iloc[-1] == first_best


def test_table2_and_table3(released):
    ds = list(released.values())
    t2 = S.table2(ds)
    assert list(t2.columns) == ["task", "r", "method", "mean", "std", "n"]
    assert len(t2) == 3 * 10 * 4
    assert list(dict.fromkeys(t2["method"])) == list(S.TABLE2_METHODS)
    t1 = S.table1(ds)
    a = t1[(t1["selection"] == "acc_avg") & (t1["variant"] == "ca")].set_index(["task", "r"])["mean"]
    b = t2[t2["method"] == "acc_avg_ca"].set_index(["task", "r"])["mean"]
    pd.testing.assert_series_equal(a, b, check_names=False)
    t3 = S.table3(ds)
    assert list(t3.columns) == ["task", "lr", "batch_size", "variant", "mean", "std", "n"]
    assert len(t3) == 3 * 21 * 4
    assert t3.groupby("task")["n"].sum().to_dict() == {"nli": 63 * 4, "tydiqa": 63 * 4, "ner": 62 * 4}


def test_tidy_route_equals_released_route(released):
    """The same tables come out of the tidy rows as out of the released wide tables."""
    for task in ("nli", "tydiqa", "ner"):
        tidy = RR.import_released(task).to_tidy()
        via_tidy = S.CrossRunData.from_tidy(tidy, task)
        for f in (S.table1, S.table2):
            pd.testing.assert_frame_equal(f(via_tidy), f(released[task]))
        pd.testing.assert_frame_equal(S.table3(via_tidy), S.table3(released[task]))


def test_selection_rows_are_tidy(released):
    ps = S.per_sampling(released["tydiqa"])
    rows = S.selection_rows(ps, "xlm-roberta-large")
    R.validate(rows)
    assert set(rows["kind"]) == {"selection"}
    assert len(rows) == len(ps[ps["method"].isin(["max_src_dev", "max_trg_dev"])])


# ---------------------------------------------------------------- our own runs (synthetic tidy)


def _synthetic_tidy(with_averages=True):
    """4 configurations x 2 seeds; targets de, fr; source en. Averages for samplings 0..2."""
    rows = []
    configs = [(1e-5, 16), (1e-5, 32), (2e-5, 16), (2e-5, 32)]
    runs = {}
    for ci, (lr, bs) in enumerate(configs):
        for seed in range(2):
            rid = f"run{ci}{seed}"
            runs[rid] = (lr, bs, seed)
            for vi, v in enumerate(R.VARIANTS):
                base = 0.5 + 0.01 * ci + 0.002 * seed + 0.001 * vi
                common = dict(run_id=rid, task="nli", model="tiny", lr=lr, batch_size=bs,
                              seed=seed, kind="variant", name=v, metric="acc")
                rows.append({**common, "dataset": "xnli", "split": "validation", "lang": "en",
                             "value": 0.9 - 0.01 * ci + 0.001 * seed})  # dev prefers config 0
                for lang, off in (("de", 0.0), ("fr", 0.02)):
                    rows.append({**common, "dataset": "xnli", "split": "validation", "lang": lang,
                                 "value": base + off})
                    rows.append({**common, "dataset": "xnli", "split": "test", "lang": lang,
                                 "value": base + off + 0.1})
                rows.append({**common, "dataset": "xnli", "split": "test", "lang": "en", "value": 0.95})
    # snapshots are ignored by the run table
    rows.append(dict(run_id="run00", task="nli", model="tiny", kind="snapshot", name="3",
                     dataset="xnli", split="test", lang="de", metric="acc", value=0.1, step=30))
    if with_averages:
        samplings = {0: ["run00", "run11", "run20"], 1: ["run31", "run01", "run21"],
                     2: ["run30", "run20", "run10"]}
        for s, ids in samplings.items():
            for r in range(1, 4):
                for v in ("last", "src_dev", "ca"):
                    name = R.cross_name("acc_avg", v, r, s)
                    for lang in ("de", "fr"):
                        rows.append(dict(run_id=name, task="nli", model="tiny", kind="average",
                                         name=name, dataset="xnli", split="test", lang=lang,
                                         metric="acc", value=0.7 + 0.01 * r + 0.001 * s,
                                         members=",".join(ids[:r])))
                name = R.cross_name("soup", "top5", r, s)
                rows.append(dict(run_id=name, task="nli", model="tiny", kind="soup", name=name,
                                 dataset=R.ALL, split="test", lang=R.ALL, metric="acc",
                                 value=0.6 + 0.01 * r, members=",".join(ids[:r])))
    return R.conform(pd.DataFrame(rows))


def test_run_table_from_synthetic_tidy():
    rt = R.run_table_from_tidy(_synthetic_tidy(), task="nli").set_index("run_id")
    assert len(rt) == 8
    r = rt.loc["run21"]  # ci=2, seed=1
    assert r["dev_src_ca"] == pytest.approx(0.9 - 0.02 + 0.001)
    base = 0.5 + 0.02 + 0.002 + 0.002  # ca is variant index 2
    assert r["dev_trg_ca"] == pytest.approx(base + 0.01)
    assert r["test_ca"] == pytest.approx(base + 0.01 + 0.1)  # English test excluded
    assert r["lr"] == 2e-5 and r["batch_size"] == 16


def test_tables_from_synthetic_tidy_with_averages():
    d = S.CrossRunData.from_tidy(_synthetic_tidy(), "nli")
    assert d.sampling_seeds == [0, 1, 2] and d.r_values == [1, 2, 3]
    ps = S.per_sampling(d, "all")
    # sampling 1: run31, run01, run21 -> dev prefers config 0 (run01) from r=2 on
    sel = ps[(ps["method"] == "max_src_dev") & (ps["sampling"] == 1) & (ps["variant"] == "last")]
    assert sel.sort_values("r")["run_id"].tolist() == ["run31", "run01", "run01"]
    t1 = S.table1(d, sampling_seeds="all")
    assert len(t1) == 3 * 2 * 3 and set(t1["n"]) == {3}
    row = t1[(t1["r"] == 2) & (t1["selection"] == "acc_avg") & (t1["variant"] == "ca")].iloc[0]
    vals = np.array([0.72 + 0.001 * s for s in range(3)])  # de and fr rows are equal
    assert row["mean"] == round(vals.mean() * 100, 1)
    assert row["std"] == round(vals.std(ddof=1) * 100, 1)
    t2 = S.table2(d, sampling_seeds=[0, 2])
    assert set(t2["method"]) == set(S.TABLE2_METHODS) and set(t2["n"]) == {2}
    soup = t2[(t2["method"] == "soup") & (t2["r"] == 3)].iloc[0]
    assert soup["mean"] == 63.0
    # "authors" drops sampling 1
    assert set(S.table1(d)["n"]) == {2}


def test_synthetic_tidy_without_averages_draws_samplings():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = S.CrossRunData.from_tidy(_synthetic_tidy(with_averages=False), "nli", n_samplings=5)
    assert any("only 4 configurations" in str(x.message) for x in w)
    assert d.r_values == [1, 2, 3, 4] and d.sampling_seeds == [0, 1, 2, 3, 4]
    t1 = S.table1(d, "all")
    assert set(t1["selection"]) == {"max_src_dev"}  # nothing averaged yet
    # r = all configurations: Max SRC-DEV always lands on configuration 0 (best English dev)
    ps = S.per_sampling(d, "all")
    last = ps[(ps["method"] == "max_src_dev") & (ps["r"] == 4)]
    assert last["run_id"].str.startswith("run0").all()


def test_average_members_must_match_r():
    tidy = _synthetic_tidy()
    bad = tidy.copy()
    m = bad["name"] == "acc_avg:ca:r=2:sampling=0"
    bad.loc[m, "members"] = "run00"
    with pytest.raises(ValueError, match="members has 1 run ids"):
        S.CrossRunData.from_tidy(bad, "nli")


# ---------------------------------------------------------------- paired comparison


def test_bootstrap_all_equal_collapses():
    assert S.bootstrap_mean_ci([0.02] * 7) == (0.02, 0.02)
    lo, hi = S.bootstrap_mean_ci([0.3])
    assert np.isnan(lo) and np.isnan(hi)  # one sampling: nothing to resample
    with pytest.raises(ValueError, match="finite"):
        S.bootstrap_mean_ci([0.1, float("nan")])


def test_bootstrap_two_values_by_hand():
    # resampled means of (0, 1): 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4 -> 2.5% and 97.5% quantiles 0 and 1
    assert S.bootstrap_mean_ci([0.0, 1.0]) == (0.0, 1.0)
    # and a narrower level cuts inside: the 30%..70% quantiles are both 0.5
    assert S.bootstrap_mean_ci([0.0, 1.0], level=0.4) == (0.5, 0.5)


def test_bootstrap_matches_exact_enumeration():
    d = np.array([0.1, 0.4, 0.7, 1.5])
    means = np.array([np.mean(c) for c in itertools.product(d, repeat=4)])  # all 256 equally likely resamples
    exact = np.quantile(means, [0.025, 0.975])
    got = S.bootstrap_mean_ci(d, n_resamples=10_000, seed=3)
    assert got == S.bootstrap_mean_ci(d, n_resamples=10_000, seed=3)  # seeded
    assert np.allclose(got, exact, atol=0.03)
    assert got[0] < d.mean() < got[1]


def _paired_ps():
    """4 samplings, r = 1 (different runs per sampling) and r = 2 (the same two runs in every sampling)."""
    diffs = {1: [0.10, 0.0, -0.05, 0.15], 2: [0.02, 0.02, 0.02, 0.02]}
    rows = []
    for r, ds in diffs.items():
        for s, dd in enumerate(ds):
            ids = (f"run{s}",) if r == 1 else ("runA", "runB")
            for v in S.TABLE1_VARIANTS:
                sel = 0.5 + 0.01 * s
                rows.append(("x", s, r, "max_src_dev", v, ids[0], ids, sel))
                rows.append(("x", s, r, "acc_avg", v, "", ids, sel + dd))
    return pd.DataFrame(rows, columns=S.PER_SAMPLING_COLUMNS)


def test_paired_comparison_counts_and_same_runs():
    pc = S.paired_comparison(_paired_ps())
    assert list(pc.columns) == S.PAIRED_COLUMNS
    assert len(pc) == 2 * len(S.PAIRS)
    r1 = pc[(pc["r"] == 1) & (pc["variant"] == "ca") & (pc["src_variant"] == "ca")].iloc[0]
    assert (r1["wins"], r1["ties"], r1["losses"], r1["n"]) == (2, 1, 1, 4)
    assert r1["mean_diff"] == 5.0 and r1["ci_low"] < 5.0 < r1["ci_high"] and not r1["same_runs"]
    r2 = pc[(pc["r"] == 2) & (pc["variant"] == "last")].iloc[0]
    assert r2["same_runs"] and (r2["ci_low"], r2["mean_diff"], r2["ci_high"]) == (2.0, 2.0, 2.0)
    assert (r2["wins"], r2["ties"], r2["losses"]) == (4, 0, 0)
    flags = S.same_runs(_paired_ps()).set_index("r")["same_runs"]
    assert flags.to_dict() == {1: False, 2: True}


def test_paired_comparison_released_matches_table1(released):
    ps = S.per_sampling(released["ner"])
    pc = S.paired_comparison(ps)
    t1 = S.table1(ps).set_index(["r", "selection", "variant"])["mean"]
    same = pc[pc["variant"] == pc["src_variant"]]
    assert sorted(same["r"].unique()) == list(range(1, 11)) and set(same["n"]) == {len(released["ner"].sampling_seeds) - 1}
    for rec in same.itertuples(index=False):  # the mean of the differences is the difference of the means
        assert abs(rec.mean_diff - (t1[(rec.r, "acc_avg", rec.variant)] - t1[(rec.r, "max_src_dev", rec.variant)])) <= 0.11
        assert rec.wins + rec.ties + rec.losses == rec.n and rec.ci_low <= rec.mean_diff <= rec.ci_high
    assert not pc["same_runs"].any()  # 21 configurations: samplings of 10 differ
