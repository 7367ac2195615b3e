"""Benchmark: peak memory and time of merge methods (ofa_lib.merge.merging) against loading all N (not a test).

Creates N_max checkpoints with the tensor shapes of multilingual-e5-small (as
``bench_averaging.py``: ~118M parameters, stored bf16) plus θ₀ (the same shapes), then for each
N and method, each repetition in a fresh subprocess:

  uniform    ofa_lib.merge.merging.merge_files(uniform) = averaging.average_checkpoints, output in bf16
  ties       ofa_lib.merge.merging.merge_files(ties, density 0.2): row blocks of θ₀ and the N inputs,
             per-tensor magnitude threshold by radix select over blocks, output in bf16
  ties-fp32  the same with an fp32 output (what ofa-merge writes: one more bf16 file's worth)
  load-all   load θ₀ and all N state dicts into memory (safetensors.torch.load_file, cloned out of
             the mmap) and nothing else: what a merge that holds its inputs needs before computing

Peak RSS is the child's ``ru_maxrss``; "over base" subtracts the child's RSS after its imports.
Targets (issue 14): ties ≤ 3× one checkpoint over base at N = 10; uniform ≤ 1.2×. Usage:

    python benchmarks/bench_merging.py [--ns 2 5 10] [--reps 1] [--threads 1]
        [--json benchmarks/raw/merging.json] [--out benchmarks/merging.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as _c
import bench_averaging as _avg
from tqdm import tqdm

METHODS = ("uniform", "ties", "ties-fp32", "load-all")
TARGETS = {"ties": 3.0, "ties-fp32": 3.0, "uniform": 1.2}


def _child_run(method: str, base: str, paths: list[str]) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from safetensors.torch import load_file

    from ofa_lib.merge import merging

    base_kib = _avg._status_kib("VmRSS")
    t0 = time.perf_counter()
    if method == "load-all":
        out = [{k: v.clone() for k, v in load_file(p).items()} for p in [base, *paths]]  # in memory, not mmapped
    else:
        # outputs in the storage dtype (as averaging always wrote them); ties-fp32 as ofa-merge writes
        name = method.removesuffix("-fp32")
        out = merging.merge_files(merging.make_spec(name), paths, base=base if name != "uniform" else None,
                                  dtype=torch.float32 if method.endswith("-fp32") else None)
    seconds = time.perf_counter() - t0
    assert out is not None
    print(json.dumps({"seconds": seconds, "base_kib": base_kib, "hwm_kib": _avg._status_kib("VmHWM")}))


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--reps", type=int, default=1, help="repetitions per (N, method), >= 1")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child")
    ap.add_argument("--workdir", type=Path, default=None)
    _c.add_output_args(ap, "merging")
    args = ap.parse_args(argv)
    if args.reps < 1 or any(n < 1 for n in args.ns):
        ap.error("--reps and every --ns must be >= 1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_merging_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        n_max = max(args.ns)
        info, _ = _avg._spawn(["--_make", str(workdir), str(n_max + 1), "", "bfloat16"])
        files = sorted(str(p) for p in workdir.glob("run*.safetensors"))
        base, paths = files[0], files[1:n_max + 1]  # run00 plays θ₀: the same shapes and head fingerprint
        file_mib = os.path.getsize(paths[0]) / 2**20
        rows = []
        for n in args.ns:
            for method in args.methods:
                secs, peak, over = [], [], []
                for _ in tqdm(range(args.reps), desc=f"N={n} {method}", leave=False, file=sys.stderr):
                    res, maxrss_kib = _avg._spawn(["--_run", method, base, *paths[:n]], args.threads, script=__file__)
                    secs.append(res["seconds"])
                    peak.append(maxrss_kib / 1024)
                    over.append((maxrss_kib - res["base_kib"]) / 1024)
                rows.append({"n": n, "method": method, "seconds": secs, "peak_mib": peak, "over_mib": over})
                print(f"N={n:<3} {method:<9} {_c.fmt(secs, 2)} s, over base {_c.fmt(over, 0)} MiB", file=sys.stderr)
        by = {(r["n"], r["method"]): r for r in rows}
        table = _c.md_table(
            ["N", "method", "time [s]", "peak RSS [MiB]", "peak over import baseline [MiB]", "over ÷ one file",
             "over ÷ load-all's"],
            [(r["n"], r["method"], _c.fmt(r["seconds"], 2), _c.fmt(r["peak_mib"], 0), _c.fmt(r["over_mib"], 0),
              f"{statistics.median(r['over_mib']) / file_mib:.2f}",
              f"{statistics.median(r['over_mib']) / statistics.median(by[(r['n'], 'load-all')]['over_mib']):.2f}"
              if (r["n"], "load-all") in by else "") for r in rows], "rlrrrrr")
        summary = []
        for n in args.ns:
            for method, limit in TARGETS.items():
                r = by.get((n, method))
                if r is None:
                    continue
                ratio = statistics.median(r["over_mib"]) / file_mib
                target = f"≤ {limit:g}×" if n == max(args.ns) else ""
                summary.append(_c.summary_row(
                    f"merging N={n}: {method} peak RSS (over the import baseline)", _c.fmt(r["over_mib"], 0, "MiB"),
                    f"one checkpoint file: {file_mib:.0f} MiB", f"{ratio:.2f}× one checkpoint", target,
                    ("met" if ratio <= limit else "missed") if target else ""))
                la = by.get((n, "load-all"))
                if la is not None:
                    summary.append(_c.summary_row(
                        f"merging N={n}: {method} wall time and memory vs loading all N", _c.fmt(r["seconds"], 2, "s"),
                        f"load-all: {_c.fmt(la['seconds'], 2, 's')}, {_c.fmt(la['over_mib'], 0, 'MiB')}",
                        f"{statistics.median(r['over_mib']) / statistics.median(la['over_mib']):.2f}× its memory"))
        text = (
            f"Model: multilingual-e5-small shapes, {info['params'] / 1e6:.1f}M parameters in {info['tensors']} "
            f"tensors, stored bfloat16 ({file_mib:.0f} MiB per file), θ₀ of the same shapes; {args.reps} "
            f"repetition(s), each in a fresh process with {args.threads} torch thread(s); median (min–max). Files "
            "come from the page cache (just written). Outputs are in the storage dtype (bf16: one file's size), "
            "except ties-fp32 (fp32, as `ofa-merge` writes: two files' size by itself). "
            "**uniform**: `merging.merge_files(uniform)` (= `averaging.average_checkpoints`); **ties**: "
            "`merging.merge_files(ties)` (density 0.2, λ 1; row blocks of at most 16 MiB ÷ N per input; exact "
            "per-tensor threshold by a two-pass radix select for tensors larger than a block); **load-all**: "
            "load θ₀ and the N files, nothing else.\n\n" + table)
        _c.write_result(name="merging", title="Merge methods: memory and time (N = " + ", ".join(map(str, args.ns)) + ")",
                        markdown=text, summary=summary,
                        data={"rows": rows, "file_mib": file_mib, "params": info["params"], "threads": args.threads,
                              "reps": args.reps},
                        started=started, json_path=_c.json_target(args.json), md_path=args.out)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_run":
        _child_run(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
