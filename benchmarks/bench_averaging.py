"""Benchmark: streaming checkpoint averaging vs the usual alternatives (not a test).

Creates N_max random checkpoints with the tensor shapes of multilingual-e5-small (word
embeddings 250037x384, 12 BERT layers, hidden 384, FFN 1536, a 3-way classifier head;
~118M parameters) stored in bf16 (``--size-mb`` for a generic model of another size), then
for each N measures, each repetition in a fresh subprocess:

  stream     ofa_lib.averaging.average_checkpoints (key by key, fp32 accumulation, pread)
  stream-mmap  the same with safetensors' default mmap backend (shows why pread is used)
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

    python benchmarks/bench_averaging.py [--ns 2 5 10] [--reps 3] [--size-mb 200] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("stream", "stream-mmap", "load-all", "stack", "read")


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

    from ofa_lib.averaging import save_checkpoint

    dtype = getattr(torch, dtype_name)
    el = torch.empty(0, dtype=dtype).element_size()
    shapes = _e5_small_shapes() if size_mb is None else _generic_shapes(size_mb, el)
    gen = torch.Generator().manual_seed(0)
    for r in range(n):
        sd = {k: (0.02 * torch.randn(s, generator=gen)).to(dtype) for k, s in shapes.items()}
        save_checkpoint(sd, workdir / f"run{r:02d}.safetensors",
                        metadata={"ofa_run_id": f"run{r:02d}", "ofa_head_fingerprint": "bench"})
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    print(json.dumps({"params": params, "tensors": len(shapes)}))


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

    from ofa_lib import averaging

    base_kib = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if method == "stream":
        out = averaging.average_checkpoints(paths)
    elif method == "stream-mmap":
        averaging._open_streaming = lambda p: safe_open(str(p), framework="pt")
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


def _spawn(args: list[str], threads: int = 1) -> tuple[dict, int]:
    """Run this script as a child with ``args``; (its last JSON line, its ru_maxrss in KiB)."""
    env = dict(
        os.environ,
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS=str(threads),
    )
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed with exit code {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]), usage.ru_maxrss


def _fmt(values: list[float], digits: int) -> str:
    med = statistics.median(values)
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 5, 10], help="numbers of checkpoints")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per (N, method), >= 1")
    ap.add_argument("--size-mb", type=float, default=None, help="generic model of this many MB instead of e5-small")
    ap.add_argument("--dtype", default="bfloat16", help="storage dtype of the checkpoints")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per child (1: stable timings on a shared machine; "
                    "oversubscribed OpenMP threads make element-wise ops many times slower)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_averaging_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        n_max = max(args.ns)
        make_args = ["--_make", str(workdir), str(n_max), str(args.size_mb or ""), args.dtype]
        info, _ = _spawn(make_args)
        paths = sorted(str(p) for p in workdir.glob("run*.safetensors"))[:n_max]
        file_mb = os.path.getsize(paths[0]) / 2**20
        rows = []
        for n in args.ns:
            for method in args.methods:
                secs, peak, over = [], [], []
                for _ in range(args.reps):
                    res, maxrss_kib = _spawn(["--_run", method, *paths[:n]], args.threads)
                    secs.append(res["seconds"])
                    peak.append(maxrss_kib / 1024)
                    if res["base_kib"] is not None:
                        over.append((maxrss_kib - res["base_kib"]) / 1024)
                rows.append((n, method, _fmt(secs, 2), _fmt(peak, 0), _fmt(over, 0) if over else "n/a"))
                print(f"N={n:<3} {method:<12} {rows[-1][2]} s, peak {rows[-1][3]} MiB", file=sys.stderr)
        model = "multilingual-e5-small shapes" if args.size_mb is None else f"generic {args.size_mb} MB"
        lines = [
            f"Model: {model}, {info['params'] / 1e6:.1f}M parameters in {info['tensors']} tensors, "
            f"stored {args.dtype} ({file_mb:.0f} MiB per file); {args.reps} repetitions, each in a "
            f"fresh process with {args.threads} torch thread(s); median (min–max). Machine: "
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
            "Files read from the page cache.",
            "",
            "| N | method | time [s] | peak RSS [MiB] | peak over import baseline [MiB] |",
            "|---:|---|---:|---:|---:|",
        ]
        lines += [f"| {n} | {m} | {t} | {p} | {o} |" for n, m, t, p, o in rows]
        table = "\n".join(lines) + "\n"
        print(table)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table, encoding="utf-8")
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
