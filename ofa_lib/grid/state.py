"""A run's state on disk: its lock, failure and skip records, and the checks that need them (head run done, live locks)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ofa_lib import locks

if TYPE_CHECKING:  # pandas is imported where tables are built: `grid status` starts fast without it
    pass
from ofa_lib.grid.spec import TRAIN_NOTEBOOK, Grid, GridError, Run


# --------------------------------------------------------------------------- state
def lock_path(grid: Grid, run: Run) -> Path:
    return grid.state_dir / "locks" / f"{run.run_id}.lock"


def failure_path(run: Run) -> Path:
    return run.dir / "failure.json"


def run_state(grid: Grid, run: Run) -> str:
    """``done`` | ``running`` (a live lock) | ``failed`` (recorded) | ``todo``; the scheduler adds ``queued``."""
    from ofa_lib.train import training

    if training.is_done(run.cfg, run.root):
        return "done"
    if locks.holder(lock_path(grid, run)) is not None:
        return "running"
    if failure_path(run).is_file():
        return "failed"
    return "todo"


def skipped_path(grid: Grid, run: Run) -> Path:
    return grid.state_dir / "skipped" / f"{run.run_id}.json"


def wait_for_live_locks(grid: Grid, runs: list[Run], poll_s: float = 10.0) -> None:
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


def require_head(grid: Grid) -> None:
    """Before the grid runs: the head-tuning run (if any) must be done (waiting for another runner's)."""
    heads = [r for r in grid.runs if r.role == "head"]
    wait_for_live_locks(grid, heads)
    for head in heads:
        state = run_state(grid, head)
        if state != "done":
            raise GridError(f"{grid.path}: the head-tuning run {head.run_id} is {state}; the grid runs need its head "
                            f"(see {failure_path(head)} and `retry-failed`)")


# --------------------------------------------------------------------------- runs no longer in the grid
def set_aside_stale_runs(grid: Grid) -> list[str]:
    """Keep the pipeline to this grid's runs: run folders under ``runs_root`` that the grid file no longer
    plans (an edited grid, or ids from an older version of ofa) are moved to ``runs_root/.stale/``, and
    their rows (and the averages they are members of) leave the grid's results store. A folder there
    whose run the grid plans again is moved back, not retrained. Returns the ids set aside."""
    from ofa_lib import results

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
