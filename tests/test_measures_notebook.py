"""05_measures.ipynb end to end on real smoke runs (SIB-200, the embedded model): two AdamW runs and
one SAM run recording measures at their snapshots, then papermill computes the rest on checkpoints."""

from __future__ import annotations

import json
import re

import nbformat
import pandas as pd
import papermill
import pytest

from ofa_lib.analysis import report
from ofa_lib.paths import REPO_ROOT
from ofa_lib.train import config, measures, training

NOTEBOOK = REPO_ROOT / "notebooks" / "05_measures.ipynb"
RECORDED = ["margin_src", "frobenius"]  # the others are computed by the notebook
RUNS = [dict(lr=1e-4, optimizer="adamw"), dict(lr=2e-4, optimizer="sam")]
# smaller than the smoke preset: 24 training sentences (3 steps = 3 snapshots), 8 dev / test per language
SMALL = dict(train_subsample=24, dev_subsample=8, test_subsample=8, measures=RECORDED, measure_examples=8)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for params in RUNS:
        cfg = config.make_config("sib", "smoke", **SMALL, **params)
        paths.append(training.run_training(cfg, root, progress=False))
    return root, paths


def test_runs_record_measures_at_snapshots(smoke_runs):
    _, paths = smoke_runs
    for path in paths:
        manifest = json.loads((path / "manifest.json").read_text())
        frame = pd.read_parquet(path / "measures.parquet")
        snaps = frame[frame.kind == "snapshot"]
        assert sorted(snaps.name.astype(int).unique()) == list(range(1, manifest["params"]["num_snapshots"] + 1))
        assert set(frame[frame.kind == "variant"].name) == {"last", "src_dev", "ca", "trg_dev"}
        assert set(frame.measure) == set(RECORDED) and frame.value.notna().all()
        assert (frame[frame.measure == "frobenius"].value > 0).all()  # training moved the encoder
        # LAST is the last snapshot: the same values
        last = frame[(frame.kind == "variant") & (frame.name == "last")].set_index("measure").value
        final = frame[(frame.kind == "snapshot") & (frame.name == str(manifest["params"]["num_snapshots"]))]
        assert last.to_dict() == final.set_index("measure").value.to_dict()


def test_measures_notebook_smoke(smoke_runs, tmp_path):
    root, _ = smoke_runs
    out_dir = tmp_path / "report"
    executed = tmp_path / "05.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(executed), kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOK.parent),
        parameters=dict(task="sib", runs_root=str(root), results_path=str(tmp_path / "none.parquet"),
                        output_dir=str(out_dir), variants=["last", "ca"], n_bootstrap=100, n_samplings=2,
                        flat_samplings=1, measure_options={"sharpness_jiang": {"steps": 1}, "sharpness_diff": {"n_samples": 1}}))
    rows = pd.read_csv(out_dir / "measures.csv")
    computed = rows[rows.source == "computed"]
    assert set(computed.measure) == {"margin_trg", "sharpness_jiang", "sharpness_diff", "fisher_trace"}  # the others were recorded
    assert set(rows.measure) == set(measures.MEASURES)
    frame = pd.read_csv(out_dir / "checkpoints.csv")
    assert len(frame) == 4 and set(frame.optimizer) == {"adamw", "sam"} and frame.test.between(0, 1).all()
    corr = pd.read_csv(out_dir / "rank_correlations.csv")
    assert set(corr.measure) == set(measures.MEASURES) and (corr.n == 4).all()
    ok = corr.spearman.notna()
    assert ((corr.spearman_lo[ok] <= corr.spearman[ok] + 1e-9) & (corr.spearman[ok] <= corr.spearman_hi[ok] + 1e-9)).all()
    table = pd.read_csv(out_dir / "selection_table.csv")
    assert {"max_src_dev", "max_trg_dev", "max_margin_src", "max_margin_trg", "min_sharpness_jiang"} <= set(table.selection)
    assert table.r.max() == 2
    close = pd.read_csv(out_dir / "closest_to_trg_dev.csv")
    assert len(close) and close.gap.notna().all()
    flat = pd.read_csv(out_dir / "averaged_flatness.csv")
    assert set(flat.measure) == {"sharpness_jiang", "sharpness_diff"} and flat.average.notna().all()
    for stem in ("measures_vs_test", "selection_vs_r"):
        assert (out_dir / f"{stem}.png").stat().st_size > 1000
    nb = nbformat.read(executed, as_version=4)
    text = "\n".join(o.get("text", "") + json.dumps(o.get("data", {})) for c in nb.cells for o in c.get("outputs", []))
    assert re.search(r"Closest label-free selection to Max TRG-DEV: \*\*\w+\*\* \(\w+\)( = \*\*\w+\*\* \(\w+\))*, [\d.]+ vs [\d.]+",
                     text)
    html = report.render(executed, out_dir / "report.html").read_text()
    assert "data:image/png" in html and "Closest label-free selection" in html


def test_measures_notebook_rejects_unknown_measure(smoke_runs, tmp_path):
    root, _ = smoke_runs
    with pytest.raises(papermill.PapermillExecutionError, match="flatness"):
        papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "o.ipynb"), kernel_name="python3", progress_bar=False,
                                   parameters=dict(runs_root=str(root), measures=["flatness"], output_dir=str(tmp_path / "r")))
