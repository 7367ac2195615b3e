"""Grid files: the YAML format (``params/grids/README.md``), its validation, and the runs a grid plans."""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ofa_lib.paths import REPO_ROOT, outputs_dir
from ofa_lib.train import config

if TYPE_CHECKING:  # pandas is imported where tables are built: `grid status` starts fast without it
    pass


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
    from ofa_lib.grid.notebook_params import declared

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
            from ofa_lib.merge import (
                merging,  # (imports torch: only for grids that name merge methods)
            )

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


def data_sets(grid: Grid) -> list[tuple[str, str, str]]:
    """Every (dataset, lang, split) the grid's runs read: training, dev and test sets."""
    keys: dict[tuple[str, str, str], None] = {}
    for run in grid.runs:
        cfg = run.cfg
        keys[(cfg.train_dataset, cfg.source_lang(), "train")] = None
        keys.update(dict.fromkeys(cfg.dev_sets() + cfg.test_sets()))
    return list(keys)
