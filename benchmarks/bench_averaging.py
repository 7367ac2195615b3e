"""Benchmark: streaming checkpoint averaging vs the usual alternatives (not a test).

Creates N_max checkpoints (one random draw plus a distinct offset per file) with the tensor
shapes of multilingual-e5-small (word embeddings 250037x384, 12 BERT layers, hidden 384, FFN
1536, a 3-way classifier head; ~118M parameters) stored in bf16 (``--size-mb`` for a generic
model of another size), then
for each N measures, each repetition in a fresh subprocess:

  stream     ofa_lib.merge.averaging.average_checkpoints (key by key, fp32 accumulation, pread)
  load-all   load all N state dicts (safetensors.torch.load_file), then a fp32 running sum
  stack      load all N, then torch.stack([...]).float().mean(0) per tensor
  read       only read the N files (every tensor of every file, pread)

Each child uses ``--threads`` torch threads (default 1: on a shared 2-core machine,
oversubscribed OpenMP threads made the element-wise ops up to ~6x slower and the timings
erratic). Time is the wall time of the operation inside the child (after imports). Peak RSS is the
child's ``ru_maxrss`` (from ``os.wait4``; this driver never imports torch, so the value the
child inherits at fork is small); "over base" subtracts the child's RSS after its imports.
Files are read from the page cache (they were just written), so this measures memory
traffic and compute, not disk. Usage:

    python benchmarks/bench_averaging.py [--ns 2 5 10] [--reps 3] [--size-mb 200] [--threads 1]
        [--json benchmarks/raw/averaging.json] [--out benchmarks/averaging.md]
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

REPO = Path(__file__).resolve().parent.parent
METHODS = ("stream", "load-all", "stack", "read")


# --------------------------------------------------------------------------- children


def _e5_small_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor shapes of multilingual-e5-small as a BertForSequenceClassification (3 labels)."""
    h, ffn = 384, 1536
    shapes: dict[str, tuple[int, ...]] = {
        "bert.embeddings.word_embeddings.weight": (250037, h),
        "bert.embeddings.position_embeddings.weight": (512, h),
        "bert.embeddings.token_type_embeddings.weight": (2, h),
        "bert.embeddings.LayerNorm.weight": (h,),
        "bert.embeddings.LayerNorm.bias": (h,),
    }
    for i in range(12):
        p = f"bert.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[f"{p}attention.self.{name}.weight"] = (h, h)
            shapes[f"{p}attention.self.{name}.bias"] = (h,)
        shapes[f"{p}attention.output.dense.weight"] = (h, h)
        shapes[f"{p}attention.output.dense.bias"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.weight"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.bias"] = (h,)
        shapes[f"{p}intermediate.dense.weight"] = (ffn, h)
        shapes[f"{p}intermediate.dense.bias"] = (ffn,)
        shapes[f"{p}output.dense.weight"] = (h, ffn)
        shapes[f"{p}output.dense.bias"] = (h,)
        shapes[f"{p}output.LayerNorm.weight"] = (h,)
        shapes[f"{p}output.LayerNorm.bias"] = (h,)
    shapes["classifier.weight"] = (3, h)
    shapes["classifier.bias"] = (3,)
    return shapes


