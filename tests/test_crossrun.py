"""Across runs on a tiny grid of REAL smoke runs: accumulative averages and soups evaluated once,
the rows 04_analysis reads, refusals, and notebooks 03 and 04 executed with papermill."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch

from ofa_lib import results as R
from ofa_lib.io import file_sha256
from ofa_lib.merge import cli as merge_cli
from ofa_lib.merge import crossrun, planning, pool
from ofa_lib.models import ckpt_io
from ofa_lib.paths import REPO_ROOT
from ofa_lib.results import selection as S
from ofa_lib.train import config, training

pytestmark = [pytest.mark.slow,  # expected on this grid (asserted once in the fixture)
              pytest.mark.filterwarnings("ignore:only 3 \\(lr, batch_size\\) configurations"),
              pytest.mark.filterwarnings("ignore:3 soup\\(s\\) skipped")]

NB03 = REPO_ROOT / "notebooks" / "03_average.ipynb"
NB04 = REPO_ROOT / "notebooks" / "04_analysis.ipynb"
GRID = [(5e-5, 8), (1e-4, 8), (1e-4, 16)]  # three (lr, batch) configurations, seed 1
SMALL = dict(seed=1, top_k=2, num_snapshots=2, head="init:0", train_subsample=32, dev_subsample=8, test_subsample=8)
SAMPLINGS = range(3)
VARIANTS = ("last", "ca")  # fp16-stored and fp32 variants; src_dev is stored like last
N_AVG, N_SOUP = 3 * len(VARIANTS) * 3, 3 * 2  # samplings x variants x r; samplings x r in {2, 3}
SOUP_K = 4
KEY = ["dataset", "split", "lang", "metric"]


def _cfg(lr, bs, **over):
    return config.make_config("sib", "smoke", lr=lr, batch_size=bs, **{**SMALL, **over})


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("crossrun") / "runs"
    for lr, bs in GRID:
        training.run_training(_cfg(lr, bs), root, progress=False)
    return root


@pytest.fixture(scope="module")
def averaged(grid):
    """One full pass (3 samplings x 2 variants x r = 1..3, soups) into a fresh store."""
    runs = pool.find_runs(grid, "sib")
    store = grid.parent / "results" / "sib.parquet"
    R.append(store, pool.collect_run_metrics(runs))
    with pytest.warns(UserWarning) as caught:
        rows = crossrun.average_runs(runs, variants=VARIANTS, r_max=10, samplings=SAMPLINGS, soup_k=SOUP_K,
                                     results_path=store, progress=False)
    messages = " | ".join(str(w.message) for w in caught)
    assert "r_max capped at 3" in messages and "3 soup(s) skipped" in messages, messages
    assert "differently" not in messages  # the r = 1 self-check of the evaluation
    return runs, store, rows


def test_find_runs(grid, averaged):
    runs = averaged[0]
    assert list(runs.columns) == pool.RUN_COLUMNS
    assert sorted(zip(runs["lr"], runs["batch_size"])) == sorted(GRID)
    assert set(runs["run_id"]) == {_cfg(lr, bs).run_id for lr, bs in GRID}
    assert runs["head_fingerprint"].nunique() == 1 and (runs["top_k"] == 2).all()


def test_r1_average_scores_what_the_run_scored(averaged):
    """Same stored weights, same scores: every test set for each variant, and English dev for CA
    (training keeps LAST's dev scores from the live fp32 snapshot, before its fp16 storage)."""
    runs, store, rows = averaged
    own = pool.collect_run_metrics(runs)
    own = own[(own["kind"] == "variant") & ((own["split"] == "test") | ((own["name"] == "ca") & (own["lang"] == "en")))]
    checked = 0
    for s in SAMPLINGS:
        for v in VARIANTS:
            mine = rows[rows["name"] == R.cross_name("acc_avg", v, 1, s)]
            (run_id,) = R.members_list(mine["members"].iloc[0])
            theirs = own[(own["run_id"] == run_id) & (own["name"] == v)]
            assert len(mine) == 3  # en dev, 2 target test (averages need no target dev)
            b = theirs.set_index(KEY)["value"].sort_index()
            a = mine.set_index(KEY)["value"].reindex(b.index)
            assert len(b) == (3 if v == "ca" else 2)
            assert (a == b).all(), (v, run_id)
            checked += 1
    assert checked == 3 * len(VARIANTS)


def test_rows_follow_the_store_contract(averaged):
    runs, store, rows = averaged
    R.validate(rows)
    assert set(rows["kind"]) == {"average", "soup"}
    assert (rows["run_id"] == rows["name"]).all() and rows["lr"].isna().all() and rows["seed"].isna().all()
    assert set(rows["split"]) == {"validation", "test"} and set(rows["metric"]) == {"acc"}
    assert "en" in set(rows["lang"]) and "eng_Latn" not in set(rows["lang"])
    orders = {s: S.sample_runs(runs, 3, seed=s) for s in SAMPLINGS}
    for name, g in rows.groupby("name"):
        method, variant, r, s = R.parse_cross_name(name)
        assert g["members"].nunique() == 1
        members = R.members_list(g["members"].iloc[0])
        assert members == orders[s][:r]  # sampling order: the prefix of the sampling's list
        if method == "acc_avg":
            assert g["kind"].iloc[0] == "average" and variant in VARIANTS
        else:
            assert g["kind"].iloc[0] == "soup" and variant == f"top{SOUP_K}" and r >= 2  # r=1 keeps 2 < 4
    names = set(rows["name"])
    assert len([n for n in names if n.startswith("acc_avg:")]) == N_AVG
    assert len([n for n in names if n.startswith("soup:")]) == N_SOUP
    # what 04_analysis reads: the run table, the averages and the samplings they imply
    data = S.CrossRunData.from_tidy(R.read(store), "sib")
    assert len(data.run_table) == 3 and data.run_table["dev_src_ca"].notna().all()
    assert len(data.averages) == N_AVG + N_SOUP
    assert data.sampling_seeds == list(SAMPLINGS) and data.r_values == [1, 2, 3]
    t1 = S.table1(S.per_sampling(data, "all"))
    assert set(t1["selection"]) == {"max_src_dev", "acc_avg"} and (t1["n"] == 3).all()


def test_each_set_of_weights_is_evaluated_once(averaged):
    runs, store, rows = averaged
    stats = rows.attrs["stats"]
    orders = {s: S.sample_runs(runs, 3, seed=s) for s in SAMPLINGS}
    distinct = {(v, frozenset(orders[s][:r])) for s in SAMPLINGS for v in VARIANTS for r in (1, 2, 3)}
    snaps = {r: pool.kept_snapshots(p) for r, p in zip(runs["run_id"], runs["path"])}
    soups = {planning.soup_key((x.run_id, x.snapshot) for x in planning.soup_members(snaps, orders[s][:r], SOUP_K))
             for s in SAMPLINGS for r in (2, 3)}
    assert stats["evaluations"] == len(distinct) + len(soups)
    assert stats["reused"] == N_AVG + N_SOUP - stats["evaluations"] > 0  # r=3 is the same set in every sampling
    assert stats["already_stored"] == 0 and stats["soups_skipped"] == 3
    again = crossrun.average_runs(runs, variants=VARIANTS, r_max=3, samplings=SAMPLINGS, soup_k=SOUP_K,
                                  results_path=store, progress=False)
    assert again.attrs["stats"]["evaluations"] == 0 and again.attrs["stats"]["checkpoint_reads"] == 0
    assert again.attrs["stats"]["already_stored"] == N_AVG + N_SOUP
    pd.testing.assert_frame_equal(again.sort_values(R.KEY).reset_index(drop=True),
                                  rows.sort_values(R.KEY).reset_index(drop=True))


def test_keep_checkpoints(averaged, tmp_path):
    runs, store, _ = averaged
    out = crossrun.average_runs(runs, variants=("ca",), r_max=3, samplings=[0], soup_k=0, results_path=store,
                                keep_checkpoints=True, averages_dir=tmp_path, progress=False)
    assert out.attrs["stats"]["evaluations"] == 0  # cached, but the weights are still written
    files = sorted(tmp_path.glob("average-ca-*.safetensors"))
    assert len(files) == 3 and not list(tmp_path.glob(".*.tmp"))
    first = S.sample_runs(runs, 3, seed=0)[0]
    one = [f for f in files if ckpt_io.read_metadata(f)["ofa_members"] == first]
    run_dir = Path(runs.set_index("run_id").loc[first, "path"])
    run_ca = ckpt_io.load_checkpoint(run_dir / "checkpoints" / "ca.safetensors")
    got = ckpt_io.load_checkpoint(one[0])
    assert all(torch.equal(got[k], run_ca[k]) for k in run_ca)


def _fake_run(grid: Path, tmp: Path, name: str, change) -> Path:
    """A runs folder: links to the real runs plus a fake one (an edited copy of one run's
    manifest and LAST checkpoint; a cheap stand-in for another real run)."""
    root = tmp / "runs"
    root.mkdir(parents=True)
    real = sorted(p for p in grid.iterdir() if (p / "manifest.json").is_file())
    for p in real:
        (root / p.name).symlink_to(p, target_is_directory=True)
    dst = root / f"sib-{name}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy(real[0] / "checkpoints" / "last.safetensors", dst / "checkpoints" / "last.safetensors")
    m = json.loads((real[0] / "manifest.json").read_text())
    m["run_id"] = dst.name
    change(m, dst)
    # the stand-in recorded the hashes of the files it has, as a real run does when it writes them
    m["checkpoint_sha256"] = {str(f.relative_to(dst)): file_sha256(f) for f in (dst / "checkpoints").iterdir()}
    (dst / "manifest.json").write_text(json.dumps(m))
    return root


def test_refuses_runs_that_cannot_be_combined(grid, tmp_path):
    def other_head(m, _):
        m["params"]["head"], m["head_fingerprint"] = "init:1", "0" * 64

    root = _fake_run(grid, tmp_path / "a", "otherhead", other_head)
    with pytest.raises(pool.IncompatibleRunsError, match="heads are not aligned") as err:
        pool.find_runs(root, "sib")
    assert "sib-otherhead" in str(err.value) and _cfg(*GRID[0]).run_id in str(err.value)

    def other_data(m, _):
        m["params"]["dev_subsample"] = 9

    root = _fake_run(grid, tmp_path / "b", "otherdata", other_data)
    with pytest.raises(pool.IncompatibleRunsError, match="dev_subsample") as err:
        pool.find_runs(root, "sib")
    assert "sib-otherdata" in str(err.value)

    def other_vocab(m, path):  # another seed trims the vocabulary to another training subsample
        m["params"]["seed"] = 2
        file = path / "checkpoints" / "last.safetensors"
        sd = ckpt_io.load_checkpoint(file)
        key = next(k for k in sd if k.endswith("word_embeddings.weight"))
        sd[key] = sd[key].flip(0)
        ckpt_io.save_checkpoint(sd, file, metadata=ckpt_io.read_metadata(file))

    root = _fake_run(grid, tmp_path / "c", "othervocab", other_vocab)
    with pytest.raises(pool.IncompatibleRunsError, match="different vocabularies") as err:
        pool.find_runs(root, "sib")
    assert "sib-othervocab" in str(err.value)


def test_notebook_structure():
    nb = nbformat.read(NB03, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", [])
    from papermill.translators import PythonTranslator

    parsed = {p.name for p in PythonTranslator.inspect(first)}  # what papermill can override
    assert {"task", "runs_root", "results_path", "variants", "r_max", "n_samplings", "soup_k",
            "keep_checkpoints"} <= parsed
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_notebooks_03_then_04(averaged, tmp_path):
    import papermill as pm

    runs, store, _ = averaged
    grid = Path(runs["path"].iloc[0]).parent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nb3 = pm.execute_notebook(
            str(NB03), str(tmp_path / "03.ipynb"), kernel_name="python3", progress_bar=False, cwd=str(NB03.parent),
            parameters=dict(task="sib", runs_root=str(grid), results_path=str(store), variants=list(VARIANTS),
                            n_samplings=3, soup_k=SOUP_K))
    text = json.dumps(nb3["cells"][-1]["outputs"])
    assert "max_src_dev:ca" in text and "acc_avg:ca" in text and "soup" in text
    assert any("already_stored" in json.dumps(c.get("outputs", [])) for c in nb3["cells"])

    pm.execute_notebook(
        str(NB04), str(tmp_path / "04.ipynb"), kernel_name="python3", progress_bar=False, cwd=str(NB04.parent),
        parameters=dict(source=str(store), model=config.make_config("sib", "smoke").model_name, tasks=["sib"],
                        sampling_seeds="all", report_name="ours", outputs_root=str(tmp_path), gain_r=3))
    cols = {  # the same columns as for the released results (tests/test_analysis_notebook.py)
        "table1.csv": ["task", "r", "selection", "variant", "mean", "std", "n"],
        "table2.csv": ["task", "r", "method", "mean", "std", "n"],
        "table3.csv": ["task", "lr", "batch_size", "variant", "mean", "std", "n"],
    }
    for name, want in cols.items():
        df = pd.read_csv(tmp_path / "ours" / name)
        assert list(df.columns) == want, name
        assert set(df["task"]) == {"sib"} and len(df), name
    t1 = pd.read_csv(tmp_path / "ours" / "table1.csv")
    assert set(t1["selection"]) == {"max_src_dev", "acc_avg"} and sorted(set(t1["r"])) == [1, 2, 3]
    t2 = pd.read_csv(tmp_path / "ours" / "table2.csv")
    assert {"max_src_dev", "max_trg_dev", "acc_avg_ca"} <= set(t2["method"])


def test_merge_methods_in_the_pass(averaged, tmp_path):
    """An old store (no method column) keeps its uniform rows as cache hits; each method's rows carry
    its label; TIES keeping everything at r = 1 scores like the run itself; greedy soups are uniform
    means of the runs they keep; nothing is evaluated twice."""
    runs, store, _ = averaged
    old = tmp_path / "old.parquet"
    pd.read_parquet(store).drop(columns=["method"]).to_parquet(old)  # as written before the column existed
    methods = {"uniform": None, "task_arithmetic": {"lambda": 0.5}, "ties": {"density": 1.0, "lambda": 1.0},
               "dare_ties": {"density": 0.5}, "greedy_soup": None}
    kw = dict(variants=("ca",), r_max=3, samplings=[0, 1], soup_k=0, methods=methods, results_path=old,
              averages_dir=tmp_path / "averages", progress=False)
    rows = crossrun.average_runs(runs, **kw)
    stats = rows.attrs["stats"]
    labels = set(rows["method"])
    assert {lab.split("(")[0] for lab in labels} == set(methods) and "ties(density=1.0,lambda=1.0)" in labels
    uni = rows[rows["method"] == "uniform"]
    assert set(uni["name"]) == {R.cross_name("acc_avg", "ca", r, s) for r in (1, 2, 3) for s in (0, 1)}
    assert stats["already_stored"] == 6  # every uniform row of the old store: a hit, not re-evaluated
    assert len(list((tmp_path / "averages").glob("base-*.safetensors"))) == 1  # θ₀, written once

    def scores(method, name):
        d = rows[(rows["method"] == method) & (rows["name"] == name)]
        return d.set_index(KEY)["value"].sort_index()

    r1 = R.cross_name("acc_avg", "ca", 1, 0)
    pd.testing.assert_series_equal(scores("ties(density=1.0,lambda=1.0)", r1), scores("uniform", r1))
    dare = rows[rows["method"] == "dare_ties(density=0.5,lambda=1.0,seed=0)"]
    assert dare["value"].between(0, 1).all() and dare["name"].nunique() == 6
    greedy = rows[rows["method"] == "greedy_soup"]
    assert set(greedy["name"]) == set(uni["name"])
    g1 = R.cross_name("acc_avg", "ca", 1, 1)
    pd.testing.assert_series_equal(scores("greedy_soup", g1), scores("uniform", g1))  # one candidate: itself
    # distinct sets of weights evaluated once: a second pass evaluates nothing
    again = crossrun.average_runs(runs, **kw)
    assert again.attrs["stats"]["evaluations"] == 0 and again.attrs["stats"]["dev_evaluations"] == 0
    assert again.attrs["stats"]["already_stored"] == len({(m, n) for m, n in zip(rows["method"], rows["name"])})
    # what 04_analysis reads: the merge table against the selections, and only uniform in Tables 1-2
    ps = S.merge_per_sampling(R.read(old), "sib")
    table = S.merge_table(ps)
    assert {"max_src_dev", "max_trg_dev", "uniform", "greedy_soup"} <= set(table["method"])
    assert set(S.CrossRunData.from_tidy(R.read(old), "sib").averages["variant"]) == {"last", "ca", "top4"}
    with pytest.raises(ValueError, match="method_variants"):
        crossrun.average_runs(runs, **dict(kw, method_variants=["last"]))


def test_fisher_in_the_pass(averaged, tmp_path):
    """fisher merges in the pass: each run's diagonal computed once (then read, also by a pass into a
    fresh store), r = 1 scores like the run itself, a second pass evaluates nothing."""
    from ofa_lib.train import fisher

    runs, store, _ = averaged
    kw = dict(variants=("ca",), r_max=3, samplings=[0, 1], soup_k=0, methods={"fisher": {"examples": 8}},
              averages_dir=tmp_path / "averages", progress=False)
    first = tmp_path / "first.parquet"
    shutil.copy(store, first)
    rows = crossrun.average_runs(runs, results_path=first, **kw)
    stats = rows.attrs["stats"]
    label = "fisher(examples=8,floor=1e-12,labels='sample',seed=0,split='train')"
    assert set(rows["method"]) == {label} and rows["name"].nunique() == 6
    # 3 runs: each diagonal computed once; sampling 1 reads those its unevaluated merges need
    assert stats["fisher_computed"] == 3 and 0 < stats["fisher_reused"] <= 3
    files = sorted((tmp_path / "averages" / "fisher").glob("*.safetensors"))
    assert len(files) == 3 and not list((tmp_path / "averages" / "fisher").glob(".*"))
    shas = {file_sha256(Path(p) / "checkpoints" / "ca.safetensors") for p in runs["path"]}
    assert {ckpt_io.read_metadata(f)[fisher.CHECKPOINT_SHA_KEY] for f in files} == shas
    uni = R.read(first)
    uni = uni[(uni["method"] == "uniform") & (uni["kind"] == "average")]
    r1 = R.cross_name("acc_avg", "ca", 1, 0)
    mine = rows[rows["name"] == r1].set_index(KEY)["value"].sort_index()
    pd.testing.assert_series_equal(mine, uni[uni["name"] == r1].set_index(KEY)["value"].sort_index())
    again = crossrun.average_runs(runs, results_path=first, **kw).attrs["stats"]
    assert again["evaluations"] == 0 and again["fisher_computed"] == 0
    fresh = crossrun.average_runs(runs, results_path=tmp_path / "fresh.parquet", **kw).attrs["stats"]
    assert fresh["evaluations"] == stats["evaluations"] and fresh["fisher_computed"] == 0
    assert fresh["fisher_reused"] == stats["fisher_computed"] + stats["fisher_reused"]


def test_ofa_merge_base_from_run(averaged, tmp_path):
    """θ₀ from a run's config: the file the pass names for these runs, then the same merge as with --base."""
    from ofa_lib.merge import merging

    runs, _, _ = averaged
    run_dir = Path(runs["path"].iloc[0])
    ckpts = [str(Path(p) / "checkpoints" / "ca.safetensors") for p in runs["path"]]
    out = tmp_path / "ta.safetensors"
    assert merge_cli.main(["--method", "task_arithmetic", "--base-from-run", str(run_dir), "--out", str(out), *ckpts]) == 0
    plan = planning.plan_pass(runs, variants=("ca",), r_max=3, samplings=[0], soup_k=0, methods=["task_arithmetic"])
    base = plan.avg_dir / f"base-{planning.key_digest([plan.base_id])}.safetensors"
    assert base.is_file() and json.loads(ckpt_io.read_metadata(out)["ofa_merge_base"])["file"] == str(base)
    want = merging.merge_files(merging.make_spec("task_arithmetic"), ckpts, base=base)
    got = ckpt_io.load_checkpoint(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert merge_cli.main(["--method", "uniform", "--base-from-run", str(run_dir), "--out", str(out), *ckpts]) == 2
    assert merge_cli.main(["--method", "ties", "--base-from-run", str(tmp_path), "--out", str(out), *ckpts]) == 2
