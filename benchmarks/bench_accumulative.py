"""Benchmark: the accumulative protocol r = 1…R over S samplings, running mean vs re-averaging.

Accumulative averaging scores θ̄_r, the mean of the first r runs of a sampling, for r = 1…R
(R = 10 in the paper). Two ways to get every θ̄_r of one sampling and variant:

  running   this project: ``ofa_lib.merge.averaging.running_average`` over the sampling's order (what
            ``ofa_lib.merge.crossrun.average_runs`` does): each checkpoint read once, θ̄_r updated in
            place, R reads per sampling and variant
  scratch   re-average from scratch at each r (the original study's code): ``average_checkpoints``
            of the first r files for r = 1…R, 1 + 2 + … + R reads (55 for R = 10)

Both yield fp32 state dicts as ``average_runs`` asks (``dtype=torch.float32``); nothing is
evaluated (the evaluations are the same for both). Reads are counted, not assumed: the
benchmark wraps ``safe_open`` and the ``pread`` reader inside ``ofa_lib.merge.averaging`` and counts the tensor bytes each way
actually reads; "checkpoint reads" = bytes read ÷ bytes of one checkpoint's tensors. Synthetic
checkpoints have the tensor shapes of multilingual-e5-small (117.5M parameters, as
bench_averaging.py; ``--size-mb`` for a generic model of another size). Each (method,
repetition) runs in a fresh process with ``--threads`` torch threads; it samples S orders of
the R files (numpy seed = sampling index) and produces θ̄_1…θ̄_R for each; peak RSS is the
child's ``ru_maxrss``. Usage:

    python benchmarks/bench_accumulative.py [--r-max 10] [--samplings 2] [--reps 3] [--size-mb 56]
        [--json benchmarks/raw/accumulative.json] [--out benchmarks/accumulative.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as _c
from tqdm import tqdm

METHODS = ("running", "scratch")


# --------------------------------------------------------------------------- child
def _child(method: str, samplings: int, paths: list[str]) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from ofa_lib.merge import averaging
    from ofa_lib.models import ckpt_io

    counts = {"bytes": 0, "get_tensor": 0}
    real_open = ckpt_io.safe_open

    class Counting:
        """A safe_open handle whose get_tensor counts the bytes it returns."""

        def __init__(self, *args, **kwargs):
            self._cm = real_open(*args, **kwargs)

        def __enter__(self):
            self._h = self._cm.__enter__()
            return self

        def __exit__(self, *exc):
            return self._cm.__exit__(*exc)

        def get_tensor(self, key):
            t = self._h.get_tensor(key)
            counts["bytes"] += t.nbytes
            counts["get_tensor"] += 1
            return t

        def __getattr__(self, name):
            return getattr(self._h, name)

    ckpt_io.safe_open = Counting
    real_rows = ckpt_io.TensorReader.get_rows  # average_checkpoints reads through its own pread reader

    def counting_rows(reader, key, rows=None):
        t = real_rows(reader, key, rows)
        counts["bytes"] += t.nbytes
        counts["get_tensor"] += 1
        return t

    ckpt_io.TensorReader.get_rows = counting_rows
    info = ckpt_io.checkpoint_info(paths[0])  # header only (get_slice), not counted
    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}
    one = sum(int(np.prod(shape)) * itemsize[info.dtypes[k]] for k, shape in info.shapes.items())
    r_max = len(paths)
    per_r = [0.0] * r_max
    t0 = time.perf_counter()
    for s in range(samplings):
        order = [paths[i] for i in np.random.default_rng(s).permutation(r_max)]
        if method == "running":
            t = time.perf_counter()
            for r, state in enumerate(averaging.running_average(order, dtype=torch.float32), start=1):
                del state  # average_runs evaluates θ̄_r here (the same work for both methods)
                per_r[r - 1] += time.perf_counter() - t
                t = time.perf_counter()
        else:
            for r in range(1, r_max + 1):
                t = time.perf_counter()
                averaging.average_checkpoints(order[:r], dtype=torch.float32)  # θ̄_r, dropped
                per_r[r - 1] += time.perf_counter() - t
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "bytes": counts["bytes"], "get_tensor": counts["get_tensor"],
                      "checkpoint_bytes": one, "reads": counts["bytes"] / one, "per_r": per_r}))


# --------------------------------------------------------------------------- driver
def _spawn(args: list[str], threads: int) -> tuple[dict, int]:
    env = dict(os.environ, PYTHONPATH=f"{_c.REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child {args[:2]} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return json.loads(stdout.strip().splitlines()[-1]), usage.ru_maxrss


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--r-max", type=int, default=10, help="R: runs per sampling (the paper: 10)")
    ap.add_argument("--samplings", type=int, default=2, help="S: samplings (orders of the R runs)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per method")
    ap.add_argument("--size-mb", type=float, default=None,
                    help="generic model of this many MB instead of the e5-small shapes (times scale ~linearly)")
    ap.add_argument("--dtype", default="float16", choices=["bfloat16", "float16", "float32"],
                    help="storage dtype of the checkpoints (training stores variants in fp16 by default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child")
    _c.add_output_args(ap, "accumulative")
    args = ap.parse_args(argv)
    if min(args.r_max, args.samplings, args.reps) < 1:
        ap.error("--r-max, --samplings and --reps must be >= 1")

    import bench_averaging

    workdir = Path(tempfile.mkdtemp(prefix="bench_accumulative_"))
    try:
        env = dict(os.environ, PYTHONPATH=f"{_c.REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        made = subprocess.run([sys.executable, bench_averaging.__file__, "--_make", str(workdir), str(args.r_max),
                               str(args.size_mb or ""), args.dtype], env=env, check=True, capture_output=True, text=True)
        info = json.loads(made.stdout.strip().splitlines()[-1])
        paths = sorted(str(p) for p in workdir.glob("run*.safetensors"))
        file_mib = os.path.getsize(paths[0]) / 2**20
        res: dict[str, list[dict]] = {m: [] for m in METHODS}
        peaks: dict[str, list[float]] = {m: [] for m in METHODS}
        for rep in tqdm(range(args.reps), desc="accumulative", file=sys.stderr):
            for method in METHODS if rep % 2 == 0 else METHODS[::-1]:
                out, maxrss = _spawn(["--_run", method, str(args.samplings), *paths], args.threads)
                res[method].append(out)
                peaks[method].append(maxrss / 1024)
                print(f"rep {rep + 1} {method}: {out['seconds']:.1f} s, {out['reads']:.2f} reads", file=sys.stderr)

        secs = {m: [o["seconds"] for o in res[m]] for m in METHODS}
        reads = {m: [o["reads"] for o in res[m]] for m in METHODS}
        r_max, s = args.r_max, args.samplings
        expected = {"running": s * r_max, "scratch": s * r_max * (r_max + 1) // 2}
        for m in METHODS:  # the count must be exact and identical in every repetition
            if any(abs(x - expected[m]) > 1e-9 for x in reads[m]):
                print(f"warning: {m} read {reads[m]} checkpoints, expected {expected[m]}", file=sys.stderr)
        ratio_t = _c.ratio(secs["scratch"], secs["running"])
        ratio_reads = statistics.median(reads["scratch"]) / statistics.median(reads["running"])
        per_r = {m: [statistics.median(o["per_r"][i] / s for o in res[m]) for i in range(r_max)] for m in METHODS}
        model = "multilingual-e5-small shapes" if args.size_mb is None else f"generic {args.size_mb} MB"
        rows = [(m, f"{statistics.median(reads[m]):g}", f"{statistics.median(reads[m]) / s:g}",
                 _c.fmt(secs[m], 1), _c.fmt([x / s for x in secs[m]], 2), _c.fmt(peaks[m], 0))
                for m in METHODS]
        table = _c.md_table(["method", f"checkpoint reads (S = {s})", "reads per sampling and variant",
                             "wall [s]", "wall per sampling [s]", "peak RSS [MiB]"], rows, "lrrrrr")
        per_r_table = _c.md_table(["r", *(str(i) for i in range(1, r_max + 1))],
                                  [(m, *(f"{x:.2f}" for x in per_r[m])) for m in METHODS], "l" + "r" * r_max)
        text = (
            f"R = {r_max} runs per sampling, S = {s} samplings (orders: numpy seed = sampling index), one variant; "
            f"{model}, {info['params'] / 1e6:.1f}M parameters stored {args.dtype} ({file_mib:.0f} MiB per "
            f"checkpoint); {args.reps} repetitions, each method in a fresh process with {args.threads} torch "
            "thread(s); median (min–max). Reads are counted by wrapping `safe_open` and the `pread` reader inside `ofa_lib.merge.averaging` "
            "(tensor bytes read ÷ one checkpoint's tensor bytes), so they are measured, not assumed. Files come from "
            "the page cache; evaluation of each θ̄_r (identical for both) is not included.\n\n"
            "**running** = `ofa_lib.merge.averaging.running_average` (what `crossrun.average_runs` does: each checkpoint "
            "read once per sampling and variant); **scratch** = `average_checkpoints` of the first r files at each "
            f"r (the original code's protocol; 1 + 2 + … + {r_max} = {r_max * (r_max + 1) // 2} reads per sampling "
            "and variant), using this project's streaming averager so that only the protocol differs.\n\n"
            + table + f"\n\nSeconds per sampling spent producing θ̄_r, by r (median):\n\n{per_r_table}\n\n"
            f"Re-averaging reads {ratio_reads:.1f}× the checkpoints and takes {ratio_t:.2f}× the wall time. "
            "The running mean's cost per r is flat (one read, one in-place update, one fp32 copy handed out); "
            "re-averaging's grows linearly with r. For the paper (3 tasks × 3 variants × 10 samplings) the counts "
            f"scale by 90: {expected['running'] // s * 90} vs {expected['scratch'] // s * 90} checkpoint reads "
            "(XLM-R large: 1.12 GB each in fp16).")
        summary = [
            _c.summary_row(f"accumulative r = 1…{r_max}, S = {s}: checkpoint reads",
                           f"{statistics.median(reads['running']):g}",
                           f"re-averaging from scratch: {statistics.median(reads['scratch']):g}",
                           f"{1 / ratio_reads:.2f}× (÷{ratio_reads:.1f})"),
            _c.summary_row(f"accumulative r = 1…{r_max}, S = {s}: wall time", _c.fmt(secs["running"], 1, "s"),
                           f"re-averaging from scratch: {_c.fmt(secs['scratch'], 1, 's')}",
                           f"{1 / ratio_t:.2f}× (÷{ratio_t:.2f})"),
        ]
        _c.write_result(name="accumulative", title="Accumulative protocol: running mean vs re-averaging",
                        markdown=text, summary=summary,
                        data={"results": res, "peak_mib": peaks, "expected_reads": expected, "r_max": r_max,
                              "samplings": s, "params": info["params"], "file_mib": file_mib, "dtype": args.dtype},
                        started=started, json_path=_c.json_target(args.json), md_path=args.out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_run":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        main()
