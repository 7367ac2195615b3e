"""Across-run model selection and the paper's Tables 1-3 (docs/method.md §4).

Inputs are a *run table* (one row per run, :data:`ofa_lib.results.RUN_TABLE_COLUMNS`) and,
for accumulative averaging and soups, the scores of the averaged weights -- which are
measured elsewhere (the released ``*_ra`` rows, or our own ``03_average`` notebook).

:class:`CrossRunData` bundles both for one task, built either from the released results
(:meth:`CrossRunData.from_released`) or from tidy rows (:meth:`CrossRunData.from_tidy`).

Contract for our own averages (tidy rows, see :mod:`ofa_lib.results`):

* ``kind="average"``, ``name="acc_avg:<variant>:r=<r>:sampling=<s>"`` with variant in
  last/src_dev/ca: the test scores (per target language, or one ``lang="*"`` flat-mean row)
  of the uniform average of the first ``r`` runs' ``<variant>`` weights of sampling ``s``;
  ``members`` = those ``r`` run ids, comma-joined, in sampling order (the first ``r`` of
  the sampling's list, so the ``members`` of ``r`` are a prefix of those of ``r + 1``).
* ``kind="soup"``, ``name="soup:top<k>:r=<r>:sampling=<s>"``: the uniform average of the ``k``
  snapshots with the best source dev among the first ``r`` runs; ``members`` = the ``r`` runs.
* the runs themselves: ``kind="variant"`` rows (validation in the source language, and
  validation/test in the target languages) from which the run table is built.

Max SRC-DEV / Max TRG-DEV for sampling ``s`` and ``r`` pick among the ``members`` of the
matching average row, so selection and averaging always see the same runs. Without any
average rows, samplings are drawn with :func:`sample_runs` (seeds ``0 .. n_samplings-1``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ofa_lib import results as R
from ofa_lib.results import released

TABLE1_VARIANTS = ("last", "src_dev", "ca")
TABLE2_METHODS = ("max_src_dev", "max_trg_dev", "acc_avg_ca", "soup")
SAMPLING_PRESETS = ("authors", "all")
# Table 2's Max SRC-DEV column: the SRC-DEV variant (best snapshot by English dev, then best
# run by English dev) -- the single-checkpoint counterpart of SOUP, which averages the top-5
# snapshots by English dev. See table2(src_variant=...).
TABLE2_SRC_VARIANT = "src_dev"
SOUP_VARIANT = "top5"
# when a sampling was not recorded for a variant, the sampled ids are taken from these
_IDS_FALLBACK = ("src_dev", "ca", "last", "*", "top5", "top3", "top10")


# --------------------------------------------------------------------------------------
# sampling and selection primitives
# --------------------------------------------------------------------------------------

def sample_runs(run_table: pd.DataFrame, r_max: int = 10, seed: int = 0) -> list[str]:
    """An ordered list of ``r_max`` run ids from distinct (lr, batch_size) configurations.

    Shuffle the distinct configurations (sorted first, so the order of ``run_table`` does not
    matter) with ``numpy.random.default_rng(seed)``, keep the first ``r_max`` and pick one of
    each configuration's runs (sorted by run id) with the same generator. Deterministic for
    a seed; ``ValueError`` if there are fewer than ``r_max`` configurations.
    """
    configs = (
        run_table[["lr", "batch_size"]].drop_duplicates().sort_values(["lr", "batch_size"])
    )
    configs = list(configs.itertuples(index=False, name=None))
    if len(configs) < r_max:
        raise ValueError(
            f"sample_runs: only {len(configs)} (lr, batch_size) configurations for r_max={r_max}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(configs))[:r_max]
    ids = []
    for i in order:
        lr, bs = configs[i]
        cand = sorted(
            run_table.loc[(run_table["lr"] == lr) & (run_table["batch_size"] == bs), "run_id"]
        )
        ids.append(str(cand[int(rng.integers(len(cand)))]))
    return ids


def _argmax_first(run_table: pd.DataFrame, ids: Sequence[str], column: str) -> str:
    if len(ids) == 0:
        raise ValueError("no candidate runs")
    if column not in run_table.columns:
        raise KeyError(f"run table has no column {column!r}")
    scores = run_table.set_index("run_id")[column]
    missing = [i for i in ids if i not in scores.index]
    if missing:
        raise KeyError(f"runs not in the run table: {missing}")
    best_id, best = None, None
    for i in ids:  # strict '>' keeps the earlier run on ties
        s = float(scores.loc[i])
        if np.isnan(s):
            raise ValueError(f"run {i} has no {column}")
        if best is None or s > best:
            best_id, best = i, s
    return str(best_id)


def max_src_dev(run_table: pd.DataFrame, ids: Sequence[str], variant: str) -> str:
    """The run among ``ids`` whose ``variant`` weights score best on source dev
    (``dev_src_<variant>``); ties keep the earlier run."""
    return _argmax_first(run_table, ids, f"dev_src_{variant}")


def max_trg_dev(run_table: pd.DataFrame, ids: Sequence[str], variant: str = "trg_dev") -> str:
    """The run among ``ids`` with the best mean target dev (``dev_trg_<variant>``; for the
    released runs only ``trg_dev`` = ``validation_oracle`` exists); ties keep the earlier."""
    return _argmax_first(run_table, ids, f"dev_trg_{variant}")


def resolve_sampling_seeds(spec: str | Iterable[int], available: Iterable[int]) -> list[int]:
    """``"authors"``: the available seeds except 1 (the authors' ``if s == 1: continue``);
    ``"all"``: every available seed; a list: exactly those (each must be available)."""
    available = sorted(int(s) for s in available)
    if isinstance(spec, str):
        if spec == "authors":
            return [s for s in available if s != 1]
        if spec == "all":
            return available
        raise ValueError(f"sampling_seeds must be one of {SAMPLING_PRESETS} or a list, got {spec!r}")
    seeds = [int(s) for s in spec]
    missing = [s for s in seeds if s not in available]
    if missing:
        raise ValueError(f"sampling seeds {missing} not available (available: {available})")
    return seeds


# --------------------------------------------------------------------------------------
# the data one task's tables are computed from
# --------------------------------------------------------------------------------------

_AVG_COLUMNS = ["method", "variant", "sampling", "r", "ids", "score"]


@dataclass
class CrossRunData:
    """Everything Tables 1-3 need for one task.

    run_table: one row per run (:data:`ofa_lib.results.RUN_TABLE_COLUMNS`), scores in [0, 1].
    averages: ``method`` (acc_avg | soup), ``variant``, ``sampling``, ``r``, ``ids`` (tuple),
        ``score`` -- measured scores of averaged weights (may be empty).
    samplings: ``variant``, ``sampling``, ``r``, ``ids`` -- the runs available at (s, r);
        ``variant == "*"`` when shared by all variants (sampler-drawn).
    """

    task: str
    model: str
    run_table: pd.DataFrame
    averages: pd.DataFrame
    samplings: pd.DataFrame
    origin: str = ""

    @classmethod
    def from_released(cls, rr: "released.ReleasedResults") -> "CrossRunData":
        samplings = rr.averages[["variant", "sampling", "r", "ids"]].reset_index(drop=True)
        return cls(rr.task, rr.model, rr.run_table, rr.averages.reset_index(drop=True),
                   samplings, origin="released")

    @classmethod
    def from_tidy(
        cls,
        tidy: pd.DataFrame,
        task: str,
        model: str | None = None,
        source_lang: str = R.SOURCE_LANG,
        metric: str | None = None,
        n_samplings: int = 10,
        r_max: int = 10,
        origin: str = "tidy",
    ) -> "CrossRunData":
        """Build from tidy rows (our runs): run table from ``kind="variant"`` rows, averages
        from ``kind="average"``/``"soup"`` rows (see the module docstring). Without average
        rows, ``n_samplings`` samplings of ``min(r_max, #configurations)`` runs are drawn."""
        tidy = tidy[tidy["task"] == task]
        if model is None:
            models = sorted(tidy["model"].unique())
            if len(models) != 1:
                raise ValueError(f"{task}: pass model= (models present: {models})")
            model = models[0]
        tidy = tidy[tidy["model"] == model]
        rt = R.run_table_from_tidy(tidy, task=task, model=model, source_lang=source_lang,
                                   metric=metric)
        if rt.empty:
            raise ValueError(f"no kind='variant' rows for task {task!r} and model {model!r}")
        averages = averages_from_tidy(tidy, task, model, source_lang=source_lang, metric=metric)
        if len(averages):
            samplings = averages[["variant", "sampling", "r", "ids"]].reset_index(drop=True)
        else:
            n_cfg = len(rt[["lr", "batch_size"]].drop_duplicates())
            r_eff = min(r_max, n_cfg)
            if r_eff < r_max:
                warnings.warn(f"{task}: only {n_cfg} configurations; samplings of {r_eff} runs")
            rows = []
            for s in range(n_samplings):
                ids = sample_runs(rt, r_eff, seed=s)
                rows += [{"variant": "*", "sampling": s, "r": r, "ids": tuple(ids[:r])}
                         for r in range(1, r_eff + 1)]
            samplings = pd.DataFrame(rows, columns=["variant", "sampling", "r", "ids"])
        return cls(task, model, rt, averages, samplings, origin=origin)

    @property
    def sampling_seeds(self) -> list[int]:
        return sorted(int(s) for s in self.samplings["sampling"].unique())

    @property
    def r_values(self) -> list[int]:
        return sorted(int(r) for r in self.samplings["r"].unique())

    def ids_for(self, variant: str, sampling: int, r: int) -> tuple[str, ...]:
        """The ordered run ids available at (sampling, r) for ``variant``: those of the
        matching average row, else of the first of :data:`_IDS_FALLBACK` recorded."""
        sm = self.samplings
        sm = sm[(sm["sampling"] == sampling) & (sm["r"] == r)]
        if sm.empty:
            raise KeyError(f"{self.task}: no sampling {sampling} with r={r}")
        by_variant = dict(zip(sm["variant"], sm["ids"]))
        for v in (variant,) + _IDS_FALLBACK:
            if v in by_variant:
                return tuple(by_variant[v])
        return tuple(sm["ids"].iloc[0])


def averages_from_tidy(
    tidy: pd.DataFrame,
    task: str,
    model: str,
    source_lang: str = R.SOURCE_LANG,
    metric: str | None = None,
    merge: str | None = R.UNIFORM,
) -> pd.DataFrame:
    """``kind in {average, soup}`` test rows -> one row per cross-run name with the flat
    mean over target languages (or the ``lang="*"`` row) as ``score``.

    ``merge``: the merge method (store ``method`` label) to keep, default the uniform mean the
    paper's tables are about; None keeps every method and adds a ``merge`` column."""
    metric = metric or R.TASK_METRIC.get(task)
    d = tidy[(tidy["task"] == task) & (tidy["model"] == model)
             & tidy["kind"].isin(["average", "soup"]) & (tidy["split"] == "test")]
    if merge is not None:
        d = d[d["method"] == merge]
    if metric is not None:
        d = d[d["metric"] == metric]
    columns = _AVG_COLUMNS + ([] if merge is not None else ["merge"])
    if d.empty:
        return pd.DataFrame(columns=columns)
    per_lang = d[(d["lang"] != source_lang) & (d["lang"] != R.ALL)]
    agg = d[d["lang"] == R.ALL]
    by = ["method", "name"]
    score = per_lang.groupby(by)["value"].mean().combine_first(agg.groupby(by)["value"].mean())
    members = d.groupby(by)["members"].first()
    rows = []
    for (label, name), sc in score.items():
        method, variant, r, s = R.parse_cross_name(name)
        ids = tuple(R.members_list(members.loc[(label, name)]))
        if len(ids) != r:
            raise ValueError(f"{name}: members has {len(ids)} run ids, expected r={r}")
        rows.append({"method": method, "variant": variant, "sampling": s, "r": r,
                     "ids": ids, "score": float(sc), "merge": label})
    out = pd.DataFrame(rows, columns=columns)
    return out.sort_values(["method", "variant", "sampling", "r"] + ([] if merge is not None else ["merge"])
                           ).reset_index(drop=True)


# --------------------------------------------------------------------------------------
# per-sampling scores and the tables
# --------------------------------------------------------------------------------------

PER_SAMPLING_COLUMNS = ["task", "sampling", "r", "method", "variant", "run_id", "ids", "score"]


def per_sampling(
    data: CrossRunData,
    sampling_seeds: str | Iterable[int] = "authors",
    variants: Sequence[str] = TABLE1_VARIANTS,
    trg_variant: str = "trg_dev",
) -> pd.DataFrame:
    """One row per (sampling, r, method, variant) with the test score in [0, 1].

    methods: ``max_src_dev`` (each of ``variants``; ``run_id`` = the chosen run),
    ``max_trg_dev`` (``trg_variant``, only where ``dev_trg_<trg_variant>`` is known),
    ``acc_avg`` and ``soup`` (the measured averages; ``run_id`` is empty).
    """
    seeds = resolve_sampling_seeds(sampling_seeds, data.sampling_seeds)
    rt = data.run_table.set_index("run_id")
    rows = []
    have_trg = f"dev_trg_{trg_variant}" in rt.columns and rt[f"dev_trg_{trg_variant}"].notna().all()
    for s in seeds:
        for r in data.r_values:
            for v in variants:
                ids = data.ids_for(v, s, r)
                best = max_src_dev(data.run_table, ids, v)
                rows.append((data.task, s, r, "max_src_dev", v, best, ids,
                             float(rt.loc[best, f"test_{v}"])))
            if have_trg:
                ids = data.ids_for(trg_variant, s, r)
                best = max_trg_dev(data.run_table, ids, trg_variant)
                rows.append((data.task, s, r, "max_trg_dev", trg_variant, best, ids,
                             float(rt.loc[best, f"test_{trg_variant}"])))
    av = data.averages
    av = av[av["sampling"].isin(seeds)]
    for rec in av.itertuples(index=False):
        rows.append((data.task, int(rec.sampling), int(rec.r), rec.method, rec.variant, "",
                     tuple(rec.ids), float(rec.score)))
    out = pd.DataFrame(rows, columns=PER_SAMPLING_COLUMNS)
    return out.sort_values(["method", "variant", "sampling", "r"], kind="stable").reset_index(drop=True)


def _as_per_sampling(data, sampling_seeds) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, CrossRunData):
        data = [data]
    frames = [per_sampling(d, sampling_seeds) for d in data]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PER_SAMPLING_COLUMNS)


