"""Tidy results: one row per measurement, and the importer for the authors' released results.

The tidy schema
---------------
Every score the study produces or imports is one row of a long ("tidy") table:

==========  ========  =====================================================================
column      dtype     meaning
==========  ========  =====================================================================
run_id      str       the fine-tuning run; for averages and soups the row's ``name`` (e.g.
                      ``acc_avg:ca:r=3:sampling=2``); for selections the selected run
task        str       ``nli`` / ``ner`` / ``tydiqa`` / ...
model       str       e.g. ``xlm-roberta-large``
lr          float64   learning rate (NaN on cross-run rows)
batch_size  Int64     batch size (NA on cross-run rows)
seed        Int64     training seed (NA on cross-run rows)
kind        str       one of ``snapshot``, ``variant``, ``average``, ``soup``, ``selection``
name        str       snapshot index (``"3"``), variant (``last``, ``src_dev``, ``ca``,
                      ``trg_dev``) or a cross-run name ``<method>:<variant>:r=<r>:sampling=<s>``
dataset     str       e.g. ``xnli``, ``indicxnli``, ``wikiann``; ``*`` for a mean over targets
split       str       ``validation`` or ``test``
lang        str       language code; the source language is ``en``; ``*`` = flat mean over
                      all target languages (only where per-language scores are not available,
                      e.g. the released ``validation_oracle``)
metric      str       ``acc``, ``f1``, ``exact_match``, ...
value       float64   the score, always in [0, 1] (released TyDiQA percentages are / 100)
step        Int64     optimiser step of a snapshot (NA otherwise)
epoch       float64   epoch of a snapshot (NaN otherwise)
members     str       ordered member run ids of a cross-run row joined by ``","`` (``""``
                      otherwise); run ids must therefore not contain commas.
                      :func:`members_list` splits it back.
method      str       the merge method of an ``average``/``soup`` row, as the label of
                      :class:`ofa_lib.merge.merging.MergeSpec` (``uniform``, ``ties(density=0.2,
                      lambda=1.0)``, ...); ``""`` on other rows. Stores written before the
                      column existed read as ``uniform`` on their average and soup rows.
==========  ========  =====================================================================

``members`` is a plain comma-joined string (not a list column) so that rows stay hashable
(de-duplication) and Parquet files stay trivially readable by any tool.

Rows are identified by :data:`KEY` (run_id, task, model, kind, name, dataset, split, lang,
metric, method); :func:`append` keeps the newest row per key.

Cross-run names (the contract with the averaging notebook)
----------------------------------------------------------
``kind="average"``: ``acc_avg:<variant>:r=<r>:sampling=<s>`` -- the merge (``method``; the
paper's uniform average when ``method == "uniform"``) of the first ``r`` runs' ``<variant>``
weights (variant in last/src_dev/ca) of sampling ``s``; ``members`` = those ``r`` run ids in
sampling order.
``kind="soup"``: ``soup:top<k>:r=<r>:sampling=<s>`` -- uniform average of the ``k`` snapshots
with the best source dev among the first ``r`` sampled runs; ``members`` = the ``r`` runs.
``kind="selection"``: ``<max_src_dev|max_trg_dev>:<variant>:r=<r>:sampling=<s>`` -- the
test score of the selected run (``members`` = the ``r`` candidates).
Average and soup rows carry ``run_id == name``; selection rows carry the selected run's id.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ofa_lib import tasks as tasks_lib
from ofa_lib.io import write_parquet

# --------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------

SCHEMA: dict[str, str] = {
    "run_id": "str",
    "task": "str",
    "model": "str",
    "lr": "float64",
    "batch_size": "Int64",
    "seed": "Int64",
    "kind": "str",
    "name": "str",
    "dataset": "str",
    "split": "str",
    "lang": "str",
    "metric": "str",
    "value": "float64",
    "step": "Int64",
    "epoch": "float64",
    "members": "str",
    "method": "str",
}
KEY: list[str] = ["run_id", "task", "model", "kind", "name", "dataset", "split", "lang", "metric", "method"]
CROSS_KINDS = ("average", "soup")
UNIFORM = "uniform"  # the method of every average and soup row written before the column existed
KINDS = ("snapshot", "variant", "average", "soup", "selection")
VARIANTS = ("last", "src_dev", "ca", "trg_dev")
SPLITS = ("validation", "test")
ALL = "*"  # dataset/lang of a row that is already a flat mean over all target languages
SOURCE_LANG = "en"
# the stored name of each task's primary metric ("acc" for accuracy), by study and released-results name
TASK_METRIC = {name: {"accuracy": "acc"}.get(task.primary_metric, task.primary_metric)
               for name, task in tasks_lib.BY_ANY_NAME.items()}

_STR_COLS = [c for c, t in SCHEMA.items() if t == "str"]
_OPTIONAL_DEFAULTS = {
    "lr": np.nan,
    "batch_size": pd.NA,
    "seed": pd.NA,
    "step": pd.NA,
    "epoch": np.nan,
    "members": "",
}


def empty_frame() -> pd.DataFrame:
    """A tidy frame with no rows and the schema's columns and dtypes."""
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in SCHEMA.items()})


