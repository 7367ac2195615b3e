"""The plan table: one row per run with its state, from the run folders and, for SLURM grids, the scheduler."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas is imported where tables are built: `grid status` starts fast without it
    import pandas as pd
from ofa_lib.grid.slurm import slurm_states, slurm_why
from ofa_lib.grid.spec import Grid
from ofa_lib.grid.state import failure_path, run_state


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
        why = slurm_why(grid, run, job) if job and state == "todo" and job["state"] in ("GONE", "CANCELLED") else None
        if why:
            state, row["error"] = why
        row["state"] = state
        if job:
            row["job"] = job["job_id"]
        if state == "failed":
            row["error"] = json.loads(failure_path(run).read_text()).get("error", "")[:120]
        rows.append(row)
    return pd.DataFrame(rows)


def sweep_table(grid: Grid) -> "pd.DataFrame":
    """One row per finished grid run: its grid values, its best English dev score (primary metric, ×100) over
    its snapshots and the snapshot that gave it, and its last snapshot's; sorted best first. A learning-rate
    sweep reads its centre off this table (English data only, as zero-shot transfer allows)."""
    import pandas as pd

    from ofa_lib.train import runs as runs_lib

    rows = []
    for run in grid.runs:
        if run.role != "grid" or run_state(grid, run) != "done":
            continue
        curve = runs_lib.snapshot_curves(runs_lib.load_run(run.dir))["English dev"].dropna()
        row = {k: getattr(run.cfg, k) for k in grid.axes}
        row.update({"run_id": run.run_id, "best English dev": round(100 * curve.max(), 1),
                    "at snapshot": int(curve.reset_index(drop=True).idxmax()) + 1,
                    "last English dev": round(100 * curve.iloc[-1], 1)})
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("best English dev", ascending=False, kind="stable") if len(table) else table
