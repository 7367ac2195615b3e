"""End-to-end: papermill runs notebooks/04_analysis.ipynb on the released results, then the
report CLI renders a self-contained report.html."""

from __future__ import annotations

import re
import subprocess
import sys

import nbformat
import pandas as pd
import pytest

from ofa_lib import results as R
from ofa_lib.paths import REPO_ROOT, data_dir

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
        if not (data_dir() / R.RELEASED_SUBDIR).is_dir():
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

    res = subprocess.run([sys.executable, "-m", "ofa_lib.report", "render", str(executed)],
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