def _aggregate(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    g = df.groupby(by, sort=False)["score"]
    out = pd.DataFrame({
        "mean": (g.mean() * 100).round(1),
        "std": (g.std(ddof=1) * 100).round(1),
        "n": g.size().astype("int64"),
    }).reset_index()
    return out


def table1(data: CrossRunData, sampling_seeds: str | Iterable[int] = "authors") -> pd.DataFrame:
    """Paper Table 1: columns ``task, r, selection, variant, mean, std, n``.

    ``selection`` in {max_src_dev, acc_avg}, ``variant`` in {last, src_dev, ca}; mean and std
    (ddof=1) over sampling seeds, x100, one decimal; ``n`` = number of samplings.
    ``data``: a :class:`CrossRunData`, a list of them, or a :func:`per_sampling` frame.
    Rows exist only where scores exist (e.g. no acc_avg rows before averages are measured).
    """
    ps = _as_per_sampling(data, sampling_seeds)
    ps = ps[ps["method"].isin(["max_src_dev", "acc_avg"]) & ps["variant"].isin(TABLE1_VARIANTS)]
    ps = ps.rename(columns={"method": "selection"})
    out = _aggregate(ps, ["task", "r", "selection", "variant"])
    order = {"selection": ["max_src_dev", "acc_avg"], "variant": list(TABLE1_VARIANTS),
             "task": _task_order(ps)}
    return _sort(out, ["task", "r", "selection", "variant"], order)[
        ["task", "r", "selection", "variant", "mean", "std", "n"]]


def table2(
    data: CrossRunData,
    sampling_seeds: str | Iterable[int] = "authors",
    src_variant: str = TABLE2_SRC_VARIANT,
    soup_variant: str = SOUP_VARIANT,
) -> pd.DataFrame:
    """Paper Table 2: columns ``task, r, method, mean, std, n`` with method in
    {max_src_dev, max_trg_dev, acc_avg_ca, soup}.

    max_src_dev uses the ``src_variant`` weights (default SRC-DEV: the paper's "Max. SRC-DEV"
    picks one checkpoint by source dev, the counterpart of SOUP's top-5 by source dev);
    max_trg_dev selects on mean target dev and reports TRG-DEV (oracle) test scores;
    acc_avg_ca = accumulative averaging of CA weights; soup = ``soup_variant`` (top-5).
    """
    ps = _as_per_sampling(data, sampling_seeds)
    parts = []
    for method, (m, v) in {
        "max_src_dev": ("max_src_dev", src_variant),
        "max_trg_dev": ("max_trg_dev", "trg_dev"),
        "acc_avg_ca": ("acc_avg", "ca"),
        "soup": ("soup", soup_variant),
    }.items():
        sel = ps[(ps["method"] == m) & (ps["variant"] == v)].copy()
        sel["method"] = method
        parts.append(sel)
    ps = pd.concat(parts, ignore_index=True)
    out = _aggregate(ps, ["task", "r", "method"])
    return _sort(out, ["task", "r", "method"],
                 {"method": list(TABLE2_METHODS), "task": _task_order(ps)})[
        ["task", "r", "method", "mean", "std", "n"]]


def table3(data: CrossRunData) -> pd.DataFrame:
    """Paper Table 3: per (lr, batch_size) and variant (last, src_dev, ca, trg_dev) the mean
    and std (ddof=1) over the configuration's seeds of the test score, x100, one decimal.
    Columns ``task, lr, batch_size, variant, mean, std, n``."""
    if isinstance(data, CrossRunData):
        data = [data]
    frames = []
    for d in data:
        rt = d.run_table
        long = rt.melt(id_vars=["run_id", "lr", "batch_size"],
                       value_vars=[f"test_{v}" for v in R.VARIANTS],
                       var_name="variant", value_name="score")
        long["variant"] = long["variant"].str.removeprefix("test_")
        long = long.dropna(subset=["score"])
        long["task"] = d.task
        frames.append(long)
    long = pd.concat(frames, ignore_index=True)
    out = _aggregate(long, ["task", "lr", "batch_size", "variant"])
    out["batch_size"] = out["batch_size"].astype("int64")
    return _sort(out, ["task", "lr", "batch_size", "variant"],
                 {"variant": list(R.VARIANTS), "task": _task_order(long)})[
        ["task", "lr", "batch_size", "variant", "mean", "std", "n"]]


def _task_order(df: pd.DataFrame) -> list[str]:
    """Tasks in order of first appearance (the order the caller passed them)."""
    return list(dict.fromkeys(df["task"]))


def _sort(df: pd.DataFrame, by: list[str], categorical: dict[str, list[str]]) -> pd.DataFrame:
    key_cols = {}
    for c in by:
        if c in categorical:
            cats = categorical[c] + sorted(set(df[c]) - set(categorical[c]))
            key_cols[c] = df[c].map({v: i for i, v in enumerate(cats)})
        else:
            key_cols[c] = df[c]
    order = pd.DataFrame(key_cols).sort_values(by, kind="stable").index
    return df.loc[order].reset_index(drop=True)


def selection_rows(ps: pd.DataFrame, model: str) -> pd.DataFrame:
    """Max SRC-DEV / Max TRG-DEV results of :func:`per_sampling` as tidy
    ``kind="selection"`` rows: ``run_id`` = the selected run, ``name`` =
    ``<method>:<variant>:r=<r>:sampling=<s>``, ``members`` = the candidates, the flat target
    mean as ``value`` (``dataset = lang = "*"``)."""
    sel = ps[ps["method"].isin(["max_src_dev", "max_trg_dev"])]
    names = [R.cross_name(m, v, r, s) for m, v, r, s in
             zip(sel["method"], sel["variant"], sel["r"], sel["sampling"])]
    out = pd.DataFrame({
        "run_id": sel["run_id"].values, "task": sel["task"].values, "model": model, "kind": "selection",
        "name": names, "dataset": R.ALL, "split": "test", "lang": R.ALL,
        "metric": sel["task"].map(lambda t: R.TASK_METRIC.get(t, "score")).values,
        "value": sel["score"].values,
        "members": [R.join_members(i) for i in sel["ids"]],
    })
    return R.conform(out)


# --------------------------------------------------------------------------------------
# merge methods (03_average's ``methods``) against selection
# --------------------------------------------------------------------------------------

MERGE_COLUMNS = ["task", "variant", "r", "method", "mean", "std", "n"]


def merge_per_sampling(
    tidy: pd.DataFrame,
    task: str,
    model: str | None = None,
    sampling_seeds: str | Iterable[int] = "all",
) -> pd.DataFrame:
    """Per (sampling, r, variant): the test score of every merge method of the first r runs
    (``method`` = its store label, e.g. ``uniform``, ``ties(density=0.2,lambda=1.0)``) and of
    Max SRC-DEV (same variant) and Max TRG-DEV (the oracle, variant ``trg_dev``) over the same
    candidates. Columns of :func:`per_sampling`; empty when no average rows are stored."""
    data = CrossRunData.from_tidy(tidy, task, model)
    merges = averages_from_tidy(tidy, task, data.model, merge=None)
    merges = merges[merges["method"] == "acc_avg"]
    if merges.empty:
        return pd.DataFrame(columns=PER_SAMPLING_COLUMNS)
    # the candidates of (variant, sampling, r) are the members of any method's merge (the same runs)
    data.samplings = merges.drop_duplicates(["variant", "sampling", "r"])[["variant", "sampling", "r", "ids"]]
    data.averages = pd.DataFrame(columns=_AVG_COLUMNS)
    variants = [v for v in TABLE1_VARIANTS if v in set(merges["variant"])]
    ps = per_sampling(data, sampling_seeds, variants=variants)
    seeds = set(ps["sampling"]) if len(ps) else set(resolve_sampling_seeds(sampling_seeds, data.sampling_seeds))
    merges = merges[merges["sampling"].isin(seeds)]
    rows = pd.DataFrame({"task": task, "sampling": merges["sampling"].astype(int), "r": merges["r"].astype(int),
                         "method": merges["merge"], "variant": merges["variant"], "run_id": "",
                         "ids": merges["ids"], "score": merges["score"].astype(float)})
    out = pd.concat([ps, rows], ignore_index=True)
    return out.sort_values(["variant", "r", "method", "sampling"], kind="stable").reset_index(drop=True)


def merge_table(ps: pd.DataFrame) -> pd.DataFrame:
    """:func:`merge_per_sampling` aggregated: mean and std (ddof=1) over samplings, x100, one
    decimal, per (task, variant, r, method); columns :data:`MERGE_COLUMNS`. Max TRG-DEV rows
    (variant ``trg_dev``) are repeated under each variant, so every variant's rows compare the
    methods with both selections."""
    if ps.empty:
        return pd.DataFrame(columns=MERGE_COLUMNS)
    variants = [v for v in TABLE1_VARIANTS if v in set(ps["variant"])]
    trg = ps[ps["method"] == "max_trg_dev"]
    parts = [ps[ps["method"] != "max_trg_dev"]] + [trg.assign(variant=v) for v in variants]
    out = _aggregate(pd.concat(parts, ignore_index=True), ["task", "variant", "r", "method"])
    first = ["max_src_dev", "max_trg_dev", R.UNIFORM]
    methods = first + sorted(set(out["method"]) - set(first))
    return _sort(out, ["task", "variant", "r", "method"], {"variant": variants, "method": methods,
                                                           "task": _task_order(out)})[MERGE_COLUMNS]


# --------------------------------------------------------------------------------------
# paired comparison over samplings: accumulative averaging against Max SRC-DEV
# --------------------------------------------------------------------------------------

PAIRED_COLUMNS = ["task", "r", "variant", "src_variant", "n", "mean_diff", "ci_low", "ci_high",
                  "wins", "ties", "losses", "same_runs"]
# (averaged weights, Max SRC-DEV's weights): Table 1's same-variant pairs and Table 2's pair
PAIRS = tuple((v, v) for v in TABLE1_VARIANTS) + (("ca", TABLE2_SRC_VARIANT),)
N_RESAMPLES = 10_000


def bootstrap_mean_ci(
    diffs: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (paired differences, one per sampling).

    ``n_resamples`` resamples of ``len(diffs)`` values with replacement, drawn at once with
    ``numpy.random.default_rng(seed)``; the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of the resampled means. NaN, NaN for fewer than 2 values (nothing to resample)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or not np.isfinite(d).all():
        raise ValueError(f"bootstrap_mean_ci: expected a 1-d array of finite differences, got {d!r}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_mean_ci: level must be in (0, 1), got {level}")
    if len(d) < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(d), size=(int(n_resamples), len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    # all differences equal: the interval is that value (no rounding noise from the mean)
    return (float(d[0]), float(d[0])) if np.all(d == d[0]) else (float(lo), float(hi))


def same_runs(ps: pd.DataFrame) -> pd.DataFrame:
    """Per (task, r): whether every sampling holds the same *set* of runs (as when r equals the
    number of configurations and each has one run). There the samplings no longer differ, so a
    standard deviation of 0 says nothing about certainty. Columns ``task, r, n, same_runs``."""
    rows = []
    for (task, r), g in ps.groupby(["task", "r"], sort=False):
        n = int(g["sampling"].nunique())
        rows.append({"task": task, "r": int(r), "n": n,
                     "same_runs": n > 1 and len({frozenset(ids) for ids in g["ids"]}) == 1})
    return pd.DataFrame(rows, columns=["task", "r", "n", "same_runs"])


def paired_comparison(
    ps: pd.DataFrame, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95,
    pairs: Sequence[tuple[str, str]] = PAIRS,
) -> pd.DataFrame:
    """For each task, r and (variant, src_variant) of ``pairs``: accumulative averaging of the first r
    runs' ``variant`` weights minus Max SRC-DEV over the same runs (``src_variant`` weights), paired by
    sampling. ``mean_diff`` and its bootstrap interval (:func:`bootstrap_mean_ci`) in points (x100, one
    decimal); ``wins``/``ties``/``losses``: samplings where averaging scores higher / the same / lower;
    ``same_runs`` from :func:`same_runs`. ``ps``: a :func:`per_sampling` frame. Columns
    :data:`PAIRED_COLUMNS`; rows only where both sides were measured."""
    flags = same_runs(ps).set_index(["task", "r"])["same_runs"]
    key = ["task", "sampling", "r"]
    rows = []
    for k, (v, sv) in enumerate(pairs):
        avg = ps[(ps["method"] == "acc_avg") & (ps["variant"] == v)][key + ["score"]]
        sel = ps[(ps["method"] == "max_src_dev") & (ps["variant"] == sv)][key + ["score"]]
        both = avg.merge(sel, on=key, suffixes=("_avg", "_sel"), validate="one_to_one")
        for (task, r), g in both.groupby(["task", "r"], sort=False):
            d = (g["score_avg"] - g["score_sel"]).to_numpy(dtype=np.float64)
            lo, hi = bootstrap_mean_ci(d, n_resamples, seed, level)
            tie = np.isclose(d, 0.0, rtol=0.0, atol=1e-12)  # the same score (e.g. both the same weights)
            rows.append({"_pair": k, "task": task, "r": int(r), "variant": v, "src_variant": sv, "n": len(d),
                         "mean_diff": round(float(d.mean()) * 100, 1),
                         "ci_low": round(lo * 100, 1), "ci_high": round(hi * 100, 1),
                         "wins": int(((d > 0) & ~tie).sum()), "ties": int(tie.sum()),
                         "losses": int(((d < 0) & ~tie).sum()),
                         "same_runs": bool(flags.get((task, int(r)), False))})
    out = pd.DataFrame(rows, columns=["_pair"] + PAIRED_COLUMNS)
    out = _sort(out, ["task", "_pair", "r"], {"task": _task_order(out)}) if len(out) else out
    return out[PAIRED_COLUMNS]
