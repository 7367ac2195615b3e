"""02_train.ipynb runs headless through papermill for every task (smoke preset)."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import papermill
import pytest

from ofa_lib.train.config import TASKS


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


@pytest.mark.parametrize("name, value, match", [
    ("lrr", 1e-4, r"unknown parameter\(s\) 'lrr' \(did you mean 'lr'\?\)"),
    ("freeze_embeddings", "no", r"parameter freeze_embeddings='no' is invalid: expected true or false"),
    ("top_k", "two", r"parameter top_k='two' is invalid: expected an integer"),
    ("threads", "many", r"parameter threads='many' is invalid"),
])
def test_train_notebook_refuses_what_it_does_not_declare_or_cannot_take(tmp_path, name, value, match):
    """papermill only warns about an unknown -p name; the notebook's first cell refuses it, before any work."""
    with pytest.raises(papermill.PapermillExecutionError, match=match):
        papermill.execute_notebook(
            "notebooks/02_train.ipynb", str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
            parameters={"preset": "smoke", name: value, "output_root": str(tmp_path / "runs")},
        )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("notebook", ["01_data_prep", "03_average", "04_analysis", "05_measures", "06_unfreezing"])
def test_every_notebook_refuses_an_undeclared_parameter(tmp_path, notebook):
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown parameter\(s\) 'r_maks'"):
        papermill.execute_notebook(f"notebooks/{notebook}.ipynb", str(tmp_path / "out.ipynb"), kernel_name="python3",
                                   progress_bar=False, parameters={"r_maks": 2}, cwd="notebooks")


def test_train_notebook_refuses_cuda_without_it_in_its_first_cell(tmp_path):
    """A GPU job on a node without usable CUDA fails before any work, naming the node and the torch build."""
    import platform

    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out.ipynb"
    with pytest.raises(papermill.PapermillExecutionError, match=rf"DeviceError.*needs CUDA.*{platform.node()}.*torch 2\.13"):
        papermill.execute_notebook(
            "notebooks/02_train.ipynb", str(out), kernel_name="python3", progress_bar=False,
            parameters={"preset": "smoke", "device": "cuda", "output_root": str(tmp_path / "runs")},
        )
    assert not (tmp_path / "runs").exists()
    cells = nbformat.read(out, as_version=4).cells
    code = [i for i, c in enumerate(cells) if c.cell_type == "code"]
    injected = next(i for i in code if "injected-parameters" in cells[i].metadata.get("tags", []))
    failed = [i for i in code if any(o.get("output_type") == "error" for o in cells[i].get("outputs", []))]
    assert failed == [code[code.index(injected) + 1]]  # the first code cell after the parameters
