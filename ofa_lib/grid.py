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
import concurrent.futures
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import config, data, locks
from .io import write_json, write_text
from .paths import REPO_ROOT, outputs_dir

if TYPE_CHECKING:  # pandas is imported where tables are built: `grid status` starts fast without it
    import pandas as pd

GRIDS_DIR = REPO_ROOT / "params" / "grids"
NOTEBOOKS = REPO_ROOT / "notebooks"
TRAIN_NOTEBOOK = "02_train.ipynb"
NOTEBOOK_ONLY = ("device", "threads")  # 02_train parameters not in the run id (threads change only rounding:
# CPU sums split by thread, so runs are bit for bit equal only at an equal thread count)
DEFAULT_PIPELINE = [{"notebook": "03_average.ipynb"}, {"notebook": "04_analysis.ipynb", "html": "report.html"}]
STATES = ("todo", "queued", "running", "done", "failed", "cancelled", "skipped")
TOP_KEYS = {"name", "description", "task", "preset", "grid", "train", "head_tuning", "data_prep", "pipeline", "resources"}
RESOURCE_KEYS = {"workers", "slurm", "stall_timeout", "run_timeout"}
STALL_TIMEOUT_S = 1800.0  # default resources.stall_timeout: seconds without progress before a run is given up
SLURM_KEYS = {"partition", "account", "qos", "gpus_per_run", "cpus_per_task", "mem", "time", "max_concurrent", "setup",
              "extra_args", "signal_before_s"}
STEP_RESOURCE_KEYS = {"gpus", "cpus", "mem", "time"}
# Pipeline notebooks that evaluate models (a GPU job of their own on SLURM, sized like a training task); the
# others (04_analysis, 01_data_prep) only read tables: a small CPU job.
EVALUATING_NOTEBOOKS = ("03_average.ipynb", "05_measures.ipynb", "06_unfreezing.ipynb")
SMALL_JOB = {"gpus": 0, "cpus": 1, "mem": "4G", "time": "02:00:00"}
# sbatch options the backend sets itself: extra_args may not override them
OWN_SBATCH_OPTIONS = ("--array", "--output", "--error", "--dependency", "--job-name", "--parsable", "--requeue",
                      "--no-requeue", "--signal", "--kill-on-invalid-dep", "--wrap")


class GridError(ValueError):
    """A grid file is invalid; the message names the file and the field."""


# --------------------------------------------------------------------------- the grid file
@dataclass
class Step:
    """One pipeline notebook run after training."""

    notebook: str
    parameters: dict[str, Any] = field(default_factory=dict)
    html: str | None = None
    resources: dict[str, Any] = field(default_factory=dict)  # SLURM job: gpus, cpus, mem, time (see step_resources)


@dataclass
class Slurm:
    partition: str | None = None
    account: str | None = None
    gpus_per_run: int = 1
    cpus_per_task: int = 8
    mem: str = "64G"
    time: str = "12:00:00"
    max_concurrent: int = 16
    setup: list[str] = field(default_factory=list)  # shell lines run after `cd` to the repository (one line each)
    extra_args: list[str] = field(default_factory=list)
    qos: str | None = None
    signal_before_s: int = 300  # --signal=B:USR1@<s>: a training task writes its resume state and is requeued


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
        extra = sorted(set(raw) - {"notebook", "parameters", "html", "resources"})
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
        steps.append(Step(raw["notebook"], dict(raw.get("parameters") or {}), raw.get("html"),
                          _step_resources(path, f"pipeline[{i}].resources", raw.get("resources"))))

    resources = spec.get("resources") or {}
    if not isinstance(resources, dict):
        raise _err(path, "resources", f"{resources!r}: expected a mapping (workers, slurm, stall_timeout, run_timeout)")
    unknown = sorted(set(resources) - RESOURCE_KEYS)
    if unknown:
        raise _err(path, f"resources.{unknown[0]}", f"unknown; known: {sorted(RESOURCE_KEYS)}")
    workers = resources.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise _err(path, "resources.workers", f"{workers!r}: expected a positive integer")
    slurm = _slurm_spec(path, resources.get("slurm") or {})

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


