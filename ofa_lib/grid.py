"""Grids of training runs (``params/grids/<name>.yaml``): validate, plan, run, status, report.

A grid is the cartesian product of its ``grid`` axes over 02_train parameters (or the union of several
such products, when ``grid`` is a list). ``run`` trains the
head-tuning run first where the grid has one, then every grid run, each by executing
``notebooks/02_train.ipynb`` with papermill (one kernel process per run), skipping finished runs
and recording failed ones (``failure.json`` + the executed notebook with its error cell) while the
rest continue; then ``report`` executes the pipeline notebooks (03_average, 04_analysis, …) and
renders their HTML. Backends: ``local`` (a process pool, CPU threads divided among its workers)
and ``slurm`` (one job array, submitted with ``sbatch``; the head run and the report are jobs with
dependencies). A lock per run (:mod:`ofa_lib.locks`) keeps two runners from training the same run.

    python -m ofa_lib.grid plan|run|status|retry-failed|report params/grids/demo.yaml

The file format is documented in ``params/grids/README.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import itertools
import json
import multiprocessing
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import config, data, locks
from .io import write_json, write_text
from .paths import REPO_ROOT, outputs_dir

GRIDS_DIR = REPO_ROOT / "params" / "grids"
NOTEBOOKS = REPO_ROOT / "notebooks"
TRAIN_NOTEBOOK = "02_train.ipynb"
NOTEBOOK_ONLY = ("device", "threads")  # 02_train parameters that do not change results (not in the run id)
DEFAULT_PIPELINE = [{"notebook": "03_average.ipynb"}, {"notebook": "04_analysis.ipynb", "html": "report.html"}]
STATES = ("todo", "queued", "running", "done", "failed")
TOP_KEYS = {"name", "description", "task", "preset", "grid", "train", "head_tuning", "data_prep", "pipeline", "resources"}
RESOURCE_KEYS = {"workers", "slurm", "stall_timeout", "run_timeout"}
STALL_TIMEOUT_S = 1800.0  # default resources.stall_timeout: seconds without progress before a run is given up
SLURM_KEYS = {"partition", "account", "gpus_per_run", "cpus_per_task", "mem", "time", "max_concurrent", "setup",
              "extra_args"}


class GridError(ValueError):
    """A grid file is invalid; the message names the file and the field."""


# --------------------------------------------------------------------------- the grid file
@dataclass
class Step:
    """One pipeline notebook run after training."""

    notebook: str
    parameters: dict[str, Any] = field(default_factory=dict)
    html: str | None = None


@dataclass
class Slurm:
    partition: str | None = None
    account: str | None = None
    gpus_per_run: int = 1
    cpus_per_task: int = 8
    mem: str = "64G"
    time: str = "12:00:00"
    max_concurrent: int = 16
    setup: str = ""
    extra_args: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One training run of a grid: its config, its 02_train parameters and its role."""

    cfg: config.TrainConfig
    params: dict[str, Any]
    role: str  # "head" (head tuning, trained first) or "grid"
    root: Path

    @property
    def run_id(self) -> str:
        return self.cfg.run_id

    @property
    def dir(self) -> Path:
        return self.root / self.run_id

    @property
    def label(self) -> str:
        return f"lr={self.cfg.lr:g} bs={self.cfg.batch_size} seed={self.cfg.seed}"


@dataclass
class Grid:
    name: str
    path: Path
    task: str
    preset: str
    description: str
    axes: dict[str, list[Any]]
    train: dict[str, Any]
    head_tuning: dict[str, Any] | None
    data_prep: dict[str, Any] | None
    pipeline: list[Step]
    workers: int
    slurm: Slurm
    blocks: list[dict[str, list[Any]]] = field(default_factory=list)  # the cartesian products, unioned
    runs: list[Run] = field(default_factory=list)
    stall_timeout: float | None = STALL_TIMEOUT_S  # resources.stall_timeout (None: never)
    run_timeout: float | None = None  # resources.run_timeout (None: no limit)

    @property
    def runs_root(self) -> Path:
        return outputs_dir() / "runs" / self.name

    @property
    def results_path(self) -> Path:
        return outputs_dir() / "results" / f"{self.name}.parquet"

    @property
    def reports_dir(self) -> Path:
        return outputs_dir() / "reports" / self.name

    @property
    def state_dir(self) -> Path:
        """Locks, scheduler submissions and job logs."""
        return self.runs_root / ".grid"

    def run(self, run_id: str) -> Run:
        for run in self.runs:
            if run.run_id == run_id:
                return run
        raise GridError(f"{self.path}: no run {run_id!r} in this grid (see `python -m ofa_lib.grid plan {self.path}`)")


def _err(path: Path, where: str, message: str) -> GridError:
    return GridError(f"{path}: field {where}: {message}")


def resolve_path(grid: str | Path) -> Path:
    """A grid file path, or a bare name looked up in ``params/grids/``."""
    path = Path(grid)
    if not path.suffix and not path.exists():
        path = GRIDS_DIR / f"{grid}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))
        raise GridError(f"grid file {str(grid)!r} not found (known grids in params/grids: {known})")
    return path


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """The parameters a notebook declares in its ``parameters`` cell (papermill's inspection)."""
    from .notebook_params import declared

    return declared(notebook)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}, again on line "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax error or a duplicate key is a :class:`GridError` naming file and line."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: not valid YAML: {exc}") from exc


