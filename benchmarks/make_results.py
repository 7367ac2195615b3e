"""Assemble ``benchmarks/RESULTS.md`` from the benchmark JSONs in ``benchmarks/raw/``.

Every ``bench_*.py`` writes one JSON (see ``_common.py``); this script only formats: machine
and versions, a summary of every headline ratio next to its baseline with targets marked
met/missed, each benchmark's section, the end-to-end times (the demo grid's from
``outputs/reports/demo/grid_summary.json``, written by the grid runner after ``make demo``),
CUDA figures where a GPU run left its JSON, and what each bench script cost. Missing inputs
become "not measured" lines, never errors.

    python benchmarks/make_results.py [--raw benchmarks/raw] [--grid-summary PATH] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as _c  # noqa: E402

# (item, name of the JSON, how to run it alone)
SECTIONS = [
    (1, "averaging", "python benchmarks/bench_averaging.py"),
    (1, "merging", "python benchmarks/bench_merging.py"),
    (2, "accumulative", "python benchmarks/bench_accumulative.py"),
    (3, "storage", "python benchmarks/bench_storage.py"),
    (3, "bytes", "python benchmarks/bench_bytes.py"),
    (4, "training", "python benchmarks/bench_training.py"),
    (4, "group_by_length", "python benchmarks/bench_group_by_length.py"),
    (5, "evaluation", "python benchmarks/bench_eval.py"),
    (5, "eval_cache", "python benchmarks/bench_storage.py"),
    (6, "e2e", "python benchmarks/bench_e2e.py"),
]
ITEM_TITLES = {1: "Checkpoint averaging", 2: "Accumulative protocol", 3: "Storage per run",
               4: "Training throughput (CPU)", 5: "Evaluation", 6: "End to end", 7: "CUDA"}
DEFAULT_GRID_SUMMARY = _c.REPO / "outputs" / "reports" / "demo" / "grid_summary.json"

GPU_METHOD = """\
GPU-hours for the paper grids: `python -m ofa_lib.grid plan params/grids/paper_nli.yaml --estimate` (and
paper_ner, paper_tydiqa) counts the tokens each run trains and evaluates from the data and converts them with
the cost model's GPU throughput (`ofa_lib.grid.cost`): **assumed** figures until `make gpu-check` has measured this
GPU (`benchmarks/raw/cost_cuda.json`), then measured. The estimate is printed next to the authors' ~1,050
V100-hours and ~1.4 TB per task.
"""


def load_results(raw: Path) -> dict[str, dict[str, Any]]:
    """Every ``*.json`` under ``raw`` that looks like a bench result, by name."""
    out = {}
    for path in sorted(Path(raw).glob("*.json")):
        data = _c.load_json(path)
        if isinstance(data, dict) and {"name", "markdown", "summary"} <= set(data):
            out[data["name"]] = data
    return out


def machine_section(results: dict[str, dict]) -> str:
    if not results:
        return "No benchmark has been run yet: `make bench`.\n"
    first = next(iter(results.values()))
    m = first.get("machine", {})
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v)
    dates = sorted(r.get("date", "") for r in results.values())
    lines = [
        f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('mem_gib', '?')} GiB memory; "
        f"{m.get('platform', '?')}",
        f"- Python {m.get('python', '?')}; {versions}",
        f"- Code: git {m.get('git') or '?'}",
        f"- Measured: {dates[0]} … {dates[-1]} (UTC)",
        "- Load average (1, 5, 15 min) when each benchmark finished: "
        + "; ".join(f"{n} {r.get('machine', {}).get('loadavg')}" for n, r in results.items())
        + ". A load above the core count means other processes competed for the CPU and the times are inflated.",
    ]
    others = {r.get("machine", {}).get("cpu") for r in results.values()} - {m.get("cpu")}
    if others:
        lines.append(f"- **Warning**: some results come from other machines: {sorted(map(str, others))}")
    return "\n".join(lines) + "\n"


def summary_section(results: dict[str, dict]) -> str:
    rows = []
    order = [name for _, name, _ in SECTIONS] + sorted(n for n in results if n not in {s[1] for s in SECTIONS})
    for name in order:
        for row in (results.get(name) or {}).get("summary", []):
            status = {"met": "✅ met", "missed": "❌ missed"}.get(row.get("status", ""), "")
            rows.append((row["figure"], row["ours"], row.get("baseline", ""), row.get("ratio", ""),
                         row.get("target", ""), status))
    if not rows:
        return "Nothing measured yet.\n"
    return _c.md_table(["figure", "this project", "baseline", "ratio", "target", "status"], rows) + "\n"


def missed_section(results: dict[str, dict]) -> str:
    lines = []
    for name, r in results.items():
        for row in r.get("summary", []):
            if row.get("status") == "missed":
                why = row.get("why") or "no diagnosis recorded"
                lines.append(f"- **{row['figure']}** ({row.get('ratio', '')}, target {row.get('target', '')}): {why}")
    return ("\n".join(lines) + "\n") if lines else "Every target with a measurement is met.\n"


def _when(t: Any) -> str:
    """An epoch time as UTC ISO; other values as they are."""
    if isinstance(t, (int, float)):
        import datetime as dt

        return dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(microsecond=0).isoformat()
    return str(t)


def grid_summary_text(path: Path) -> str:
    """The demo grid's wall time from the grid runner's summary: the last invocation that trained
    every run (a re-run that skips finished runs is not the grid's cost), and the latest one."""
    data = _c.load_json(path)
    if not isinstance(data, dict):
        return f"Demo grid (`make demo`): not measured: run `make demo` first (no `{_rel(path)}`)."
    runs = data.get("runs")
    n_runs = len(runs) if isinstance(runs, (list, dict)) else runs
    calls = [c for c in data.get("invocations") or [] if isinstance(c, dict)]
    full = [c for c in calls if n_runs is not None and c.get("trained") == n_runs]
    pick = full[-1] if full else data

    def describe(c: dict) -> str:
        wall = c.get("wall_s")
        wall_txt = f"**{wall / 60:.1f} min** ({wall:.0f} s)" if isinstance(wall, (int, float)) else "wall time missing"
        parts = [f"started {_when(c['started'])}" if c.get("started") is not None else "",
                 f"finished {_when(c['finished'])}" if c.get("finished") is not None else "",
                 f"{c['trained']} runs trained" if c.get("trained") is not None else ""]
        return wall_txt + "".join(f", {p}" for p in parts if p)

    head = f"Demo grid (`make demo`, {n_runs} runs; measured by the grid runner, read from `{_rel(path)}`): "
    if full:
        text = head + "whole grid, every run trained: " + describe(pick)
    else:
        text = head + describe(data) + (" (no recorded invocation trained every run: this may be a partial re-run)"
                                        if calls else "")
    if calls and full and calls[-1] is not full[-1]:
        text += f"; latest invocation: {describe(calls[-1])}"
    if data.get("machine"):
        text += f"; machine: {_short(data['machine'])}"
    return text + "."


def _short(machine: Any) -> str:
    if isinstance(machine, dict):
        return ", ".join(f"{k}={v}" for k, v in machine.items() if not isinstance(v, (dict, list)))
    return str(machine)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(_c.REPO))
    except ValueError:
        return str(path)


