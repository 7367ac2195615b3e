"""Throughput of this machine for the cost model (``ofa_lib.grid.cost``, ``grid plan GRID --estimate``).

Trains the demo grid's head-tuning run (SIB-200, ``cpu`` preset, embedded model) in this process and
derives from its manifest and the tokens the cost model counts for it:

* training TFLOP/s = 6 × encoder parameters × trained tokens / training-step seconds,
* evaluation TFLOP/s = 2 × encoder parameters × evaluated tokens / evaluation seconds (snapshots + final),
* the fixed cost of a run: data and model loading, featurization, plus a papermill execution of
  ``02_train`` on the finished run (kernel start, imports, the notebook's tables and figure),
* the fixed cost of a pipeline step: a papermill execution of ``04_analysis`` on the released results.

On a busy machine wall times overstate what a run costs alone; the CPU time of the process is measured
too, and the figures are scaled by ``CPU seconds ÷ (wall seconds × threads)`` (capped at 1) so that they
describe this machine when the run has its cores: both are in the JSON.

    python benchmarks/bench_cost.py [--json benchmarks/raw/cost_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import _common as _c


def cpu_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=0, help="train only this many steps of the demo head run's "
                        "shapes (0: the whole run)")
    parser.add_argument("--json", type=Path, default=_c.RAW_DIR / "cost_cpu.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from ofa_lib.grid import cost
    from ofa_lib.grid import execute as grid_execute
    from ofa_lib.grid import spec as grid_spec
    from ofa_lib.train import runs as runs_lib
    from ofa_lib.train import training

    grid = grid_spec.load_grid("demo")
    head = grid.runs[0]
    if args.steps:  # a shorter run of the same shapes (model, data, batch, lengths): throughput carries over
        from dataclasses import replace

        from ofa_lib.train import config

        params = {**head.params, **{k: v for k, v in grid.train.items() if k not in grid_spec.NOTEBOOK_ONLY},
                  "epochs": 1, "train_subsample": args.steps * head.cfg.batch_size, "num_snapshots": 2, "top_k": 2}
        cfg = config.make_config(**params)
        head = replace(head, cfg=cfg, params=params)
    with tempfile.TemporaryDirectory(prefix="bench_cost_") as tmp:
        c0, w0 = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
        out = training.run_training(head.cfg, Path(tmp) / "runs", progress=False)
        run_cpu, run_wall = cpu_seconds(resource.RUSAGE_SELF) - c0, time.perf_counter() - w0
        manifest = runs_lib.read_manifest(out, missing_ok=True)
        # the notebook around a run: kernel start, imports, the finished run's tables and figure
        k0, w1 = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
        grid_execute.execute_notebook("02_train.ipynb", Path(tmp) / "nb" / "02_train.ipynb",
                           dict(head.params, output_root=str(Path(tmp) / "runs")))
        nb_cpu, nb_wall = cpu_seconds(resource.RUSAGE_CHILDREN) - k0, time.perf_counter() - w1
        # a pipeline step: 04_analysis on the authors' released results (as make reproduce-paper)
        import yaml

        params = yaml.safe_load((_c.REPO / "params" / "reproduce_paper.yaml").read_text())
        params["outputs_root"] = str(Path(tmp) / "report")
        k1, w2 = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
        grid_execute.execute_notebook("04_analysis.ipynb", Path(tmp) / "report" / "04_analysis.ipynb", params)
        step_cpu, step_wall = cpu_seconds(resource.RUSAGE_CHILDREN) - k1, time.perf_counter() - w2
    t = manifest["timings"]
    work = cost.run_work(head.cfg)
    p = cost.encoder_params(head.cfg.model_name)
    share = min(1.0, run_cpu / (run_wall * args.threads))  # 1.0: the run had its cores to itself
    train_s = t["train_step_s"] * share
    eval_s = (t["train_s"] - t["train_step_s"] + t["final_eval_s"]) * share
    prep_s = (t["load_data_s"] + t["load_model_s"] + t["featurize_s"]) * share
    run_overhead = prep_s + min(nb_wall, nb_cpu)  # kernel work is mostly one thread: its CPU time
    step_overhead = min(step_wall, step_cpu)
    hw = _c.machine_info()
    th = cost.Throughput(
        device=f"cpu ({hw['cpu']}, {args.threads} threads)",
        train_tflops=6 * p * work["train_tokens"] / train_s / 1e12,
        eval_tflops=2 * p * work["eval_tokens"] / eval_s / 1e12,
        run_overhead_s=round(run_overhead, 1), step_overhead_s=round(step_overhead, 1), measured=True,
        source=f"benchmarks/bench_cost.py on the demo head run, {_c.now_utc()}, CPU share {share:.2f}")
    rows = [
        ("training", f"{work['train_tokens']:,.0f} tokens", f"{t['train_step_s']:.1f} s", f"{th.train_tflops:.4f}"),
        ("evaluation", f"{work['eval_tokens']:,.0f} tokens", f"{t['train_s'] - t['train_step_s'] + t['final_eval_s']:.1f} s",
         f"{th.eval_tflops:.4f}"),
    ]
    text = (f"The demo grid's head-tuning run ({head.run_id}: SIB-200, `cpu` preset, precision {manifest['precision']}), "
            f"{args.threads} threads, trained in this process; load average {hw['loadavg']}.\n\n"
            + _c.md_table(["work", "counted by ofa_lib.grid.cost", "wall", "effective TFLOP/s"], rows, "lrrr")
            + f"\n\nRun: {run_wall:.1f} s wall, {run_cpu:.1f} s CPU → CPU share {share:.2f} (times scaled by it). "
            f"Fixed cost per run {th.run_overhead_s:.1f} s (data, model, featurize {prep_s:.1f} s; the 02_train "
            f"notebook around a finished run {nb_wall:.1f} s wall, {nb_cpu:.1f} s CPU); per pipeline step "
            f"{th.step_overhead_s:.1f} s (04_analysis on the released results: {step_wall:.1f} s wall, {step_cpu:.1f} s CPU).")
    from dataclasses import asdict

    _c.write_result(name="cost_cpu", title="Cost model: this machine's throughput", markdown=text, summary=[],
                    data={"manifest_timings": t, "work": work, "run_wall_s": run_wall, "run_cpu_s": run_cpu,
                          "notebook_wall_s": nb_wall, "notebook_cpu_s": nb_cpu, "step_wall_s": step_wall,
                          "step_cpu_s": step_cpu, "share": share},
                    started=started, json_path=_c.json_target(args.json), md_path=None,
                    extra={"throughput": asdict(th), "vocab": {head.cfg.model_name: manifest["vocab_size"]}})


if __name__ == "__main__":
    main()
