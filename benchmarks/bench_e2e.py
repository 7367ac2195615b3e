"""End-to-end wall time of ``make reproduce-paper`` (the authors' analysis of their released
results: 04_analysis executed headless by papermill, then rendered to HTML).

Each repetition runs ``make -s reproduce-paper`` in the repository (the same command a user
types; it rewrites ``outputs/reports/paper``) and times it from start to exit. The demo grid
(``make demo``, ~16 minutes) does not fit in ``make bench``'s budget: ``make_results.py`` reads
its measured wall time from ``outputs/reports/demo/grid_summary.json`` instead.

    python benchmarks/bench_e2e.py [--reps 3] [--json benchmarks/raw/e2e.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import _common as _c


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--target", default="reproduce-paper", help="the make target to time")
    _c.add_output_args(ap, "e2e")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    make = os.environ.get("MAKE", "make")
    secs = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        proc = subprocess.run([make, "-s", args.target], cwd=_c.REPO, capture_output=True, text=True)
        secs.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"`make {args.target}` failed with exit code {proc.returncode} (repetition {rep + 1})")
        print(f"rep {rep + 1}: make {args.target} {secs[-1]:.1f} s", flush=True)
    text = (f"`make {args.target}` (papermill executes `notebooks/04_analysis.ipynb` on the released results of "
            "the paper, then the report is rendered to HTML; the virtual environment already installed): "
            f"**{_c.fmt(secs, 1, 's')}**, median (min–max) of {args.reps} runs.")
    summary = [_c.summary_row(f"`make {args.target}` wall time", _c.fmt(secs, 1, "s"), "", "")]
    _c.write_result(name="e2e", title=f"End to end: make {args.target}", markdown=text, summary=summary,
                    data={"seconds": secs, "target": args.target}, started=started,
                    json_path=_c.json_target(args.json), md_path=args.out)


if __name__ == "__main__":
    main()
