"""The SLURM backend: job scripts (validated values only), submission as one array plus a job per pipeline step, requeue and signals, and the scheduler's view of a grid."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ofa_lib import locks
from ofa_lib.io import write_json, write_text
from ofa_lib.paths import REPO_ROOT, outputs_dir

if TYPE_CHECKING:  # pandas is imported where tables are built: `grid status` starts fast without it
    pass
from ofa_lib.grid.spec import Grid, GridError, Run, Step, step_resources
from ofa_lib.grid.state import failure_path, run_state, skipped_path


def slurm_why(grid: Grid, run: Run, job: dict[str, str]) -> tuple[str, str] | None:
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
