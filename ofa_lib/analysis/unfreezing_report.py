"""06_unfreezing's analysis across runs: the scheduled runs of a grid, their tr(F) curves and unfreezing
events, transfer per setting (Table 1) and accumulative averaging per setting. The runtime half (the
schedules themselves) is :mod:`ofa_lib.train.unfreezing`; the figures are in :mod:`ofa_lib.analysis.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ofa_lib import results
from ofa_lib.merge import crossrun, pool
from ofa_lib.results import selection
from ofa_lib.train import runs as runs_lib
from ofa_lib.train.metrics import PRIMARY_METRIC


def fisher_curve(fisher: pd.DataFrame) -> pd.DataFrame:
    """The paper's curve: per run and step, tr(F) summed over the trainable blocks (head excluded)
    divided by their number (``mean_trainable``), and over all blocks (``total``)."""
    enc = fisher[fisher.block != "head"]
    keys = [c for c in ("run_id", "step", "epoch") if c in enc.columns]
    total = enc.groupby(keys).trace.sum().rename("total")
    trainable = enc[enc.trainable].groupby(keys).trace.agg(["sum", "count"])
    mean = (trainable["sum"] / trainable["count"]).rename("mean_trainable")
    return pd.concat([total, mean], axis=1).reset_index()


def schedule_table(events: list[dict[str, Any]], blocks: list[str]) -> pd.DataFrame:
    """Per unfreezing event: its position, step, block and the block's depth from the top (0 = top)."""
    top_down = list(reversed(blocks))
    return pd.DataFrame([{"position": i, "step": e["step"], "block": e["block"], "depth_from_top": top_down.index(e["block"])}
                         for i, e in enumerate(events)])


def setting_of(params: dict[str, Any]) -> str:
    """A run's training setting: its schedule, ``+ada<r>`` with task adapters (e.g. ``gu+ada16``)."""
    return str(params.get("unfreeze", "none")) + (f"+ada{params['adapters']}" if params.get("adapters") else "")


def find_schedule_runs(runs_root: str | Path | None, task: str) -> pd.DataFrame:
    """Finished runs of ``task`` (:func:`ofa_lib.merge.pool.find_runs`, unchecked: settings differ) with
    ``setting``, ``schedule``, ``every`` and ``adapters`` columns."""
    runs = pool.find_runs(runs_root, task, check=False)
    if runs.empty:
        raise FileNotFoundError(f"no finished {task} runs under {runs_root}")
    params = [runs_lib.read_manifest(p)["params"] for p in runs["path"]]
    return runs.assign(setting=[setting_of(p) for p in params], schedule=[p.get("unfreeze", "none") for p in params],
                       every=[p.get("unfreeze_every") for p in params], adapters=[p.get("adapters", 0) for p in params])


