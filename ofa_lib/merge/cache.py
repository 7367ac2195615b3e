"""The evaluation cache of a cross-run pass: the results store's cross-run rows indexed by name and by content
key (:class:`Store`, :func:`open_cache`), so that weights already evaluated under any name are not evaluated
again (:func:`cache_status`, :func:`reuse_rows`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from ofa_lib import results as R
from ofa_lib.merge.planning import CrossRunPlan, Item
from ofa_lib.results import selection as S


@dataclass
class Store:
    """The results store's cross-run rows, indexed by (method, name) and by content key."""

    path: Path
    task: str
    model: str
    by_name: dict[tuple[str, str], tuple[str, pd.DataFrame]] = field(default_factory=dict)
    by_key: dict[tuple, pd.DataFrame] = field(default_factory=dict)
    pending: list[pd.DataFrame] = field(default_factory=list)

    def load(self, key_of_row: Callable[[str, list[str], str], tuple | None]) -> None:
        if not self.path.exists():
            return
        d = R.read(self.path)
        d = d[(d["task"] == self.task) & (d["model"] == self.model) & d["kind"].isin(R.CROSS_KINDS)]
        for (method, name), g in d.groupby(["method", "name"], sort=False):
            members = str(g["members"].iloc[0])
            self.by_name[(method, name)] = (members, g)
            key = key_of_row(name, R.members_list(members), method)
            if key is not None:
                self.by_key.setdefault(key, g)

    def add(self, key: tuple, rows: pd.DataFrame, flush: bool) -> None:
        self.by_name[(rows["method"].iloc[0], rows["name"].iloc[0])] = (rows["members"].iloc[0], rows)
        self.by_key.setdefault(key, rows)
        self.pending.append(rows)
        if flush:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            R.append(self.path, pd.concat(self.pending, ignore_index=True))
            self.pending = []


def complete(rows: pd.DataFrame, expected: set[tuple[str, str, str, str]]) -> bool:
    """Whether ``rows`` hold every (dataset, split, lang, metric) the pass expects of one set of weights."""
    have = set(zip(rows["dataset"], rows["split"], rows["lang"], rows["metric"]))
    return expected <= have


def open_cache(plan: CrossRunPlan, results_path: str | Path, runs: pd.DataFrame) -> Store:
    """The store's cross-run rows indexed for :func:`cache_status` (warns about stale names)."""
    store = Store(Path(results_path), plan.cfg.task, plan.cfg.model_name)
    store.load(plan.key_of_row)
    stale = stale_names(store, runs, plan.r_eff, dict(plan.orders))
    if stale:
        warnings.warn(f"{len(stale)} cross-run name(s) in {results_path} list members this pool of runs would not "
                      f"sample (another pool of runs?), e.g. {stale[:3]}; names this pass computes are overwritten, "
                      f"the others stay: use a fresh results_path when the pool of runs changes", stacklevel=3)
    return store


def cache_status(store: Store, it: Item, expected: set) -> str:
    """stored (this method and name, same members), reused (same content under another name) or evaluate."""
    stored = store.by_name.get((it.method, it.name))
    if stored is not None and stored[0] == it.members_str and complete(stored[1], expected):
        return "stored"
    cached = store.by_key.get(it.key)
    return "reused" if cached is not None and complete(cached, expected) else "evaluate"


def reuse_rows(store: Store, it: Item, rows: pd.DataFrame, flush: bool = False) -> None:
    """Store ``rows`` (scores of the same weights) under ``it``'s name, method and members."""
    rows = rows.copy()
    rows["name"] = it.name
    rows["run_id"] = it.name
    rows["members"] = it.members_str
    rows["method"] = it.method
    store.add(it.key, rows, flush=flush)


def stale_names(store: Store, runs: pd.DataFrame, r_eff: int, orders: dict[int, list[str]]) -> list[str]:
    """Stored cross-run names whose members are not the first r runs of this pool's sampling s."""
    stale = []
    for (_, name), (members, _) in store.by_name.items():
        try:
            _, _, r, s = R.parse_cross_name(name)
        except ValueError:
            continue
        if r > r_eff:
            stale.append(name)
            continue
        if s not in orders:
            orders[s] = S.sample_runs(runs, r_eff, seed=s)
        if R.members_list(members) != orders[s][:r]:
            stale.append(name)
    return sorted(set(stale))
