"""A real one-node SLURM cluster (munged + slurmctld + slurmd) under a temp directory.

Skipped, with the reason, where SLURM cannot be started (not root, binaries missing); CI installs
the Debian packages first (`python -m ofa_lib.slurm_cluster install`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ofa_lib import slurm_cluster as sc

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.reliability  # make test-reliability: a real one-node SLURM


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from sc.pytest_cluster(tmp_path_factory.mktemp("slurm"))


def _job_procs(job_id: str) -> list[int]:
    """Processes whose environment says they belong to SLURM job ``job_id``."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and sc._env_of(int(p.name)).get("SLURM_JOB_ID") == job_id:
            found.append(int(p.name))
    return found


def test_job_array_runs_writes_files_and_reports_states(slurm, tmp_path):
    script = tmp_path / "task.sh"
    script.write_text(
        "#!/bin/bash\n"
        'echo "array=$SLURM_ARRAY_JOB_ID task=$SLURM_ARRAY_TASK_ID node=$SLURMD_NODENAME" '
        '> "out_$SLURM_ARRAY_TASK_ID.txt"\n'
        'exit $(( SLURM_ARRAY_TASK_ID == 2 ? 3 : 0 ))\n'  # task 2 fails: the scheduler must say so
    )
    t0 = time.monotonic()
    job = slurm.run("sbatch", "--parsable", "--array=0-2", "--time=00:05:00", "--cpus-per-task=1",
                    "-o", "log_%A_%a.txt", str(script), cwd=tmp_path).stdout.strip()
    assert job.isdigit(), job
    states = sc.wait_jobs(slurm, job, timeout_s=60)
    elapsed = time.monotonic() - t0
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED", f"{job}_2": "FAILED"}, states
    for i in range(3):
        assert (tmp_path / f"out_{i}.txt").read_text().split() == [f"array={job}", f"task={i}", f"node={slurm.node}"]
        assert (tmp_path / f"log_{job}_{i}.txt").exists()
    shown = slurm.run("scontrol", "show", "job", f"{job}_2").stdout
    assert "JobState=FAILED" in shown and "ExitCode=3:0" in shown, shown
    # no slurmdbd: sacct cannot work; the job-completion log has every task instead
    sacct = slurm.run("sacct", "-j", job, check=False)
    assert sacct.returncode != 0 or "accounting storage is disabled" in (sacct.stdout + sacct.stderr).lower()
    done = [ln for ln in Path(slurm.logs["jobcomp"]).read_text().splitlines() if f"ArrayJobId={job} " in ln]
    assert sorted(ln.split("JobState=")[1].split()[0] for ln in done) == ["COMPLETED", "COMPLETED", "FAILED"]
    print(f"3-task array finished in {elapsed:.1f} s")


def test_scancel_kills_a_running_job(slurm, tmp_path):
    job = slurm.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "touch started; sleep 300",
                    cwd=tmp_path).stdout.strip()
    deadline = time.monotonic() + 30
    while sc.job_states(slurm, job).get(job) != "RUNNING" or not (tmp_path / "started").exists():
        assert time.monotonic() < deadline, sc.job_states(slurm, job)
        time.sleep(0.2)
    assert _job_procs(job), "the running job has no processes"
    slurm.run("scancel", job)
    assert sc.wait_jobs(slurm, job, timeout_s=30) == {job: "CANCELLED"}
    deadline = time.monotonic() + 10
    while _job_procs(job):
        assert time.monotonic() < deadline, f"job {job} processes survive scancel: {_job_procs(job)}"
        time.sleep(0.2)


def test_impossible_requests_are_rejected_at_submit(slurm, tmp_path):
    """No GRES exist here: a GPU request fails at once (so does asking for more CPUs/memory than the node has)."""
    for opts, message in [(["--gres=gpu:1"], "Invalid generic resource"),
                          ([f"--cpus-per-task={slurm.cpus + 1}"], "More processors requested than permitted"),
                          ([f"--mem={slurm.real_memory_mb + 1024}M"], "Memory specification can not be satisfied"),
                          (["--partition=nope"], "invalid partition")]:
        res = slurm.run("sbatch", *opts, "--wrap", "true", cwd=tmp_path, check=False)
        assert res.returncode != 0 and message.lower() in res.stderr.lower(), (opts, res.stderr)


