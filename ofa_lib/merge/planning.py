"""Planning a cross-run pass (:func:`plan_pass`): the samplings, and for each merge method, variant and r the
merge of the first r runs (and the soups), each with its content key (:func:`average_key`, :func:`soup_key`),
before anything is read from the store or evaluated."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from ofa_lib import results as R
from ofa_lib.merge import merging
from ofa_lib.merge.pool import (
    STORE_METRIC,
    IncompatibleRunsError,
    Snapshot,
    base_identity,
    check_compatible,
    groups,
    kept_snapshots,
)
from ofa_lib.results import selection as S
from ofa_lib.train import metrics
from ofa_lib.train.config import TrainConfig
from ofa_lib.train.runs import run_config

AVERAGE_VARIANTS = ("last", "src_dev", "ca")


def average_key(variant: str, members: Iterable[str], spec: merging.MergeSpec | None = None) -> tuple:
    """Content key of a merge (default: the uniform mean) of the members' ``variant`` weights:
    :meth:`ofa_lib.merge.merging.MergeSpec.key` (uniform: order-free, as always; other methods add
    their label and options, and keep the order where it matters)."""
    return (spec or UNIFORM).key(variant, members)


def soup_key(pairs: Iterable[tuple[str, int]]) -> tuple:
    """Content key of the uniform average of ``(run id, snapshot)`` snapshots (order-free)."""
    return ("soup", tuple(sorted((str(r), int(s)) for r, s in pairs)))


def key_digest(key: tuple) -> str:
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


UNIFORM = merging.make_spec("uniform")


def soup_members(snapshots: dict[str, list[Snapshot]], run_ids: Sequence[str], k: int) -> list[Snapshot]:
    """The ``k`` snapshots with the best English dev among ``run_ids``' kept ones (ties: run id,
    then snapshot, so the choice depends only on the set of runs); fewer if fewer are kept."""
    pool = [s for r in run_ids for s in snapshots.get(r, [])]
    return sorted(pool, key=lambda s: (-s.score, s.run_id, s.snapshot))[:k]


@dataclass
class Item:
    kind: str          # average | soup
    variant: str       # last/src_dev/ca or top<k>
    sampling: int
    r: int
    members: list[str]
    key: tuple
    paths: list[Path]  # averages: the members' variant files; soups: the snapshot files
    spec: merging.MergeSpec = UNIFORM
    name: str = ""
    status: str = ""   # stored | reused | evaluate

    @property
    def members_str(self) -> str:
        return R.join_members(self.members)

    @property
    def method(self) -> str:
        return self.spec.label


@dataclass
class CrossRunPlan:
    """What one cross-run pass computes (:func:`plan_pass`): the runs, their samplings, the merge
    methods and the ordered work list, before anything is read from the store or evaluated."""

    cfg: TrainConfig
    paths: dict[str, Path]
    r_eff: int
    orders: dict[int, list[str]]
    specs: list[merging.MergeSpec]
    snapshots: dict[str, list[Snapshot]]
    soup_k: int | None
    items: list[Item]
    expected: set[tuple[str, str, str, str]]
    avg_dir: Path
    soups_skipped: int = 0
    base_id: str | None = None  # what θ₀ is made of (when a method needs it): names its file

    @property
    def source_lang(self) -> str:
        return self.cfg.source_lang()

    def key_of_row(self, name: str, members: list[str], method: str) -> tuple | None:
        """The content key of a stored cross-run row (None: not one this pass can reuse)."""
        try:
            kind, variant, r, _ = R.parse_cross_name(name)
        except ValueError:
            return None
        if kind == "acc_avg":
            spec = merging.spec_from_label(method)
            return None if spec is None else average_key(variant, members, spec)
        if kind == "soup" and method == R.UNIFORM and variant.startswith("top") and variant[3:].isdigit():
            if not all(m in self.snapshots for m in members):
                return None
            chosen = soup_members(self.snapshots, members, int(variant[3:]))
            return soup_key((s.run_id, s.snapshot) for s in chosen) if len(chosen) == int(variant[3:]) else None
        return None


def plan_pass(
    runs: pd.DataFrame,
    *,
    variants: Sequence[str] = AVERAGE_VARIANTS,
    r_max: int = 10,
    samplings: Iterable[int] = range(10),
    soup_k: int | None = 5,
    methods: Any = None,
    method_variants: Sequence[str] | None = None,
    averages_dir: str | Path | None = None,
) -> CrossRunPlan:
    """Plan a pass (see :func:`average_runs`): check the runs, draw the samplings, list every
    method × variant × sampling × r average and every soup in a deterministic order."""
    check_compatible(runs)
    bad = [v for v in variants if v not in AVERAGE_VARIANTS + ("trg_dev",)]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; expected some of {AVERAGE_VARIANTS}")
    specs = merging.parse_methods(methods)
    if method_variants is not None:
        extra = [v for v in method_variants if v not in variants]
        if extra:
            raise ValueError(f"method_variants {extra} are not among variants {list(variants)}")
    base_id = None
    if any(s.info.needs_base for s in specs):
        ids = groups(base_identity(runs))
        base_id = next(iter(ids))
        if len(ids) > 1:
            raise IncompatibleRunsError(
                f"merge method(s) {[s.method for s in specs if s.info.needs_base]} need one θ₀ (pretrained weights + "
                f"head) for all runs, but the runs' θ₀ differ: {list(ids.values())}")
    paths = dict(zip(runs["run_id"], (Path(p) for p in runs["path"])))
    first = runs["run_id"].iloc[0]
    cfg = run_config(paths[first])
    n_cfg = len(runs[["lr", "batch_size"]].drop_duplicates())
    r_eff = min(int(r_max), n_cfg)
    if r_eff < r_max:
        warnings.warn(f"only {n_cfg} (lr, batch_size) configurations: r_max capped at {r_eff} (asked {r_max})",
                      stacklevel=3)
    samplings = [int(s) for s in samplings]
    orders = {s: S.sample_runs(runs, r_eff, seed=s) for s in samplings}

    # soups: each run's kept snapshots and their English dev scores
    snapshots: dict[str, list[Snapshot]] = {}
    if soup_k:
        snapshots = {r: kept_snapshots(p) for r, p in paths.items()}
        if not any(snapshots.values()):
            warnings.warn("no run kept top-k snapshots (train with top_k >= 1): soups skipped", stacklevel=3)
            soup_k = None
        else:
            top_k, n_snap = int(cfg.top_k), int(cfg.num_snapshots)
            if top_k < soup_k and top_k < n_snap:
                warnings.warn(f"runs kept only their top_k={top_k} snapshots (< soup_k={soup_k}): a soup's "
                              f"top-{soup_k} among r runs may miss snapshots a run did not keep", stacklevel=3)

    # the work list, in a deterministic order: per sampling, per method, per variant, r = 1..r_eff; then soups
    items: list[Item] = []
    skipped = 0
    for s in samplings:
        order = orders[s]
        for spec in specs:
            for v in merging.merged_variants(spec, variants, method_variants):
                for r in range(1, r_eff + 1):
                    items.append(Item("average", v, s, r, order[:r], average_key(v, order[:r], spec),
                                       [paths[i] / "checkpoints" / f"{v}.safetensors" for i in order[:r]], spec))
        if soup_k:
            for r in range(1, r_eff + 1):
                chosen = soup_members(snapshots, order[:r], soup_k)
                if len(chosen) < soup_k:
                    skipped += 1
                    continue
                items.append(Item("soup", f"top{soup_k}", s, r, order[:r],
                                   soup_key((c.run_id, c.snapshot) for c in chosen), [c.path for c in chosen]))
    if skipped:
        warnings.warn(f"{skipped} soup(s) skipped: fewer than soup_k={soup_k} kept snapshots among the first r runs",
                      stacklevel=3)
    for it in items:
        it.name = R.cross_name("acc_avg" if it.kind == "average" else "soup", it.variant, it.r, it.sampling)

    # averaged models are scored on English dev and the target test sets (target dev only serves
    # the Max TRG-DEV oracle over single runs)
    source_lang = cfg.source_lang()
    expected = {(d, split, R.SOURCE_LANG if lang == source_lang else lang, STORE_METRIC.get(m, m))
                for d, lang, split in [cfg.dev_sets()[0], *cfg.test_sets()] for m in metrics.task_metrics(cfg.task)}
    avg_dir = Path(averages_dir) if averages_dir else paths[first].parent.parent / "averages" / cfg.task
    return CrossRunPlan(cfg, paths, r_eff, orders, specs, snapshots, soup_k, items, expected, avg_dir, skipped, base_id)
