"""Benchmark: the ``fisher`` merge method on real runs (not a test): time to compute one run's diagonal
Fisher on N English examples, what the diagonal looks like, and time / peak memory of a fisher merge.

For the first of ``--runs`` (finished runs: their manifests, checkpoints and config), the run's
data and model are prepared once (``setup.prepare``; not timed), then for each N of
``--examples`` the diagonal of its ``--variant`` checkpoint is computed into a fresh cache
(``execution.fisher_diagonal_of``: N seeded English training examples, one forward + backward per
example, labels sampled from the model, the runs' precision) and timed; the diagonal's entries
are summarised (fraction exactly 0, fraction below the default floor, quantiles of the positive
ones). Then the diagonal of every run (largest N) is stored, and the runs are merged in fresh
child processes: ``fisher`` (``merging.merge_files``, row blocks, fp32 output, as ``ofa-merge``),
``fisher-incremental`` (``merging.incremental_states`` to r = all runs, as ``03_average``) and
``uniform`` (``merging.merge_files``, fp32 output) for the baseline; peak RSS is the child's
VmHWM (not ``ru_maxrss``, which counts the prepared parent's pages from before exec), "over base"
subtracts its RSS after imports. Usage:

    python benchmarks/bench_fisher.py --runs RUN_DIR [RUN_DIR …] [--variant ca] [--examples 16 32]
        [--threads 2] [--json benchmarks/raw/fisher.json] [--out benchmarks/fisher.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as _c
import bench_averaging as _avg


def _child_merge(method: str, paths: list[str], fishers: list[str]) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from ofa_lib.merge import merging

    base_kib = _avg._status_kib("VmRSS")
    t0 = time.perf_counter()
    if method == "uniform":
        out = merging.merge_files(merging.make_spec("uniform"), paths, dtype=torch.float32)
    elif method == "fisher":
        out = merging.merge_files(merging.spec_from_fishers(fishers), paths, fishers=fishers, dtype=torch.float32)
    else:  # fisher-incremental: every r up to all runs, as the cross-run pass streams them
        for out in merging.incremental_states(merging.spec_from_fishers(fishers), paths, fishers=fishers):
            pass
    seconds = time.perf_counter() - t0
    assert out is not None
    print(json.dumps({"seconds": seconds, "base_kib": base_kib, "hwm_kib": _avg._status_kib("VmHWM")}))


def _summary(diag) -> dict:
    import torch

    flat = torch.cat([v.reshape(-1).double() for v in diag.values()])
    pos = flat[flat > 0]
    qs = torch.quantile(pos[torch.randperm(pos.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                        torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist() if pos.numel() else [0, 0, 0]
    return {"entries": int(flat.numel()), "zero": float((flat == 0).double().mean()),
            "below_1e-12": float((flat < 1e-12).double().mean()), "pos_q01": qs[0], "pos_median": qs[1],
            "pos_q99": qs[2], "max": float(flat.max())}


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="finished run folders (manifest.json)")
    ap.add_argument("--variant", default="ca")
    ap.add_argument("--examples", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (diagonal and merge children)")
    ap.add_argument("--workdir", type=Path, default=None)
    _c.add_output_args(ap, "fisher")
    args = ap.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "manifest.json").is_file()]
    if missing or any(n < 1 for n in args.examples):
        ap.error(f"--runs need manifest.json (missing: {missing}); --examples must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    from ofa_lib.merge import execution, merging
    from ofa_lib.models import ckpt_io
    from ofa_lib.train import fisher, hardware, setup
    from ofa_lib.train.config import TrainConfig

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_fisher_"))
    try:
        cfg = TrainConfig(**json.loads((args.runs[0] / "manifest.json").read_text())["params"])
        prep = setup.prepare(cfg)
        dev, precision, _ = hardware.resolve_runtime(cfg, "cpu")
        autocast = hardware.AUTOCAST.get(precision)
        n_params = sum(p.numel() for p in prep.model.parameters())
        ckpts = [r / "checkpoints" / f"{args.variant}.safetensors" for r in args.runs]
        rows = []
        for n in args.examples:
            spec = merging.make_spec("fisher", {"examples": n})
            t0 = time.perf_counter()
            path, computed = execution.fisher_diagonal_of(ckpts[0], spec, workdir / f"cache-{n}", prep, device=dev,
                                                         autocast_dtype=autocast, progress=False)
            seconds = time.perf_counter() - t0
            assert computed
            used = int(ckpt_io.read_metadata(path)[fisher.EXAMPLES_KEY])
            t1 = time.perf_counter()
            _, again = execution.fisher_diagonal_of(ckpts[0], spec, workdir / f"cache-{n}", prep, device=dev,
                                                   autocast_dtype=autocast, progress=False)
            reread = time.perf_counter() - t1
            assert not again
            rows.append({"examples": n, "used": used, "seconds": seconds, "per_example": seconds / used,
                         "reread_seconds": reread, **_summary(ckpt_io.load_checkpoint(path))})
            print(f"N={n} ({used} used): {seconds:.1f} s, stored one read back in {reread:.2f} s", file=sys.stderr)
        spec = merging.make_spec("fisher", {"examples": max(args.examples)})
        fishers = [str(execution.fisher_diagonal_of(c, spec, workdir / f"cache-{max(args.examples)}", prep, device=dev,
                                                   autocast_dtype=autocast, progress=False)[0]) for c in ckpts]
        del prep
        merges = []
        for method in ("uniform", "fisher", "fisher-incremental"):
            # the child's own VmHWM: its ru_maxrss would count the pages of this (large, prepared) parent it was
            # forked from before exec
            res, _ = _avg._spawn(["--_merge", method, str(len(ckpts)), *map(str, ckpts), *fishers], args.threads,
                                 script=__file__)
            merges.append({"method": method, "seconds": res["seconds"], "peak_mib": res["hwm_kib"] / 1024,
                           "over_mib": (res["hwm_kib"] - res["base_kib"]) / 1024})
        file_mib = os.path.getsize(ckpts[0]) / 2**20
        t1 = _c.md_table(["N examples (used)", "diagonal [s]", "s / example", "stored one read [s]", "F = 0",
                          "F < 1e-12", "positive F: 1% / median / 99%", "max F"],
                         [(f"{r['examples']} ({r['used']})", f"{r['seconds']:.1f}", f"{r['per_example']:.2f}",
                           f"{r['reread_seconds']:.2f}", f"{r['zero']:.1%}", f"{r['below_1e-12']:.1%}",
                           f"{r['pos_q01']:.1e} / {r['pos_median']:.1e} / {r['pos_q99']:.1e}", f"{r['max']:.1e}")
                          for r in rows], "lrrrrrrr")
        t2 = _c.md_table(["merge of the runs", "time [s]", "peak RSS [MiB]", "over import baseline [MiB]", "÷ one file"],
                         [(m["method"], f"{m['seconds']:.2f}", f"{m['peak_mib']:.0f}", f"{m['over_mib']:.0f}",
                           f"{m['over_mib'] / file_mib:.2f}") for m in merges], "lrrrr")
        uni = merges[0]
        summary = [_c.summary_row(f"fisher diagonal of one run ({rows[-1]['used']} examples)",
                                  f"{rows[-1]['seconds']:.1f} s", "", f"{rows[-1]['per_example']:.2f} s/example")]
        summary += [_c.summary_row(f"fisher merge of {len(ckpts)} runs: {m['method']} peak over base",
                                   f"{m['over_mib']:.0f} MiB, {m['seconds']:.2f} s",
                                   f"uniform: {uni['over_mib']:.0f} MiB, {uni['seconds']:.2f} s",
                                   f"{m['over_mib'] / uni['over_mib']:.2f}× its memory") for m in merges[1:]]
        text = (f"Runs: {len(ckpts)} × `{cfg.task}` "
                f"({cfg.model_name}, {n_params / 1e6:.1f}M parameters, max_length {cfg.max_length}, "
                f"{args.variant} checkpoints of {file_mib:.0f} MiB), precision {precision}, {args.threads} torch "
                "thread(s), one measurement each. Diagonal: English training examples, one forward + backward each, "
                "sampled labels; its time excludes preparing data and model.\n\n" + t1 + "\n\n" + t2)
        _c.write_result(name="fisher", title="Fisher merging: diagonal cost and merge memory", markdown=text,
                        summary=summary, data={"diagonals": rows, "merges": merges, "file_mib": file_mib,
                                               "runs": [str(r) for r in args.runs], "threads": args.threads},
                        started=started, json_path=_c.json_target(args.json), md_path=args.out)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_merge":
        n = int(sys.argv[3])
        _child_merge(sys.argv[2], sys.argv[4:4 + n], sys.argv[4 + n:])
    else:
        main()