def members_list(members: str) -> list[str]:
    """``"a,b,c"`` -> ``["a", "b", "c"]``; ``""`` -> ``[]``."""
    return [m for m in str(members).split(",") if m] if isinstance(members, str) else []


def join_members(ids: Iterable[str]) -> str:
    ids = [str(i) for i in ids]
    bad = [i for i in ids if "," in i]
    if bad:
        raise ValueError(f"run ids must not contain ',': {bad}")
    return ",".join(ids)


def _dtype_ok(series: pd.Series, want: str) -> bool:
    dt = series.dtype
    if want == "str":
        if isinstance(dt, pd.StringDtype):
            return True
        return dt == np.dtype(object) and series.map(lambda v: isinstance(v, str)).all()
    return str(dt) == want


def validate(df: pd.DataFrame) -> pd.DataFrame:
    """Check ``df`` against :data:`SCHEMA`; return it unchanged or raise ``ValueError``.

    Checks: exactly the schema's columns (missing and extra ones are named), dtypes (string
    columns may be any pandas string dtype), no missing strings, ``kind`` in :data:`KINDS`,
    ``split`` in :data:`SPLITS`, ``value`` present and within [0, 1].
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in SCHEMA if c not in df.columns]
    extra = [c for c in df.columns if c not in SCHEMA]
    if missing or extra:
        raise ValueError(f"tidy results: missing columns {missing}, extra columns {extra}")
    bad = {c: str(df[c].dtype) for c, t in SCHEMA.items() if not _dtype_ok(df[c], t)}
    if bad:
        want = {c: SCHEMA[c] for c in bad}
        raise ValueError(f"tidy results: bad dtypes {bad}; expected {want} (see results.conform)")
    if len(df):
        nulls = [c for c in _STR_COLS if df[c].isna().any()]
        if nulls:
            raise ValueError(f"tidy results: missing values in string columns {nulls}")
        kinds = set(df["kind"].unique()) - set(KINDS)
        if kinds:
            raise ValueError(f"tidy results: unknown kind(s) {sorted(kinds)}; allowed {KINDS}")
        splits = set(df["split"].unique()) - set(SPLITS)
        if splits:
            raise ValueError(f"tidy results: unknown split(s) {sorted(splits)}; allowed {SPLITS}")
        v = df["value"]
        if v.isna().any():
            raise ValueError(f"tidy results: {int(v.isna().sum())} rows without a value")
        out = (v < 0) | (v > 1)
        if out.any():
            ex = df.loc[out, ["run_id", "dataset", "lang", "value"]].head(3).to_dict("records")
            raise ValueError(
                f"tidy results: {int(out.sum())} values outside [0, 1] (percentages? divide "
                f"by 100), e.g. {ex}"
            )
    return df


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """Add absent optional columns (lr, batch_size, seed, step, epoch, members, method), cast
    every column to the schema dtype, order columns, then :func:`validate`. A missing ``method``
    is ``uniform`` on average and soup rows (the only rule before the column) and ``""`` else."""
    df = df.copy()
    for c, default in _OPTIONAL_DEFAULTS.items():
        if c not in df.columns:
            df[c] = default
    if "kind" in df.columns:
        cross = df["kind"].isin(CROSS_KINDS)
        method = df["method"] if "method" in df.columns else pd.Series(pd.NA, index=df.index, dtype=object)
        df["method"] = method.where(method.notna() & (method != "") | ~cross, UNIFORM).fillna("")
    missing = [c for c in SCHEMA if c not in df.columns]
    extra = [c for c in df.columns if c not in SCHEMA]
    if missing or extra:
        raise ValueError(f"tidy results: missing columns {missing}, extra columns {extra}")
    df["members"] = df["members"].fillna("")
    for c, t in SCHEMA.items():
        try:
            df[c] = df[c].astype(t)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tidy results: column {c!r} cannot be cast to {t}: {exc}") from exc
    return validate(df[list(SCHEMA)].reset_index(drop=True))


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates(KEY, keep="last").reset_index(drop=True)


def append(path: str | os.PathLike, df: pd.DataFrame) -> pd.DataFrame:
    """Append tidy rows to the Parquet file ``path`` and return the file's new content.

    Reads the existing file (if any), concatenates, de-duplicates on :data:`KEY` keeping the
    newest row (those of ``df``), and writes through a temp file + rename. A sidecar
    ``.<name>.lock`` file (``flock``) serialises concurrent appenders on one machine.
    """
    path = Path(path)
    new = conform(df)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            parts = [conform(pd.read_parquet(path)), new] if path.exists() else [new]
            parts = [p for p in parts if len(p)] or [empty_frame()]
            out = _dedupe(pd.concat(parts, ignore_index=True))
            out = conform(out)
            write_parquet(path, out)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return out


def drop_runs(path: str | os.PathLike, run_ids: Iterable[str]) -> int:
    """Remove from the Parquet file ``path`` every row of the given runs and of the averages and soups
    that have one of them as a member (same lock and temp-file write as :func:`append`); returns the
    number of rows removed (0 when the file does not exist)."""
    path, ids = Path(path), set(run_ids)
    if not path.exists() or not ids:
        return 0
    with open(path.parent / f".{path.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            df = conform(pd.read_parquet(path))
            stale = df["run_id"].isin(ids) | df["members"].map(lambda m: bool(ids & set(members_list(m))))
            if stale.any():
                write_parquet(path, conform(df[~stale].reset_index(drop=True)))
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return int(stale.sum())


def read(path_or_dir: str | os.PathLike) -> pd.DataFrame:
    """Read one tidy Parquet file, or every ``*.parquet`` under a directory (recursively,
    in sorted path order, concatenated). Returns a conformed frame (empty if no files)."""
    p = Path(path_or_dir)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if not f.name.startswith("."))
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"no tidy results at {p}")
    frames = [conform(pd.read_parquet(f)) for f in files]
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty_frame()
    return conform(pd.concat(frames, ignore_index=True))


# --------------------------------------------------------------------------------------
# cross-run names
# --------------------------------------------------------------------------------------

_CROSS_RE = re.compile(
    r"^(?P<method>[a-z_]+):(?P<variant>[a-z0-9_]+):r=(?P<r>\d+):sampling=(?P<sampling>-?\d+)$"
)


def cross_name(method: str, variant: str, r: int, sampling: int) -> str:
    """``cross_name("acc_avg", "ca", 3, 2)`` -> ``"acc_avg:ca:r=3:sampling=2"``."""
    return f"{method}:{variant}:r={int(r)}:sampling={int(sampling)}"


def parse_cross_name(name: str) -> tuple[str, str, int, int]:
    """Inverse of :func:`cross_name`: ``(method, variant, r, sampling)``."""
    m = _CROSS_RE.match(name)
    if not m:
        raise ValueError(
            f"bad cross-run name {name!r}; expected '<method>:<variant>:r=<r>:sampling=<s>'"
        )
    return m["method"], m["variant"], int(m["r"]), int(m["sampling"])


# --------------------------------------------------------------------------------------
# run table (the per-run summary that selection works on)
# --------------------------------------------------------------------------------------

RUN_TABLE_COLUMNS = (
    ["run_id", "lr", "batch_size", "seed"]
    + [f"dev_src_{v}" for v in VARIANTS]
    + [f"dev_trg_{v}" for v in VARIANTS]
    + [f"test_{v}" for v in VARIANTS]
)


def run_table_from_tidy(
    tidy: pd.DataFrame,
    task: str | None = None,
    model: str | None = None,
    source_lang: str = SOURCE_LANG,
    metric: str | None = None,
) -> pd.DataFrame:
    """One row per run (``kind == "variant"`` rows) with :data:`RUN_TABLE_COLUMNS`.

    Per variant ``v``:
    ``dev_src_<v>`` = the run's validation score in ``source_lang``;
    ``dev_trg_<v>`` = flat mean of its validation scores over target languages (or the
    ``lang == "*"`` row when there are no per-language ones);
    ``test_<v>`` = flat mean of its test scores over all target languages (every dataset,
    ``lang != source_lang``), or the ``"*"`` row when no per-language rows exist.
    ``task``/``model`` filter the rows (required when several are present); ``metric``
    defaults to :data:`TASK_METRIC` of the task, or the only metric present.
    """
    df = tidy[tidy["kind"] == "variant"]
    for col, want in (("task", task), ("model", model)):
        if want is not None:
            df = df[df[col] == want]
        elif df[col].nunique() > 1:
            raise ValueError(f"several {col}s in the rows {sorted(df[col].unique())}: pass {col}=")
    if metric is None:
        t = task if task is not None else (df["task"].iloc[0] if len(df) else None)
        metric = TASK_METRIC.get(t) if t is not None else None
        if metric is None or metric not in set(df["metric"]):
            metrics = sorted(df["metric"].unique())
            if len(metrics) > 1:
                raise ValueError(f"several metrics {metrics}: pass metric=")
            metric = metrics[0] if metrics else None
    df = df[(df["metric"] == metric) & df["name"].isin(VARIANTS)]
    if df.empty:
        return pd.DataFrame({c: [] for c in RUN_TABLE_COLUMNS}).astype(
            {"run_id": "str", "lr": "float64", "batch_size": "Int64", "seed": "Int64"}
        )
    info = df.groupby("run_id", sort=False)[["lr", "batch_size", "seed"]].first()
    is_src = df["lang"] == source_lang
    is_all = df["lang"] == ALL
    out = info.copy()
    for split, prefix_trg in (("validation", "dev_trg_"), ("test", "test_")):
        d = df[df["split"] == split]
        per_lang = d[~is_src.loc[d.index] & ~is_all.loc[d.index]]
        mean_lang = per_lang.groupby(["run_id", "name"])["value"].mean()
        agg = d[is_all.loc[d.index]].groupby(["run_id", "name"])["value"].mean()
        combined = mean_lang.combine_first(agg).unstack("name")
        for v in VARIANTS:
            out[prefix_trg + v] = combined[v] if v in combined.columns else np.nan
    src = df[(df["split"] == "validation") & is_src]
    dup = src.duplicated(["run_id", "name"], keep=False)
    if dup.any():
        raise ValueError(
            "several source-language validation rows per run and variant (datasets "
            f"{sorted(src.loc[dup, 'dataset'].unique())}); filter the tidy rows first"
        )
    src_w = src.set_index(["run_id", "name"])["value"].unstack("name")
    for v in VARIANTS:
        out[f"dev_src_{v}"] = src_w[v].reindex(out.index) if v in src_w.columns else np.nan
    out = out.reset_index()
    out = out[RUN_TABLE_COLUMNS]
    return out.astype({c: "float64" for c in RUN_TABLE_COLUMNS[4:]}).reset_index(drop=True)
