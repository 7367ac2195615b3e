"""Report helpers for ``notebooks/04_analysis.ipynb``: loading, tables, figures, HTML.

CLI: ``python -m ofa_lib.analysis.report render <executed.ipynb> [--out report.html]`` writes a
self-contained ``report.html`` (code hidden, figures as base64 data URIs, no external
scripts) next to the executed notebook, i.e. in ``outputs/reports/<name>/``.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ofa_lib import results as R
from ofa_lib import tasks as tasks_lib
from ofa_lib.io import write_text
from ofa_lib.paths import outputs_dir, repo_relative
from ofa_lib.results import released
from ofa_lib.results import selection as S

# what reports call each task, by its study name and by its name in the released results (ofa_lib.tasks)
TASK_LABEL = {name: task.label for name, task in tasks_lib.BY_ANY_NAME.items()}
VARIANT_LABEL = {"last": "LAST", "src_dev": "SRC-DEV", "ca": "CA", "trg_dev": "TRG-DEV"}
SELECTION_LABEL = {"max_src_dev": "Max. SRC-DEV", "acc_avg": "Acc. averaging"}
METHOD_LABEL = {"max_src_dev": "Max. SRC-DEV", "max_trg_dev": "Max. TRG-DEV",
                "acc_avg_ca": "Acc. avg. (CA)", "soup": "SOUP (top-5)"}
TABLE_FILES = ("table1.csv", "table2.csv", "table3.csv")


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------

@dataclass
class TaskData:
    """One task's tidy rows and the :class:`~ofa_lib.results.selection.CrossRunData` built from them."""

    task: str
    tidy: pd.DataFrame
    cross: S.CrossRunData


def load(
    source: str | os.PathLike,
    tasks: Sequence[str],
    model: str = "xlm-roberta-large",
    data_dir: str | os.PathLike | None = None,
) -> dict[str, TaskData]:
    """``source="released"``: the authors' released results (``import_released``);
    otherwise a tidy Parquet file or directory of them (:func:`ofa_lib.results.read`)."""
    out: dict[str, TaskData] = {}
    if str(source) == "released":
        for t in tasks:
            rr = released.import_released(t, model=model, data_dir=data_dir)
            out[t] = TaskData(t, rr.to_tidy(), S.CrossRunData.from_released(rr))
        return out
    tidy = R.read(source)
    for t in tasks:
        sub = tidy[(tidy["task"] == t) & (tidy["model"] == model)].reset_index(drop=True)
        out[t] = TaskData(t, sub, S.CrossRunData.from_tidy(sub, t, model, origin=str(source)))
    return out


def report_dir(report_name: str, outputs_root: str | os.PathLike | None = None) -> Path:
    """``<outputs_root>/<report_name>`` (default root: ``outputs/reports``), created."""
    root = Path(outputs_root) if outputs_root is not None else outputs_dir() / "reports"
    path = root / report_name
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------