def _generic_shapes(size_mb: float, bytes_per_el: int) -> dict[str, tuple[int, ...]]:
    """About ``size_mb`` MB of (rows, 1024) blocks of at most 4M elements each."""
    total = int(size_mb * 1e6 / bytes_per_el)
    shapes, i = {}, 0
    while total > 0:
        rows = max(1, min(4096, total // 1024))
        shapes[f"block{i}.weight"] = (rows, 1024)
        total -= rows * 1024
        i += 1
    return shapes


def _child_make(workdir: Path, n: int, size_mb: float | None, dtype_name: str) -> None:
    import torch

    from ofa_lib.models.ckpt_io import save_checkpoint

    dtype = getattr(torch, dtype_name)
    el = torch.empty(0, dtype=dtype).element_size()
    shapes = _e5_small_shapes() if size_mb is None else _generic_shapes(size_mb, el)
    gen = torch.Generator().manual_seed(0)
    base = {k: 0.02 * torch.randn(s, generator=gen) for k, s in shapes.items()}  # one random draw (slow) ...
    for r in range(n):
        sd = {k: (b + 0.001 * (r + 1)).to(dtype) for k, b in base.items()}  # ... and a distinct offset per file
        save_checkpoint(sd, workdir / f"run{r:02d}.safetensors",
                        metadata={"ofa_run_id": f"run{r:02d}", "ofa_head_fingerprint": "bench"})
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    largest = max(shapes, key=lambda k: torch.Size(shapes[k]).numel())
    print(json.dumps({"params": params, "tensors": len(shapes), "largest": largest,
                      "largest_shape": list(shapes[largest]), "largest_numel": int(torch.Size(shapes[largest]).numel())}))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _child_run(method: str, paths: list[str]) -> None:
    import time

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ofa_lib.merge import averaging

    base_kib = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if method == "stream":
        out = averaging.average_checkpoints(paths)
    elif method == "load-all":
        sds = [load_file(p) for p in paths]
        out = {}
        for k, first in sds[0].items():
            acc = first.to(torch.float32, copy=True)
            for sd in sds[1:]:
                acc.add_(sd[k].to(torch.float32))
            out[k] = acc.div_(len(sds)).to(first.dtype)
    elif method == "stack":
        sds = [load_file(p) for p in paths]
        out = {
            k: torch.stack([sd[k].float() for sd in sds]).mean(0).to(first.dtype)
            for k, first in sds[0].items()
        }
    elif method == "read":
        nbytes = 0
        for p in paths:
            with safe_open(p, framework="pt", backend="pread") as f:
                for k in f.keys():
                    nbytes += f.get_tensor(k).nbytes
        out = nbytes
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t0
    assert out is not None
    print(json.dumps({"seconds": seconds, "base_kib": base_kib, "hwm_kib": _status_kib("VmHWM")}))


# --------------------------------------------------------------------------- driver


def _spawn(args: list[str], threads: int = 1, script: str | None = None) -> tuple[dict, int]:
    """Run ``script`` (default this one) as a child with ``args``; (its last JSON line, its ru_maxrss in KiB)."""
    env = dict(
        os.environ,
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS=str(threads),
    )
    proc = subprocess.Popen([sys.executable, script or __file__, *args], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed with exit code {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]), usage.ru_maxrss


def _target_rows(rows: list[dict], file_mib: float, info: dict) -> tuple[list[dict], list[str]]:
    """Summary rows for the two targets, per N (with a diagnosis where missed), and notes."""
    by = {(r["n"], r["method"]): r for r in rows}
    acc_mib = info["largest_numel"] * 4 / 2**20
    why_rss = (
        f"the averager holds the output model ({file_mib:.0f} MiB, storage dtype) plus one fp32 accumulator sized "
        f"for the largest tensor ({acc_mib:.0f} MiB for `{info['largest']}` {info['largest_shape']}): "
        f"{file_mib + acc_mib:.0f} MiB expected, as measured. Fix (in `ofa_lib.merge.averaging.average_checkpoints`): "
        "accumulate large tensors in row blocks (`get_slice` reads only those rows) into a small fp32 buffer and "
        "write each finished block into the preallocated output: peak ≈ output + one block ≈ 1.1× a checkpoint.")
    why_wall = (
        "besides reading, the streaming mean makes about N + 2 passes over the model in one thread "
        "(an upcast-and-add per input, the final cast to the storage dtype, the NaN/inf check), so at small N "
        "the fixed passes weigh most, and a contended machine inflates compute more than page-cache reads. "
        "Fixes: run the averager with the available cores (`--threads 2` on a quiet machine) and fold the final "
        "cast and the finite check into one pass.")
    summary, notes = [], []
    for n in sorted({r["n"] for r in rows}):
        stream, read = by.get((n, "stream")), by.get((n, "read"))
        if stream is None:
            continue
        over = stream["over_mib"]
        if over:
            rss_ratio = statistics.median(over) / file_mib
            summary.append(_c.summary_row(
                f"averaging N={n}: peak RSS of the averager (over the import baseline)",
                _c.fmt(over, 0, "MiB"), f"one checkpoint file: {file_mib:.0f} MiB", f"{rss_ratio:.2f}× one checkpoint",
                "≤ 2.5×", "met" if rss_ratio <= 2.5 else "missed", why_rss if rss_ratio > 2.5 else ""))
        if read is not None:
            t_ratio = _c.ratio(stream["seconds"], read["seconds"])
            summary.append(_c.summary_row(
                f"averaging N={n}: wall time", _c.fmt(stream["seconds"], 2, "s"),
                f"just reading the {n} files: {_c.fmt(read['seconds'], 2, 's')}", f"{t_ratio:.2f}× reading",
                "≤ 1.5×", "met" if t_ratio <= 1.5 else "missed", why_wall if t_ratio > 1.5 else ""))
        for other in ("load-all", "stack"):
            o = by.get((n, other))
            if o is not None:
                summary.append(_c.summary_row(
                    f"averaging N={n}: peak RSS vs {other}", _c.fmt(stream["peak_mib"], 0, "MiB"),
                    f"{other}: {_c.fmt(o['peak_mib'], 0, 'MiB')}",
                    f"{statistics.median(stream['peak_mib']) / statistics.median(o['peak_mib']):.2f}×"))
    return summary, notes


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 5, 10], help="numbers of checkpoints")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per (N, method), >= 1")
    ap.add_argument("--size-mb", type=float, default=None, help="generic model of this many MB instead of e5-small")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="storage dtype of the checkpoints")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per child (1: stable timings on a shared machine; "
                    "oversubscribed OpenMP threads make element-wise ops many times slower)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    _c.add_output_args(ap, "averaging")
    args = ap.parse_args(argv)
    if args.reps < 1 or any(n < 1 for n in args.ns):
        ap.error("--reps and every --ns must be >= 1")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_averaging_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        n_max = max(args.ns)
        make_args = ["--_make", str(workdir), str(n_max), str(args.size_mb or ""), args.dtype]
        info, _ = _spawn(make_args)
        paths = sorted(str(p) for p in workdir.glob("run*.safetensors"))[:n_max]
        file_mib = os.path.getsize(paths[0]) / 2**20
        rows = []
        for n in args.ns:
            for method in args.methods:
                secs, peak, over = [], [], []
                for _ in tqdm(range(args.reps), desc=f"N={n} {method}", leave=False, file=sys.stderr):
                    res, maxrss_kib = _spawn(["--_run", method, *paths[:n]], args.threads)
                    secs.append(res["seconds"])
                    peak.append(maxrss_kib / 1024)
                    if res["base_kib"] is not None:
                        over.append((maxrss_kib - res["base_kib"]) / 1024)
                rows.append({"n": n, "method": method, "seconds": secs, "peak_mib": peak, "over_mib": over})
                print(f"N={n:<3} {method:<12} {_c.fmt(secs, 2)} s, peak {_c.fmt(peak, 0)} MiB", file=sys.stderr)
        model = "multilingual-e5-small shapes" if args.size_mb is None else f"generic {args.size_mb} MB"
        table = _c.md_table(
            ["N", "method", "time [s]", "× read", "peak RSS [MiB]", "peak over import baseline [MiB]", "over ÷ one file"],
            [(r["n"], r["method"], _c.fmt(r["seconds"], 2),
              f"{_c.ratio(r['seconds'], next(x['seconds'] for x in rows if x['n'] == r['n'] and x['method'] == 'read')):.2f}"
              if any(x["n"] == r["n"] and x["method"] == "read" for x in rows) else "",
              _c.fmt(r["peak_mib"], 0), _c.fmt(r["over_mib"], 0) if r["over_mib"] else "n/a",
              f"{statistics.median(r['over_mib']) / file_mib:.2f}" if r["over_mib"] else "")
             for r in rows], "rlrrrrr")
        text = (
            f"Model: {model}, {info['params'] / 1e6:.1f}M parameters in {info['tensors']} tensors, stored "
            f"{args.dtype} ({file_mib:.0f} MiB per file); {args.reps} repetitions, each in a fresh process with "
            f"{args.threads} torch thread(s); median (min–max). Files are read from the page cache (just written), "
            "so this measures memory traffic and compute, not disk. Peak RSS is the child's `ru_maxrss`; "
            "\"over import baseline\" subtracts the child's RSS after importing torch and safetensors "
            "(the averager's own memory).\n\n"
            "Methods: **stream** = `ofa_lib.merge.averaging.average_checkpoints` (key by key across all files, fp32 "
            "accumulation in 16 MiB blocks of rows, `pread`); **load-all** = load all N state dicts, then a fp32 running sum (what the original study's "
            "earlier code did); **stack** = load all N, `torch.stack(...).float().mean(0)` per tensor (what general "
            "merge tools do); **read** = only read every tensor of the N files (the floor).\n\n" + table)
        summary, notes = _target_rows(rows, file_mib, info)
        _c.write_result(name="averaging", title="Checkpoint averaging (N = " + ", ".join(map(str, args.ns)) + ")",
                        markdown=text + ("\n\n" + "\n".join(notes) if notes else ""), summary=summary,
                        data={"rows": rows, "file_mib": file_mib, "params": info["params"], "dtype": args.dtype,
                              "threads": args.threads, "reps": args.reps},
                        started=started, json_path=_c.json_target(args.json), md_path=args.out)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_make":
        _, _, wd, n, size, dt = sys.argv
        _child_make(Path(wd), int(n), float(size) if size else None, dt)
    elif len(sys.argv) > 1 and sys.argv[1] == "--_run":
        _child_run(sys.argv[2], sys.argv[3:])
    else:
        main()
