"""Model selection by generalization measures, and how well the measures predict transfer (05_measures).

For a pool of finished runs: :func:`measure_table` gathers the measures of every run's kept
variants (recorded by training in ``measures.parquet``, else computed here on the stored
checkpoints with :mod:`ofa_lib.train.measures`); :func:`rank_correlations` relates each measure to the
target-language test score (Spearman and Kendall with bootstrap intervals);
:func:`per_sampling_measures` adds selection strategies (Max margin on English dev, Max label-free
target margin, Min sharpness, …) to the samplings of :mod:`ofa_lib.results.selection` so that they sit
next to Max SRC-DEV, Max TRG-DEV and accumulative averaging in the Table-1 layout;
:func:`averaged_flatness` asks whether averaged weights are flatter than the runs they average.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from ofa_lib import results as R
from ofa_lib.io import write_parquet
from ofa_lib.merge import averaging, pool
from ofa_lib.models import ckpt_io
from ofa_lib.results import selection
from ofa_lib.train import hardware, measures, setup, training
from ofa_lib.train import runs as runs_lib
from ofa_lib.train.config import TrainConfig

# config fields that say how a run was optimised or measured: runs may differ in them and still be compared
# and averaged (same data, vocabulary and head)
VARIANTS = ("last", "src_dev", "ca", "trg_dev")
# selection strategy → (measure, direction): +1 picks the largest value, -1 the smallest
STRATEGIES: dict[str, tuple[str, int]] = {
    "max_margin_src": ("margin_src", 1),
    "max_margin_trg": ("margin_trg", 1),
    "min_sharpness_jiang": ("sharpness_jiang", -1),
    "min_sharpness_diff": ("sharpness_diff", -1),
    "min_frobenius": ("frobenius", -1),
    "min_fisher_trace": ("fisher_trace", -1),
}
LABEL_FREE_STRATEGIES = tuple(s for s, (m, _) in STRATEGIES.items() if m in measures.LABEL_FREE)


# --------------------------------------------------------------------------- runs
def find_runs(runs_root: str | Path | None, task: str) -> pd.DataFrame:
    """:func:`ofa_lib.merge.pool.find_runs` plus ``optimizer`` and ``measures_file``; runs must agree on
    every data parameter (they may differ in :data:`pool.PROCEDURE_PARAMS`), head and vocabulary."""
    runs = pool.find_runs(runs_root, task, check=False)
    if runs.empty:
        raise FileNotFoundError(f"no finished runs of task {task!r} under {training.runs_root(runs_root)}")
    ignore = set(pool.FREE_PARAMS)
    params = {r: {k: v for k, v in runs_lib.read_manifest(p)["params"].items() if k not in ignore}
              for r, p in zip(runs["run_id"], runs["path"])}
    first = next(iter(params.values()))
    for run_id, p in params.items():
        diff = sorted(k for k in set(p) | set(first) if p.get(k) != first.get(k))
        if diff:
            raise pool.IncompatibleRunsError(f"run {run_id} differs from {runs['run_id'].iloc[0]} in data parameters {diff}")
    for key, what in ((runs["head_fingerprint"], "head fingerprints"),
                      (runs["path"].map(pool.vocabulary_key), "vocabularies")):
        if key.nunique() > 1:
            raise pool.IncompatibleRunsError(f"runs have different {what}: {dict(zip(runs['run_id'], key))}")
    runs = runs.copy()
    runs["optimizer"] = [runs_lib.run_config(p).optimizer for p in runs["path"]]
    return runs


def recorded_measures(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's ``measures.parquet`` (runs trained with ``measures``), concatenated."""
    frames = [pd.read_parquet(Path(p) / "measures.parquet") for p in runs["path"] if (Path(p) / "measures.parquet").is_file()]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=measures.MEASURE_COLUMNS)
    return frame.assign(source="recorded")


