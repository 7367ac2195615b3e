"""Every notebook is a jupytext pair: ``notebooks/NN_*.py`` (percent format, the reviewed source) and
``notebooks/NN_*.ipynb`` (what papermill and JupyterLab open). The two must hold the same cells."""

from pathlib import Path

import jupytext
import nbformat
import pytest
from jupytext.compare import compare_notebooks

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
IPYNB = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
PY = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def test_every_notebook_has_its_source_and_every_source_its_notebook():
    assert IPYNB, f"no notebooks in {NOTEBOOKS}"
    assert [p.stem for p in IPYNB] == [p.stem for p in PY], (
        "unpaired notebooks: run `make notebooks` (jupytext --sync) after adding or renaming one")


def test_the_pairing_is_declared_for_jupyterlab():
    # jupytext's contents manager reads this file: saving either half in JupyterLab rewrites the other
    config = (NOTEBOOKS / "jupytext.toml").read_text()
    assert "ipynb" in config and "py:percent" in config


@pytest.mark.parametrize("ipynb", IPYNB, ids=lambda p: p.stem)
def test_the_pair_agrees(ipynb: Path):
    source = jupytext.read(ipynb.with_suffix(".py"))
    notebook = nbformat.read(ipynb, as_version=4)
    # cell types, sources and cell metadata (the papermill `parameters` tag) must match; outputs are not compared
    compare_notebooks(source, notebook, fmt="py:percent")


@pytest.mark.parametrize("ipynb", IPYNB, ids=lambda p: p.stem)
def test_the_parameters_cell_comes_first_among_code_cells(ipynb: Path):
    notebook = nbformat.read(ipynb, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), f"{ipynb.name}: first code cell is not tagged parameters"
