"""The smoke grid through the ``slurm`` backend on a real one-node SLURM cluster (127.0.0.1).

Skipped, with the reason, where SLURM cannot be started (see ``ofa_lib.slurm_cluster.available``);
``.ci/run`` installs Debian's packages so that CI executes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from ofa_lib import slurm_cluster
from ofa_lib.grid import cli as grid_cli
from ofa_lib.grid import slurm as grid_slurm
from ofa_lib.grid import spec as grid_spec
from ofa_lib.grid import state as grid_state
from ofa_lib.grid import status as grid_status
from ofa_lib.paths import REPO_ROOT

pytestmark = pytest.mark.reliability  # make test-reliability: a real one-node SLURM


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    for cluster in slurm_cluster.pytest_cluster(tmp_path / "slurm"):
        for key, value in cluster.client_env().items():
            if key.startswith("SLURM"):
                monkeypatch.setenv(key, value)
        yield cluster


def test_smoke_grid_runs_as_a_slurm_job_array(slurm, tmp_outputs):
    grid = grid_spec.load_grid("smoke")
    start = time.time()
    assert grid_cli.run(grid, backend="slurm", wait=True) == 0
    seconds = time.time() - start

    record = grid_slurm.submissions(grid)[-1]
    assert record["head_job"] and record["array_job"] and record["report_job"]
    for run in grid.runs:
        assert grid_state.run_state(grid, run) == "done", (run.run_id, list(run.dir.glob("*")))
        manifest = json.loads((run.dir / "manifest.json").read_text())
        assert manifest["environment"]["slurm_job_id"] == record["runs"][run.run_id]  # job id in the manifest
    array = slurm_cluster.job_states(slurm, record["array_job"])
    assert sorted(array.values()) == ["COMPLETED", "COMPLETED"], array
    assert slurm_cluster.job_states(slurm, record["report_job"]) == {record["report_job"]: "COMPLETED"}
    html = grid.reports_dir / "report.html"
    assert html.is_file() and "Table 1" in html.read_text()

    status = subprocess.run([sys.executable, "-m", "ofa_lib.grid", "status", "smoke"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert status.count(" done") == 3 and record["array_job"] + "_1" in status
    steps = record["step_jobs"]  # one job per pipeline step, each finished
    assert list(steps) == ["03_average", "04_analysis"] and record["report_job"] == steps["03_average"]
    for job in steps.values():
        assert slurm_cluster.job_states(slurm, job) == {job: "COMPLETED"}
    # a second submission has nothing to train: only the pipeline jobs (cancelled: they would repeat the report)
    again = grid_slurm.submit_slurm(grid)
    assert again["head_job"] is None and again["array_job"] is None and again["report_job"]
    assert set(grid_slurm.squeue(list(again["step_jobs"].values()))) == set(again["step_jobs"].values())
    slurm.run("scancel", *again["step_jobs"].values())
    print(f"smoke grid on SLURM: {seconds:.0f} s")


def test_slurm_status_reads_the_scheduler(slurm, tmp_outputs):
    """A submitted run shows the scheduler's state (queued/running) and its job id before it is done."""
    grid = grid_spec.load_grid("smoke")
    slurm.run("scontrol", "update", f"NodeName={slurm.node}", "State=DRAIN", "Reason=test")  # nothing can start
    record = grid_slurm.submit_slurm(grid)
    table = grid_status.plan_table(grid)
    head = grid.runs[0]
    assert table.set_index("run_id").loc[head.run_id, "state"] == "queued"
    assert table.set_index("run_id").loc[head.run_id, "job"] == record["head_job"]
    ids = [record[k] for k in ("head_job", "array_job")] + list(record["step_jobs"].values())
    slurm.run("scancel", *ids)
    deadline = time.time() + 30
    while grid_slurm.squeue(ids) and time.time() < deadline:
        time.sleep(0.5)
    assert not grid_slurm.squeue(ids)
    assert set(grid_status.plan_table(grid).state) == {"todo"}


def _grid_file(tmp_path, **changes):
    import yaml

    spec = yaml.safe_load((REPO_ROOT / "params" / "grids" / "smoke.yaml").read_text())
    spec.update(changes)
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    return grid_spec.load_grid(path)


def _wait_gone(ids, timeout_s=120):
    deadline = time.time() + timeout_s
    while grid_slurm.squeue(ids) and time.time() < deadline:
        time.sleep(0.5)
    assert not grid_slurm.squeue(ids), grid_slurm.squeue(ids)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA to make the head fail")
