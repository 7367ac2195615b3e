"""Executing notebooks: papermill with a watchdog (stall and run timeouts), one training run (:func:`run_one`, :func:`run_task`) and the pipeline notebooks (:func:`report`)."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ofa_lib import locks
from ofa_lib.data import loading
from ofa_lib.grid.spec import (
    NOTEBOOK_ONLY,
    NOTEBOOKS,
    TRAIN_NOTEBOOK,
    Grid,
    GridError,
    Run,
    notebook_parameters,
)
from ofa_lib.grid.state import (
    failure_path,
    lock_path,
    run_state,
    set_aside_stale_runs,
    skipped_path,
)
from ofa_lib.io import write_json


# --------------------------------------------------------------------------- watching executions
class Stalled(RuntimeError):
    """A notebook execution made no progress for ``stall_timeout`` s (or ran past ``run_timeout``): killed."""


def child_pids(pid: int) -> list[int]:
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
    for pid in child_pids(os.getpid()):
        try:
            if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids += [pid, *child_pids(pid)]
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
        from ofa_lib import progress

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

        from ofa_lib import progress

        self.progress_file.unlink(missing_ok=True)
        self._saved_env = os.environ.get(progress.ENV)
        os.environ[progress.ENV] = str(self.progress_file)  # the kernel inherits it
        self._stop = threading.Event()
        if self.stall_timeout is not None or self.run_timeout is not None:
            threading.Thread(target=self._watch, daemon=True, name=f"watchdog {self.notebook_file.name}").start()
        return self

    def __exit__(self, *exc: object) -> None:
        from ofa_lib import progress

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


@contextlib.contextmanager
def kernel_config() -> Iterator[Any]:
    """The kernel's transport: IPC sockets in a folder private to this kernel (mode 0700, removed afterwards),
    not TCP ports on localhost that any user of a shared login or compute node can reach (ipykernel warns
    about those once per notebook on the runner's terminal). The folder is unique per kernel because
    jupyter_client's default IPC name, ``kernel-ipc-<n>`` in the working directory, collides between kernels
    started in the same folder (a SLURM job array: "Invalid Signature", a kernel that does not answer)."""
    from traitlets.config import Config

    config = Config()
    if os.name != "posix":
        yield config
        return
    base = tempfile.gettempdir()
    if len(base) > 60:  # a socket path is limited to ~107 bytes; cluster TMPDIRs can be long
        base = "/tmp"
    folder = tempfile.mkdtemp(prefix="ofa-kernel-", dir=base)
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = os.path.join(folder, "kernel")
    try:
        yield config
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
    with watchdog, kernel_config() as config:
        try:
            papermill.execute_notebook(str(NOTEBOOKS / notebook), str(tmp), parameters=parameters, kernel_name="python3",
                                       cwd=str(cwd), progress_bar=False, config=config)
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
    from ofa_lib.train import training

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


def signal_descendants(sig: int) -> list[int]:
    """Send ``sig`` to every process this one started (the notebook kernels: they run in their own session,
    so a signal to the job's batch shell alone would not reach them)."""
    sent = []
    for pid in child_pids(os.getpid()):
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return sent


def run_task(grid: Grid, run: Run, *, threads: int | None = None) -> int:
    """``run-one``, the body of a SLURM task: train one run (:func:`run_one`). SIGUSR1 (``--signal`` before the
    time limit) and SIGTERM (preemption, ``scontrol requeue``) are passed to the kernel, whose training loop
    writes its resume state and stops; then a task told by SIGUSR1 requeues itself (``scontrol requeue``) so
    that its next start resumes. A run held by another live task is recorded as skipped (``grid status``
    shows it). Exit status: 1 when the run failed, else 0."""
    got: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        got.append(signum)
        sent = signal_descendants(signum)
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


# --------------------------------------------------------------------------- report
def pipeline_context(grid: Grid) -> dict[str, Any]:
    """Parameters every pipeline notebook gets when it declares them."""
    return {"task": grid.task, "runs_root": str(grid.runs_root), "results_path": str(grid.results_path),
            "report_name": grid.name, "output_dir": str(grid.reports_dir), "source": str(grid.results_path),
            "tasks": [grid.task], "model": grid.runs[-1].cfg.model_name,
            "description": (grid.description + "\n\n" if grid.description else "") + data_line(grid)}


def data_line(grid: Grid) -> str:
    """Where the runs' data came from, from their manifests (reports print it under the description)."""
    # imported here: it pulls in torch and pandas, which `grid status` and planning do not need
    from ofa_lib.train import runs as runs_lib

    summaries: dict[str, int] = {}
    for run in grid.runs:
        manifest = runs_lib.read_manifest(run.dir, missing_ok=True) or {}
        # from the recorded sources, so that the line reads as describe_sources writes it now (runs trained
        # before it showed a mirror beside the repository relative to it recorded the absolute path)
        line = loading.describe_sources(manifest["data"]) if manifest.get("data") else manifest.get("data_summary")
        if line:
            summaries[line] = summaries.get(line, 0) + 1
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
    from ofa_lib.analysis import report as rp

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