def test_cli_status_and_idempotent_stop_leave_no_daemons(tmp_path):
    ok, reason = sc.available()
    if not ok:
        pytest.skip(f"no local SLURM cluster: {reason}")
    deep = tmp_path / ("d" * 40) / "slurm"  # too deep for AF_UNIX sockets: run dir moves to a short path
    c = sc.start(deep)
    try:
        assert len(c.run_dir) <= sc._MAX_RUN_DIR and Path(c.run_dir).is_dir()
        assert {"SLURM_CONF": str(deep / "slurm.conf")} == c.env
        cli = [sys.executable, "-m", "ofa_lib.slurm_cluster"]
        res = subprocess.run([*cli, "status", "--dir", str(deep)], capture_output=True, text=True, cwd=REPO,
                             timeout=60, check=True)
        assert '"node_state": "idle"' in res.stdout and '"slurmd": true' in res.stdout, res.stdout
        with pytest.raises(sc.SlurmClusterError, match="already running"):
            sc.start(deep)
        subprocess.run([*cli, "stop", "--dir", str(deep)], cwd=REPO, timeout=60, check=True)
    finally:
        sc.stop(c)  # idempotent: also reaps the daemons (children of this process)
    assert not any(sc._alive(pid, sc._marker(c, name)) for name, pid in c.pids.items())
    assert not Path(c.run_dir).exists()
    assert sc.status(deep)["alive"] == {"munged": False, "slurmctld": False, "slurmd": False}
    sc.stop(deep)
    sc.stop(tmp_path / "never-started")


def test_unavailable_reasons_and_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(sc.os, "geteuid", lambda: 1000)
    ok, reason = sc.available()
    assert not ok and "root" in reason
    with pytest.raises(sc.SlurmClusterError, match="root"):
        sc.start(tmp_path)
    monkeypatch.delenv(sc.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no local SLURM cluster: .*root"):
        next(sc.pytest_cluster(tmp_path))
    monkeypatch.setenv(sc.REQUIRE_ENV, "1")  # CI: a missing SLURM fails the test instead
    with pytest.raises(pytest.fail.Exception, match="OFA_REQUIRE_SLURM=1 but no local SLURM cluster"):
        next(sc.pytest_cluster(tmp_path))
    monkeypatch.setattr(sc.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sc.shutil, "which", lambda name, path=None: None)
    ok, reason = sc.available()
    assert not ok and "slurmctld" in reason and "ofa_lib.slurm_cluster install" in reason


def test_ensure_installed_is_a_noop_when_present_and_refuses_without_root(monkeypatch):
    calls = []
    monkeypatch.setattr(sc, "missing_binaries", lambda: [])
    monkeypatch.setattr(sc.subprocess, "run", lambda *a, **k: calls.append(a))
    sc.ensure_installed()
    assert calls == []
    monkeypatch.setattr(sc, "missing_binaries", lambda: ["slurmd"])
    monkeypatch.setattr(sc.os, "geteuid", lambda: 1000)
    with pytest.raises(sc.SlurmClusterError, match="not root"):
        sc.ensure_installed()


def test_ensure_installed_times_out_with_a_clear_error(monkeypatch):
    """No network: apt-get must not hang; the error says what timed out."""
    monkeypatch.setattr(sc, "missing_binaries", lambda: ["slurmd"])
    monkeypatch.setattr(sc.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sc.shutil, "which", lambda name, path=None: f"/usr/bin/{name}")

    def hang(argv, timeout=None, **kwargs):
        raise subprocess.TimeoutExpired(argv, timeout)

    monkeypatch.setattr(sc.subprocess, "run", hang)
    with pytest.raises(sc.SlurmClusterError, match="timed out after 5 s"):
        sc.ensure_installed(timeout_s=5)
