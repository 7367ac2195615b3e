"""Packaging consistency: environment.yml vs pyproject.toml, the torch pin, importable modules,
valid notebooks, and the commands the README promises (Makefile, CI entry)."""

from __future__ import annotations

import importlib
import pkgutil
import re
import tomllib

import pytest
import yaml

import ofa_lib
from ofa_lib.paths import REPO_ROOT

TORCH_PIN = "torch==2.13.0"


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _env_pip() -> list[str]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text(encoding="utf-8"))
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "environment.yml must have exactly one `pip:` section"
    return list(pip[0])


def _project_requirements() -> list[str]:
    project = _pyproject()["project"]
    return list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("dev", []))


def test_environment_yml_matches_pyproject():
    pip = _env_pip()
    assert pip and pip[-1] == "-e .", "the pip list of environment.yml must end with `-e .`"
    env, proj = pip[:-1], _project_requirements()
    only_env = sorted(set(env) - set(proj))
    only_proj = sorted(set(proj) - set(env))
    dup = sorted({x for x in env if env.count(x) > 1})
    assert not (only_env or only_proj or dup), (
        "environment.yml's pip list must equal pyproject.toml's dependencies + the `dev` extra:\n"
        f"  only in environment.yml: {only_env}\n  only in pyproject.toml: {only_proj}\n"
        f"  repeated in environment.yml: {dup}"
    )


def test_torch_pinned_exactly():
    deps = _pyproject()["project"]["dependencies"]
    torch_deps = [d for d in deps if re.match(r"torch\b", d)]
    assert torch_deps == [TORCH_PIN], f"pyproject.toml pins {torch_deps}, expected [{TORCH_PIN!r}]"
    env_torch = [d for d in _env_pip() if re.match(r"torch\b", d)]
    assert env_torch == [TORCH_PIN], f"environment.yml pins {env_torch}, expected [{TORCH_PIN!r}]"
    import torch

    assert torch.__version__.startswith("2.13.0"), f"installed torch is {torch.__version__}"


def _modules() -> list[str]:
    # (a package's __main__ runs its command on import: `python -m` is tested where each command is)
    return sorted(m.name for m in pkgutil.walk_packages(ofa_lib.__path__, prefix="ofa_lib.") if not m.name.endswith(".__main__"))


def test_package_has_modules():
    names = _modules()
    for core in ("ofa_lib.data", "ofa_lib.models", "ofa_lib.data.features", "ofa_lib.train.config", "ofa_lib.io", "ofa_lib.paths"):
        assert core in names


@pytest.mark.parametrize("name", _modules())
def test_module_imports(name):
    importlib.import_module(name)


def _notebooks() -> list:
    return sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert _notebooks(), "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_notebook_valid_with_parameters_cell(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    assert "parameters" in code[0].metadata.get("tags", []), (
        f"{path.name}: the first code cell must be tagged `parameters` (papermill)"
    )


def test_makefile_targets():
    text = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))
    missing = {"test", "demo", "reproduce-paper"} - targets
    assert not missing, f"Makefile lacks targets {sorted(missing)}"


def test_ci_runs_make_test():
    path = REPO_ROOT / ".ci" / "run"
    commands = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    assert "make test" in commands, f".ci/run does not run `make test`: {commands}"


def test_readme_mentions_the_commands():
    readme = REPO_ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md does not exist yet")
    text = readme.read_text(encoding="utf-8")
    for command in ("make test", "make demo"):
        assert command in text, f"README.md does not mention `{command}`"
