"""What a notebook declares in its ``parameters`` cell, and the check its first code cell makes.

papermill injects every ``-p name value`` as an ``injected-parameters`` cell after the ``parameters``
cell and only warns about names the notebook does not declare, so ``-p lrr 1e-4`` would run with the
default lr. :func:`check` refuses them, and values of the wrong type, before any work.
"""

from __future__ import annotations

import ast
import difflib
import functools
import types
from pathlib import Path
from typing import Any

from ofa_lib.paths import REPO_ROOT
from ofa_lib.train.config import ConfigError

NOTEBOOKS = REPO_ROOT / "notebooks"

# What a parameter may be, by name, where its default does not say it (None defaults, and values of several
# types); the same name means the same in every notebook. Any other parameter must have its default's type.
TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "sampling_seeds": ((str, list), "'authors', 'all' or a list of seeds"),
    "threads": (int, "an integer"), "device": (str, "a device name such as 'cpu' or 'cuda'"),
    "output_root": (str, "a folder path"), "output_dir": (str, "a folder path"), "runs_root": (str, "a folder path"),
    "results_path": (str, "a file path"), "outputs_root": (str, "a folder path"), "data_dir": (str, "a folder path"),
    "methods": ((list, dict), "a list of merge-method names or a mapping name -> options (ofa_lib.merge.merging)"),
    "method_variants": (list, "a list of variants"),
}


def notebook_path(notebook: str | Path) -> Path:
    """``02_train``, ``02_train.ipynb`` or a path → the notebook file."""
    path = Path(notebook)
    if path.is_file():
        return path
    return NOTEBOOKS / (path.name if path.suffix == ".ipynb" else f"{path.name}.ipynb")


@functools.lru_cache(maxsize=32)
def _declared(path: str, mtime_ns: int) -> dict[str, Any]:
    import papermill

    return papermill.inspect_notebook(path)


def declared(notebook: str | Path) -> dict[str, Any]:
    """The parameters a notebook declares (papermill's inspection of its ``parameters`` cell)."""
    path = notebook_path(notebook)
    return _declared(str(path), path.stat().st_mtime_ns)


def _expectation(name: str, default_source: str) -> tuple[Any, str] | None:
    """(accepts(value), what is expected) for a declared parameter, or ``None`` when anything goes."""
    try:
        default = ast.literal_eval(default_source)
    except (ValueError, SyntaxError):
        return None
    if name in TYPES:
        kind, text = TYPES[name]
        if default is None:
            text = f"None or {text}"
        return (lambda v: (default is None and v is None) or (isinstance(v, kind) and not isinstance(v, bool))), text
    if default is None:
        return None
    if isinstance(default, bool):
        return (lambda v: isinstance(v, bool)), "true or false"
    if isinstance(default, int):
        return (lambda v: isinstance(v, int) and not isinstance(v, bool)), "an integer"
    if isinstance(default, float):
        return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)), "a number"
    for kind, text in ((str, "a string"), (list, "a list"), (dict, "a mapping")):
        if isinstance(default, kind):
            return (lambda v, kind=kind: isinstance(v, kind)), text
    return None


def check(namespace: dict[str, Any], notebook: str | Path) -> None:
    """Refuse, with :class:`ConfigError`, parameters ``notebook`` does not declare and values whose type
    is not the declared one. Call it first thing after the parameters cell with ``globals()``."""
    params = declared(notebook)
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    hidden = set(shell.user_ns_hidden) if shell is not None else set()
    given = {k for k, v in namespace.items()
             if not k.startswith("_") and k not in hidden and not isinstance(v, types.ModuleType)}
    unknown = sorted(given - set(params))
    if unknown:
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, params, 1)) else repr(u)
                 for u in unknown]
        raise ConfigError(f"{notebook_path(notebook).name}: unknown parameter(s) {', '.join(hints)}; "
                          f"it declares {sorted(params)}")
    for name, info in params.items():
        expected = _expectation(name, info["default"])
        if expected is not None and name in namespace and not expected[0](namespace[name]):
            raise ConfigError(f"parameter {name}={namespace[name]!r} is invalid: expected {expected[1]}")
