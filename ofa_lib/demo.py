"""``make demo``: the study end to end on the embedded model (``params/demo.yaml``).

01_data_prep → one 02_train per grid point (skipped when already done) → 03_average →
04_analysis, each executed headless by papermill; the report lands in
``outputs/reports/<report_name>/report.html``. Re-running finishes only what is missing.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import papermill
import yaml
from tqdm.auto import tqdm

from . import config, report, training
from .paths import REPO_ROOT, outputs_dir

NOTEBOOKS = REPO_ROOT / "notebooks"


def execute(notebook: str, out: Path, parameters: dict[str, Any]) -> Path:
    """Run a notebook with papermill into ``out`` (written to a temp name, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.ipynb")
    papermill.execute_notebook(str(NOTEBOOKS / notebook), str(tmp), parameters=parameters, kernel_name="python3",
                               cwd=str(NOTEBOOKS), progress_bar=False)
    os.replace(tmp, out)
    return out


def grid_configs(spec: dict[str, Any]) -> list[config.TrainConfig]:
    """Every TrainConfig of the grid (validated before anything runs)."""
    grid = spec["grid"]
    return [config.make_config(spec["task"], spec["preset"], lr=lr, batch_size=bs, seed=seed, **spec.get("train", {}))
            for lr, bs, seed in itertools.product(grid["lr"], grid["batch_size"], grid["seed"])]


def main(params_file: str | Path = REPO_ROOT / "params" / "demo.yaml") -> Path:
    spec = yaml.safe_load(Path(params_file).read_text())
    task, name = spec["task"], spec["report_name"]
    configs = grid_configs(spec)
    runs_root = outputs_dir() / "runs" / name  # one folder per grid: 03_average pools every run in it
    reports = outputs_dir() / "reports" / name
    results_path = outputs_dir() / "results" / f"{name}.parquet"
    start = time.perf_counter()
    print(f"demo: {len(configs)} training runs of task {task!r} ({spec['preset']} preset)")
    execute("01_data_prep.ipynb", reports / "01_data_prep.ipynb", {"task": task, "subsample": 300})
    for cfg in tqdm(configs, desc="training runs", unit="run"):
        if training.is_done(cfg, runs_root):
            continue
        params = dict(task=task, preset=spec["preset"], lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                      output_root=str(runs_root), **spec.get("train", {}))
        execute("02_train.ipynb", runs_root / cfg.run_id / "02_train.ipynb", params)
    avg = spec.get("average", {})
    execute("03_average.ipynb", reports / "03_average.ipynb",
            dict(task=task, runs_root=str(runs_root), results_path=str(results_path), **avg))
    analysis = execute("04_analysis.ipynb", reports / "04_analysis.ipynb",
                       dict(source=str(results_path), model=configs[0].model_name, tasks=[task], report_name=name,
                            **spec.get("analysis", {})))
    html = report.render(analysis, reports / "report.html")
    print(f"demo finished in {time.perf_counter() - start:.0f} s: {html}")
    return Path(html)


if __name__ == "__main__":
    main(*sys.argv[1:])
