"""End-to-end: papermill runs notebooks/04_analysis.ipynb on the released results, then the
report CLI renders a self-contained report.html."""

from __future__ import annotations

import re
import subprocess
import sys

import nbformat
import pandas as pd
import pytest

from ofa_lib.paths import REPO_ROOT, data_dir
from ofa_lib.results import released

NOTEBOOK = REPO_ROOT / "notebooks" / "04_analysis.ipynb"
PARAMS = REPO_ROOT / "params" / "reproduce_paper.yaml"
FIGURES = ("score_vs_r", "spread_by_r", "language_gain", "table3_heatmap")


def test_notebook_structure():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", [])
    for knob in ("source", "model", "tasks", "sampling_seeds", "report_name", "outputs_root"):
        assert re.search(rf"^{knob} = ", first.source, re.M), knob
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_params_preset():
    import yaml

    p = yaml.safe_load(PARAMS.read_text())
    assert p["source"] == "released" and p["model"] == "xlm-roberta-large"
    assert p["tasks"] == ["nli", "tydiqa", "ner"] and p["sampling_seeds"] == "authors"
    assert p["report_name"] == "paper"


@pytest.mark.slow
def test_papermill_end_to_end(tmp_path):
    try:
        if not (data_dir() / released.RELEASED_SUBDIR).is_dir():
            pytest.skip("released results not available")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import papermill as pm
    import yaml

    params = yaml.safe_load(PARAMS.read_text())
    params.update(outputs_root=str(tmp_path), report_name="e2e")
    out_dir = tmp_path / "e2e"
    out_dir.mkdir()
    executed = out_dir / "04_analysis.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(executed), parameters=params,
                        cwd=str(NOTEBOOK.parent), kernel_name="python3", progress_bar=False)

    cols = {
        "table1.csv": ["task", "r", "selection", "variant", "mean", "std", "n"],
        "table2.csv": ["task", "r", "method", "mean", "std", "n"],
        "table3.csv": ["task", "lr", "batch_size", "variant", "mean", "std", "n"],
    }
    for name, want in cols.items():
        df = pd.read_csv(out_dir / name)
        assert list(df.columns) == want, name
        assert set(df["task"]) == {"nli", "tydiqa", "ner"}
    assert len(pd.read_csv(out_dir / "table1.csv")) == 180
    for stem in FIGURES:
        for ext in ("png", "svg"):
            assert (out_dir / f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"

    res = subprocess.run([sys.executable, "-m", "ofa_lib.analysis.report", "render", str(executed)],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr
    html = (out_dir / "report.html").read_text(encoding="utf-8")
    imgs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(imgs) >= len(FIGURES) and all(s.startswith("data:image/") for s in imgs)
    assert not re.search(r'<script[^>]*\ssrc=', html)  # nothing to fetch
    assert not re.search(r'<link[^>]*\shref="https?:', html)
    assert "Table 1" in html and "Max. SRC-DEV" in html and "78.3" in html  # NLI CA r=10
    assert "from ofa_lib import" not in html  # code hidden
    assert not list(out_dir.glob(".*.tmp"))


def test_paired_sentence_and_same_runs_note():
    from test_selection import _paired_ps

    from ofa_lib.analysis import report as rp

    ps = _paired_ps()
    pc = rp.S.paired_comparison(ps)
    text = rp.paired_sentence(pc)
    # r = 2 holds the same runs in every sampling: the sentence speaks of r = 1, the largest r that differs
    assert text.startswith("x, r = 1: accumulative averaging against Max. SRC-DEV") and text.endswith(").")
    lo, hi = pc.loc[(pc["r"] == 1) & (pc["variant"] == "ca"), ["ci_low", "ci_high"]].iloc[0]
    assert lo < 0 < hi  # one loss of 5 points against gains of 10 and 15: the interval includes 0
    assert f"on CA weights it is level with Max. SRC-DEV at +5.0 [{lo:+.1f}, {hi:+.1f}] points (2 of 4 samplings favour it, 1 tie)" in text
    only2 = rp.paired_sentence(pc[pc["r"] == 2])
    assert only2.startswith("x, r = 2 (every sampling holds the same runs at r = 2: they differ only in order")
    assert "not 4 independent observations)" in only2
    worse = rp.paired_sentence(pc.assign(mean_diff=-pc["mean_diff"], ci_low=-pc["ci_high"], ci_high=-pc["ci_low"],
                                         wins=pc["losses"], losses=pc["wins"])[pc["r"] == 2])
    assert "it trails Max. SRC-DEV by 2.0 [2.0, 2.0] points (0 of 4 samplings favour it)" in worse
    assert "it beats Max. SRC-DEV by +2.0 [+2.0, +2.0] points (4 of 4 samplings favour it)" in only2
    assert "r = 2" in rp.same_runs_note(ps) and "0.0" in rp.same_runs_note(ps)
    assert rp.same_runs_note(ps[ps["r"] == 1]) == ""
    wide = rp.wide_paired(pc)
    assert ("x", "2 (same runs)") in wide.index and wide.loc[("x", "2 (same runs)"), "LAST"] == "+2.0 [+2.0, +2.0] 4/0/0"


def test_provenance_shows_repo_relative_paths(tmp_path):
    from ofa_lib.analysis import report as rp

    class _C:
        origin = str(REPO_ROOT / "outputs" / "results" / "demo.parquet")
        sampling_seeds = [0, 1]
        r_values = [1, 2]
        run_table = pd.DataFrame({"lr": [1e-5, 2e-5], "batch_size": [16, 16]})

    data = {"sib": rp.TaskData("sib", pd.DataFrame(), _C())}
    md = rp.provenance_markdown(data, {"source": _C.origin, "outside": str(tmp_path)}, "all", REPO_ROOT / "outputs" / "reports" / "x")
    assert str(REPO_ROOT) not in md
    assert "'outputs/results/demo.parquet'" in md and "| outputs/results/demo.parquet |" in md
    assert "`outputs/reports/x`" in md and str(tmp_path) in md  # a path outside the repository stays as given


def test_snapshot_convergence_and_ca_sentence():
    from ofa_lib.analysis import report as rp

    en = {"slow": [0.25, 0.25, 0.25, 0.3, 0.6, 0.7, 0.72, 0.74, 0.75, 0.75],
          "fast": [0.5, 0.7, 0.72, 0.74, 0.75, 0.75, 0.76, 0.76, 0.76, 0.77]}
    rows = [dict(run_id=rid, task="sib", kind="snapshot", name=str(k + 1), dataset="sib200", split="validation",
                 lang="en", metric="acc", value=v) for rid, vals in en.items() for k, v in enumerate(vals)]
    rows += [dict(run_id="slow", task="sib", kind="snapshot", name="1", dataset="sib200", split="validation",
                  lang="deu_Latn", metric="acc", value=0.9)]  # a target dev row: not English, ignored

    class _C:
        run_table = pd.DataFrame({"run_id": ["slow", "fast"], "lr": [5e-5, 2e-4], "batch_size": [32, 16],
                                  "test_last": [0.57, 0.80], "test_ca": [0.26, 0.79]})

    conv = rp.snapshot_convergence({"sib": rp.TaskData("sib", pd.DataFrame(rows), _C())})
    got = conv.set_index("run_id")
    # slow: lowest 25, best 75, half-way 50 -> snapshots 1-4 below it; fast: lowest 50, best 77 -> 1 below 63.5
    assert got.loc["slow", "early"] == 4 and got.loc["fast", "early"] == 1
    assert (got.loc["slow", "first"], got.loc["slow", "best"], got.loc["slow", "ca"]) == (25.0, 75.0, 26.0)
    text = rp.ca_sentence(conv)
    assert "over its 2 runs, a run's own CA weights score -16.0 points against its LAST" in text
    assert "(lr 5e-05 batch 32: 4 of 10), CA scores -31.0 against LAST; in the other 1, -1.0." in text
    assert "pull it back towards the start weights" in text
    assert rp.ca_sentence(conv.iloc[:0]) == ""