def test_a_failed_head_job_cancels_its_dependents_and_status_says_why(slurm, tmp_outputs, tmp_path):
    grid = _grid_file(tmp_path, train={"top_k": 2, "device": "cuda"})  # fails in the first cell: no CUDA here
    record = grid_slurm.submit_slurm(grid)
    ids = [record["head_job"], record["array_job"], *record["step_jobs"].values()]
    _wait_gone(ids)
    assert slurm_cluster.job_states(slurm, record["head_job"]) == {record["head_job"]: "FAILED"}
    assert set(slurm_cluster.job_states(slurm, record["array_job"]).values()) == {"CANCELLED"}
    for job in record["step_jobs"].values():
        assert slurm_cluster.job_states(slurm, job) == {job: "CANCELLED"}
    table = grid_status.plan_table(grid).set_index("run_id")
    head = grid.runs[0]
    assert table.loc[head.run_id, "state"] == "failed" and "DeviceError" in table.loc[head.run_id, "error"]
    for run in grid.runs[1:]:
        assert table.loc[run.run_id, "state"] == "cancelled"
        assert f"head-tuning run {head.run_id} failed" in table.loc[run.run_id, "error"]


def test_a_task_that_finds_its_run_held_is_reported_as_skipped(slurm, tmp_outputs, tmp_path):
    from ofa_lib import locks

    grid = _grid_file(tmp_path, head_tuning=None, grid={"lr": [1.0e-4], "batch_size": [8], "seed": [1]},
                      train={"top_k": 2, "head": "init:0"})
    (run,) = grid.runs
    # submitted while free (submission leaves out runs already held), then held by this live process before
    # the task has even imported the package
    record = grid_slurm.submit_slurm(grid)
    held = locks.acquire(grid_state.lock_path(grid, run))
    try:
        _wait_gone([record["array_job"]])
        slurm.run("scancel", *record["step_jobs"].values())
        row = grid_status.plan_table(grid).set_index("run_id").loc[run.run_id]
        assert row["state"] == "running"  # still held: the holder is alive
    finally:
        held.release()
    row = grid_status.plan_table(grid).set_index("run_id").loc[run.run_id]
    assert row["state"] == "skipped" and f"pid {held.info['pid']}" in row["error"], row.to_dict()
    status = subprocess.run([sys.executable, "-m", "ofa_lib.grid", "status", str(grid.path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert "skipped" in status


def test_scontrol_requeue_of_a_running_task_resumes_from_its_state(slurm, tmp_outputs, tmp_path):
    """A running smoke task is requeued (as preemption does): SIGTERM reaches its training loop, which writes its
    resume state and stops; the requeued task resumes from that state and finishes with exactly the metrics of
    an uninterrupted run."""
    import pandas as pd

    from ofa_lib.models import ckpt_io
    from ofa_lib.train import runs as runs_lib
    from ofa_lib.train import training

    grid = _grid_file(tmp_path, head_tuning=None, grid={"lr": [1.0e-4], "batch_size": [8], "seed": [1]},
                      train={"top_k": 2, "head": "init:0", "epochs": 30, "num_snapshots": 3}, pipeline=[
                          {"notebook": "04_analysis.ipynb", "parameters": {"sampling_seeds": "all"}}])
    (run,) = grid.runs
    record = grid_slurm.submit_slurm(grid)
    task = record["runs"][run.run_id]
    deadline = time.time() + 240
    while time.time() < deadline:  # training has started once a snapshot's resume state or a device is recorded
        manifest = runs_lib.read_manifest(run.dir, missing_ok=True) or {}
        if manifest.get("device") and manifest.get("status") == "running":
            break
        time.sleep(0.5)
    assert manifest.get("status") == "running", manifest
    time.sleep(3)
    slurm.run("scontrol", "requeue", task)
    _wait_gone([record["array_job"]], timeout_s=600)
    assert grid_state.run_state(grid, run) == "done", list(run.dir.iterdir())
    notebook = (run.dir / "02_train.ipynb").read_text()
    assert "resuming run" in notebook  # the second start resumed, not retrained
    assert not grid_state.failure_path(run).exists()
    slurm.run("scancel", *record["step_jobs"].values(), check=False)

    # the reference on the task's thread count (cpus_per_task): CPU kernels split their sums by thread, so a
    # reference on this process's threads differs in rounding (that, not the resume, was the 0.5 vs 0.4375)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(grid.slurm.cpus_per_task)
    try:
        reference = training.run_training(run.cfg, tmp_path / "reference", progress=False)
    finally:
        torch.set_num_threads(before)
    assert json.loads((run.dir / "manifest.json").read_text())["environment"]["threads"] == grid.slurm.cpus_per_task
    ours = pd.read_parquet(run.dir / "metrics.parquet").sort_values(["kind", "name", "dataset", "lang", "split", "metric"])
    ref = pd.read_parquet(reference / "metrics.parquet").sort_values(["kind", "name", "dataset", "lang", "split", "metric"])
    assert ours.value.tolist() == ref.value.tolist()
    for name in ("last", "ca", "src_dev", "trg_dev"):  # the weights too, tensor for tensor (file bytes differ:
        # safetensors writes its metadata in a per-process order)
        a = ckpt_io.load_checkpoint(run.dir / "checkpoints" / f"{name}.safetensors")
        b = ckpt_io.load_checkpoint(reference / "checkpoints" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
