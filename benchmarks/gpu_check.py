"""The GPU check (``make gpu-check``): what a first GPU machine must show, in one command, ≤ 8 minutes.

Never run in CI. Each check writes ``benchmarks/raw/gpu_<check>.json`` (the bench result schema, so
``benchmarks/make_results.py`` folds them into RESULTS.md's CUDA section) and a failed check is
recorded and the next one still runs:

1. ``gpu_precision``: what ``precision: auto`` picks on this GPU, and one smoke training run each in
   bf16 (where the GPU has it) and fp16 + GradScaler: finite losses, the scale the scaler ended at;
2. ``gpu_resume``: CUDA resume exactness: a smoke run stopped after a step and resumed gives exactly the
   metrics of an uninterrupted run (CUDA RNG in the resume state);
3. ``gpu_smoke_grid``: the smoke grid end to end on CUDA (head run, 2 runs, 03_average on the GPU, 04);
4. ``training_cuda_*``: training throughput vs ``transformers.Trainer`` and peak memory on a random
   XLM-R-large with QA shapes (batch 64 × 384), without and with gradient accumulation (4 micro-batches);
5. ``cost_cuda``: the cost model's GPU throughput from check 4 (``grid plan --estimate`` then uses it).

    python benchmarks/gpu_check.py [--budget-s 480]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _common as _c


def check(name: str, title: str, fn, started_all: float, budget_s: float) -> dict | None:
    """Run one check; on failure write its JSON with the error (a missed row), never stop the others."""
    if time.perf_counter() - started_all > budget_s:
        print(f"== {name}: skipped (budget of {budget_s:.0f} s spent)")
        return None
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 -- a check that fails is a result, recorded
        text = f"**failed** after {time.perf_counter() - t0:.0f} s: `{type(exc).__name__}: {exc}`\n\n```\n" \
               f"{traceback.format_exc()[-3000:]}\n```"
        _c.write_result(name=name, title=title, markdown=text,
                        summary=[_c.summary_row(title, "failed", "", "", "passes", "missed", str(exc)[:200])],
                        data={"error": str(exc)}, started=t0, json_path=_c.RAW_DIR / f"{name}.json", md_path=None)
        return None


def precision_check() -> dict:
    import torch

    from ofa_lib.train import config, hardware, training
    from ofa_lib.train import runs as runs_lib

    t0 = time.perf_counter()
    dev = torch.device("cuda")
    auto, why = hardware.resolve_precision("auto", dev)
    cc = torch.cuda.get_device_capability(dev)
    rows, data = [], {"auto": auto, "why": why, "capability": cc, "runs": {}}
    for precision in (["bf16"] if cc >= (8, 0) else []) + ["fp16"]:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config.make_config("nli", "smoke", precision=precision, target_langs={"xnli": ["de"]})
            out = training.run_training(cfg, tmp, progress=False, device="cuda")
            import pandas as pd

            log = pd.read_parquet(out / "train_log.parquet")
            manifest = runs_lib.read_manifest(out, missing_ok=True)
            ok = bool(log.loss.notna().all() and (log.loss < 1e4).all())
            data["runs"][precision] = {"final_loss": float(log.loss.iloc[-1]), "finite": ok,
                                       "precision_used": manifest["precision"]}
            rows.append((precision, manifest["precision"], f"{log.loss.iloc[0]:.3f} → {log.loss.iloc[-1]:.3f}",
                         "yes" if ok else "NO"))
    text = (f"{torch.cuda.get_device_name(0)} (compute capability {cc[0]}.{cc[1]}): `precision: auto` → **{auto}** "
            f"({why}).\n\n" + _c.md_table(["asked", "used", "smoke loss first → last", "finite"], rows))
    good = all(r[3] == "yes" for r in rows)
    return _c.write_result(name="gpu_precision", title="CUDA precision paths", markdown=text,
                           summary=[_c.summary_row("CUDA bf16/fp16 smoke runs", ", ".join(r[0] for r in rows),
                                                   "", "", "finite losses", "met" if good else "missed")],
                           data=data, started=t0, json_path=_c.RAW_DIR / "gpu_precision.json", md_path=None)


def resume_check() -> dict:
    import pandas as pd

    from ofa_lib.train import config, training

    t0 = time.perf_counter()
    cfg = config.make_config("nli", "smoke", target_langs={"xnli": ["de"]}, storage_dtype="fp32", top_k=2)
    with tempfile.TemporaryDirectory() as tmp:
        whole = training.run_training(cfg, Path(tmp) / "whole", progress=False, device="cuda")
        try:
            training.run_training(cfg, Path(tmp) / "split", progress=False, device="cuda", stop_after_step=4)
        except KeyboardInterrupt:
            pass
        split = training.run_training(cfg, Path(tmp) / "split", progress=False, device="cuda")
        a, b = (pd.read_parquet(p / "metrics.parquet").sort_values(["kind", "name", "dataset", "lang", "split", "metric"])
                for p in (whole, split))
        la, lb = (pd.read_parquet(p / "train_log.parquet") for p in (whole, split))
    exact = a.value.tolist() == b.value.tolist() and la.loss.tolist() == lb.loss.tolist()
    text = (f"Smoke run on CUDA, stopped after step 4 and resumed, against the same run uninterrupted: metrics "
            f"{'identical' if a.value.tolist() == b.value.tolist() else 'DIFFERENT'}, training losses "
            f"{'identical' if la.loss.tolist() == lb.loss.tolist() else 'DIFFERENT'} ({len(la)} steps).")
    return _c.write_result(name="gpu_resume", title="CUDA resume exactness", markdown=text,
                           summary=[_c.summary_row("CUDA resume (metrics, losses)", "identical" if exact else "different",
                                                   "uninterrupted run", "", "identical", "met" if exact else "missed")],
                           data={"exact": exact}, started=t0, json_path=_c.RAW_DIR / "gpu_resume.json", md_path=None)


def smoke_grid_check() -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OFA_OUTPUTS=tmp)
        proc = subprocess.run([sys.executable, "-m", "ofa_lib.grid", "run", "smoke"], cwd=_c.REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        manifests = [json.loads(p.read_text()) for p in Path(tmp, "runs", "smoke").rglob("manifest.json")]
        devices = sorted({m.get("device", "?") for m in manifests})
        avg = Path(tmp, "reports", "smoke", "03_average.ipynb")
        on_gpu = avg.is_file() and "cuda" in avg.read_text()
    wall = time.perf_counter() - t0
    ok = proc.returncode == 0 and devices == ["cuda"]
    text = (f"`python -m ofa_lib.grid run smoke` on CUDA: exit {proc.returncode}, {wall:.0f} s; run devices {devices}; "
            f"03_average's notebook mentions cuda: {on_gpu}.\n\n```\n{proc.stdout[-1500:]}\n```")
    return _c.write_result(name="gpu_smoke_grid", title="Smoke grid on CUDA", markdown=text,
                           summary=[_c.summary_row("smoke grid on CUDA", f"{wall:.0f} s", "", "", "exit 0, runs on cuda",
                                                   "met" if ok else "missed", "" if ok else proc.stderr[-300:])],
                           data={"returncode": proc.returncode, "wall_s": wall, "devices": devices},
                           started=t0, json_path=_c.RAW_DIR / "gpu_smoke_grid.json", md_path=None)


def throughput_check(accum: int, steps: int) -> dict:
    cmd = [sys.executable, str(_c.REPO / "benchmarks" / "bench_training.py"), "--device", "cuda", "--random-model",
           "xlmr-large", "--task", "qa", "--max-length", "384", "--batch-size", "64", "--steps", str(steps),
           "--repeats", "1", "--grad-accum", str(accum)]
    subprocess.run(cmd, cwd=_c.REPO, check=True, timeout=400)
    name = "training_cuda_xlmr-large_qa384" + (f"_accum{accum}" if accum > 1 else "")
    return json.loads((_c.RAW_DIR / f"{name}.json").read_text())


def cost_check(result: dict) -> dict:
    """The cost model's GPU figures from the measured XLM-R-large training throughput."""
    from dataclasses import asdict

    import torch

    from ofa_lib.grid import cost

    t0 = time.perf_counter()
    ex_s = _c.stats(result["data"]["examples_per_s"]["ofa_lib"])["median"]
    tokens = 384  # QA windows fill max_length
    p = cost.encoder_params("xlm-roberta-large")
    train = 6 * p * tokens * ex_s / 1e12
    th = cost.Throughput(device=f"cuda ({torch.cuda.get_device_name(0)})", train_tflops=train,
                         eval_tflops=train * cost.ASSUMED_GPU["A100"].eval_tflops / cost.ASSUMED_GPU["A100"].train_tflops,
                         run_overhead_s=120.0, step_overhead_s=120.0, measured=True,
                         source=f"make gpu-check {_c.now_utc()}: training measured (QA 64 × 384); evaluation scaled "
                                "from it by the assumed eval/train ratio; fixed costs assumed")
    return _c.write_result(name="cost_cuda", title="Cost model: this GPU's throughput",
                           markdown=f"Training {train:.1f} effective TFLOP/s ({ex_s:.1f} examples/s of XLM-R large at "
                                    f"384 tokens); see the source line.", summary=[], data={"examples_per_s": ex_s},
                           started=t0, json_path=_c.RAW_DIR / "cost_cuda.json", md_path=None,
                           extra={"throughput": asdict(th), "vocab": {}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting checks after this many seconds")
    parser.add_argument("--steps", type=int, default=12, help="training steps per throughput loop")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        from ofa_lib.train import hardware

        print(f"gpu-check: no usable CUDA device here ({hardware.torch_build()}); nothing to check", file=sys.stderr)
        return 2
    start = time.perf_counter()
    check("gpu_precision", "CUDA precision paths", precision_check, start, args.budget_s)
    check("gpu_resume", "CUDA resume exactness", resume_check, start, args.budget_s)
    check("gpu_smoke_grid", "Smoke grid on CUDA", smoke_grid_check, start, args.budget_s)
    plain = check("training_cuda_xlmr-large_qa384", "Training throughput (CUDA, QA shapes)",
                  lambda: throughput_check(1, args.steps), start, args.budget_s)
    check("training_cuda_xlmr-large_qa384_accum4", "Training throughput (CUDA, QA shapes, accumulation)",
          lambda: throughput_check(4, args.steps), start, args.budget_s)
    if plain:
        check("cost_cuda", "Cost model: this GPU's throughput", lambda: cost_check(plain), start, args.budget_s)
    subprocess.run([sys.executable, str(_c.REPO / "benchmarks" / "make_results.py")], cwd=_c.REPO, check=False)
    print(f"gpu-check: {time.perf_counter() - start:.0f} s; results in {_c.RAW_DIR}/gpu_*.json, training_cuda_*.json, "
          "cost_cuda.json and benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