def runtime_section(results: dict[str, dict]) -> str:
    rows = [(n, r.get("seconds", "?"), " ".join(Path(a).name if i == 0 else a for i, a in enumerate(r.get("argv", []))))
            for n, r in results.items()]
    total = sum(r.get("seconds", 0) or 0 for r in results.values())
    return (_c.md_table(["result", "wall [s]", "command"], rows, "lrl") + f"\n\nTotal: {total:.0f} s "
            f"({total / 60:.1f} min).\n")


def build(raw: Path, grid_summary: Path = DEFAULT_GRID_SUMMARY) -> str:
    """RESULTS.md's text from the JSONs in ``raw`` and the demo grid summary."""
    results = load_results(raw)
    out = ["# Benchmark results", "",
           "Generated by `make bench` (`benchmarks/make_results.py` from `benchmarks/raw/*.json`); do not edit by "
           "hand. Each timed figure is the median of ≥ 3 repetitions with (min–max) unless it says otherwise; byte "
           "and count figures are exact. Run one benchmark alone with the command in its section.", "",
           "## Machine and versions", "", machine_section(results),
           "## Summary: this project vs the baselines", "", summary_section(results),
           "## Missed targets: why, and what would fix it", "", missed_section(results)]
    item_done = set()
    for item, name, cmd in SECTIONS:
        if item not in item_done:
            out += [f"## {item}. {ITEM_TITLES[item]}", ""]
            item_done.add(item)
        r = results.get(name)
        if name == "e2e":
            out += [grid_summary_text(grid_summary), ""]
        if r is None:
            out += [f"### {name}", "", f"Not measured: run `{cmd}` (or `make bench`).", ""]
            continue
        out += [f"### {r['title']}", "", r["markdown"].strip(), "",
                f"*Measured {r.get('date', '?')} in {r.get('seconds', '?')} s: `{cmd}`*", ""]
    out += [f"## 7. {ITEM_TITLES[7]}", ""]
    cuda = {n: r for n, r in results.items() if "cuda" in n or n.startswith("gpu_")}
    if not cuda:
        out += ["Not measured (no GPU lent). On a GPU: `make gpu-check` (one command, ≤ 8 min: precision paths, "
                "CUDA resume exactness, the smoke grid on CUDA, XLM-R-large throughput vs Trainer and peak memory "
                "at QA shapes, with and without accumulation; it rewrites this file).", ""]
    for n, r in cuda.items():
        out += [f"### {r['title']}", "", r["markdown"].strip(), ""]
    out += [GPU_METHOD, "## What each benchmark cost", "", runtime_section(results) if results else "Nothing yet.\n"]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, default=_c.RAW_DIR, help="folder of bench JSONs")
    ap.add_argument("--grid-summary", type=Path, default=DEFAULT_GRID_SUMMARY,
                    help="the demo grid's summary JSON (written after `make demo`)")
    ap.add_argument("--out", type=Path, default=_c.REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    from ofa_lib.io import write_text

    text = build(args.raw, args.grid_summary)
    write_text(args.out, text)
    print(f"wrote {args.out} ({len(load_results(args.raw))} results)")


if __name__ == "__main__":
    main()
