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

from ofa_lib import grid as G
from ofa_lib import slurm_cluster
from ofa_lib.paths import REPO_ROOT


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    for cluster in slurm_cluster.pytest_cluster(tmp_path / "slurm"):
        for key, value in cluster.client_env().items():
            if key.startswith("SLURM"):
                monkeypatch.setenv(key, value)
        yield cluster


def test_smoke_grid_runs_as_a_slurm_job_array(slurm, tmp_outputs):
    grid = G.load_grid("smoke")
    start = time.time()
    assert G.run(grid, backend="slurm", wait=True) == 0
    seconds = time.time() - start

    record = G.submissions(grid)[-1]
    assert record["head_job"] and record["array_job"] and record["report_job"]
    for run in grid.runs:
        assert G.run_state(grid, run) == "done", (run.run_id, list(run.dir.glob("*")))
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
    # a second submission has nothing to train: only the report job (cancelled: it would repeat the report)
    again = G.submit_slurm(grid)
    assert again["head_job"] is None and again["array_job"] is None and again["report_job"]
    assert set(G.squeue([again["report_job"]])) == {again["report_job"]}
    slurm.run("scancel", again["report_job"])
    print(f"smoke grid on SLURM: {seconds:.0f} s")


def test_slurm_status_reads_the_scheduler(slurm, tmp_outputs):
    """A submitted run shows the scheduler's state (queued/running) and its job id before it is done."""
    grid = G.load_grid("smoke")
    slurm.run("scontrol", "update", f"NodeName={slurm.node}", "State=DRAIN", "Reason=test")  # nothing can start
    record = G.submit_slurm(grid)
    table = G.plan_table(grid)
    head = grid.runs[0]
    assert table.set_index("run_id").loc[head.run_id, "state"] == "queued"
    assert table.set_index("run_id").loc[head.run_id, "job"] == record["head_job"]
    ids = [record[k] for k in ("head_job", "array_job", "report_job")]
    slurm.run("scancel", *ids)
    deadline = time.time() + 30
    while G.squeue(ids) and time.time() < deadline:
        time.sleep(0.5)
    assert not G.squeue(ids)
    assert set(G.plan_table(grid).state) == {"todo"}
