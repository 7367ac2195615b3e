"""The local backend: a process pool of training runs with the grid's progress bar, and graceful stops on SIGTERM/SIGINT."""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ofa_lib.paths import outputs_dir

if TYPE_CHECKING:  # pandas is imported where tables are built: `grid status` starts fast without it
    import pandas as pd
from ofa_lib.grid.execute import Outcome, child_pids, run_one, signal_descendants
from ofa_lib.grid.spec import TRAIN_NOTEBOOK, Grid, Run, load_grid
from ofa_lib.grid.state import (
    failure_path,
    require_head,
    run_state,
    wait_for_live_locks,
)

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
                signal_descendants(signal.SIGTERM)
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


def summary_table(grid: Grid, outcomes: list[Outcome], submitted: set[str] = frozenset()) -> "pd.DataFrame":
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


def running_progress(runs: list[Run]) -> str:
    """What the runs now executing report of themselves (their kernels' :mod:`ofa_lib.progress` beats), for the
    grid's bar: ``lr=5e-05 bs=16 seed=1: step 34/88 (training)``; runs not started yet say nothing."""
    from ofa_lib import progress

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
        for pid in child_pids(os.getpid()):  # the workers pass it on to their kernels
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
                    require_head(grid)
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
            wait_for_live_locks(grid, grid.runs)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return outcomes
