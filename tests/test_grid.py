"""Grid files, locks and the local backend (the SLURM backend: tests/test_grid_slurm.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ofa_lib import grid as G
from ofa_lib import locks
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
])
def test_invalid_grids_name_the_field(tmp_path, changes, match):
    path = write_grid(tmp_path, **changes)
    with pytest.raises(G.GridError, match=match) as info:
        G.load_grid(path)
    assert str(path) in str(info.value)


def test_missing_grid_file_lists_known_grids():
    with pytest.raises(G.GridError, match=r"not found .*'demo'.*'smoke'"):
        G.load_grid("no_such_grid")


def test_plan_head_first_and_its_head_file_in_every_grid_run(tmp_outputs):
    grid = G.load_grid("smoke")
    assert [r.role for r in grid.runs] == ["head", "grid", "grid"]
    head = grid.runs[0]
    assert head.cfg.head == "train" and head.root == grid.runs_root / "head"
    for run in grid.runs[1:]:
        assert run.cfg.head == str(head.dir.resolve() / "head.safetensors") == run.params["head"]
    assert {r.cfg.lr for r in grid.runs[1:]} == {1e-4, 3e-4}
    assert G.load_grid(SMOKE).runs[1].run_id == grid.runs[1].run_id  # stable ids
    table = G.plan_table(grid, with_scheduler=False)
    assert list(table.state) == ["todo"] * 3


def test_run_ids_do_not_depend_on_where_outputs_is(tmp_path, monkeypatch):
    ids = []
    for where in ("a", "b/c"):
        monkeypatch.setenv("OFA_OUTPUTS", str(tmp_path / where))
        ids.append([r.run_id for r in G.load_grid("smoke").runs])
    assert ids[0] == ids[1] and len(set(ids[0])) == 3
    head = G.load_grid("smoke").runs[1].cfg
    assert head.identity()["head"] == "run:" + G.load_grid("smoke").runs[0].run_id
    assert head.canonical()["head"] == head.head  # the manifest keeps the real path


def test_runs_no_longer_in_the_grid_are_set_aside_and_come_back(tmp_path, tmp_outputs):
    import pandas as pd

    from ofa_lib import results

    path = write_grid(tmp_path, grid={"lr": [1e-4]})
    grid = G.load_grid(path)
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
    assert G.set_aside_stale_runs(grid) == [stale]
    assert (grid.runs_root / ".stale" / stale / "manifest.json").is_file()
    assert (grid.runs_root / kept).is_dir()
    left = results.read(grid.results_path)
    assert sorted(left.name) == ["acc_avg:last:r=1:sampling=0", "last"] and stale not in set(left.run_id)
    # the grid file grows back: the folder returns instead of being retrained
    wider = G.load_grid(write_grid(tmp_path, grid={"lr": [1e-4, 3e-4]}))
    back = wider.runs[2].run_id
    (grid.runs_root / ".stale" / back).mkdir()
    assert G.set_aside_stale_runs(wider) == [] and (wider.runs_root / back).is_dir()


def test_a_list_of_products_is_their_union(tmp_path, tmp_outputs):
    grid = G.load_grid(write_grid(tmp_path, grid=[{"lr": [1e-4, 3e-4], "seed": [1]}, {"lr": [2e-4], "seed": [2, 3]}]))
    points = [(r.cfg.lr, r.cfg.seed) for r in grid.runs if r.role == "grid"]
    assert points == [(1e-4, 1), (3e-4, 1), (2e-4, 2), (2e-4, 3)]
    assert grid.axes == {"lr": [1e-4, 3e-4, 2e-4], "seed": [1, 2, 3]}
    assert list(G.plan_table(grid, with_scheduler=False).columns[2:4]) == ["lr", "seed"]


def test_paper_grids_are_the_published_63_runs(tmp_outputs):
    for name, head in (("paper_nli", True), ("paper_ner", False), ("paper_tydiqa", True)):
        grid = G.load_grid(name)
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


# --------------------------------------------------------------------------- failures
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA to make runs fail")
def test_failed_runs_are_recorded_and_the_rest_continue(tmp_outputs, tmp_path):
    path = write_grid(tmp_path, head_tuning=None, train={"device": "cuda", "head": "init:0"},
                      grid={"lr": [1e-4, 3e-4], "batch_size": [8], "seed": [1]})
    grid = G.load_grid(path)
    assert G.run(grid) == 1
    for run in grid.runs:  # both attempted: the second ran after the first failed
        assert G.run_state(grid, run) == "failed"
        record = json.loads(G.failure_path(run).read_text())
        assert "CUDA" in record["error"] or "cuda" in record["error"]
        assert record["params"]["lr"] == run.cfg.lr
        failed_nb = json.loads(Path(record["notebook"]).read_text())
        assert any(o.get("output_type") == "error" for c in failed_nb["cells"] for o in c.get("outputs", []))
    assert not (grid.reports_dir / "report.html").exists()
    summary = json.loads((grid.reports_dir / "grid_summary.json").read_text())
    assert summary["invocations"][-1]["failed"] == 2
    assert G.run(grid) == 1 and all(G.run_state(grid, r) == "failed" for r in grid.runs)  # left as they are
    assert G.retry_failed(grid) == 1  # retried (and fails again); the first record is kept aside
    assert len(list(grid.runs[0].dir.glob("failure.*.json"))) == 1


# --------------------------------------------------------------------------- local backend, killed and resumed
def test_local_grid_killed_with_sigkill_resumes_to_the_same_report(tmp_outputs):
    """Kill the runner (SIGKILL, main process only) during a grid run's training: its pool worker and
    kernel die with it; nothing looks done that is not; a re-run trains only what is missing."""
    grid = G.load_grid("smoke")
    env = dict(os.environ, OFA_OUTPUTS=str(tmp_outputs))
    proc = subprocess.Popen([sys.executable, "-m", "ofa_lib.grid", "run", "smoke"], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = grid.runs[1]
    deadline = time.time() + 300
    while not (victim.dir / "resume" / "state.json").exists():  # killed after its first snapshot
        assert proc.poll() is None, "the grid finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # the worker (PR_SET_PDEATHSIG) and the kernel (parent poller) follow
    assert G.run_state(grid, grid.runs[0]) == "done"
    assert G.run_state(grid, victim) == "todo"  # its lock is stale, its manifest says running
    assert json.loads((victim.dir / "manifest.json").read_text())["status"] == "running"
    assert not (grid.reports_dir / "report.html").exists()
    head_mtime = (grid.runs[0].dir / "manifest.json").stat().st_mtime

    assert G.run(grid) == 0
    assert all(G.run_state(grid, r) == "done" for r in grid.runs)
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
