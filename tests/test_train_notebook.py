"""02_train.ipynb runs headless through papermill for every task (smoke preset)."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import papermill
import pytest

from ofa_lib.config import TASKS


@pytest.mark.parametrize("task", TASKS)
def test_train_notebook_smoke(task, tmp_path):
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(
        "notebooks/02_train.ipynb", str(out), kernel_name="python3", progress_bar=False,
        parameters={"task": task, "preset": "smoke", "output_root": str(tmp_path / "runs")},
    )
    (run,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["params"]["task"] == task
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert {"last", "src_dev", "ca", "trg_dev"} <= set(metrics[metrics.kind == "variant"].name)
    assert metrics.value.between(0, 1).all()
    executed = nbformat.read(out, as_version=4)
    text = json.dumps([c.get("outputs", []) for c in executed.cells])
    assert "image/png" in text  # the training plot rendered


def test_train_notebook_rejects_bad_parameter(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="batch_size"):
        papermill.execute_notebook(
            "notebooks/02_train.ipynb", str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
            parameters={"preset": "smoke", "batch_size": 0, "output_root": str(tmp_path / "runs")},
        )
    assert not (tmp_path / "runs").exists()  # failed before any work