def load_grid(grid: str | Path) -> Grid:
    """Read and validate a grid file completely (every run's parameters, every notebook)."""
    path = resolve_path(grid)
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise GridError(f"{path}: expected a mapping at the top level, got {type(spec).__name__}")
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise _err(path, str(unknown), f"unknown key(s); known: {sorted(TOP_KEYS)}")
    for key in ("name", "task", "preset", "grid"):
        if key not in spec:
            raise _err(path, key, "missing (required)")
    name = spec["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise _err(path, "name", f"{name!r} is not a folder-safe name (letters, digits, _ . -)")
    if spec["task"] not in config.TASKS:
        raise _err(path, "task", f"{spec['task']!r}: expected one of {config.TASKS}")
    if spec["preset"] not in config.PRESETS:
        raise _err(path, "preset", f"{spec['preset']!r}: expected one of {config.PRESETS}")
    fields = set(config.TrainConfig.__dataclass_fields__) - {"task", "preset"}

    raw_grid = spec["grid"]
    blocks = raw_grid if isinstance(raw_grid, list) else [raw_grid]
    if not blocks:
        raise _err(path, "grid", "expected a non-empty mapping parameter -> list of values, or a list of such mappings")
    for i, block in enumerate(blocks):
        where = f"grid[{i}]" if isinstance(raw_grid, list) else "grid"
        if not isinstance(block, dict) or not block:
            raise _err(path, where, "expected a non-empty mapping parameter -> list of values")
        for key, values in block.items():
            if key not in fields:
                raise _err(path, f"{where}.{key}", f"not a 02_train parameter; known: {sorted(fields)}")
            if not isinstance(values, list) or not values:
                raise _err(path, f"{where}.{key}", f"expected a non-empty list of values, got {values!r}")
    axes: dict[str, list[Any]] = {}  # every axis with the union of its values (for plan/status tables)
    for block in blocks:
        for key, values in block.items():
            axes.setdefault(key, [])
            axes[key] += [v for v in values if v not in axes[key]]
    train = spec.get("train") or {}
    if not isinstance(train, dict):
        raise _err(path, "train", "expected a mapping of fixed 02_train parameters")
    for key in train:
        if key not in fields | set(NOTEBOOK_ONLY):
            raise _err(path, f"train.{key}", f"not a 02_train parameter; known: {sorted(fields | set(NOTEBOOK_ONLY))}")
        if key in axes:
            raise _err(path, f"train.{key}", "is also a grid axis; give it in one place")
    head_tuning = spec.get("head_tuning")
    if head_tuning is not None:
        if not isinstance(head_tuning, dict):
            raise _err(path, "head_tuning", "expected a mapping of 02_train parameters (e.g. lr, batch_size, seed)")
        for key in head_tuning:
            if key not in fields:
                raise _err(path, f"head_tuning.{key}", "not a 02_train parameter")
        if "head" in axes or "head" in train:
            raise _err(path, "head", "is set by head_tuning (the grid runs get its trained head, frozen)")
    data_prep = spec.get("data_prep")
    if data_prep is False:
        data_prep = None
    elif data_prep is not None and not isinstance(data_prep, dict):
        raise _err(path, "data_prep", "expected a mapping of 01_data_prep parameters, or false")
    if data_prep is not None:
        declared = notebook_parameters(NOTEBOOKS / "01_data_prep.ipynb")
        for key in data_prep:
            if key not in declared:
                raise _err(path, f"data_prep.{key}", f"01_data_prep has no such parameter; known: {sorted(declared)}")

    steps = []
    for i, raw in enumerate(spec.get("pipeline") or DEFAULT_PIPELINE):
        if not isinstance(raw, dict) or "notebook" not in raw:
            raise _err(path, f"pipeline[{i}]", "expected a mapping with 'notebook' (and optional 'parameters', 'html')")
        extra = sorted(set(raw) - {"notebook", "parameters", "html"})
        if extra:
            raise _err(path, f"pipeline[{i}]", f"unknown key(s) {extra}")
        nb = NOTEBOOKS / raw["notebook"]
        if not nb.is_file():
            raise _err(path, f"pipeline[{i}].notebook", f"{raw['notebook']!r} is not a notebook in {NOTEBOOKS}")
        declared = notebook_parameters(nb)
        for key in raw.get("parameters") or {}:
            if key not in declared:
                raise _err(path, f"pipeline[{i}].parameters.{key}", f"{raw['notebook']} has no such parameter; known: {sorted(declared)}")
        if "methods" in (raw.get("parameters") or {}):  # merge methods: checked now, not after training
            from . import merging  # (imports torch: only for grids that name merge methods)

            try:
                merging.parse_methods(raw["parameters"]["methods"])
            except merging.MergeSpecError as err:
                raise GridError(f"{path}: field pipeline[{i}].parameters.{err}") from None  # err names methods.<...>
        steps.append(Step(raw["notebook"], dict(raw.get("parameters") or {}), raw.get("html")))

    resources = spec.get("resources") or {}
    if not isinstance(resources, dict):
        raise _err(path, "resources", f"{resources!r}: expected a mapping (workers, slurm, stall_timeout, run_timeout)")
    unknown = sorted(set(resources) - RESOURCE_KEYS)
    if unknown:
        raise _err(path, f"resources.{unknown[0]}", f"unknown; known: {sorted(RESOURCE_KEYS)}")
    workers = resources.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise _err(path, "resources.workers", f"{workers!r}: expected a positive integer")
    slurm_spec = resources.get("slurm") or {}
    if not isinstance(slurm_spec, dict):
        raise _err(path, "resources.slurm", f"{slurm_spec!r}: expected a mapping of SLURM settings")
    bad = sorted(set(slurm_spec) - SLURM_KEYS)
    if bad:
        raise _err(path, f"resources.slurm.{bad[0]}", f"unknown; known: {sorted(SLURM_KEYS)}")
    slurm = Slurm(**slurm_spec)
    for key in ("gpus_per_run", "cpus_per_task", "max_concurrent"):
        value = getattr(slurm, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "gpus_per_run" else 1):
            raise _err(path, f"resources.slurm.{key}", f"{value!r}: expected a {'non-negative' if key == 'gpus_per_run' else 'positive'} integer")
    if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", str(slurm.time)):
        raise _err(path, "resources.slurm.time", f"{slurm.time!r}: expected SLURM's [D-]HH:MM:SS")
    if not re.fullmatch(r"\d+[KMGT]?", str(slurm.mem)):
        raise _err(path, "resources.slurm.mem", f"{slurm.mem!r}: expected e.g. 64G")

    timeouts = {}
    for key, default in (("stall_timeout", STALL_TIMEOUT_S), ("run_timeout", None)):
        value = resources.get(key, default)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise _err(path, f"resources.{key}", f"{value!r}: expected a positive number of seconds (or null: none)")
        timeouts[key] = None if value is None else float(value)
    grid = Grid(name, path, spec["task"], spec["preset"], str(spec.get("description") or "").strip(), axes, train,
                head_tuning, data_prep, steps, workers, slurm, blocks, **timeouts)
    grid.runs = _plan_runs(grid)
    return grid


def _plan_runs(grid: Grid) -> list[Run]:
    fixed = {k: v for k, v in grid.train.items() if k not in NOTEBOOK_ONLY}
    runs: list[Run] = []
    head_file: str | None = None
    if grid.head_tuning is not None:
        params = dict(fixed, **grid.head_tuning, head="train")
        cfg = _config(grid, params, "head_tuning")
        head_root = grid.runs_root / "head"
        runs.append(Run(cfg, dict(task=grid.task, preset=grid.preset, **params), "head", head_root))
        head_file = str((head_root / cfg.run_id / "head.safetensors").resolve())
    seen: dict[str, dict[str, Any]] = {}
    points = [dict(zip(block, values)) for block in (grid.blocks or [grid.axes])
              for values in itertools.product(*block.values())]
    for point in points:
        params = dict(fixed, **point)
        if head_file:  # validated with a stand-in head (the file exists once the head run is done)
            cfg = dataclasses.replace(_config(grid, dict(params, head="init:0"), f"grid point {point}"), head=head_file)
            params["head"] = head_file
        else:
            cfg = _config(grid, params, f"grid point {point}")
        if cfg.run_id in seen:
            raise _err(grid.path, "grid", f"points {seen[cfg.run_id]} and {point} give the same run ({cfg.run_id})")
        seen[cfg.run_id] = point
        runs.append(Run(cfg, dict(task=grid.task, preset=grid.preset, **params), "grid", grid.runs_root))
    return runs


def _config(grid: Grid, params: dict[str, Any], where: str) -> config.TrainConfig:
    try:
        return config.make_config(grid.task, grid.preset, **params)
    except config.ConfigError as exc:
        raise GridError(f"{grid.path}: {where}: {exc}") from exc


# --------------------------------------------------------------------------- state
def lock_path(grid: Grid, run: Run) -> Path:
    return grid.state_dir / "locks" / f"{run.run_id}.lock"


def failure_path(run: Run) -> Path:
    return run.dir / "failure.json"


def run_state(grid: Grid, run: Run) -> str:
    """``done`` | ``running`` (a live lock) | ``failed`` (recorded) | ``todo``; the scheduler adds ``queued``."""
    from . import training

    if training.is_done(run.cfg, run.root):
        return "done"
    if locks.holder(lock_path(grid, run)) is not None:
        return "running"
    if failure_path(run).is_file():
        return "failed"
    return "todo"


def plan_table(grid: Grid, with_scheduler: bool = True) -> "pd.DataFrame":
    """One row per run: id, role, its grid values, state (and scheduler job where submitted)."""
    import pandas as pd

    jobs = slurm_states(grid) if with_scheduler else {}
    rows = []
    for run in grid.runs:
        state = run_state(grid, run)
        row = {"run_id": run.run_id, "role": run.role}
        row.update({k: getattr(run.cfg, k) for k in grid.axes})
        job = jobs.get(run.run_id)
        if job and state in ("todo", "failed") and job["state"] in ("PENDING", "CONFIGURING", "REQUEUED"):
            state = "queued"
        elif job and state == "todo" and job["state"] in ("RUNNING", "COMPLETING"):
            state = "running"
        row["state"] = state
        if job:
            row["job"] = job["job_id"]
        if state == "failed":
            row["error"] = json.loads(failure_path(run).read_text()).get("error", "")[:120]
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- watching executions
class Stalled(RuntimeError):
    """A notebook execution made no progress for ``stall_timeout`` s (or ran past ``run_timeout``): killed."""


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kernels() -> list[int]:
    """This process's Jupyter kernels (children running ipykernel) and everything they started."""
    pids = []
    for pid in _children(os.getpid()):
        try:
            if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids += [pid, *_children(pid)]
        except OSError:
            pass
    return list(dict.fromkeys(pids))


@dataclass
class Watchdog:
    """Watches one notebook execution from a thread of the runner: progress is what the kernel itself proves
    (:mod:`ofa_lib.progress` beats, and papermill saving the notebook after a cell); after ``stall_timeout`` s
    without any, or ``run_timeout`` s in all, the kernel and its children are killed (SIGKILL also ends a
    SIGSTOPped one), papermill fails with a dead kernel, and :attr:`reason` says why."""

    progress_file: Path
    notebook_file: Path
    stall_timeout: float | None
    run_timeout: float | None
    reason: str | None = None
    _stop: Any = None

    def _last_progress(self, start: float) -> float:
        times = [start]
        for path in (self.progress_file, self.notebook_file):
            try:
                times.append(path.stat().st_mtime)
            except OSError:
                pass
        return max(times)

    def _watch(self) -> None:
        from . import progress

        start = time.time()
        poll = min(5.0, max(0.2, (self.stall_timeout or 20.0) / 10))
        while not self._stop.wait(poll):
            now = time.time()
            info = progress.read(self.progress_file)
            idle = now - self._last_progress(start)
            if self.stall_timeout is not None and idle > self.stall_timeout:
                self.reason = f"stalled: no progress for {idle:.0f} s {progress.where(info)} (resources.stall_timeout={self.stall_timeout:g})"
            elif self.run_timeout is not None and now - start > self.run_timeout:
                self.reason = f"timed out: still running after {now - start:.0f} s {progress.where(info)} (resources.run_timeout={self.run_timeout:g})"
            else:
                continue
            for pid in _kernels():  # the kernel papermill started, and whatever it started
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            return

    def __enter__(self) -> "Watchdog":
        import threading

        from . import progress

        self.progress_file.unlink(missing_ok=True)
        self._saved_env = os.environ.get(progress.ENV)
        os.environ[progress.ENV] = str(self.progress_file)  # the kernel inherits it
        self._stop = threading.Event()
        if self.stall_timeout is not None or self.run_timeout is not None:
            threading.Thread(target=self._watch, daemon=True, name=f"watchdog {self.notebook_file.name}").start()
        return self

    def __exit__(self, *exc: object) -> None:
        from . import progress

        self._stop.set()
        if self._saved_env is None:
            os.environ.pop(progress.ENV, None)
        else:
            os.environ[progress.ENV] = self._saved_env
        self.progress_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------- executing notebooks
def temp_notebook(out: Path) -> Path:
    """Where papermill writes ``out`` while it runs: a name unique to this process (two runners never share it)."""
    return out.with_name(f".{out.stem}.{platform.node()}-{os.getpid()}.tmp.ipynb")


def clean_temp_notebooks(out: Path) -> list[Path]:
    """Remove the temp notebooks and progress files of killed executions of ``out`` (call it holding the lock
    that guards ``out``)."""
    litter = [p for pattern in (f".{out.stem}.*tmp.ipynb", f".{out.stem}.*.progress.json*")
              for p in out.parent.glob(pattern) if p != temp_notebook(out)]
    for path in litter:
        path.unlink(missing_ok=True)
    return litter


def execute_notebook(notebook: str | Path, out: Path, parameters: dict[str, Any], *, cwd: Path = NOTEBOOKS,
                     stall_timeout: float | None = None, run_timeout: float | None = None) -> Path:
    """Run a notebook with papermill into ``out``: written to a temp name, renamed when it succeeded.

    On failure the executed notebook (with its error cell) is kept as ``<out stem>.failed.ipynb``
    and papermill's exception is raised; :class:`Stalled` when the :class:`Watchdog` killed it.
    """
    import papermill

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_notebook(out)
    watchdog = Watchdog(out.with_name(f".{out.stem}.{os.getpid()}.progress.json"), tmp, stall_timeout, run_timeout)
    with watchdog:
        try:
            papermill.execute_notebook(str(NOTEBOOKS / notebook), str(tmp), parameters=parameters, kernel_name="python3",
                                       cwd=str(cwd), progress_bar=False)
        except BaseException as exc:
            if tmp.exists():
                os.replace(tmp, out.with_name(f"{out.stem}.failed.ipynb"))
            if watchdog.reason:
                raise Stalled(f"{notebook}: {watchdog.reason}") from exc
            raise
    os.replace(tmp, out)
    out.with_name(f"{out.stem}.failed.ipynb").unlink(missing_ok=True)
    return out


@dataclass
class Outcome:
    run_id: str
    state: str  # done | failed | skipped-done | skipped-running
    seconds: float = 0.0
    error: str = ""


def run_one(grid: Grid, run: Run, *, threads: int | None = None) -> Outcome:
    """Train one run under its lock: skip it when done or held by a live runner; record a failure."""
    from . import training

    lock = locks.acquire(lock_path(grid, run))
    if lock is None:
        return Outcome(run.run_id, "skipped-running")
    start = time.time()
    with lock:
        if training.is_done(run.cfg, run.root):
            return Outcome(run.run_id, "skipped-done")
        failure_path(run).unlink(missing_ok=True)
        clean_temp_notebooks(run.dir / "02_train.ipynb")
        params = dict(run.params, output_root=str(run.root), **{k: v for k, v in grid.train.items() if k in NOTEBOOK_ONLY})
        if threads:
            params["threads"] = threads
        try:
            execute_notebook(TRAIN_NOTEBOOK, run.dir / "02_train.ipynb", params, stall_timeout=grid.stall_timeout,
                             run_timeout=grid.run_timeout)
        except Exception as exc:  # papermill's PapermillExecutionError carries the cell's error
            error = str(exc).split(": ", 1)[1] if isinstance(exc, Stalled) else \
                f"{getattr(exc, 'ename', type(exc).__name__)}: {getattr(exc, 'evalue', exc)}"
            write_json(failure_path(run), {
                "run_id": run.run_id, "params": params, "error": error, "traceback": traceback.format_exc()[-4000:],
                "notebook": str(run.dir / "02_train.failed.ipynb"), "job_id": lock.info.get("job_id"),
                "host": lock.info["host"], "time": time.time()})
            return Outcome(run.run_id, "failed", time.time() - start, error)
        if not training.is_done(run.cfg, run.root):
            raise RuntimeError(f"02_train finished but run {run.run_id} is not complete under {run.root}: "
                               "the notebook's parameters did not reproduce the grid's run id")
    return Outcome(run.run_id, "done", time.time() - start)


def _die_with_parent() -> None:
    """Pool initializer: a worker (and so its kernel) dies when the runner is killed, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _pool_task(grid_path: str, run_id: str, threads: int | None, outputs: str) -> Outcome:
    os.environ["OFA_OUTPUTS"] = outputs
    grid = load_grid(grid_path)
    return run_one(grid, grid.run(run_id), threads=threads)


def _summary(grid: Grid, outcomes: list[Outcome], submitted: set[str] = frozenset()) -> "pd.DataFrame":
    """One row per run: what this invocation did with it (done, failed, skipped-done, …)."""
    import pandas as pd

    by_id = {o.run_id: o for o in outcomes}
    rows = []
    for run in grid.runs:
        o = by_id.get(run.run_id)
        if o is None:  # not run here: finished before, failed before, or run by SLURM for this invocation
            state = run_state(grid, run)
            o = Outcome(run.run_id, state if run.run_id in submitted or state != "done" else "skipped-done")
        rows.append({"run_id": run.run_id, "role": run.role, **{k: getattr(run.cfg, k) for k in grid.axes},
                     "result": o.state, "minutes": round(o.seconds / 60, 2), "error": o.error[:100]})
    return pd.DataFrame(rows)


def _wait_for_live_locks(grid: Grid, runs: list[Run], poll_s: float = 10.0) -> None:
    """Runs held by another live runner: wait until it lets go (then they are done, failed or free)."""
    from tqdm.auto import tqdm

    held = [r for r in runs if locks.holder(lock_path(grid, r)) is not None]
    if not held:
        return
    print(f"{len(held)} run(s) are being trained by another runner; waiting for them: {[r.run_id for r in held]}")
    since = time.time()
    with tqdm(total=len(held), desc="waiting for other runners", unit="run") as bar:
        while held:
            time.sleep(poll_s)
            still = [r for r in held if locks.holder(lock_path(grid, r)) is not None and not _gave_up_on(grid, r, since)]
            bar.update(len(held) - len(still))
            held = still


def _gave_up_on(grid: Grid, run: Run, since: float) -> bool:
    """Whether to stop waiting for a run another runner holds: its kernel proved no progress for longer than
    that runner's watchdog allows (twice ``stall_timeout``), so that runner itself is stuck."""
    if grid.stall_timeout is None:
        return False
    beats = [since] + [p.stat().st_mtime for p in run.dir.glob(f".{Path(TRAIN_NOTEBOOK).stem}.*") if p.exists()]
    idle = time.time() - max(beats)
    if idle <= 2 * grid.stall_timeout:
        return False
    holder = locks.holder(lock_path(grid, run)) or {}
    print(f"run {run.run_id}: held by host {holder.get('host')} pid {holder.get('pid')}, but no progress for {idle:.0f} s "
          f"(stall_timeout={grid.stall_timeout:g}): not waiting for it")
    return True


def run_local(grid: Grid, *, workers: int | None = None) -> list[Outcome]:
    """Train the grid's unfinished runs in a process pool (the head-tuning run first, alone)."""
    from tqdm.auto import tqdm

    workers = workers or grid.workers
    todo = [r for r in grid.runs if run_state(grid, r) == "todo"]
    heads = [r for r in todo if r.role == "head"]
    rest = [r for r in todo if r.role != "head"]
    cpus = os.cpu_count() or 1
    outcomes: list[Outcome] = []
    ctx = multiprocessing.get_context("spawn")
    with tqdm(total=len(todo), desc=f"grid {grid.name}: training runs", unit="run") as bar:
        for batch, n in ((heads, 1), (rest, workers)):
            if batch is rest:
                _require_head(grid)
            if not batch:
                continue
            n = min(n, len(batch))
            with ProcessPoolExecutor(n, mp_context=ctx, initializer=_die_with_parent) as pool:
                futures = {pool.submit(_pool_task, str(grid.path), r.run_id, max(1, cpus // n), str(outputs_dir())): r
                           for r in batch}
                for future in as_completed(futures):
                    outcome = future.result()
                    outcomes.append(outcome)
                    bar.update(1)
                    if outcome.state == "failed":
                        tqdm.write(f"run {outcome.run_id} ({futures[future].label}) FAILED: {outcome.error}")
    _wait_for_live_locks(grid, grid.runs)
    return outcomes


def _require_head(grid: Grid) -> None:
    """Before the grid runs: the head-tuning run (if any) must be done (waiting for another runner's)."""
    heads = [r for r in grid.runs if r.role == "head"]
    _wait_for_live_locks(grid, heads)
    for head in heads:
        state = run_state(grid, head)
        if state != "done":
            raise GridError(f"{grid.path}: the head-tuning run {head.run_id} is {state}; the grid runs need its head "
                            f"(see {failure_path(head)} and `retry-failed`)")


# --------------------------------------------------------------------------- SLURM
def _sbatch(args: list[str], script: Path) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} {script} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def _script(grid: Grid, job_dir: Path, command: str, directives: list[str]) -> str:
    env = {"OFA_OUTPUTS": str(outputs_dir()), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if os.environ.get("OFA_DATA_DIR"):
        env["OFA_DATA_DIR"] = os.environ["OFA_DATA_DIR"]
    lines = ["#!/bin/bash", *[f"#SBATCH {d}" for d in directives], "set -euo pipefail", grid.slurm.setup.strip(),
             f"cd {shlex.quote(str(REPO_ROOT))}", *[f"export {k}={shlex.quote(v)}" for k, v in env.items()],
             f"exec {shlex.quote(sys.executable)} -m ofa_lib.grid {command}"]
    return "\n".join(line for line in lines if line) + "\n"


def _resources(grid: Grid) -> list[str]:
    s = grid.slurm
    out = [f"--cpus-per-task={s.cpus_per_task}", f"--mem={s.mem}", f"--time={s.time}"]
    if s.gpus_per_run:
        out.append(f"--gres=gpu:{s.gpus_per_run}")
    if s.partition:
        out.append(f"--partition={s.partition}")
    if s.account:
        out.append(f"--account={s.account}")
    return out + list(s.extra_args)


def submit_slurm(grid: Grid, runs: list[Run] | None = None) -> dict[str, Any]:
    """Submit the unfinished runs as one SLURM job array (head run and report as dependent jobs)."""
    runs = [r for r in (runs if runs is not None else grid.runs) if run_state(grid, r) == "todo"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job_dir = grid.state_dir / "slurm" / stamp
    job_dir.mkdir(parents=True, exist_ok=True)
    grid_arg = shlex.quote(str(grid.path.resolve()))
    record: dict[str, Any] = {"time": time.time(), "dir": str(job_dir), "head_job": None, "array_job": None,
                              "report_job": None, "runs": {}}
    heads = [r for r in runs if r.role == "head"]
    rest = [r for r in runs if r.role != "head"]
    dependency: list[str] = []
    name = f"ofa-{grid.name}"
    if heads:
        script = job_dir / "head.sh"
        write_text(script, _script(grid, job_dir, f"run-one {grid_arg} --run-id {heads[0].run_id}",
                                   [f"--job-name={name}-head", f"--output={job_dir}/head-%j.out", *_resources(grid)]))
        record["head_job"] = _sbatch([], script)
        record["runs"][heads[0].run_id] = record["head_job"]
        dependency = [f"--dependency=afterok:{record['head_job']}"]
    if rest:
        write_json(job_dir / "runs.json", [r.run_id for r in rest])
        script = job_dir / "array.sh"
        write_text(script, _script(
            grid, job_dir, f"run-one {grid_arg} --list {shlex.quote(str(job_dir / 'runs.json'))} --index \"$SLURM_ARRAY_TASK_ID\"",
            [f"--job-name={name}", f"--array=0-{len(rest) - 1}%{grid.slurm.max_concurrent}",
             f"--output={job_dir}/%A_%a.out", *_resources(grid)]))
        record["array_job"] = _sbatch(dependency, script)
        record["runs"].update({r.run_id: f"{record['array_job']}_{i}" for i, r in enumerate(rest)})
    after = [j for j in (record["array_job"], record["head_job"]) if j]
    script = job_dir / "report.sh"
    report_res = [f"--cpus-per-task={grid.slurm.cpus_per_task}", f"--mem={grid.slurm.mem}", f"--time={grid.slurm.time}"]
    report_res += [f"--partition={grid.slurm.partition}"] if grid.slurm.partition else []
    write_text(script, _script(grid, job_dir, f"report {grid_arg}",
                               [f"--job-name={name}-report", f"--output={job_dir}/report-%j.out", *report_res]))
    record["report_job"] = _sbatch([f"--dependency=afterany:{after[0]}"] if after else [], script)
    with open(grid.state_dir / "submissions.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def submissions(grid: Grid) -> list[dict[str, Any]]:
    file = grid.state_dir / "submissions.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []


def squeue(job_ids: list[str]) -> dict[str, str]:
    """Scheduler state of jobs and array tasks still known to ``squeue`` (``{"123_4": "RUNNING"}``)."""
    if not job_ids:
        return {}
    try:
        proc = subprocess.run(["squeue", "--noheader", "--array", "--format=%i %T", f"--jobs={','.join(job_ids)}"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def slurm_states(grid: Grid) -> dict[str, dict[str, str]]:
    """For each run submitted to SLURM: its latest job id and the scheduler's state for it."""
    jobs: dict[str, str] = {}
    for record in submissions(grid):
        jobs.update(record["runs"])
    if not jobs:
        return {}
    bases = sorted({j.split("_")[0] for j in jobs.values()})
    queue = squeue(bases)
    return {run_id: {"job_id": job, "state": queue.get(job, "GONE")} for run_id, job in jobs.items()}


def wait_slurm(grid: Grid, record: dict[str, Any], poll_s: float = 5.0, timeout_s: float | None = None) -> None:
    """Block until every job of a submission has left the queue, with a progress bar over runs."""
    from tqdm.auto import tqdm

    ids = [j for j in (record["head_job"], record["array_job"], record["report_job"]) if j]
    start = time.time()
    with tqdm(total=len(grid.runs), desc=f"grid {grid.name} on SLURM", unit="run") as bar:
        while True:
            done = sum(run_state(grid, r) == "done" for r in grid.runs)
            bar.update(done - bar.n)
            if not squeue(ids):
                return
            if timeout_s is not None and time.time() - start > timeout_s:
                raise TimeoutError(f"SLURM jobs {ids} still queued after {timeout_s:.0f} s")
            time.sleep(poll_s)


# --------------------------------------------------------------------------- report
def pipeline_context(grid: Grid) -> dict[str, Any]:
    """Parameters every pipeline notebook gets when it declares them."""
    return {"task": grid.task, "runs_root": str(grid.runs_root), "results_path": str(grid.results_path),
            "report_name": grid.name, "output_dir": str(grid.reports_dir), "source": str(grid.results_path),
            "tasks": [grid.task], "model": grid.runs[-1].cfg.model_name,
            "description": (grid.description + "\n\n" if grid.description else "") + data_line(grid)}


def data_line(grid: Grid) -> str:
    """Where the runs' data came from, from their manifests (reports print it under the description)."""
    summaries: dict[str, int] = {}
    for run in grid.runs:
        file = run.dir / "manifest.json"
        manifest = json.loads(file.read_text()) if file.is_file() else {}
        if manifest.get("data_summary"):
            summaries[manifest["data_summary"]] = summaries.get(manifest["data_summary"], 0) + 1
    if not summaries:
        return "Data: not recorded by these runs."
    return "Data: " + " | ".join(f"{line} ({n} run{'s' if n > 1 else ''})" for line, n in summaries.items()) + "."


def report(grid: Grid, *, partial: bool = False) -> list[Path]:
    """Execute 01_data_prep (if asked) and the pipeline notebooks; render their HTML reports.

    Under a lock (``.grid/locks/report.lock``): a second runner that gets here while the first is still
    reporting does not run the pipeline again (it returns nothing). Each notebook is watched like a run
    (``stall_timeout``, ``run_timeout``)."""
    lock = locks.acquire(grid.state_dir / "locks" / "report.lock")
    if lock is None:
        other = locks.holder(grid.state_dir / "locks" / "report.lock") or {}
        print(f"the report of grid {grid.name} is being made by another runner (host {other.get('host')}, pid "
              f"{other.get('pid')}): not running the pipeline twice")
        return []
    with lock:
        return _report(grid, partial)


def _report(grid: Grid, partial: bool) -> list[Path]:
    from . import report as rp

    set_aside_stale_runs(grid)
    missing = [r.run_id for r in grid.runs if run_state(grid, r) != "done"]
    if missing and not partial:
        raise GridError(f"{grid.path}: {len(missing)} run(s) are not done: {missing}; finish them "
                        "(`run` / `retry-failed`) or pass --partial")
    written = []
    out = grid.reports_dir

    def execute(notebook: str, params: dict[str, Any]) -> Path:
        clean_temp_notebooks(out / notebook)
        try:
            return execute_notebook(notebook, out / notebook, params, stall_timeout=grid.stall_timeout,
                                    run_timeout=grid.run_timeout)
        except Stalled as exc:
            raise GridError(f"{grid.path}: pipeline {exc}; its notebook is kept as "
                            f"{out / (Path(notebook).stem + '.failed.ipynb')}") from exc

    if grid.data_prep is not None:
        executed = execute("01_data_prep.ipynb", dict(task=grid.task, **grid.data_prep))
        written += [executed, rp.render(executed, out / "data.html")]
    context = pipeline_context(grid)
    for step in grid.pipeline:
        declared = notebook_parameters(NOTEBOOKS / step.notebook)
        params = {k: v for k, v in context.items() if k in declared}
        params.update(step.parameters)
        executed = execute(step.notebook, params)
        written.append(executed)
        if step.html:
            written.append(rp.render(executed, out / step.html))
    return written


# --------------------------------------------------------------------------- runs no longer in the grid
def set_aside_stale_runs(grid: Grid) -> list[str]:
    """Keep the pipeline to this grid's runs: run folders under ``runs_root`` that the grid file no longer
    plans (an edited grid, or ids from an older version of ofa) are moved to ``runs_root/.stale/``, and
    their rows (and the averages they are members of) leave the grid's results store. A folder there
    whose run the grid plans again is moved back, not retrained. Returns the ids set aside."""
    from . import results

    planned = {r.run_id for r in grid.runs if r.role == "grid"}
    stale_dir = grid.runs_root / ".stale"
    for run_id in sorted(planned):
        if (stale_dir / run_id).is_dir() and not (grid.runs_root / run_id).exists():
            os.replace(stale_dir / run_id, grid.runs_root / run_id)
            print(f"{run_id}: planned again, moved back from {stale_dir}")
    moved = []
    pattern = re.compile(rf"{re.escape(grid.task)}-[0-9a-f]{{12}}")
    for path in sorted(grid.runs_root.glob("*/manifest.json")) if grid.runs_root.is_dir() else []:
        run_id = path.parent.name
        if pattern.fullmatch(run_id) and run_id not in planned and locks.holder(grid.state_dir / "locks" / f"{run_id}.lock") is None:
            stale_dir.mkdir(parents=True, exist_ok=True)
            target = stale_dir / run_id
            if target.exists():  # an older copy set aside before: keep both
                target = stale_dir / f"{run_id}.{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(path.parent, target)
            moved.append(run_id)
    if moved:
        dropped = results.drop_runs(grid.results_path, moved)
        print(f"{len(moved)} run folder(s) under {grid.runs_root} are not in {grid.path} (edited grid?): moved to "
              f"{stale_dir} so the pipeline does not average them ({', '.join(moved)}); {dropped} row(s) of theirs "
              f"left {grid.results_path}")
    return moved


# --------------------------------------------------------------------------- commands
def run(grid: Grid, *, backend: str = "local", workers: int | None = None, wait: bool = False,
        with_report: bool = True) -> int:
    """``run``: train what is unfinished, then the pipeline; returns the exit status (1 if any run failed)."""
    import pandas as pd

    start = time.time()
    set_aside_stale_runs(grid)
    failed = [r.run_id for r in grid.runs if run_state(grid, r) == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed before and are left as they are (`retry-failed` runs them again): {failed}")
    if backend == "slurm":
        record = submit_slurm(grid)
        print(f"submitted to SLURM: head job {record['head_job']}, array job {record['array_job']}, "
              f"report job {record['report_job']}; scripts and logs in {record['dir']}")
        if not wait:
            print(f"follow with: python -m ofa_lib.grid status {grid.path}")
            return 0
        wait_slurm(grid, record)
        outcomes: list[Outcome] = []
        submitted = set(record["runs"])
    else:
        outcomes = run_local(grid, workers=workers)
        submitted = set()
    summary = _summary(grid, outcomes, submitted)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.to_string(index=False))
    bad = [r.run_id for r in grid.runs if run_state(grid, r) != "done"]
    if backend == "local" and with_report and not bad:
        for path in report(grid):
            print(f"wrote {path}")
    elif backend == "slurm":
        html = [grid.reports_dir / s.html for s in grid.pipeline if s.html]
        print("report:", ", ".join(f"{p} ({'ok' if p.is_file() else 'missing'})" for p in html))
    wall = time.time() - start
    _write_summary(grid, backend, wall, summary)
    print(f"grid {grid.name}: {sum(summary.result.isin(['done', 'skipped-done']))}/{len(grid.runs)} runs done, "
          f"{len(bad)} not done; {wall / 60:.1f} min")
    return 1 if bad else 0


def _write_summary(grid: Grid, backend: str, wall: float, summary: "pd.DataFrame") -> None:
    file = grid.reports_dir / "grid_summary.json"
    previous = json.loads(file.read_text()) if file.is_file() else {}
    invocation = {"backend": backend, "wall_s": round(wall, 1), "started": time.time() - wall, "finished": time.time(),
                  "trained": int((summary.result == "done").sum()), "failed": int((summary.result == "failed").sum())}
    write_json(file, {
        "grid": grid.name, "file": str(grid.path), "runs": len(grid.runs), "wall_s": invocation["wall_s"],
        "started": invocation["started"], "finished": invocation["finished"], "backend": backend,
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "invocations": previous.get("invocations", []) + [invocation],
        "results": summary.to_dict("records")})


def retry_failed(grid: Grid, *, backend: str = "local", workers: int | None = None, wait: bool = False) -> int:
    """Forget the recorded failures (their notebooks stay, as ``*.failed.ipynb``) and run again."""
    failed = [r for r in grid.runs if run_state(grid, r) == "failed"]
    print(f"retrying {len(failed)} failed run(s): {[r.run_id for r in failed]}")
    for r in failed:
        record = failure_path(r)
        os.replace(record, record.with_name(f"failure.{int(time.time())}.json"))
    return run(grid, backend=backend, workers=workers, wait=wait)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa_lib.grid", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("plan", "list the runs with their ids and state"), ("status", "state of every run, with SLURM's"),
                        ("run", "train unfinished runs, then the pipeline"), ("retry-failed", "run the failed runs again"),
                        ("report", "run the pipeline notebooks and render the reports"), ("run-one", argparse.SUPPRESS)):
        p = sub.add_parser(name, help=help_)
        p.add_argument("grid", help="params/grids/<name>.yaml or a bare name")
        if name in ("run", "retry-failed"):
            p.add_argument("--backend", choices=("local", "slurm"), default="local")
            p.add_argument("--workers", type=int, default=None, help="local backend: runs at once (default: the grid's)")
            p.add_argument("--wait", action="store_true", help="slurm backend: block until the jobs have finished")
        if name == "run":
            p.add_argument("--no-report", action="store_true", help="train only")
        if name == "report":
            p.add_argument("--partial", action="store_true", help="report on the finished runs even if some are not")
        if name == "run-one":
            p.add_argument("--run-id")
            p.add_argument("--list", help="JSON list of run ids (a SLURM array)")
            p.add_argument("--index", type=int)
    args = parser.parse_args(argv)
    try:
        return _command(args)
    except (GridError, data.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def data_sets(grid: Grid) -> list[tuple[str, str, str]]:
    """Every (dataset, lang, split) the grid's runs read: training, dev and test sets."""
    keys: dict[tuple[str, str, str], None] = {}
    for run in grid.runs:
        cfg = run.cfg
        keys[(cfg.train_dataset, cfg.source_lang(), "train")] = None
        keys.update(dict.fromkeys(cfg.dev_sets() + cfg.test_sets()))
    return list(keys)


def _command(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    # before anything is planned or trained: every data set must be readable now (mirror or hub), else one
    # error names what is missing and the `ofa-data fetch` command (file checks only: seconds)
    data.require(data_sets(grid))
    if args.command in ("plan", "status"):
        import pandas as pd

        table = plan_table(grid, with_scheduler=args.command == "status")
        print(f"grid {grid.name} ({grid.path}): {len(grid.runs)} runs of task {grid.task!r}, preset {grid.preset!r}")
        if grid.description:
            print(grid.description)
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 500):
            print(table.to_string(index=False))
        print(table.state.value_counts().to_string())
        return 0
    if args.command == "run":
        return run(grid, backend=args.backend, workers=args.workers, wait=args.wait, with_report=not args.no_report)
    if args.command == "retry-failed":
        return retry_failed(grid, backend=args.backend, workers=args.workers, wait=args.wait)
    if args.command == "report":
        for path in report(grid, partial=args.partial):
            print(f"wrote {path}")
        return 0
    run_id = args.run_id or json.loads(Path(args.list).read_text())[args.index]
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or None
    outcome = run_one(grid, grid.run(run_id), threads=threads)
    print(f"run {run_id}: {outcome.state} {outcome.error}")
    return 1 if outcome.state == "failed" else 0


if __name__ == "__main__":
    raise SystemExit(main())
