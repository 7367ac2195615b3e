"""``python -m ofa_lib.grid`` / ``ofa-grid``: plan, run, status, report, retry-failed and the cost estimate."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ofa_lib.data import catalog, locate
from ofa_lib.io import write_json

if TYPE_CHECKING:  # pandas is imported where tables are built: `grid status` starts fast without it
    import pandas as pd
from ofa_lib.grid.execute import Outcome, report, run_task
from ofa_lib.grid.local import run_local, summary_table
from ofa_lib.grid.slurm import submit_slurm, wait_slurm
from ofa_lib.grid.spec import Grid, GridError, data_sets, load_grid
from ofa_lib.grid.state import failure_path, run_state, set_aside_stale_runs
from ofa_lib.grid.status import plan_table, sweep_table


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
    summary = summary_table(grid, outcomes, submitted)
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
    """``plan --estimate``: :func:`ofa_lib.grid.cost.estimate` of the grid, formatted (paper grids: next to the
    authors' figures)."""
    from ofa_lib.grid import cost

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
                        ("report", "run the pipeline notebooks and render the reports"),
                        ("sweep", "best English dev per finished run, best first (a learning-rate sweep)"),
                        ("run-one", argparse.SUPPRESS)):
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
                           help="also print the time and bytes the grid costs (ofa_lib.grid.cost; measured throughputs)")
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
    except (GridError, catalog.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    # before anything is planned or trained: every data set must be readable now (mirror or hub), else one
    # error names what is missing and the `ofa-data fetch` command (file checks only: seconds)
    locate.require(data_sets(grid))
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
    if args.command == "sweep":
        import pandas as pd

        table = sweep_table(grid)
        if table.empty:
            print(f"no finished runs yet: python -m ofa_lib.grid run {grid.path} --no-report")
            return 1
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(table.to_string(index=False))
        return 0
    if args.command == "report":
        for path in report(grid, partial=args.partial, step=args.step):
            print(f"wrote {path}")
        return 0
    run_id = args.run_id or json.loads(Path(args.list).read_text())[args.index]
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or None
    return run_task(grid, grid.run(run_id), threads=threads)


if __name__ == "__main__":
    raise SystemExit(main())
