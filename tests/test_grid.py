"""Grid files, locks and the local backend (the SLURM backend: tests/test_grid_slurm.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ofa_lib import locks
from ofa_lib.grid import cli as grid_cli
from ofa_lib.grid import execute as grid_execute
from ofa_lib.grid import local as grid_local
from ofa_lib.grid import slurm as grid_slurm
from ofa_lib.grid import spec as grid_spec
from ofa_lib.grid import state as grid_state
from ofa_lib.grid import status as grid_status
from ofa_lib.paths import REPO_ROOT

SMOKE = REPO_ROOT / "params" / "grids" / "smoke.yaml"


def write_grid(tmp_path: Path, **changes) -> Path:
    spec = yaml.safe_load(SMOKE.read_text())
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("changes, match", [
    (dict(colour="red"), r"unknown key\(s\)"),
    (dict(task="pos"), r"field task: 'pos'"),
    (dict(grid={"learning_rate": [1e-4]}), r"field grid.learning_rate: not a 02_train parameter"),
    (dict(grid={"lr": [1e-4, 2.0]}), r"grid point \{'lr': 2.0\}.*parameter lr=2.0"),
    (dict(grid={"lr": []}), r"field grid.lr: expected a non-empty list"),
    (dict(train={"head": "init:0"}), r"field head: is set by head_tuning"),
    (dict(train={"lr": 1e-4}), r"field train.lr: is also a grid axis"),
    (dict(pipeline=[{"notebook": "09_missing.ipynb"}]), r"pipeline\[0\].notebook"),
    (dict(pipeline=[{"notebook": "03_average.ipynb", "parameters": {"r_maxx": 2}}]), r"pipeline\[0\].parameters.r_maxx"),
    (dict(resources={"slurm": {"time": "2 hours"}}), r"resources.slurm.time"),
    (dict(resources={"slurm": {"gpus": 1}}), r"resources.slurm.gpus: unknown"),
    (dict(resources={"workers": 0}), r"resources.workers"),
    (dict(name="a b"), r"field name"),
    (dict(grid=[{"lr": [1e-4]}, {"lrr": [1e-4]}]), r"field grid\[1\].lrr: not a 02_train parameter"),
    (dict(grid=[{"lr": [1e-4, 3e-4]}, {"lr": [1e-4]}]), r"field grid: points .* give the same run"),
    (dict(grid=[]), r"field grid: expected a non-empty"),
    (dict(pipeline=[{"notebook": "03_average.ipynb", "parameters": {"methods": ["uniform", "tie"]}}]),
     r"pipeline\[0\].parameters.methods: unknown merge method 'tie'"),
    (dict(pipeline=[{"notebook": "03_average.ipynb", "parameters": {"methods": {"ties": {"density": 2}}}}]),
     r"pipeline\[0\].parameters.methods.ties.density: expected 0 < density <= 1"),
    # every value that goes into a job script is checked: a newline or a quote is an error, never shell
    (dict(resources={"slurm": {"partition": "gpu\n#SBATCH --x"}}), r"resources.slurm.partition"),
    (dict(resources={"slurm": {"partition": "gpu'; rm -rf ~"}}), r"resources.slurm.partition"),
    (dict(resources={"slurm": {"account": 'a"b'}}), r"resources.slurm.account"),
    (dict(resources={"slurm": {"qos": "hi gh"}}), r"resources.slurm.qos"),
    (dict(resources={"slurm": {"time": "01:00:00\necho"}}), r"resources.slurm.time"),
    (dict(resources={"slurm": {"setup": "module load cuda\nrm -rf /"}}), r"resources.slurm.setup\[0\]"),
    (dict(resources={"slurm": {"setup": ["echo 'hi'"]}}), r"resources.slurm.setup\[0\]"),
    (dict(resources={"slurm": {"extra_args": ["--constraint=a100 --x"]}}), r"resources.slurm.extra_args\[0\]"),
    (dict(resources={"slurm": {"extra_args": ["--array=0-99"]}}), r"extra_args\[0\].*sets --array itself"),
    (dict(resources={"slurm": {"signal_before_s": -1}}), r"resources.slurm.signal_before_s"),
    (dict(pipeline=[{"notebook": "03_average.ipynb", "resources": {"gpu": 1}}]), r"pipeline\[0\].resources.gpu: unknown"),
    (dict(pipeline=[{"notebook": "03_average.ipynb", "resources": {"mem": "lots"}}]), r"pipeline\[0\].resources.mem"),
])
def test_invalid_grids_name_the_field(tmp_path, changes, match):
    path = write_grid(tmp_path, **changes)
    with pytest.raises(grid_spec.GridError, match=match) as info:
        grid_spec.load_grid(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text, match", [
    ("lr: [1e-4]\nlr: [3e-4]\n", r"duplicate key 'lr' \(first on line \d+, again on line \d+\)"),
    ("resources: 4\n", r"field resources: 4: expected a mapping"),
    ("resources:\n  slurm: gpu\n", r"field resources.slurm: 'gpu': expected a mapping"),
    ("resources:\n  workerz: 2\n", r"field resources.workerz: unknown"),
])
def test_duplicate_keys_and_malformed_resources_are_named(tmp_path, text, match):
    spec = yaml.safe_load(SMOKE.read_text())
    spec.pop("resources", None)
    grid_block = yaml.safe_dump({"grid": spec.pop("grid")})
    if text.startswith("lr:"):  # a key twice inside the grid mapping
        grid_block = "grid:\n" + "".join("  " + line + "\n" for line in text.splitlines()) + "  batch_size: [8]\n"
        text = ""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec) + grid_block + text)
    with pytest.raises(grid_spec.GridError, match=match) as info:
        grid_spec.load_grid(path)
    assert str(path) in str(info.value)


def test_missing_grid_file_lists_known_grids():
    with pytest.raises(grid_spec.GridError, match=r"not found .*'demo'.*'smoke'"):
        grid_spec.load_grid("no_such_grid")


def test_plan_head_first_and_its_head_file_in_every_grid_run(tmp_outputs):
    grid = grid_spec.load_grid("smoke")
    assert [r.role for r in grid.runs] == ["head", "grid", "grid"]
    head = grid.runs[0]
    assert head.cfg.head == "train" and head.root == grid.runs_root / "head"
    for run in grid.runs[1:]:
        assert run.cfg.head == str(head.dir.resolve() / "head.safetensors") == run.params["head"]
    assert {r.cfg.lr for r in grid.runs[1:]} == {1e-4, 3e-4}
    assert grid_spec.load_grid(SMOKE).runs[1].run_id == grid.runs[1].run_id  # stable ids
    table = grid_status.plan_table(grid, with_scheduler=False)
    assert list(table.state) == ["todo"] * 3


def test_the_estimate_counts_every_merge_method_03_evaluates(tmp_outputs):
    """`grid plan --estimate` counts 03's evaluations as plan_pass lists them: each non-uniform method adds
    one merge per distinct member set of its method_variants (a greedy soup adds none)."""
    from ofa_lib.grid import cost

    grid = grid_spec.load_grid("demo")
    step = next(s for s in grid.pipeline if s.notebook == "03_average.ipynb")

    def count(**params):
        step.parameters = {"variants": ["last", "src_dev", "ca"], "r_max": 6, "n_samplings": 3, "soup_k": 0} | params
        return cost.averaging_evaluations(grid)

    ca_sets = count(variants=["ca"])
    assert count() == 3 * ca_sets  # the uniform mean of each variant
    assert count(methods=["uniform", "task_arithmetic", "ties", "greedy_soup"], method_variants=["ca"]) \
        == 3 * ca_sets + 2 * ca_sets
    assert count(methods=["ties"], method_variants=["ca"]) == ca_sets  # no uniform asked: none counted


def test_run_ids_do_not_depend_on_where_outputs_is(tmp_path, monkeypatch):
    ids = []
    for where in ("a", "b/c"):
        monkeypatch.setenv("OFA_OUTPUTS", str(tmp_path / where))
        ids.append([r.run_id for r in grid_spec.load_grid("smoke").runs])
    assert ids[0] == ids[1] and len(set(ids[0])) == 3
    head = grid_spec.load_grid("smoke").runs[1].cfg
    assert head.identity()["head"] == "run:" + grid_spec.load_grid("smoke").runs[0].run_id
    assert head.canonical()["head"] == head.head  # the manifest keeps the real path


def test_runs_no_longer_in_the_grid_are_set_aside_and_come_back(tmp_path, tmp_outputs):
    import pandas as pd

    from ofa_lib import results

    path = write_grid(tmp_path, grid={"lr": [1e-4]})
    grid = grid_spec.load_grid(path)
    kept, stale = grid.runs[1].run_id, f"{grid.task}-0123456789ab"
    for run_id in (kept, stale):
        (grid.runs_root / run_id).mkdir(parents=True)
        (grid.runs_root / run_id / "manifest.json").write_text("{}")
    row = dict(task=grid.task, model="m", dataset="sib200", split="test", lang="deu_Latn", metric="acc", value=0.5)
    results.append(grid.results_path, pd.DataFrame([
        dict(row, run_id=kept, kind="variant", name="last"),
        dict(row, run_id=stale, kind="variant", name="last"),
        dict(row, run_id="acc_avg:last:r=2:sampling=0", kind="average", name="acc_avg:last:r=2:sampling=0",
             members=f"{kept},{stale}"),
        dict(row, run_id="acc_avg:last:r=1:sampling=0", kind="average", name="acc_avg:last:r=1:sampling=0", members=kept)]))
    assert grid_state.set_aside_stale_runs(grid) == [stale]
    assert (grid.runs_root / ".stale" / stale / "manifest.json").is_file()
    assert (grid.runs_root / kept).is_dir()
    left = results.read(grid.results_path)
    assert sorted(left.name) == ["acc_avg:last:r=1:sampling=0", "last"] and stale not in set(left.run_id)
    # the grid file grows back: the folder returns instead of being retrained
    wider = grid_spec.load_grid(write_grid(tmp_path, grid={"lr": [1e-4, 3e-4]}))
    back = wider.runs[2].run_id
    (grid.runs_root / ".stale" / back).mkdir()
    assert grid_state.set_aside_stale_runs(wider) == [] and (wider.runs_root / back).is_dir()


def test_a_list_of_products_is_their_union(tmp_path, tmp_outputs):
    grid = grid_spec.load_grid(write_grid(tmp_path, grid=[{"lr": [1e-4, 3e-4], "seed": [1]}, {"lr": [2e-4], "seed": [2, 3]}]))
    points = [(r.cfg.lr, r.cfg.seed) for r in grid.runs if r.role == "grid"]
    assert points == [(1e-4, 1), (3e-4, 1), (2e-4, 2), (2e-4, 3)]
    assert grid.axes == {"lr": [1e-4, 3e-4, 2e-4], "seed": [1, 2, 3]}
    assert list(grid_status.plan_table(grid, with_scheduler=False).columns[2:4]) == ["lr", "seed"]


def test_paper_grids_are_the_published_63_runs(tmp_outputs):
    for name, head in (("paper_nli", True), ("paper_ner", False), ("paper_tydiqa", True)):
        grid = grid_spec.load_grid(name)
        runs = [r for r in grid.runs if r.role == "grid"]
        assert len(runs) == 63 and len({r.run_id for r in runs}) == 63
        assert {r.cfg.model_name for r in runs} == {"xlm-roberta-large"}
        assert any(r.role == "head" for r in grid.runs) == head
        assert grid.slurm.gpus_per_run == 1


# --------------------------------------------------------------------------- locks
def test_lock_excludes_a_second_holder_and_is_released(tmp_path):
    path = tmp_path / "r.lock"
    first = locks.acquire(path)
    assert first is not None and locks.holder(path)["pid"] == os.getpid()
    assert locks.acquire(path) is None
    first.release()
    assert not path.exists() and locks.holder(path) is None


def test_lock_of_a_killed_process_is_stale_and_broken(tmp_path):
    path = tmp_path / "r.lock"
    code = f"from ofa_lib import locks; import os, sys; l = locks.acquire({str(path)!r}); print(l is not None, flush=True); os.kill(os.getpid(), 9)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL and proc.stdout.strip() == "True"
    assert path.exists() and locks.is_stale(path)
    lock = locks.acquire(path)
    assert lock is not None and lock.info["pid"] == os.getpid()
    lock.release()


def test_lock_on_another_host_is_stale_only_without_heartbeat(tmp_path):
    path = tmp_path / "r.lock"
    path.write_text(json.dumps({"host": socket.gethostname() + "-elsewhere", "pid": 1, "start": "0"}))
    assert not locks.is_stale(path) and locks.acquire(path) is None
    old = time.time() - locks.STALE_AFTER_S - 10
    os.utime(path, (old, old))
    assert locks.is_stale(path)
    lock = locks.acquire(path)
    assert lock is not None
    lock.release()


def test_a_requeued_slurm_job_owns_the_lock_of_its_earlier_start(tmp_path, monkeypatch):
    """Requeued (same job id, higher SLURM_RESTART_COUNT): the lock its first start left on another node is its
    own at once, not someone else's for STALE_AFTER_S; a different job's lock is not."""
    path = tmp_path / "r.lock"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    path.write_text(json.dumps({"host": "node-gone", "pid": 1, "start": "0", "job_id": "4242", "restart": 0}))
    assert not locks.is_stale(path)  # first start (restart 0) sees a live holder elsewhere
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert locks.is_stale(path)
    lock = locks.acquire(path)
    assert lock is not None and lock.info["restart"] == 1
    lock.release()
    path.write_text(json.dumps({"host": "node-gone", "pid": 1, "start": "0", "job_id": "4343", "restart": 0}))
    assert not locks.is_stale(path)


# --------------------------------------------------------------------------- SLURM job scripts (no SLURM needed)
def _dry_run(tmp_path, **slurm):
    res = {"slurm": dict({"gpus_per_run": 1, "cpus_per_task": 4, "mem": "32G", "time": "04:00:00"}, **slurm)}
    spec = {"pipeline": [{"notebook": "03_average.ipynb", "parameters": {"r_max": 2, "n_samplings": 2}},
                         {"notebook": "04_analysis.ipynb", "html": "report.html"}], "resources": res}
    grid = grid_spec.load_grid(write_grid(tmp_path, **spec))
    proc = subprocess.run([sys.executable, "-m", "ofa_lib.grid", "run", str(grid.path), "--backend", "slurm", "--dry-run"],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ, PATH="/usr/bin:/bin"))
    assert proc.returncode == 0, proc.stderr
    scripts = [Path(line.strip()) for line in proc.stdout.splitlines() if line.strip().endswith(".sh")]
    return grid, {p.name: p.read_text() for p in scripts}, proc.stdout


def test_dry_run_writes_the_scripts_a_submission_would_and_submits_nothing(tmp_outputs, tmp_path):
    grid, scripts, out = _dry_run(tmp_path, account="proj1", qos="normal", setup=["source .venv/bin/activate"],
                                  extra_args=["--constraint=a100"])
    assert "nothing submitted" in out and not grid_slurm.submissions(grid)  # PATH has no sbatch: nothing was called
    assert set(scripts) == {"head.sh", "array.sh", "step_03_average.sh", "step_04_analysis.sh"}
    assert all(str(grid.state_dir / "slurm") in line for line in out.splitlines() if line.strip().endswith(".sh"))
    for name, text in scripts.items():  # account, qos and extra args on every job; setup after cd
        assert "#SBATCH --account=proj1" in text and "#SBATCH --qos=normal" in text and "--constraint=a100" in text
        lines = text.splitlines()
        assert lines.index("source .venv/bin/activate") == lines.index(f"cd {REPO_ROOT}") + 1
    for name in ("head.sh", "array.sh"):  # training tasks: requeued when preempted, told before the time limit
        assert "#SBATCH --requeue" in scripts[name] and "#SBATCH --signal=B:USR1@300" in scripts[name]
        assert "#SBATCH --gres=gpu:1" in scripts[name]
    assert "#SBATCH --gres=gpu:1" in scripts["step_03_average.sh"]  # 03_average evaluates: a GPU job
    assert "--cpus-per-task=4" in scripts["step_03_average.sh"] and "--time=04:00:00" in scripts["step_03_average.sh"]
    assert "gres" not in scripts["step_04_analysis.sh"] and "--cpus-per-task=1" in scripts["step_04_analysis.sh"]
    assert "report " in scripts["step_04_analysis.sh"] and "--step 1" in scripts["step_04_analysis.sh"]
    assert "requeue" not in scripts["step_04_analysis.sh"]


def test_a_step_s_own_resources_win(tmp_outputs, tmp_path):
    grid = grid_spec.load_grid(write_grid(tmp_path, pipeline=[
        {"notebook": "03_average.ipynb", "resources": {"gpus": 2, "time": "1-00:00:00"}}, {"notebook": "04_analysis.ipynb"}]))
    assert grid_spec.step_resources(grid, grid.pipeline[0])["gpus"] == 2
    assert grid_spec.step_resources(grid, grid.pipeline[0])["time"] == "1-00:00:00"
    assert grid_spec.step_resources(grid, grid.pipeline[1]) == {"gpus": 0, "cpus": 1, "mem": "1G", "time": "02:00:00"}  # smoke: 1G


def test_a_half_failed_submission_cancels_what_it_queued(tmp_outputs, tmp_path, monkeypatch):
    """The second sbatch is refused: the first job is cancelled, the attempt recorded, the error says so."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "sbatch").write_text(f"#!/bin/bash\necho sbatch \"$@\" >> {calls}\n"
                                    f"if [ $(grep -c ^sbatch {calls}) -ge 2 ]; then echo 'Invalid account' >&2; exit 1; fi\n"
                                    "echo 777\n")
    (bin_dir / "scancel").write_text(f"#!/bin/bash\necho scancel \"$@\" >> {calls}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    grid = grid_spec.load_grid("smoke")
    with pytest.raises(grid_spec.GridError, match=r"half-way.*Invalid account.*cancelled the 1 job\(s\).*777"):
        grid_slurm.submit_slurm(grid)
    assert calls.read_text().splitlines()[-1] == "scancel 777"
    (record,) = grid_slurm.submissions(grid)
    assert record["cancelled"] == ["777"] and "Invalid account" in record["error"] and record["runs"] == {}


# --------------------------------------------------------------------------- failures
@pytest.mark.reliability
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA to make runs fail")
def test_failed_runs_are_recorded_and_the_rest_continue(tmp_outputs, tmp_path):
    path = write_grid(tmp_path, head_tuning=None, train={"device": "cuda", "head": "init:0"},
                      grid={"lr": [1e-4, 3e-4], "batch_size": [8], "seed": [1]})
    grid = grid_spec.load_grid(path)
    assert grid_cli.run(grid) == 1
    for run in grid.runs:  # both attempted: the second ran after the first failed
        assert grid_state.run_state(grid, run) == "failed"
        record = json.loads(grid_state.failure_path(run).read_text())
        assert "CUDA" in record["error"] or "cuda" in record["error"]
        assert record["params"]["lr"] == run.cfg.lr
        failed_nb = json.loads(Path(record["notebook"]).read_text())
        assert any(o.get("output_type") == "error" for c in failed_nb["cells"] for o in c.get("outputs", []))
    assert not (grid.reports_dir / "report.html").exists()
    summary = json.loads((grid.reports_dir / "grid_summary.json").read_text())
    assert summary["invocations"][-1]["failed"] == 2
    assert grid_cli.run(grid) == 1 and all(grid_state.run_state(grid, r) == "failed" for r in grid.runs)  # left as they are
    assert grid_cli.retry_failed(grid) == 1  # retried (and fails again); the first record is kept aside
    assert len(list(grid.runs[0].dir.glob("failure.*.json"))) == 1


@pytest.mark.reliability
# --------------------------------------------------------------------------- local backend, killed and resumed
def test_local_grid_killed_with_sigkill_resumes_to_the_same_report(tmp_outputs):
    """Kill the runner (SIGKILL, main process only) during a grid run's training: its pool worker and
    kernel die with it; nothing looks done that is not; a re-run trains only what is missing."""
    grid = grid_spec.load_grid("smoke")
    env = dict(os.environ, OFA_OUTPUTS=str(tmp_outputs))
    proc = subprocess.Popen([sys.executable, "-m", "ofa_lib.grid", "run", "smoke"], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = grid.runs[1]
    deadline = time.time() + 300
    while not (victim.dir / "resume" / "state.safetensors").exists():  # killed after its first snapshot
        assert proc.poll() is None, "the grid finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # the worker (PR_SET_PDEATHSIG) and the kernel (parent poller) follow
    assert grid_state.run_state(grid, grid.runs[0]) == "done"
    assert grid_state.run_state(grid, victim) == "todo"  # its lock is stale, its manifest says running
    assert json.loads((victim.dir / "manifest.json").read_text())["status"] == "running"
    assert not (grid.reports_dir / "report.html").exists()
    head_mtime = (grid.runs[0].dir / "manifest.json").stat().st_mtime

    assert grid_cli.run(grid) == 0
    assert all(grid_state.run_state(grid, r) == "done" for r in grid.runs)
    assert (grid.runs[0].dir / "manifest.json").stat().st_mtime == head_mtime  # not trained again
    html = (grid.reports_dir / "report.html").read_text()
    assert "Table 1" in html and "<script src=" not in html
    assert (grid.reports_dir / "table1.csv").is_file()
    # the smoke grid's 03_average merges with 5 methods: rows for each, and 04's merge-methods table
    from ofa_lib import results

    store = results.read(grid.results_path)
    merged = store[store["kind"] == "average"]
    assert {m.split("(")[0] for m in merged["method"]} == {"uniform", "task_arithmetic", "ties", "dare_ties", "greedy_soup"}
    import pandas as pd

    table = pd.read_csv(grid.reports_dir / "merge_methods.csv")
    assert len({m for m in table["method"] if not m.startswith("max_")}) >= 4
    assert {"max_src_dev", "max_trg_dev"} <= set(table["method"]) and (grid.reports_dir / "merge_methods.png").is_file()
    summary = json.loads((grid.reports_dir / "grid_summary.json").read_text())
    assert summary["runs"] == 3 and summary["invocations"][-1]["trained"] == 2
    plan = subprocess.run([sys.executable, "-m", "ofa_lib.grid", "status", "smoke"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True).stdout
    assert plan.count(" done") == 3


# --------------------------------------------------------------------------- nothing hangs, runners that meet
def _stop_kernel_at_step(run_dir: Path, step: int, stopped: dict, deadline_s: float = 900) -> None:
    """SIGSTOP the kernel training in ``run_dir`` once its progress file says ``step``."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        for file in run_dir.glob(".02_train.*.progress.json"):
            try:
                info = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
            if (info.get("step") or 0) >= step:
                os.kill(info["pid"], signal.SIGSTOP)
                stopped.update(info, at=time.time())
                return
        time.sleep(0.1)


@pytest.mark.reliability
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_stopped_kernel_is_given_up_and_the_grid_goes_on(tmp_outputs, tmp_path):
    """A kernel that stops (SIGSTOP) while its lock heartbeat thread keeps beating: after stall_timeout s
    without progress it is killed, the run recorded failed with the reason, its lock released; the next run trains."""
    import threading

    stall = 60
    path = write_grid(tmp_path, head_tuning=None, train={"head": "init:0"},
                      grid={"lr": [1e-4, 3e-4], "batch_size": [8], "seed": [1]},
                      resources={"workers": 1, "stall_timeout": stall})
    grid = grid_spec.load_grid(path)
    victim, other = grid.runs
    stopped: dict = {}
    watcher = threading.Thread(target=_stop_kernel_at_step, args=(victim.dir, 2, stopped), daemon=True)
    watcher.start()
    assert grid_cli.run(grid) == 1
    ended = time.time()
    watcher.join(1)
    assert stopped, "the victim's kernel was never stopped"
    record = json.loads(grid_state.failure_path(victim).read_text())
    assert re.fullmatch(rf"stalled: no progress for \d+ s at step {stopped['step']} \((training|scoring snapshot \d+/\d+)\) "
                        rf"\(resources.stall_timeout={stall}\)", record["error"]), record["error"]
    assert grid_state.run_state(grid, victim) == "failed" and locks.holder(grid_state.lock_path(grid, victim)) is None
    assert grid_state.run_state(grid, other) == "done"
    state = Path(f"/proc/{stopped['pid']}/stat")
    assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # the kernel is dead
    print(f"stopped at step {stopped['step']}; given up and the grid finished {ended - stopped['at']:.0f} s later")


def test_timeouts_are_validated(tmp_path):
    for value in (0, -5, "an hour", True):
        with pytest.raises(grid_spec.GridError, match=r"resources.stall_timeout: .*positive number of seconds"):
            grid_spec.load_grid(write_grid(tmp_path, resources={"stall_timeout": value}))
    grid = grid_spec.load_grid(write_grid(tmp_path, resources={"stall_timeout": None, "run_timeout": 3600}))
    assert grid.stall_timeout is None and grid.run_timeout == 3600.0
    assert grid_spec.load_grid(SMOKE).stall_timeout == grid_spec.STALL_TIMEOUT_S


def test_a_pipeline_notebook_past_its_run_timeout_is_killed_and_named(tmp_path):
    out = tmp_path / "reports" / "03_average.ipynb"
    start = time.time()
    with pytest.raises(grid_execute.Stalled, match=r"03_average.ipynb: timed out: still running after \d+ s .*run_timeout=0.5"):
        grid_execute.execute_notebook("03_average.ipynb", out, {"task": "sib", "runs_root": str(tmp_path / "none")},
                           run_timeout=0.5)
    assert time.time() - start < 60
    assert (out.parent / "03_average.failed.ipynb").is_file() and not list(out.parent.glob(".*"))


def test_kernels_started_together_in_one_folder_talk_over_private_ipc_sockets(tmp_path):
    """A SLURM job array starts several kernels at once in notebooks/: each gets its own IPC socket folder (no
    TCP port on a shared node, no ipykernel warning about one, no two kernels on one socket), removed after."""
    code = ("import sys; from pathlib import Path; from ofa_lib.grid import execute\n"
            "try:\n"
            "    execute.execute_notebook('03_average.ipynb', Path(sys.argv[1]) / '03_average.ipynb',\n"
            "                             {'task': 'sib', 'runs_root': sys.argv[1] + '/none'})\n"
            "except Exception as exc:\n"
            "    print('ERROR', type(exc).__name__, exc)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / str(i))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        # both kernels ran the first cells and failed on the missing runs, not on their sockets
        assert "ERROR PapermillExecutionError" in out and "runs_root" in out, out + err
        assert "without encryption" not in err and "Invalid Signature" not in err
    with grid_execute.kernel_config() as config:
        folder = Path(config.KernelManager.ip).parent
        assert config.KernelManager.transport == "ipc" and folder.is_dir() and folder.stat().st_mode & 0o077 == 0
    assert not folder.exists()


def test_sweep_lists_the_best_english_dev_of_each_finished_run(tmp_path, tmp_outputs, capsys):
    """`grid sweep`: a learning-rate sweep's table, English dev only, best first; unfinished runs left out."""
    from ofa_lib.train import runs as runs_lib
    from ofa_lib.train import training

    path = write_grid(tmp_path, head_tuning=None, train={"head": "init:0", "train_subsample": 24, "dev_subsample": 8,
                                                         "test_subsample": 8, "target_langs": {"xnli": ["de"]}})
    grid = grid_spec.load_grid(path)
    assert grid_cli.main(["sweep", str(path)]) == 1 and "no finished runs yet" in capsys.readouterr().out
    training.run_training(grid.runs[0].cfg, grid.runs_root, progress=False)
    table = grid_status.sweep_table(grid)
    curve = runs_lib.snapshot_curves(runs_lib.load_run(grid.runs[0].dir))["English dev"]
    assert list(table["run_id"]) == [grid.runs[0].run_id] and table["lr"].iloc[0] == grid.runs[0].cfg.lr
    assert table["best English dev"].iloc[0] == round(100 * curve.max(), 1)
    assert table["last English dev"].iloc[0] == round(100 * curve.iloc[-1], 1)
    assert 1 <= table["at snapshot"].iloc[0] <= grid.runs[0].cfg.num_snapshots
    assert grid_cli.main(["sweep", str(path)]) == 0 and grid.runs[0].run_id in capsys.readouterr().out


def test_report_steps_take_a_lock(tmp_outputs, capsys):
    """A second runner reaching the report while another makes it does not run the pipeline again."""
    grid = grid_spec.load_grid("smoke")
    held = locks.acquire(grid.state_dir / "locks" / "report.lock")
    try:
        assert grid_execute.report(grid, partial=True) == []
    finally:
        held.release()
    assert "being made by another runner" in capsys.readouterr().out
    assert not grid.reports_dir.exists()


def test_temp_notebooks_are_unique_per_process_and_litter_is_cleaned(tmp_path):
    out = tmp_path / "run" / "02_train.ipynb"
    mine = grid_execute.temp_notebook(out)
    assert str(os.getpid()) in mine.name and mine.name.startswith(".02_train.") and mine.name.endswith(".tmp.ipynb")
    out.parent.mkdir()
    litter = [out.with_name(".02_train.tmp.ipynb"), out.with_name(".02_train.otherhost-123.tmp.ipynb"),
              out.with_name(".02_train.123.progress.json")]
    for path in litter + [out.with_name("02_train.failed.ipynb")]:
        path.write_text("{}")
    assert sorted(grid_execute.clean_temp_notebooks(out)) == sorted(litter)
    assert [p.name for p in out.parent.iterdir()] == ["02_train.failed.ipynb"]


def test_a_runner_does_not_wait_forever_for_a_stuck_one(tmp_path, tmp_outputs, capsys):
    """Another runner holds a run (a live lock) but its kernel proves no progress: after twice
    stall_timeout the waiting runner goes on instead of waiting with it."""
    grid = grid_spec.load_grid(write_grid(tmp_path, head_tuning=None, train={"head": "init:0"}, resources={"stall_timeout": 1}))
    run = grid.runs[0]
    held = locks.acquire(grid_state.lock_path(grid, run))  # live: this process holds it
    run.dir.mkdir(parents=True)
    (run.dir / ".02_train.999.progress.json").write_text('{"step": 3}')
    start = time.time()
    try:
        grid_state.wait_for_live_locks(grid, [run], poll_s=0.2)
    finally:
        held.release()
    assert time.time() - start < 10 and "not waiting for it" in capsys.readouterr().out


def test_the_grid_bar_shows_what_running_runs_report(tmp_path, tmp_outputs):
    """The local runner's bar names each running run's step of its total (its kernel's progress beats)."""
    grid = grid_spec.load_grid(write_grid(tmp_path, head_tuning=None, train={"head": "init:0"}))
    started, waiting = grid.runs[0], grid.runs[1]
    started.dir.mkdir(parents=True)
    (started.dir / ".02_train.999.progress.json").write_text(
        json.dumps({"pid": 1, "step": 34, "total": 88, "what": "training", "time": time.time()}))
    assert grid_local.running_progress([started, waiting]) == f"{started.label}: step 34/88 (training)"
    waiting.dir.mkdir(parents=True)
    (waiting.dir / ".02_train.vm-1.tmp.ipynb").write_text("{}")  # its kernel is starting: no beat yet
    assert grid_local.running_progress([waiting]) == f"{waiting.label}: starting"
    (started.dir / ".02_train.999.progress.json").write_text(json.dumps({"pid": 1, "step": None, "what": "featurizing"}))
    assert grid_local.running_progress([started]).endswith("featurizing")


def test_progress_beats_carry_the_total_for_the_runner(tmp_path, monkeypatch):
    from ofa_lib import progress

    monkeypatch.setenv(progress.ENV, str(tmp_path / "p.json"))
    monkeypatch.setattr(progress, "_state", {"step": None, "total": None, "what": "", "written": 0.0})
    progress.beat(step=5, what="training", total=20)
    assert progress.describe(progress.read(tmp_path / "p.json")) == "step 5/20 (training)"
    progress.beat(what="scoring snapshot 1/10")  # a new `what` is written at once
    assert progress.describe(progress.read(tmp_path / "p.json")) == "step 5/20 (scoring snapshot 1/10)"


@pytest.mark.reliability
@pytest.mark.slow
def test_sigterm_stops_a_local_grid_gracefully_and_the_rerun_finishes_it(tmp_outputs):
    """SIGTERM to `grid run` during a run's training: within 60 s the runner exits (130) with that run's resume
    state written and its lock released, no kernel left; the re-run resumes it and trains nothing twice."""
    grid = grid_spec.load_grid("smoke")
    env = dict(os.environ, OFA_OUTPUTS=str(tmp_outputs))
    proc = subprocess.Popen([sys.executable, "-m", "ofa_lib.grid", "run", "smoke"], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = grid.runs[1]
    deadline = time.time() + 300
    while not (victim.dir / "resume").exists():  # in training, after its first snapshot
        assert proc.poll() is None, "the grid finished before it could be stopped"
        assert time.time() < deadline
        time.sleep(0.2)
    children = grid_execute.child_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    out, _ = proc.communicate(timeout=90)
    stopped_s = time.time() - t0
    assert proc.returncode == 130 and stopped_s < 60, (proc.returncode, stopped_s, out[-2000:])
    assert "stopping" in out

    def alive() -> list[str]:  # a zombie is gone too: it only waits to be reaped
        return [f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}" for pid in children
                if Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"]

    while alive() and time.time() < t0 + 60:  # workers and kernels are gone within the 60 s of the stop
        time.sleep(0.5)
    assert not alive(), alive()
    assert locks.holder(grid_state.lock_path(grid, victim)) is None and not grid_state.failure_path(victim).exists()
    manifest = json.loads((victim.dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "SIGTERM" in manifest["error"]
    assert grid_state.run_state(grid, victim) == "todo" and (victim.dir / "resume").exists()
    head_mtime = (grid.runs[0].dir / "manifest.json").stat().st_mtime

    assert grid_cli.run(grid) == 0
    assert all(grid_state.run_state(grid, r) == "done" for r in grid.runs)
    assert (grid.runs[0].dir / "manifest.json").stat().st_mtime == head_mtime
    assert "resuming run" in (victim.dir / "02_train.ipynb").read_text()
