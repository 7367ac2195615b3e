"""06_unfreezing.ipynb executes headless (papermill) on real smoke runs and renders to HTML."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import papermill
import pytest

from ofa_lib import results
from ofa_lib.analysis import report, unfreezing_report
from ofa_lib.train import config, training


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """Four real smoke runs of SIB-200: standard and FUN, two learning rates each (so both can be averaged)."""
    root = tmp_path_factory.mktemp("unfreezing_runs")
    for unfreeze in ("none", "fun"):
        for lr in (1e-4, 3e-4):
            cfg = config.make_config("sib", "smoke", lr=lr, unfreeze=unfreeze, unfreeze_every=3, fisher_every=3,
                                     fisher_batches=1, target_langs={"sib200": ["deu_Latn", "zho_Hans"]})
            training.run_training(cfg, root, progress=False)
    return root


def test_unfreezing_notebook_on_smoke_runs(runs_root, tmp_path):
    out_dir = tmp_path / "report"
    executed = tmp_path / "06.ipynb"
    papermill.execute_notebook(
        "notebooks/06_unfreezing.ipynb", str(executed), kernel_name="python3", progress_bar=False,
        parameters={"task": "sib", "runs_root": str(runs_root), "output_dir": str(out_dir), "r_max": 2, "n_samplings": 2},
    )
    for name in ("fisher_curves.png", "fisher_curves.svg", "unfreezing_order.png", "averaging_by_setting.png",
                 "transfer_table.csv", "transfer_per_run.csv", "fisher_curves.csv", "unfreezing_events.csv"):
        assert (out_dir / name).is_file(), name
    table = pd.read_csv(out_dir / "transfer_table.csv")
    assert set(table.setting) == {"none", "fun"} and (table.runs == 2).all()
    assert table.filter(like="lowest").shape[1] == 1
    per_run = pd.read_csv(out_dir / "transfer_per_run.csv")
    assert per_run.average.between(0, 100).all() and per_run.en.between(0, 100).all()
    events = pd.read_csv(out_dir / "unfreezing_events.csv")
    assert set(events.setting) == {"fun"} and (events[events.position == 0].depth_from_top == 0).all()
    averaging = pd.read_csv(out_dir / "averaging_by_setting.csv")
    assert set(averaging.setting) == {"none", "fun"} and set(averaging.r) == {1, 2}
    assert {"acc_avg", "max_src_dev"} <= set(averaging.selection)
    curves = pd.read_csv(out_dir / "fisher_curves.csv")
    manifest = json.loads(next(runs_root.glob("*/manifest.json")).read_text())
    assert set(curves.step) == set(range(0, manifest["total_steps"] + 1, 3))
    # a run that is gone (an edited grid) leaves the per-setting store; the stored averages are reused
    store = out_dir / "results_none.parquet"
    results.append(store, results.read(store).query("kind == 'variant'").head(1).assign(run_id="sib-0123456789ab"))
    again = unfreezing_report.averaging_by_setting(unfreezing_report.find_schedule_runs(runs_root, "sib"), out_dir,
                                            variants=["last", "ca"], r_max=2, n_samplings=2, progress=False)
    assert "sib-0123456789ab" not in set(results.read(store).run_id)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), averaging, check_dtype=False)
    nb = nbformat.read(executed, as_version=4)
    assert "image/png" in json.dumps([c.get("outputs", []) for c in nb.cells])
    html = report.render(executed, tmp_path / "report.html")
    text = html.read_text()
    assert "Scheduled unfreezing" in text and "<img" in text and "find_schedule_runs" not in text  # no code