def compute_tables(data: dict[str, TaskData], sampling_seeds: str | Iterable[int] = "authors") -> dict[str, pd.DataFrame]:
    """``per_sampling``, ``table1``, ``table2``, ``table3`` and ``paired`` (accumulative averaging
    against Max SRC-DEV, paired over samplings: :func:`ofa_lib.results.selection.paired_comparison`) over all
    tasks (in order)."""
    ps = pd.concat([S.per_sampling(d.cross, sampling_seeds) for d in data.values()],
                   ignore_index=True)
    crosses = [d.cross for d in data.values()]
    return {
        "per_sampling": ps,
        "table1": S.table1(ps),
        "table2": S.table2(ps),
        "table3": S.table3(crosses),
        "paired": S.paired_comparison(ps),
    }


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` as CSV (no index) atomically."""
    write_text(path, df.to_csv(index=False))
    return Path(path)


def write_tables(tables: dict[str, pd.DataFrame], out_dir: str | os.PathLike) -> list[Path]:
    """Write table1/2/3 and the paired comparison (``paired.csv``, when computed) as CSV (atomically)
    into ``out_dir``."""
    return [write_csv(tables[name], Path(out_dir) / f"{name}.csv")
            for name in ("table1", "table2", "table3", "paired") if name in tables]


def _pm(mean: pd.Series, std: pd.Series) -> pd.Series:
    return mean.map("{:.1f}".format) + " ± " + std.map(
        lambda s: "–" if pd.isna(s) else f"{s:.1f}")


def wide_table1(t1: pd.DataFrame) -> pd.DataFrame:
    """Paper layout: rows r, columns (task, selection, variant) holding ``mean ± std``."""
    df = t1.assign(cell=_pm(t1["mean"], t1["std"]),
                   task=t1["task"].map(lambda t: TASK_LABEL.get(t, t)),
                   selection=t1["selection"].map(SELECTION_LABEL),
                   variant=t1["variant"].map(VARIANT_LABEL))
    w = df.pivot(index="r", columns=["task", "selection", "variant"], values="cell")
    return w.reindex(columns=_col_order(df, ["task", "selection", "variant"]))


def wide_table2(t2: pd.DataFrame) -> pd.DataFrame:
    df = t2.assign(cell=_pm(t2["mean"], t2["std"]),
                   task=t2["task"].map(lambda t: TASK_LABEL.get(t, t)),
                   method=t2["method"].map(METHOD_LABEL))
    w = df.pivot(index="r", columns=["task", "method"], values="cell")
    return w.reindex(columns=_col_order(df, ["task", "method"]))


def wide_table3(t3: pd.DataFrame) -> pd.DataFrame:
    df = t3.assign(cell=_pm(t3["mean"], t3["std"]),
                   task=t3["task"].map(lambda t: TASK_LABEL.get(t, t)),
                   variant=t3["variant"].map(VARIANT_LABEL),
                   lr=t3["lr"].map(lambda x: f"{x:.1e}"))
    w = df.pivot(index=["lr", "batch_size"], columns=["task", "variant"], values="cell")
    w = w.reindex(columns=_col_order(df, ["task", "variant"]))
    order = t3[["lr", "batch_size"]].drop_duplicates().sort_values(["lr", "batch_size"])
    idx = pd.MultiIndex.from_arrays([order["lr"].map(lambda x: f"{x:.1e}"), order["batch_size"]],
                                    names=["lr", "batch_size"])
    return w.reindex(idx)


def _col_order(df: pd.DataFrame, cols: list[str]) -> pd.MultiIndex:
    return pd.MultiIndex.from_frame(df[cols].drop_duplicates())


def style_table1(t1: pd.DataFrame) -> Any:
    """Styled :func:`wide_table1`: averaging cells >= 0.2 above the best Max. SRC-DEV value
    of that task and variant (any r) in green, within +-0.1 of it in yellow (as the paper)."""
    wide = wide_table1(t1)
    best = (t1[t1["selection"] == "max_src_dev"].groupby(["task", "variant"])["mean"].max())
    colors = pd.DataFrame("", index=wide.index, columns=wide.columns)
    for rec in t1[t1["selection"] == "acc_avg"].itertuples(index=False):
        key = (rec.task, rec.variant)
        if key not in best.index:
            continue
        diff = rec.mean - best.loc[key]
        col = (TASK_LABEL.get(rec.task, rec.task), SELECTION_LABEL["acc_avg"], VARIANT_LABEL[rec.variant])
        if diff >= 0.2 - 1e-9:
            colors.loc[rec.r, col] = "background-color: #c7e9c0"
        elif abs(diff) <= 0.1 + 1e-9:
            colors.loc[rec.r, col] = "background-color: #fff3b0"
    return wide.style.apply(lambda _: colors, axis=None)


def provenance_markdown(data: dict[str, TaskData], params: dict, sampling_seeds: str | Iterable[int],
                        out_dir: str | os.PathLike) -> str:
    """A short markdown block: parameters, runs and samplings per task, output folder."""
    lines = ["| parameter | value |", "|---|---|"]
    lines += [f"| `{k}` | `{_shown(v)!r}` |" for k, v in params.items()]
    lines += ["", "| task | source | runs | (lr, batch) configurations | sampling seeds used | r |",
              "|---|---|---|---|---|---|"]
    for task, td in data.items():
        c = td.cross
        seeds = S.resolve_sampling_seeds(sampling_seeds, c.sampling_seeds)
        n_cfg = len(c.run_table[["lr", "batch_size"]].drop_duplicates())
        rs = c.r_values
        lines.append(f"| {TASK_LABEL.get(task, task)} | {_shown(c.origin)} | {len(c.run_table)} | {n_cfg} | "
                     f"{', '.join(map(str, seeds))} (n={len(seeds)}) | {rs[0]}–{rs[-1]} |")
    lines += ["", f"Tables and figures are written to `{repo_relative(Path(out_dir).resolve())}`."]
    return "\n".join(lines)


def _shown(value):
    """A parameter as the report shows it: absolute paths inside the repository made relative to it."""
    if isinstance(value, (str, os.PathLike)) and os.path.isabs(value):
        return repo_relative(value)
    return value


def headline_markdown(t1: pd.DataFrame, t2: pd.DataFrame) -> str:
    """Per task: the best Max. SRC-DEV value (any r, any variant) against accumulative
    averaging of CA weights, Max. TRG-DEV and SOUP at the largest r."""
    lines = ["| task | best Max. SRC-DEV (any r, variant) | Acc. avg. CA at r=max | "
             "Max. TRG-DEV (oracle) at r=max | SOUP at r=max |", "|---|---|---|---|---|"]
    for task in dict.fromkeys(t1["task"]):
        a = t1[(t1["task"] == task) & (t1["selection"] == "max_src_dev")]
        if a.empty:
            continue
        b = a.loc[a["mean"].idxmax()]
        d2 = t2[(t2["task"] == task)]
        rmax = int(d2["r"].max()) if len(d2) else None

        def cell(method):
            x = d2[(d2["method"] == method) & (d2["r"] == rmax)]
            return "–" if x.empty else f"{x['mean'].iloc[0]:.1f} ± {x['std'].iloc[0]:.1f}"

        lines.append(f"| {TASK_LABEL.get(task, task)} | {b['mean']:.1f} ± {b['std']:.1f} "
                     f"({VARIANT_LABEL[b['variant']]}, r={int(b['r'])}) | {cell('acc_avg_ca')} | "
                     f"{cell('max_trg_dev')} | {cell('soup')} |")
    return "\n".join(lines)


def same_runs_note(per_sampling: pd.DataFrame) -> str:
    """A markdown line naming each task's r at which every sampling holds the same set of runs
    (:func:`ofa_lib.results.selection.same_runs`), where a standard deviation of 0 is no certainty; empty if none."""
    flags = S.same_runs(per_sampling)
    flags = flags[flags["same_runs"]]
    if flags.empty:
        return ""
    parts = [f"{TASK_LABEL.get(t, t)}: r = {', '.join(str(int(r)) for r in g['r'])}"
             for t, g in flags.groupby("task", sort=False)]
    return ("**Same runs in every sampling** (" + "; ".join(parts) + "): there every sampling holds the same "
            "set of runs (r = the number of configurations), so the samplings differ at most in the order of the runs "
            "(which only decides ties in Max. SRC-DEV's choice): a standard deviation of 0.0 there reads as certainty but "
            "is none, and the paired comparison below is no independent evidence there.")


def _fmt_pair(rec) -> str:
    if pd.isna(rec.ci_low):
        return f"{rec.mean_diff + 0.0:+.1f} (one sampling, no interval)"
    return f"{rec.mean_diff + 0.0:+.1f} [{rec.ci_low + 0.0:+.1f}, {rec.ci_high + 0.0:+.1f}]"  # + 0.0: no "-0.0"


def paired_sentence(paired: pd.DataFrame) -> str:
    """One sentence per task from :func:`ofa_lib.results.selection.paired_comparison`, at the largest r whose
    samplings still differ (the largest r if none do): for each pair of weights, whether accumulative
    averaging beats, trails or is level with Max. SRC-DEV (its 95% bootstrap interval excludes 0 or not),
    the mean paired difference in points with that interval, and how many samplings favour averaging."""
    if paired.empty:
        return "No accumulative averages in the results: nothing to compare with Max. SRC-DEV."
    out = []
    for task, t in paired.groupby("task", sort=False):
        differ = t[~t["same_runs"]]
        r = int((differ if len(differ) else t)["r"].max())
        at = t[t["r"] == r]
        clauses = []
        for rec in at.itertuples(index=False):
            weights = (f"{VARIANT_LABEL[rec.variant]} weights" if rec.variant == rec.src_variant else
                       f"its {VARIANT_LABEL[rec.variant]} weights against the {VARIANT_LABEL[rec.src_variant]} "
                       "checkpoint Max. SRC-DEV picks")
            if pd.isna(rec.ci_low) or rec.ci_low <= 0 <= rec.ci_high:
                verb = f"is level with Max. SRC-DEV at {_fmt_pair(rec)}"
            elif rec.ci_low > 0:
                verb = f"beats Max. SRC-DEV by {_fmt_pair(rec)}"
            else:  # the gap as a positive number: "trails by 11.4 [10.5, 13.3]"
                verb = f"trails Max. SRC-DEV by {-rec.mean_diff:.1f} [{-rec.ci_high:.1f}, {-rec.ci_low:.1f}]"
            ties = f", {rec.ties} tie{'s' if rec.ties != 1 else ''}" if rec.ties else ""
            clauses.append(f"on {weights} it {verb} points ({rec.wins} of {rec.n} samplings favour it{ties})")
        same = at["same_runs"].any()
        tail = (f" (every sampling holds the same runs at r = {r}: they differ only in order, which decides ties in "
                f"Max. SRC-DEV's choice; not {int(at['n'].iloc[0])} independent observations)") if same else ""
        out.append(f"{TASK_LABEL.get(task, task)}, r = {r}{tail}: accumulative averaging against Max. SRC-DEV over "
                   f"the same runs, paired by sampling: " + "; ".join(clauses) + ".")
    return " ".join(out)


def wide_paired(paired: pd.DataFrame) -> pd.DataFrame:
    """Rows (task, r), columns the pairs of weights, cells "+d [lo, hi] w/t/l"; r where every sampling
    holds the same runs is marked "(same runs)"."""
    if paired.empty:
        return pd.DataFrame()
    d = paired.assign(
        cell=[f"{_fmt_pair(x)} {x.wins}/{x.ties}/{x.losses}" for x in paired.itertuples(index=False)],
        task=paired["task"].map(lambda t: TASK_LABEL.get(t, t)),
        r=[f"{int(r)} (same runs)" if s else str(int(r)) for r, s in zip(paired["r"], paired["same_runs"])],
        weights=[VARIANT_LABEL[v] if v == sv else f"{VARIANT_LABEL[v]} vs {VARIANT_LABEL[sv]}"
                 for v, sv in zip(paired["variant"], paired["src_variant"])])
    w = d.pivot_table(index=["task", "r"], columns="weights", values="cell", aggfunc="first", sort=False)
    return w[list(dict.fromkeys(d["weights"]))]


# --------------------------------------------------------------------------------------
# why CA averages can be weak: the runs' snapshots on English dev (issue 18)
# --------------------------------------------------------------------------------------

def snapshot_convergence(data: dict[str, TaskData], source_lang: str = R.SOURCE_LANG) -> pd.DataFrame:
    """Per run (tasks whose store holds the runs' snapshot rows): English dev of each snapshot, how many leading
    snapshots stay below half-way from the run's lowest to its best English dev (``early``), and the target
    test scores of its LAST and CA weights (x100). Columns ``task, run_id, lr, batch_size, n_snapshots,
    first, best, early, last, ca``."""
    rows = []
    for task, td in data.items():
        tidy = td.tidy
        snap = tidy[(tidy["kind"] == "snapshot") & (tidy["lang"] == source_lang) & (tidy["split"] != "test")]
        if "metric" in snap and task in R.TASK_METRIC:
            snap = snap[snap["metric"] == R.TASK_METRIC[task]]
        if snap.empty:
            continue
        rt = td.cross.run_table.set_index("run_id")
        for run_id, g in snap.groupby("run_id", sort=False):
            if run_id not in rt.index:
                continue
            en = g.assign(k=g["name"].astype(int)).groupby("k")["value"].mean().sort_index()
            lo, hi = float(en.min()), float(en.max())
            early = 0
            for v in en:
                if v >= lo + 0.5 * (hi - lo) or hi == lo:
                    break
                early += 1
            rows.append({"task": task, "run_id": run_id, "lr": float(rt.loc[run_id, "lr"]),
                         "batch_size": int(rt.loc[run_id, "batch_size"]), "n_snapshots": len(en),
                         "first": round(100 * float(en.iloc[0]), 1), "best": round(100 * hi, 1), "early": early,
                         "last": round(100 * float(rt.loc[run_id, "test_last"]), 1),
                         "ca": round(100 * float(rt.loc[run_id, "test_ca"]), 1)})
    return pd.DataFrame(rows, columns=["task", "run_id", "lr", "batch_size", "n_snapshots", "first", "best",
                                       "early", "last", "ca"])


def ca_sentence(conv: pd.DataFrame) -> str:
    """Per task, from :func:`snapshot_convergence`: how far CA trails (or leads) LAST in single runs, split by
    whether a run's first snapshots were still unconverged on English dev (``early`` of at least a fifth of its
    snapshots), so a reader sees whether CA's weakness sits in the slowly converging runs."""
    if conv.empty:
        return ""
    out = []
    for task, t in conv.groupby("task", sort=False):
        gap = t["ca"] - t["last"]
        slow = t["early"] >= np.ceil(0.2 * t["n_snapshots"])
        s = (f"{TASK_LABEL.get(task, task)}: over its {len(t)} runs, a run's own CA weights score {gap.mean():+.1f} points "
             f"against its LAST on target test (from {gap.min():+.1f} to {gap.max():+.1f}).")
        if slow.any() and (~slow).any():
            desc = ", ".join(f"lr {r.lr:g} batch {r.batch_size}: {r.early} of {r.n_snapshots}" for r in t[slow].itertuples())
            s += (f" In the {int(slow.sum())} run(s) whose English dev is still less than half-way from its lowest to its "
                  f"best value for the first snapshots ({desc}), CA scores {gap[slow].mean():+.1f} against LAST; in the "
                  f"other {int((~slow).sum())}, {gap[~slow].mean():+.1f}.")
            if gap[slow].mean() < gap[~slow].mean():
                s += (" CA is the uniform mean of all snapshots, so those early, barely trained snapshots pull it back "
                      "towards the start weights, and averaging the runs' CA weights inherits that.")
        elif slow.all():
            s += " Every run's first snapshots are still less than half-way to its best English dev."
        else:
            s += " No run spends its first snapshots far from its best English dev."
        out.append(s)
    return " ".join(out)


# --------------------------------------------------------------------------------------
# per-language analysis
# --------------------------------------------------------------------------------------

def per_language_gain(
    data: dict[str, TaskData], per_sampling: pd.DataFrame, r: int = 10,
    variants: Sequence[str] = S.TABLE1_VARIANTS, source_lang: str = R.SOURCE_LANG,
) -> pd.DataFrame:
    """Per target language, the gain (x100) of accumulative averaging over Max. SRC-DEV at
    ``r`` for each variant, averaged over the samplings in ``per_sampling``.

    Columns ``task, variant, dataset, lang, gain, n``. Uses the per-language tidy rows: the
    ``acc_avg:<v>:r=<r>:sampling=<s>`` average and the selected run's ``<v>`` test scores.
    Tasks without per-language average rows are skipped.
    """
    rows = []
    for task, td in data.items():
        tidy = td.tidy
        test = tidy[(tidy["split"] == "test") & (tidy["lang"] != source_lang)
                    & (tidy["lang"] != R.ALL)]
        if "metric" in test and task in R.TASK_METRIC:
            test = test[test["metric"] == R.TASK_METRIC[task]]
        runs = test[test["kind"] == "variant"].set_index(["run_id", "name", "dataset", "lang"])["value"]
        avgs = test[test["kind"] == "average"].set_index(["name", "dataset", "lang"])["value"]
        if avgs.empty:
            continue
        ps = per_sampling[(per_sampling["task"] == task) & (per_sampling["r"] == r)
                          & (per_sampling["method"] == "max_src_dev")]
        for rec in ps.itertuples(index=False):
            if rec.variant not in variants:
                continue
            name = R.cross_name("acc_avg", rec.variant, r, rec.sampling)
            try:
                a = avgs.xs(name, level="name")
                s = runs.xs((rec.run_id, rec.variant), level=["run_id", "name"])
            except KeyError:
                continue
            g = (a - s.reindex(a.index)) * 100
            for (ds, lang), val in g.items():
                rows.append((task, rec.variant, ds, lang, rec.sampling, val))
    df = pd.DataFrame(rows, columns=["task", "variant", "dataset", "lang", "sampling", "gain"])
    out = (df.groupby(["task", "variant", "dataset", "lang"], sort=False)["gain"]
             .agg(["mean", "size"]).reset_index()
             .rename(columns={"mean": "gain", "size": "n"}))
    return out


# --------------------------------------------------------------------------------------
# merge methods
# --------------------------------------------------------------------------------------

MERGE_FILE = "merge_methods.csv"


def merge_methods(data: dict[str, TaskData], sampling_seeds: str | Iterable[int] = "all") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-sampling scores, :func:`ofa_lib.results.selection.merge_table`) of every task whose store holds
    merges (:func:`ofa_lib.results.selection.merge_per_sampling`); both empty for the released results."""
    frames = [S.merge_per_sampling(d.tidy, d.task, d.cross.model, sampling_seeds) for d in data.values()
              if d.cross.origin != "released"]
    frames = [f for f in frames if len(f)]
    ps = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=S.PER_SAMPLING_COLUMNS)
    return ps, S.merge_table(ps)


def wide_merge_table(mt: pd.DataFrame) -> pd.DataFrame:
    """Rows (task, variant, r), columns the selections and merge methods, cells "mean ± std"."""
    if mt.empty:
        return pd.DataFrame()
    d = mt.assign(cell=_pm(mt["mean"], mt["std"]))
    wide = d.pivot_table(index=["task", "variant", "r"], columns="method", values="cell", aggfunc="first", sort=False)
    return wide[list(dict.fromkeys(mt["method"]))]


def merge_sentence(mt: pd.DataFrame, ps: pd.DataFrame | None = None) -> str:
    """Per task, at the largest r whose samplings still hold different runs (from ``ps``, the per-sampling
    scores; the largest r without it): which merge is best (any variant) and by how much over the uniform mean
    and Max SRC-DEV of that variant, then the methods ranked on the weights most of them were computed on, each
    against the uniform mean there, with the spread over samplings."""
    if mt.empty:
        return "No merge rows in the results (run 03_average with `methods`)."
    flags = S.same_runs(ps) if ps is not None and len(ps) else pd.DataFrame(columns=["task", "r", "same_runs"])

    def cell(row) -> str:
        return f"{row['mean']:.1f} ± {0 if pd.isna(row['std']) else row['std']:.1f}"

    out = []
    for task, t in mt.groupby("task", sort=False):
        r_max = int(t["r"].max())
        same = set(flags.loc[(flags["task"] == task) & flags["same_runs"].astype(bool), "r"].astype(int))
        spread_rs = sorted(set(t["r"].astype(int)) - same)
        r = spread_rs[-1] if spread_rs else r_max
        at = t[t["r"] == r]
        merges = at[~at["method"].isin(["max_src_dev", "max_trg_dev"])]
        if merges.empty:
            continue
        best = merges.sort_values("mean", ascending=False, kind="stable").iloc[0]
        ref = at[at["variant"] == best["variant"]].set_index("method")
        parts = [f"{TASK_LABEL.get(task, task)}, r = {r}"
                 + (f" (the largest r whose samplings hold different runs; at r = {r_max} every sampling holds the "
                    "same runs, so its spread says nothing)" if r != r_max else "")
                 + f": the best merge is **{best['method']}** on {VARIANT_LABEL.get(best['variant'], best['variant'])} "
                 f"weights, {cell(best)} (mean ± std over {int(best['n'])} samplings)"]
        for name, label in ((R.UNIFORM, "the uniform mean"), ("max_src_dev", "Max. SRC-DEV")):
            if name in ref.index and name != best["method"]:
                gap = best["mean"] - ref.loc[name, "mean"]
                spread = max(float(np.nan_to_num(best["std"])), float(np.nan_to_num(ref.loc[name, "std"])))
                note = " (within one standard deviation)" if abs(gap) <= spread else ""
                parts.append(f"{gap:+.1f} over {label} ({cell(ref.loc[name])}){note}")
        if "max_trg_dev" in ref.index:
            parts.append(f"Max. TRG-DEV (oracle) {cell(ref.loc['max_trg_dev'])}")
        # the methods side by side: on the variant most of them were computed on (a grid may restrict them)
        per_variant = merges.groupby("variant", sort=False)["method"].nunique()
        variant = per_variant.idxmax()
        ranked = merges[merges["variant"] == variant].sort_values("mean", ascending=False, kind="stable")
        if len(ranked) > 1:
            uni = ranked.set_index("method")["mean"].get(R.UNIFORM)
            parts.append(f"the methods on {VARIANT_LABEL.get(variant, variant)} weights: " + " > ".join(
                f"{m} {cell(row)}" + (f" ({row['mean'] - uni:+.1f} over uniform)" if uni is not None and m != R.UNIFORM else "")
                for m, row in zip(ranked["method"], ranked.to_dict("records"))))
        out.append("; ".join(parts) + ".")
    return " ".join(out) or "No merge rows in the results."


# --------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------
# HTML rendering
# --------------------------------------------------------------------------------------

_EXT_SCRIPT = re.compile(r"<script[^>]*\bsrc=\"(?:https?:)?//[^\"]*\"[^>]*>\s*</script>", re.I)


def render(notebook_path: str | os.PathLike, out_html: str | os.PathLike | None = None) -> Path:
    """Render an executed notebook to a self-contained HTML report (inputs hidden, images
    embedded as data URIs, external ``<script src=...>`` tags removed). Default output:
    ``report.html`` beside the notebook. Written atomically."""
    import nbformat
    from nbconvert import HTMLExporter

    nb_path = Path(notebook_path)
    nb = nbformat.read(nb_path, as_version=4)
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    body, _ = exporter.from_notebook_node(nb)
    body = _EXT_SCRIPT.sub("", body)
    out = Path(out_html) if out_html is not None else nb_path.parent / "report.html"
    write_text(out, body)
    return out


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa_lib.analysis.report")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("render", help="executed notebook -> self-contained report.html")
    p.add_argument("notebook")
    p.add_argument("--out", default=None, help="output HTML (default: report.html beside it)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.cmd == "render":
        if not Path(args.notebook).is_file():
            parser.error(f"no such notebook: {args.notebook}")
        out = render(args.notebook, args.out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def diagnosis_folder(value: str | os.PathLike | None, out_dir: str | os.PathLike) -> Path | None:
    """The folder 04 shows a CA diagnosis from: None for None; for ``"auto"``, ``<out_dir>/diagnosis`` when a
    diagnosis was written there (else None); any other value is the folder itself."""
    if value is None:
        return None
    if str(value) == "auto":
        folder = Path(out_dir) / "diagnosis"
        return folder if (folder / "diagnosis.md").is_file() else None
    return Path(value)


def diagnosis_markdown(folder: str | os.PathLike | None) -> str:
    """The generated summary of a CA diagnosis (``python -m ofa_lib.analysis.diagnose … --out folder``: its
    ``diagnosis.md``), with the folder shown relative to the repository; empty when ``folder`` is None."""
    if folder is None:
        return ""
    md = Path(folder) / "diagnosis.md"
    if not md.is_file():
        raise FileNotFoundError(f"parameter diagnosis={str(folder)!r}: {md} does not exist "
                                "(write it with `python -m ofa_lib.analysis.diagnose RUN_A RUN_B ... --out FOLDER`)")
    return f"**Diagnosis** (`{repo_relative(Path(folder).resolve())}`): " + md.read_text(encoding="utf-8").strip()
