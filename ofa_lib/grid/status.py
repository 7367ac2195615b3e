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