class Skeleton:
    """One model (built once with :func:`ofa_lib.train.setup.prepare` of a run's config) and its
    measure batches; checkpoints are loaded into it in turn."""

    def __init__(self, cfg: TrainConfig, n_examples: int, device: str | None = None):
        self.cfg, self.n_examples = cfg, n_examples
        self.device = hardware.resolve_device(device, cfg.preset)
        self._prep = None

    @property
    def prep(self) -> setup.Prepared:
        if self._prep is None:
            self._prep = setup.prepare(self.cfg)
            self._prep.model.to(self.device)
            self.data = measures.MeasureData.from_prepared(self._prep, self.cfg.model_name, n_examples=self.n_examples)
        return self._prep

    def load(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        model = self.prep.model
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model

    def measure(self, state: Mapping[str, torch.Tensor], names: Sequence[str], options: Mapping[str, Any] | None = None) -> dict[str, tuple[float, float]]:
        model = self.load(state)
        return measures.compute(model, names, self.data, device=self.device, options=options)


def measure_table(runs: pd.DataFrame, names: Sequence[str], *, variants: Sequence[str] = VARIANTS,
                  n_examples: int | None = None, options: Mapping[str, Mapping[str, Any]] | None = None,
                  cache_path: str | Path | None = None, device: str | None = None, progress: bool = True,
                  skeleton: Skeleton | None = None) -> pd.DataFrame:
    """Measures per run: the recorded rows (snapshots and variants) and, for every (run, variant,
    measure) not recorded, the value computed on the stored checkpoint (fp32; the same batches for
    every run: ``n_examples`` per set, default the runs' ``measure_examples``). Computed rows are
    cached in ``cache_path`` (keyed by the settings), so a re-run computes nothing new.
    Columns: :data:`ofa_lib.train.measures.MEASURE_COLUMNS` + ``source`` (recorded | computed)."""
    first = runs_lib.run_config(runs["path"].iloc[0])
    measures.check_supported(first.task, names)
    n_examples = n_examples or first.measure_examples
    settings = json.dumps({"n_examples": n_examples, "options": options or {}}, sort_keys=True)
    recorded = recorded_measures(runs)
    recorded = recorded[recorded["measure"].isin(names) & ((recorded["kind"] == "snapshot") | recorded["name"].isin(variants))]
    cached = pd.DataFrame()
    if cache_path and Path(cache_path).is_file():
        cached = pd.read_parquet(cache_path)
        cached = cached[(cached["settings"] == settings) & cached["run_id"].isin(runs["run_id"]) & cached["name"].isin(variants)
                        & cached["measure"].isin(names)]
    have = set(zip(recorded["run_id"], recorded["kind"], recorded["name"], recorded["measure"]))
    have |= set(zip(cached.get("run_id", []), cached.get("kind", []), cached.get("name", []), cached.get("measure", [])))
    todo = [(r, p, v, [m for m in names if (r, "variant", v, m) not in have])
            for r, p in zip(runs["run_id"], runs["path"]) for v in variants]
    todo = [t for t in todo if t[3]]
    new = []
    if todo:
        sk = skeleton or Skeleton(first, n_examples, device)
        for run_id, path, variant, missing in tqdm(todo, desc="measure checkpoints", disable=not progress):
            file = Path(path) / "checkpoints" / f"{variant}.safetensors"
            if not file.is_file():
                raise FileNotFoundError(f"run {run_id} has no {variant} checkpoint ({file}); pass variants= that it keeps")
            values = sk.measure(ckpt_io.load_checkpoint(file, dtype=torch.float32), missing, options)
            new += measures.rows(values, run_id=run_id, kind="variant", name=variant, step=-1, epoch=float("nan"))
    fresh = pd.DataFrame(new, columns=measures.MEASURE_COLUMNS).assign(source="computed", settings=settings)
    if cache_path and len(fresh):
        write_parquet(cache_path, pd.concat([cached, fresh], ignore_index=True) if len(cached) else fresh)
    parts = [recorded] + ([cached.assign(source="computed")] if len(cached) else []) + [fresh]
    out = pd.concat([p for p in parts if len(p)], ignore_index=True)
    return out.drop(columns=["settings"], errors="ignore").reset_index(drop=True)


# --------------------------------------------------------------------------- per checkpoint
def variant_frame(measure_rows: pd.DataFrame, run_table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, variant): its measures (wide), test and dev scores, lr, batch size, seed, optimizer."""
    m = measure_rows[measure_rows["kind"] == "variant"]
    wide = m.pivot_table(index=["run_id", "name"], columns="measure", values="value", aggfunc="first").reset_index()
    wide = wide.rename(columns={"name": "variant"})
    rt = run_table.set_index("run_id")
    for col in ("test", "dev_src", "dev_trg"):
        wide[col] = [rt.loc[r, f"{col}_{v}"] if r in rt.index and f"{col}_{v}" in rt.columns else np.nan
                     for r, v in zip(wide["run_id"], wide["variant"])]
    info = runs.set_index("run_id")[["lr", "batch_size", "seed", "optimizer"]]
    wide = wide.join(info, on="run_id")
    wide.columns.name = None
    return wide.sort_values(["optimizer", "lr", "batch_size", "seed", "variant"]).reset_index(drop=True)


def snapshot_frame(measure_rows: pd.DataFrame, metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, snapshot) with recorded measures: the measures (wide), English dev and the
    mean target dev score (snapshots are scored on dev only). Empty when nothing was recorded."""
    m = measure_rows[measure_rows["kind"] == "snapshot"]
    if m.empty:
        return pd.DataFrame()
    wide = m.pivot_table(index=["run_id", "name"], columns="measure", values="value", aggfunc="first").reset_index()
    wide.columns.name = None
    task = runs_lib.run_config(runs["path"].iloc[0]).task
    metric = R.TASK_METRIC.get(task)
    d = metrics[(metrics["kind"] == "snapshot") & (metrics["split"] == "validation") & (metrics["metric"] == metric)]
    src = d[d["lang"] == R.SOURCE_LANG].groupby(["run_id", "name"])["value"].mean().rename("dev_src")
    trg = d[d["lang"] != R.SOURCE_LANG].groupby(["run_id", "name"])["value"].mean().rename("dev_trg")
    wide = wide.join(src, on=["run_id", "name"]).join(trg, on=["run_id", "name"])
    wide = wide.join(runs.set_index("run_id")[["lr", "batch_size", "seed", "optimizer"]], on="run_id")
    wide["snapshot"] = wide.pop("name").astype(int)
    return wide.sort_values(["run_id", "snapshot"]).reset_index(drop=True)


def rank_correlations(frame: pd.DataFrame, names: Sequence[str], target: str = "test", *, n_bootstrap: int = 1000,
                      seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Spearman ρ and Kendall τ of each measure with ``target`` over the rows of ``frame`` (one row per
    checkpoint), with percentile bootstrap intervals (rows resampled with replacement, ``n_bootstrap``
    times, seeded; resamples where a side is constant are skipped and counted in ``n_boot``)."""
    rng = np.random.default_rng(seed)
    out = []
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    for name in names:
        if name not in frame.columns:
            continue
        d = frame[[name, target]].dropna()
        x, y = d[name].to_numpy(float), d[target].to_numpy(float)
        row = {"measure": name, "target": target, "n": len(d)}
        for label, fn in (("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
            est = float(fn(x, y)[0]) if len(d) > 2 and np.ptp(x) > 0 and np.ptp(y) > 0 else np.nan
            boots = []
            for _ in range(n_bootstrap if len(d) > 2 else 0):
                idx = rng.integers(0, len(d), len(d))
                if np.ptp(x[idx]) > 0 and np.ptp(y[idx]) > 0:
                    boots.append(float(fn(x[idx], y[idx])[0]))
            row[label] = est
            row[f"{label}_lo"] = float(np.percentile(boots, lo_q)) if boots else np.nan
            row[f"{label}_hi"] = float(np.percentile(boots, hi_q)) if boots else np.nan
        row["n_boot"] = len(boots)
        row["expected_sign"] = measures.DIRECTION[name]
        out.append(row)
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- selection
def _pick(frame: pd.DataFrame, ids: Sequence[str], variant: str, measure: str, direction: int) -> str | None:
    """The run among ``ids`` whose ``variant`` has the best ``measure`` (ties: the earlier run)."""
    vals = frame[frame["variant"] == variant].set_index("run_id")[measure] if measure in frame.columns else pd.Series(dtype=float)
    best_id, best = None, None
    for i in ids:
        if i not in vals.index or pd.isna(vals.loc[i]):
            return None
        v = direction * float(vals.loc[i])
        if best is None or v > best:
            best_id, best = i, v
    return best_id


def per_sampling_measures(data: selection.CrossRunData, frame: pd.DataFrame, sampling_seeds: str | Iterable[int] = "all",
                          variants: Sequence[str] = selection.TABLE1_VARIANTS,
                          strategies: Sequence[str] = tuple(STRATEGIES)) -> pd.DataFrame:
    """:func:`ofa_lib.results.selection.per_sampling` (Max SRC-DEV, Max TRG-DEV, accumulative averages, soups)
    plus, for each strategy of :data:`STRATEGIES` whose measure is in ``frame``, the run it picks among
    the same candidates (``data.ids_for``) and that run's test score."""
    ps = selection.per_sampling(data, sampling_seeds, variants=variants)
    seeds = selection.resolve_sampling_seeds(sampling_seeds, data.sampling_seeds)
    rt = data.run_table.set_index("run_id")
    rows = []
    for strategy in strategies:
        measure, direction = STRATEGIES[strategy]
        if measure not in frame.columns:
            continue
        for s in seeds:
            for r in data.r_values:
                for v in variants:
                    ids = data.ids_for(v, s, r)
                    best = _pick(frame, ids, v, measure, direction)
                    if best is not None:
                        rows.append((data.task, s, r, strategy, v, best, ids, float(rt.loc[best, f"test_{v}"])))
    extra = pd.DataFrame(rows, columns=selection.PER_SAMPLING_COLUMNS)
    return pd.concat([ps, extra], ignore_index=True)


SELECTION_ORDER = ["max_src_dev", "max_trg_dev", "acc_avg", *STRATEGIES]


def selection_table(ps: pd.DataFrame) -> pd.DataFrame:
    """Table-1 layout: ``task, r, selection, variant, mean, std, n`` (test score ×100, mean and std
    over samplings), for Max SRC-DEV / accumulative averaging (last, src_dev, ca), Max TRG-DEV
    (trg_dev) and every measure-based strategy."""
    ps = ps[ps["method"].isin(SELECTION_ORDER)]
    g = ps.groupby(["task", "r", "method", "variant"], sort=False)["score"]
    out = pd.DataFrame({"mean": (g.mean() * 100).round(1), "std": (g.std(ddof=1) * 100).round(1),
                        "n": g.size().astype("int64")}).reset_index().rename(columns={"method": "selection"})
    order = {m: i for i, m in enumerate(SELECTION_ORDER)}
    vorder = {v: i for i, v in enumerate(VARIANTS)}
    out = out.assign(_s=out["selection"].map(order), _v=out["variant"].map(vorder))
    return out.sort_values(["task", "r", "_s", "_v"]).drop(columns=["_s", "_v"]).reset_index(drop=True)


def wide_selection(table: pd.DataFrame, r: int | None = None) -> pd.DataFrame:
    """Rows: selection; columns: variants; cells "mean ± std" at ``r`` (default the largest)."""
    r = int(table["r"].max()) if r is None else r
    t = table[table["r"] == r]
    cell = t["mean"].map("{:.1f}".format) + " ± " + t["std"].map(lambda x: "–" if pd.isna(x) else f"{x:.1f}")
    wide = t.assign(cell=cell).pivot(index="selection", columns="variant", values="cell")
    rows = [s for s in SELECTION_ORDER if s in wide.index]
    cols = [v for v in VARIANTS if v in wide.columns]
    wide = wide.loc[rows, cols].fillna("")
    wide.columns.name = f"r = {r}"
    return wide


def closest_to_trg_dev(ps: pd.DataFrame, strategies: Sequence[str] = LABEL_FREE_STRATEGIES) -> pd.DataFrame:
    """For each label-free strategy and variant: its mean test score over all (sampling, r ≥ 2) and
    the gap to Max TRG-DEV on the same (sampling, r) (×100; smaller is closer), sorted by gap."""
    trg = ps[(ps["method"] == "max_trg_dev") & (ps["r"] >= 2)].set_index(["sampling", "r"])["score"]
    rows = []
    for (method, variant), g in ps[ps["method"].isin(strategies) & (ps["r"] >= 2)].groupby(["method", "variant"]):
        g = g.set_index(["sampling", "r"])
        common = g.index.intersection(trg.index)
        if len(common) == 0:
            continue
        rows.append({"selection": method, "variant": variant, "n": len(common),
                     "mean": round(float(g.loc[common, "score"].mean()) * 100, 2),
                     "trg_dev": round(float(trg.loc[common].mean()) * 100, 2),
                     "gap": round(float((trg.loc[common] - g.loc[common, "score"]).mean()) * 100, 2)})
    cols = ["selection", "variant", "n", "mean", "trg_dev", "gap"]
    return pd.DataFrame(rows, columns=cols).sort_values(["gap", "selection", "variant"]).reset_index(drop=True)


def closest_sentence(close: pd.DataFrame, ps: pd.DataFrame) -> str:
    """The answer, in one paragraph with numbers: which label-free selection comes closest to TRG-DEV
    (selections with the same scores are named together: they picked the same checkpoints)."""
    if close.empty:
        return "No label-free selection could be compared with Max TRG-DEV (need r ≥ 2 and target dev scores)."
    best = close.iloc[0]
    tied = close[(close["gap"] == best["gap"]) & (close["mean"] == best["mean"])]
    names = " = ".join(f"**{r.selection}** ({r.variant})" for r in tied.itertuples())
    src = ps[(ps["method"] == "max_src_dev") & (ps["variant"] == best["variant"]) & (ps["r"] >= 2)]["score"].mean() * 100
    n_r = ps[ps["r"] >= 2]["r"].nunique()
    text = (f"Closest label-free selection to Max TRG-DEV: {names}, {best['mean']:.1f} vs {best['trg_dev']:.1f} "
            f"(gap TRG-DEV − selection {best['gap']:+.1f} points; mean over {int(best['n'])} (sampling, r) pairs with "
            f"r ≥ 2, {n_r} value{'s' if n_r != 1 else ''} of r). Max SRC-DEV on the same variant: {src:.1f}.")
    if len(tied) > 1:
        text += " Tied selections picked the same checkpoints."
    rest = close.iloc[len(tied):]
    if len(rest):
        text += f" Next: {rest.iloc[0]['selection']} ({rest.iloc[0]['variant']}), gap {rest.iloc[0]['gap']:+.1f}."
    return text


# --------------------------------------------------------------------------- flatness of averages
def averaged_flatness(runs: pd.DataFrame, data: selection.CrossRunData, frame: pd.DataFrame, skeleton: Skeleton, *,
                      variant: str = "ca", r: int | None = None, samplings: Iterable[int] = (0,),
                      names: Sequence[str] = ("sharpness_jiang", "sharpness_diff"), options: Mapping[str, Any] | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """For each sampling: the uniform average of the first ``r`` (default the largest) candidate runs'
    ``variant`` weights (:func:`ofa_lib.merge.averaging.average_checkpoints`), its measures next to its
    members' (mean, min, max from ``frame``); ``flatter`` = the average's value is below every member's."""
    r = max(data.r_values) if r is None else r
    paths = dict(zip(runs["run_id"], runs["path"]))
    rows = []
    for s in tqdm(list(samplings), desc="averaged flatness", disable=not progress):
        ids = list(data.ids_for(variant, s, r))
        state = averaging.average_checkpoints([Path(paths[i]) / "checkpoints" / f"{variant}.safetensors" for i in ids],
                                              dtype=torch.float32)
        values = skeleton.measure(state, names, options)
        members = frame[(frame["variant"] == variant) & frame["run_id"].isin(ids)]
        for name, (value, _) in values.items():
            mv = members[name].astype(float) if name in members.columns else pd.Series(dtype=float)
            rows.append({"sampling": s, "r": r, "variant": variant, "measure": name, "average": value,
                         "members_mean": mv.mean(), "members_min": mv.min(), "members_max": mv.max(),
                         "flatter": bool(len(mv) and value < mv.min()), "members": ",".join(ids)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figures