def load_fisher(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's ``fisher.parquet`` with its setting, lr, batch size and seed (empty if none has one)."""
    frames = [pd.read_parquet(Path(r.path) / "fisher.parquet").assign(setting=r.setting, lr=r.lr, batch_size=r.batch_size,
                                                                      seed=r.seed)
              for r in runs.itertuples() if (Path(r.path) / "fisher.parquet").is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_events(runs: pd.DataFrame) -> pd.DataFrame:
    """The unfreezing events every scheduled run applied (:func:`schedule_table` + run and setting)."""
    frames = []
    for r in runs.itertuples():
        unf = runs_lib.read_manifest(r.path).get("unfreezing")
        if unf and unf["events"]:
            frames.append(schedule_table(unf["events"], unf["blocks"]).assign(run_id=r.run_id, setting=r.setting,
                                                                              n_blocks=len(unf["blocks"])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _pm(mean: pd.Series, std: pd.Series) -> pd.Series:
    return mean.map("{:.1f}".format) + " ± " + std.map(lambda x: "–" if pd.isna(x) else f"{x:.1f}")


def transfer_table(runs: pd.DataFrame, variant: str = "last") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paper Table 2 for our runs: per setting English (source dev), the lowest target language (lowest
    mean over all runs, the same language for every setting) and the target average, ×100, mean ± std
    over runs. Returns ``(per-run numbers, the formatted table)``."""

    per_run = []
    for r in runs.itertuples():
        cfg = runs_lib.run_config(r.path)
        m = pd.read_parquet(Path(r.path) / "metrics.parquet")
        m = m[(m.kind == "variant") & (m.name == variant) & (m.metric == PRIMARY_METRIC[cfg.task])]
        src = cfg.dev_sets()[0]
        en = m[(m.dataset == src[0]) & (m.lang == src[1]) & (m.split == src[2])].value
        row = {"run_id": r.run_id, "setting": r.setting, "lr": r.lr, "batch_size": r.batch_size, "seed": r.seed,
               "en": float(en.iloc[0]) * 100 if len(en) else float("nan")}
        for d, lang, split in cfg.test_sets():
            v = m[(m.dataset == d) & (m.lang == lang) & (m.split == split)].value
            row[f"{d}/{lang}"] = float(v.iloc[0]) * 100
        per_run.append(row)
    per_run = pd.DataFrame(per_run)
    langs = [c for c in per_run.columns if "/" in c]
    per_run["average"] = per_run[langs].mean(axis=1)
    lowest = per_run[langs].mean().idxmin()
    cols = {"en": "English", lowest: f"lowest ({lowest})", "average": "average"}
    g = per_run.groupby("setting", sort=False)
    table = pd.DataFrame({label: _pm(g[c].mean(), g[c].std(ddof=1)) for c, label in cols.items()})
    table["runs"] = g.size()
    return per_run, table


def averaging_by_setting(runs: pd.DataFrame, out_dir: str | Path, *, variants: list[str], r_max: int, n_samplings: int,
                         device: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Max. SRC-DEV vs accumulative averaging by r (paper Table 1 rows), separately per setting.

    Each setting with runs of at least two (lr, batch) configurations gets its own results store
    ``<out_dir>/results_<setting>.parquet`` (runs of different settings are never averaged together);
    averaging itself is :func:`ofa_lib.merge.crossrun.average_runs`. Returns :func:`ofa_lib.results.selection.table1` + ``setting``."""

    frames = []
    for setting, group in runs.groupby("setting", sort=False):
        n_cfg = len(group[["lr", "batch_size"]].drop_duplicates())
        if n_cfg < 2:
            print(f"{setting}: {n_cfg} (lr, batch) configuration: nothing to average")
            continue
        path = Path(out_dir) / f"results_{setting}.parquet"
        if path.exists():  # rows of runs that are gone (an edited grid), and the averages they were members of
            stored = results.read(path)
            results.drop_runs(path, set(stored.loc[stored.kind.isin(["snapshot", "variant"]), "run_id"]) - set(group.run_id))
        cols = [c for c in pool.RUN_COLUMNS if c in group.columns]
        results.append(path, pool.collect_run_metrics(group[cols]))
        crossrun.average_runs(group[cols], variants=variants, r_max=r_max, samplings=range(n_samplings), soup_k=None,
                              results_path=path, device=device, progress=progress)
        task = group.task.iloc[0]
        data = selection.CrossRunData.from_tidy(results.read(path), task, n_samplings=n_samplings, r_max=r_max)
        frames.append(selection.table1(selection.per_sampling(data, "all")).assign(setting=setting))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def averaging_answer(t1: pd.DataFrame, variant: str = "last", reference: str = "none") -> str:
    """The answer to "does averaging runs of setting X beat averaging standard runs?", in one paragraph with
    numbers: per setting, accumulative averaging and Max. SRC-DEV at the setting's largest r, each setting's
    averaging compared with the ``reference`` setting's (at the largest r both reach)."""
    d = t1[t1.variant == variant]
    if d.empty:
        return f"No setting could be averaged on the {variant} weights (each needs two (lr, batch) configurations)."
    parts = []
    for setting, g in d.groupby("setting", sort=False):
        at_max = g[g.r == g.r.max()].set_index("selection")
        avg, src = at_max.loc["acc_avg"], at_max.loc["max_src_dev"]
        parts.append(f"**{setting}** at r = {int(avg['r'])}: averaging {avg['mean']:.1f} ± {np.nan_to_num(avg['std']):.1f} "
                     f"vs Max SRC-DEV {src['mean']:.1f} ± {np.nan_to_num(src['std']):.1f}")
    text = f"On the {variant} weights (target test mean ×100, mean ± std over samplings): " + "; ".join(parts) + "."
    if reference in set(d.setting):
        for setting in [s for s in d.setting.unique() if s != reference]:
            r = min(d[d.setting == setting].r.max(), d[d.setting == reference].r.max())
            at = d[(d.r == r) & (d.selection == "acc_avg")].set_index("setting")["mean"]
            diff = at[setting] - at[reference]
            text += (f" Averaging {setting} runs {'beats' if diff > 0 else 'does not beat'} averaging {reference} runs "
                     f"at r = {int(r)} ({diff:+.1f} points).")
    return text