# --------------------------------------------------------------------------- SLURM values (they go into scripts)
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.,+-]+")  # partition (or a comma list), account, qos
_SLURM_TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}")
_SLURM_MEM = re.compile(r"\d+[KMGT]?")
_SBATCH_ARG = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=[^\s'\"`\\]+)?")
_UNSAFE_SHELL = re.compile(r"[\n\r\x00'\"`\\]")


def _slurm_spec(path: Path, spec: Any) -> Slurm:
    """``resources.slurm`` validated: every value that is written into a job script is checked, so a newline or a
    quote becomes a :class:`GridError` naming the field, never a line of shell."""
    if not isinstance(spec, dict):
        raise _err(path, "resources.slurm", f"{spec!r}: expected a mapping of SLURM settings")
    bad = sorted(set(spec) - SLURM_KEYS)
    if bad:
        raise _err(path, f"resources.slurm.{bad[0]}", f"unknown; known: {sorted(SLURM_KEYS)}")
    values = dict(spec)
    setup = values.get("setup", [])
    if isinstance(setup, str):
        setup = [setup] if setup.strip() else []
    if not isinstance(setup, list) or not all(isinstance(x, str) for x in setup):
        raise _err(path, "resources.slurm.setup", f"{setup!r}: expected a shell line or a list of shell lines")
    for i, line in enumerate(setup):
        if _UNSAFE_SHELL.search(line.strip()):
            raise _err(path, f"resources.slurm.setup[{i}]", f"{line!r}: one shell line without quotes, backslashes or "
                       "newlines expected (give several lines as a YAML list)")
    values["setup"] = [line.strip() for line in setup if line.strip()]
    extra = values.get("extra_args", [])
    if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
        raise _err(path, "resources.slurm.extra_args", f"{extra!r}: expected a list of sbatch options")
    for i, arg in enumerate(extra):
        if not _SBATCH_ARG.fullmatch(arg):
            raise _err(path, f"resources.slurm.extra_args[{i}]", f"{arg!r}: expected one sbatch option --name[=value] "
                       "(no spaces, quotes, backslashes or newlines)")
        if arg.split("=")[0] in OWN_SBATCH_OPTIONS:
            raise _err(path, f"resources.slurm.extra_args[{i}]", f"{arg!r}: the backend sets {arg.split('=')[0]} itself")
    slurm = Slurm(**values)
    for key in ("gpus_per_run", "cpus_per_task", "max_concurrent", "signal_before_s"):
        value = getattr(slurm, key)
        low = 0 if key in ("gpus_per_run", "signal_before_s") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise _err(path, f"resources.slurm.{key}", f"{value!r}: expected a {'non-negative' if low == 0 else 'positive'} integer")
    for key in ("partition", "account", "qos"):
        value = getattr(slurm, key)
        if value is not None and not (isinstance(value, str) and _SLURM_NAME.fullmatch(value)):
            raise _err(path, f"resources.slurm.{key}", f"{value!r}: expected a SLURM name (letters, digits, _ . , + -)")
    if not _SLURM_TIME.fullmatch(str(slurm.time)):
        raise _err(path, "resources.slurm.time", f"{slurm.time!r}: expected SLURM's [D-]HH:MM:SS")
    if not _SLURM_MEM.fullmatch(str(slurm.mem)):
        raise _err(path, "resources.slurm.mem", f"{slurm.mem!r}: expected e.g. 64G")
    return slurm


def _step_resources(path: Path, where: str, spec: Any) -> dict[str, Any]:
    """A pipeline step's own ``resources`` (gpus, cpus, mem, time), validated like ``resources.slurm``."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise _err(path, where, f"expected a mapping with {sorted(STEP_RESOURCE_KEYS)}")
    bad = sorted(set(spec) - STEP_RESOURCE_KEYS)
    if bad:
        raise _err(path, f"{where}.{bad[0]}", f"unknown; known: {sorted(STEP_RESOURCE_KEYS)}")
    for key in ("gpus", "cpus"):
        if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < (0 if key == "gpus" else 1)):
            raise _err(path, f"{where}.{key}", f"{spec[key]!r}: expected a {'non-negative' if key == 'gpus' else 'positive'} integer")
    if "time" in spec and not _SLURM_TIME.fullmatch(str(spec["time"])):
        raise _err(path, f"{where}.time", f"{spec['time']!r}: expected SLURM's [D-]HH:MM:SS")
    if "mem" in spec and not _SLURM_MEM.fullmatch(str(spec["mem"])):
        raise _err(path, f"{where}.mem", f"{spec['mem']!r}: expected e.g. 64G")
    return dict(spec)


def _mem_mb(mem: str) -> float:
    return float(mem[:-1]) * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 ** 2}[mem[-1]] if mem[-1] in "KMGT" else float(mem)


def step_resources(grid: Grid, step: Step | None) -> dict[str, Any]:
    """The SLURM job of a pipeline step (``None``: 01_data_prep): evaluating notebooks (03_average, 05, 06) get a
    job like a training task's, GPU included; 04_analysis and 01_data_prep a small CPU job (no larger than a
    training task's); the step's own ``resources`` win."""
    s = grid.slurm
    if step is not None and step.notebook in EVALUATING_NOTEBOOKS:
        out = {"gpus": s.gpus_per_run, "cpus": s.cpus_per_task, "mem": s.mem, "time": s.time}
    else:
        out = dict(SMALL_JOB, cpus=min(SMALL_JOB["cpus"], s.cpus_per_task),
                   mem=SMALL_JOB["mem"] if _mem_mb(SMALL_JOB["mem"]) <= _mem_mb(s.mem) else s.mem)
    out.update(step.resources if step is not None else {})
    return out


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
        why = _slurm_why(grid, run, job) if job and state == "todo" and job["state"] in ("GONE", "CANCELLED") else None
        if why:
            state, row["error"] = why
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


def _slurm_why(grid: Grid, run: Run, job: dict[str, str]) -> tuple[str, str] | None:
    """Why a submitted run whose job has left the queue is still not done: ``("cancelled", …)`` when the head-tuning
    run it waited for failed (SLURM cancelled the array), ``("skipped", …)`` when its task found the run held by
    another live task; ``None`` when there is nothing to say."""
    heads = [r for r in grid.runs if r.role == "head"]
    if run.role != "head" and heads and failure_path(heads[0]).is_file():
        error = json.loads(failure_path(heads[0]).read_text()).get("error", "")[:100]
        return "cancelled", f"head-tuning run {heads[0].run_id} failed ({error}): its dependents were cancelled"
    record = locks.read(skipped_path(grid, run))  # a JSON reader that tolerates a missing file
    if record and record.get("job_id") == job["job_id"]:
        return "skipped", f"task {job['job_id']} skipped it: {record.get('held_by')}"
    return None


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
    state: str  # done | failed | interrupted | skipped-done | skipped-running
    seconds: float = 0.0
    error: str = ""


def run_one(grid: Grid, run: Run, *, threads: int | None = None) -> Outcome:
    """Train one run under its lock: skip it when done or held by a live runner; record a failure."""
    from . import training

    lock = locks.acquire(lock_path(grid, run))
    if lock is None:
        held = locks.read(lock_path(grid, run)) or {}
        return Outcome(run.run_id, "skipped-running", error=f"held by job {held.get('job_id')} "
                       f"(host {held.get('host')}, pid {held.get('pid')})")
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
            if getattr(exc, "ename", "") == "RunInterrupted":  # stopped on a signal, state written: not a failure
                return Outcome(run.run_id, "interrupted", time.time() - start, error)
            write_json(failure_path(run), {
                "run_id": run.run_id, "params": params, "error": error, "traceback": traceback.format_exc()[-4000:],
                "notebook": str(run.dir / "02_train.failed.ipynb"), "job_id": lock.info.get("job_id"),
                "host": lock.info["host"], "time": time.time()})
            return Outcome(run.run_id, "failed", time.time() - start, error)
        if not training.is_done(run.cfg, run.root):
            raise RuntimeError(f"02_train finished but run {run.run_id} is not complete under {run.root}: "
                               "the notebook's parameters did not reproduce the grid's run id")
    return Outcome(run.run_id, "done", time.time() - start)


def _signal_descendants(sig: int) -> list[int]:
    """Send ``sig`` to every process this one started (the notebook kernels: they run in their own session,
    so a signal to the job's batch shell alone would not reach them)."""
    sent = []
    for pid in _children(os.getpid()):
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return sent


def skipped_path(grid: Grid, run: Run) -> Path:
    return grid.state_dir / "skipped" / f"{run.run_id}.json"


def run_task(grid: Grid, run: Run, *, threads: int | None = None) -> int:
    """``run-one``, the body of a SLURM task: train one run (:func:`run_one`). SIGUSR1 (``--signal`` before the
    time limit) and SIGTERM (preemption, ``scontrol requeue``) are passed to the kernel, whose training loop
    writes its resume state and stops; then a task told by SIGUSR1 requeues itself (``scontrol requeue``) so
    that its next start resumes. A run held by another live task is recorded as skipped (``grid status``
    shows it). Exit status: 1 when the run failed, else 0."""
    got: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        got.append(signum)
        sent = _signal_descendants(signum)
        print(f"run-one: {signal.Signals(signum).name} passed to {len(sent)} process(es) below me", flush=True)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        outcome = run_one(grid, run, threads=threads)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    print(f"run {run.run_id}: {outcome.state} {outcome.error}", flush=True)
    job = locks.job_id()
    if outcome.state == "skipped-running":
        write_json(skipped_path(grid, run), {"run_id": run.run_id, "job_id": job, "host": platform.node(),
                                             "held_by": outcome.error, "time": time.time()})
    if outcome.state == "interrupted" and signal.SIGUSR1 in got and job:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        print(f"run-one: requeued {job} to resume: {(proc.stderr or proc.stdout).strip() or 'ok'}", flush=True)
    return 1 if outcome.state == "failed" else 0


_STOPPING: list[int] = []  # in a pool worker: the signals that asked the runner to stop


def _die_with_parent() -> None:
    """Pool initializer: a worker (and so its kernel) dies when the runner is killed, even by SIGKILL; SIGTERM
    and SIGINT make it stop gracefully instead (see :func:`_worker_stop`)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _worker_stop)


def _worker_stop(signum, frame) -> None:  # noqa: ARG001
    """A pool worker told to stop: pass SIGTERM to its kernel (its training loop writes the resume state and
    stops), keep passing it every 2 s (a kernel still starting up gets it too), start no further run."""
    if not _STOPPING:
        import threading

        def repeat() -> None:
            while True:
                _signal_descendants(signal.SIGTERM)
                time.sleep(2.0)

        threading.Thread(target=repeat, daemon=True, name="pass SIGTERM to the kernel").start()
    _STOPPING.append(signum)


def _pool_task(grid_path: str, run_id: str, threads: int | None, outputs: str) -> Outcome:
    if _STOPPING:
        return Outcome(run_id, "interrupted", error="not started: the runner was stopping")
    os.environ["OFA_OUTPUTS"] = outputs
    grid = load_grid(grid_path)
    outcome = run_one(grid, grid.run(run_id), threads=threads)
    if _STOPPING and outcome.state == "failed":  # e.g. the kernel got SIGTERM before training had started
        record = failure_path(grid.run(run_id))
        record.unlink(missing_ok=True)
        return Outcome(run_id, "interrupted", outcome.seconds, f"stopped by the runner ({outcome.error})")
    return outcome


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


def running_progress(runs: list[Run]) -> str:
    """What the runs now executing report of themselves (their kernels' :mod:`ofa_lib.progress` beats), for the
    grid's bar: ``lr=5e-05 bs=16 seed=1: step 34/88 (training)``; runs not started yet say nothing."""
    from . import progress

    parts = []
    for run in runs:
        # one file per execution (.02_train.<runner pid>.progress.json); a file can vanish as its run ends
        infos = [progress.read(p) for p in run.dir.glob(f".{Path(TRAIN_NOTEBOOK).stem}.*.progress.json")]
        infos = [i for i in infos if i]
        if infos:
            parts.append(f"{run.label}: {progress.describe(max(infos, key=lambda i: i.get('time', 0)))}")
        elif any(run.dir.glob(f".{Path(TRAIN_NOTEBOOK).stem}.*tmp.ipynb")):  # papermill started, no beat yet
            parts.append(f"{run.label}: starting")
    return " · ".join(parts)


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
    stop: list[int] = []

    def on_signal(signum, frame):  # noqa: ARG001
        if not stop:
            tqdm.write(f"grid {grid.name}: {signal.Signals(signum).name}: stopping; the running runs write their "
                       "resume state and stop (a re-run finishes what is missing)")
        stop.append(signum)
        for pid in _children(os.getpid()):  # the workers pass it on to their kernels
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with tqdm(total=len(todo), desc=f"grid {grid.name}: training runs", unit="run") as bar:
            for batch, n in ((heads, 1), (rest, workers)):
                if stop:
                    outcomes += [Outcome(r.run_id, "interrupted", error="not started: stopped") for r in batch]
                    continue
                if batch is rest:
                    _require_head(grid)
                if not batch:
                    continue
                n = min(n, len(batch))
                with ProcessPoolExecutor(n, mp_context=ctx, initializer=_die_with_parent) as pool:
                    futures = {pool.submit(_pool_task, str(grid.path), r.run_id, max(1, cpus // n), str(outputs_dir())): r
                               for r in batch}
                    pending = set(futures)
                    while pending:
                        done, pending = concurrent.futures.wait(pending, timeout=2.0, return_when="FIRST_COMPLETED")
                        for future in done:
                            outcome = future.result()
                            outcomes.append(outcome)
                            bar.update(1)
                            if outcome.state == "failed":
                                tqdm.write(f"run {outcome.run_id} ({futures[future].label}) FAILED: {outcome.error}")
                        bar.set_postfix_str(running_progress([futures[f] for f in pending]), refresh=True)
        if not stop:
            _wait_for_live_locks(grid, grid.runs)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
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
    """A job script: directives, then ``cd`` to the repository, then the grid's ``setup`` lines (so a relative
    ``source .venv/bin/activate`` works), the environment and the command."""
    env = {"OFA_OUTPUTS": str(outputs_dir()), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if os.environ.get("OFA_DATA_DIR"):
        env["OFA_DATA_DIR"] = os.environ["OFA_DATA_DIR"]
    lines = ["#!/bin/bash", *[f"#SBATCH {d}" for d in directives], "set -euo pipefail",
             f"cd {shlex.quote(str(REPO_ROOT))}", *grid.slurm.setup,
             *[f"export {k}={shlex.quote(v)}" for k, v in env.items()],
             f"exec {shlex.quote(sys.executable)} -m ofa_lib.grid {command}"]
    return "\n".join(lines) + "\n"


def _account(grid: Grid) -> list[str]:
    """What every job of the grid gets: partition, account, qos and the grid's extra sbatch options."""
    s = grid.slurm
    out = [f"--partition={s.partition}"] if s.partition else []
    out += [f"--account={s.account}"] if s.account else []
    out += [f"--qos={s.qos}"] if s.qos else []
    return out + list(s.extra_args)


def _resources(grid: Grid) -> list[str]:
    """A training task's job: the grid's CPUs, memory, time and GPUs; requeued when preempted, and told
    ``signal_before_s`` before its time limit (SIGUSR1 to the batch shell, i.e. ``run-one``) so that it writes
    its resume state and requeues itself."""
    s = grid.slurm
    out = [f"--cpus-per-task={s.cpus_per_task}", f"--mem={s.mem}", f"--time={s.time}", "--requeue"]
    if s.signal_before_s:
        out.append(f"--signal=B:USR1@{s.signal_before_s}")
    if s.gpus_per_run:
        out.append(f"--gres=gpu:{s.gpus_per_run}")
    return out + _account(grid)


def _step_directives(grid: Grid, step: Step | None) -> list[str]:
    res = step_resources(grid, step)
    out = [f"--cpus-per-task={res['cpus']}", f"--mem={res['mem']}", f"--time={res['time']}"]
    if res["gpus"]:
        out.append(f"--gres=gpu:{res['gpus']}")
    return out + _account(grid)


def _scancel(job_ids: list[str]) -> str:
    """Cancel jobs (best effort); returns what scancel said."""
    if not job_ids:
        return ""
    try:
        proc = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)
        return (proc.stderr or proc.stdout).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)


def write_slurm_scripts(grid: Grid, runs: list[Run], job_dir: Path) -> list[dict[str, Any]]:
    """Write the job scripts of one submission into ``job_dir``; returns the jobs in submission order, each
    ``{"name", "script", "kind" (head | array | step), "runs", "after"}`` where ``after`` names the earlier
    jobs it depends on and how (``afterok`` / ``afterany``)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    grid_arg = shlex.quote(str(grid.path.resolve()))
    name = f"ofa-{grid.name}"
    heads = [r for r in runs if r.role == "head"]
    rest = [r for r in runs if r.role != "head"]
    jobs: list[dict[str, Any]] = []
    if heads:
        script = job_dir / "head.sh"
        write_text(script, _script(grid, job_dir, f"run-one {grid_arg} --run-id {heads[0].run_id}",
                                   [f"--job-name={name}-head", f"--output={job_dir}/head-%j.out", *_resources(grid)]))
        jobs.append({"name": "head", "script": str(script), "kind": "head", "runs": [heads[0].run_id], "after": []})
    if rest:
        write_json(job_dir / "runs.json", [r.run_id for r in rest])
        script = job_dir / "array.sh"
        write_text(script, _script(
            grid, job_dir, f"run-one {grid_arg} --list {shlex.quote(str(job_dir / 'runs.json'))} --index \"$SLURM_ARRAY_TASK_ID\"",
            [f"--job-name={name}", f"--array=0-{len(rest) - 1}%{grid.slurm.max_concurrent}",
             f"--output={job_dir}/%A_%a.out", *_resources(grid)]))
        jobs.append({"name": "array", "script": str(script), "kind": "array", "runs": [r.run_id for r in rest],
                     "after": [("afterok", "head")] if heads else []})
    # the pipeline: one job per step, in order, each with its own resources (03_average: a GPU job)
    after: list[tuple[str, str]] = [("afterany", "array")] if rest else []
    after += [("afterok", "head")] if heads else []
    steps: list[tuple[str, Step | None]] = [("data_prep", None)] if grid.data_prep is not None else []
    steps += [(str(i), step) for i, step in enumerate(grid.pipeline)]
    for key, step in steps:
        label = "01_data_prep" if step is None else Path(step.notebook).stem
        script = job_dir / f"step_{label}.sh"
        write_text(script, _script(grid, job_dir, f"report {grid_arg} --step {key}",
                                   [f"--job-name={name}-{label}", f"--output={job_dir}/{label}-%j.out",
                                    *_step_directives(grid, step)]))
        jobs.append({"name": label, "script": str(script), "kind": "step", "runs": [], "after": after})
        after = [("afterok", label)]
    return jobs


def submit_slurm(grid: Grid, runs: list[Run] | None = None, *, dry_run: bool = False) -> dict[str, Any]:
    """Submit the unfinished runs as one SLURM job array: the head-tuning run first (its own job), the array
    after it, then one job per pipeline step. A job whose dependency can no longer be met (a failed head job)
    is cancelled by SLURM (``--kill-on-invalid-dep``). ``dry_run``: write the scripts where a submission would,
    submit nothing. When one ``sbatch`` is refused, the jobs already queued are cancelled and the attempt is
    recorded; :class:`GridError` says what happened."""
    runs = [r for r in (runs if runs is not None else grid.runs) if run_state(grid, r) == "todo"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job_dir = grid.state_dir / "slurm" / stamp
    for n in itertools.count(2):
        if not job_dir.exists():
            break
        job_dir = grid.state_dir / "slurm" / f"{stamp}-{n}"
    jobs = write_slurm_scripts(grid, runs, job_dir)
    record: dict[str, Any] = {"time": time.time(), "dir": str(job_dir), "head_job": None, "array_job": None,
                              "report_job": None, "step_jobs": {}, "runs": {}, "scripts": [j["script"] for j in jobs]}
    if dry_run:
        return dict(record, dry_run=True)
    ids: dict[str, str] = {}
    try:
        for job in jobs:
            deps = [f"{how}:{ids[name]}" for how, name in job["after"]]
            args = [f"--dependency={','.join(deps)}", "--kill-on-invalid-dep=yes"] if deps else []
            ids[job["name"]] = job_id = _sbatch(args, Path(job["script"]))
            if job["kind"] == "head":
                record["head_job"] = job_id
                record["runs"][job["runs"][0]] = job_id
            elif job["kind"] == "array":
                record["array_job"] = job_id
                record["runs"].update({r: f"{job_id}_{i}" for i, r in enumerate(job["runs"])})
            else:
                record["step_jobs"][job["name"]] = job_id
                record["report_job"] = record["report_job"] or job_id
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        queued = list(ids.values())
        said = _scancel(queued)
        record.update(error=str(exc), cancelled=queued, runs={})
        _append_submission(grid, record)
        raise GridError(f"{grid.path}: submission stopped half-way: {exc}; cancelled the {len(queued)} job(s) it had "
                        f"queued ({', '.join(queued) or 'none'}{'; scancel: ' + said if said else ''}); "
                        f"scripts in {job_dir}") from exc
    _append_submission(grid, record)
    return record


def _append_submission(grid: Grid, record: dict[str, Any]) -> None:
    with open(grid.state_dir / "submissions.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


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

    ids = [j for j in (record["head_job"], record["array_job"], *record.get("step_jobs", {}).values(),
                       record["report_job"]) if j]
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


def report(grid: Grid, *, partial: bool = False, step: str | None = None) -> list[Path]:
    """Execute 01_data_prep (if asked) and the pipeline notebooks; render their HTML reports.

    Under a lock (``.grid/locks/report.lock``): a second runner that gets here while the first is still
    reporting does not run the pipeline again (it returns nothing). Each notebook is watched like a run
    (``stall_timeout``, ``run_timeout``). ``step``: only that one (``"data_prep"`` or the pipeline index; a
    SLURM job per step, each with its own resources)."""
    lock = locks.acquire(grid.state_dir / "locks" / "report.lock")
    if lock is None:
        other = locks.holder(grid.state_dir / "locks" / "report.lock") or {}
        print(f"the report of grid {grid.name} is being made by another runner (host {other.get('host')}, pid "
              f"{other.get('pid')}): not running the pipeline twice")
        return []
    with lock:
        return _report(grid, partial, step)


def _report(grid: Grid, partial: bool, step: str | None = None) -> list[Path]:
    from . import report as rp

    if step is not None and step != "data_prep" and not (step.isdigit() and int(step) < len(grid.pipeline)):
        raise GridError(f"{grid.path}: no pipeline step {step!r} (data_prep or 0..{len(grid.pipeline) - 1})")

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

    if grid.data_prep is not None and step in (None, "data_prep"):
        executed = execute("01_data_prep.ipynb", dict(task=grid.task, **grid.data_prep))
        written += [executed, rp.render(executed, out / "data.html")]
    context = pipeline_context(grid)
    for i, item in enumerate(grid.pipeline):
        if step is not None and step != str(i):
            continue
        declared = notebook_parameters(NOTEBOOKS / item.notebook)
        params = {k: v for k, v in context.items() if k in declared}
        params.update(item.parameters)
        executed = execute(item.notebook, params)
        written.append(executed)
        if item.html:
            written.append(rp.render(executed, out / item.html))
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
        with_report: bool = True, dry_run: bool = False) -> int:
    """``run``: train what is unfinished, then the pipeline; returns the exit status (1 if any run failed).
    ``dry_run`` (slurm backend): write the job scripts where a submission would and print their paths; nothing
    is submitted or moved."""
    import pandas as pd

    if dry_run:
        if backend != "slurm":
            raise GridError("--dry-run is for --backend slurm (the local backend has no scripts to show)")
        record = submit_slurm(grid, dry_run=True)
        print(f"dry run: nothing submitted; the job scripts a submission would use ({record['dir']}):")
        for script in record["scripts"]:
            print(f"  {script}")
        return 0
    start = time.time()
    set_aside_stale_runs(grid)
    failed = [r.run_id for r in grid.runs if run_state(grid, r) == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed before and are left as they are (`retry-failed` runs them again): {failed}")
    if backend == "slurm":
        record = submit_slurm(grid)
        steps = ", ".join(f"{k} {v}" for k, v in record["step_jobs"].items())
        print(f"submitted to SLURM: head job {record['head_job']}, array job {record['array_job']}, "
              f"pipeline jobs {steps or 'none'}; scripts and logs in {record['dir']}")
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
    stopped = any(o.state == "interrupted" for o in outcomes)
    if stopped:
        print(f"grid {grid.name}: stopped; run the same command again to finish the {len(bad)} run(s) not done "
              "(interrupted runs resume from their state)")
    elif backend == "local" and with_report and not bad:
        for path in report(grid):
            print(f"wrote {path}")
    elif backend == "slurm":
        html = [grid.reports_dir / s.html for s in grid.pipeline if s.html]
        print("report:", ", ".join(f"{p} ({'ok' if p.is_file() else 'missing'})" for p in html))
    wall = time.time() - start
    _write_summary(grid, backend, wall, summary)
    print(f"grid {grid.name}: {sum(summary.result.isin(['done', 'skipped-done']))}/{len(grid.runs)} runs done, "
          f"{len(bad)} not done; {wall / 60:.1f} min")
    return 130 if stopped else 1 if bad else 0


# the paper's own figures for one task's grid (63 runs + head run, XLM-R large), next to our estimate
# the paper reports ~1,050 V100-hours for its 3 tasks x 63 runs together, and ~1.4 TB of fp32 snapshots per task
PAPER_COST = {"V100-hours for the 3 tasks (NLI, NER, TyDiQA)": "~1,050 (~350 per task)",
              "snapshot storage per task": "~1.4 TB"}


def estimate_text(grid: Grid) -> str:
    """``plan --estimate``: :func:`ofa_lib.cost.estimate` of the grid, formatted (paper grids: next to the
    authors' figures)."""
    from . import cost

    try:
        est = cost.estimate(grid)
    except FileNotFoundError as exc:
        raise GridError(f"{grid.path}: --estimate: {exc}") from None
    return cost.format_estimate(est, PAPER_COST if grid.preset == "paper" else None)


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
            p.add_argument("--dry-run", action="store_true",
                           help="slurm backend: write the job scripts and print their paths; submit nothing")
        if name == "plan":
            p.add_argument("--estimate", action="store_true",
                           help="also print the time and bytes the grid costs (ofa_lib.cost; measured throughputs)")
        if name == "report":
            p.add_argument("--partial", action="store_true", help="report on the finished runs even if some are not")
            p.add_argument("--step", default=None, help="only this step: data_prep or a pipeline index (SLURM jobs)")
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
        if getattr(args, "estimate", False):
            print(estimate_text(grid))
        return 0
    if args.command == "run":
        return run(grid, backend=args.backend, workers=args.workers, wait=args.wait, with_report=not args.no_report,
                   dry_run=args.dry_run)
    if args.command == "retry-failed":
        return retry_failed(grid, backend=args.backend, workers=args.workers, wait=args.wait)
    if args.command == "report":
        for path in report(grid, partial=args.partial, step=args.step):
            print(f"wrote {path}")
        return 0
    run_id = args.run_id or json.loads(Path(args.list).read_text())[args.index]
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or None
    return run_task(grid, grid.run(run_id), threads=threads)


if __name__ == "__main__":
    raise SystemExit(main())
