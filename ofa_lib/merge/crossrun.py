"""Across runs for OUR runs (docs/method.md §4): accumulative merges and soups, evaluated once.

:func:`find_runs` lists the finished runs under ``outputs/runs`` and checks that they can be
combined: same data parameters (every config field except lr, batch_size, seed and head), the
same head fingerprint and the same vocabulary. :func:`average_runs` then runs one pass in three
separate steps:

- **planning** (:func:`plan_pass`): for each sampling seed the ordered run list of
  :func:`ofa_lib.results.selection.sample_runs`; for each merge method (:mod:`ofa_lib.merge.merging`; default
  the paper's uniform mean), variant and r the merge of the first r runs, and the soups of the
  ``soup_k`` kept top-k snapshots with the best English dev among the first r runs;
- **cache** (:func:`open_cache`, :func:`cache_status`): which of those the results store
  already holds, under this name or under another with the same content;
- **execution** (:func:`execute_pass`): the rest is computed (incremental methods streamed with
  one checkpoint read per r; the others in row blocks of all r inputs; greedy soups by English-dev
  trials), loaded into ONE model skeleton (built once with :func:`ofa_lib.train.training.prepare` of
  the first run's config, whose featurized dev/test sets are reused) and scored on the source dev
  and target test sets.

Rows go to the tidy results store (:func:`ofa_lib.results.append`) after every evaluation, as
``kind="average"`` (``acc_avg:<variant>:r=<r>:sampling=<s>``, ``method`` = the merge method's
label) and ``kind="soup"`` (``soup:top<k>:r=<r>:sampling=<s>``, ``method="uniform"``) rows with
``run_id == name`` and ``members`` = the r run ids in sampling order (the contract of
:mod:`ofa_lib.results` / :mod:`ofa_lib.results.selection`).

The cache: a set of weights is identified by its content -- :meth:`ofa_lib.merge.merging.MergeSpec.key`
for merges (the uniform mean: ``("average", variant, sorted member run ids)``, as it always was,
since its order does not matter; any other method adds its label with every option, and keeps
the member order when the order matters), ``("soup", sorted (run id, snapshot) pairs)`` for
soups. Before evaluating, the store is searched for rows with the same content key (under any
name); if found, their scores are copied under the new name and nothing is evaluated. So
samplings whose first r runs are the same set, r = 1 across samplings, and re-running the
notebook cost no evaluation; an interrupted pass resumes.

The ``fisher`` method weights each run by its diagonal Fisher on English data
(:func:`fisher_diagonal_of`): computed once per checkpoint (by sha256) and options into
``<averages>/fisher/`` and read from there afterwards.

Methods on task vectors need θ₀: the first run's prepared, untrained model (pretrained encoder,
the runs' vocabulary, their frozen aligned head), written once in fp32 next to the averages;
runs whose θ₀ differ (see :func:`base_identity`) are refused.

Rows written to the store follow its documented conventions: the source-language rows carry
``lang = "en"`` (:data:`ofa_lib.results.SOURCE_LANG`; SIB-200 calls English ``eng_Latn``) and
accuracy is ``metric = "acc"`` (as :data:`ofa_lib.results.TASK_METRIC`); see :func:`store_rows`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ofa_lib import results as R
from ofa_lib.merge import averaging, merging
from ofa_lib.models import ckpt_io
from ofa_lib.paths import outputs_dir
from ofa_lib.results import selection as S
from ofa_lib.train import evaluation, fisher, measures, metrics, training
from ofa_lib.train.config import TrainConfig

# config fields that may differ between runs that are combined (everything else must match)
# how a run is optimised or measured, not its data, vocabulary or head: runs may differ in these and
# still be averaged (AdamW and SAM runs, runs that record different measures or tr(F) tracking)
PROCEDURE_PARAMS = ("optimizer", "sam_rho", "fisher_penalty_weight", "measures", "measure_examples",
                    "fisher_every", "fisher_batches", "fisher_labels")
FREE_PARAMS = ("lr", "batch_size", "seed", "head") + PROCEDURE_PARAMS
AVERAGE_VARIANTS = ("last", "src_dev", "ca")
RUN_COLUMNS = ["run_id", "task", "lr", "batch_size", "seed", "head", "head_fingerprint", "vocab_size",
               "top_k", "path"]
# how the store names what training calls otherwise (results.SCHEMA's documented conventions)
STORE_METRIC = {"accuracy": "acc"}


class IncompatibleRunsError(ValueError):
    """Runs that must not be combined (data parameters, head fingerprint or vocabulary differ)."""


# --------------------------------------------------------------------------- finding runs
def default_results_path(task: str) -> Path:
    """``outputs/results/<task>.parquet``: where one task's tidy rows (runs and averages) go."""
    return outputs_dir() / "results" / f"{task}.parquet"


def _manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "manifest.json").read_text())


def find_runs(runs_root: str | Path | None = None, task: str | None = None, *, check: bool = True) -> pd.DataFrame:
    """Finished runs (manifest ``status == "done"``) under ``runs_root`` (default ``outputs/runs``).

    One row per run, sorted by (lr, batch_size, seed, run_id), columns :data:`RUN_COLUMNS`.
    With ``check`` (default) raises :class:`IncompatibleRunsError` naming the runs when they
    cannot be combined (see :func:`check_compatible`); filter with ``task`` first.
    """
    root = training.runs_root(runs_root)
    rows, unfinished = [], []
    for file in sorted(root.glob("*/manifest.json")):
        m = json.loads(file.read_text())
        p = m.get("params", {})
        if task is not None and p.get("task") != task:
            continue
        if m.get("status") != "done":
            unfinished.append(f"{file.parent.name} ({m.get('status')})")
            continue
        # before any use: the checkpoints are the bytes the run wrote (runs trained before hashes were recorded
        # have none to check)
        ckpt_io.verify_recorded(file.parent, m.get("checkpoint_sha256") or {}, m["run_id"])
        rows.append({"run_id": m["run_id"], "task": p["task"], "lr": float(p["lr"]), "batch_size": int(p["batch_size"]),
                     "seed": int(p["seed"]), "head": p["head"], "head_fingerprint": m.get("head_fingerprint"),
                     "vocab_size": m.get("vocab_size"), "top_k": len(m.get("topk_snapshots") or []),
                     "path": str(file.parent)})
    if unfinished:
        print(f"find_runs: skipping {len(unfinished)} unfinished run(s): {', '.join(unfinished)}")
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    runs = runs.sort_values(["lr", "batch_size", "seed", "run_id"]).reset_index(drop=True)
    if check:
        if runs.empty:
            raise FileNotFoundError(f"no finished runs{f' of task {task!r}' if task else ''} under {root}")
        check_compatible(runs)
    return runs


def _groups(values: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for run_id, v in values.items():
        out[json.dumps(v, sort_keys=True, default=str)].append(run_id)
    return dict(out)


def vocabulary_key(path: str | Path) -> str:
    """What identifies a run's vocabulary (runs may be averaged only when these are equal).

    Untrimmed: the vocabulary size. Trimmed with frozen word embeddings: sha256 of the stored
    word-embedding table (the pretrained rows of the kept pieces, so equal iff the kept pieces
    are). Trimmed and trained: the size, plus the seed when the training subsample (part of the
    trimming corpus) depends on it.
    """
    m = _manifest(path)
    p = m["params"]
    size = m.get("vocab_size")
    if not p.get("trim_vocab"):
        return f"full:{size}"
    if p.get("freeze_embeddings"):
        file = Path(path) / "checkpoints" / "last.safetensors"
        with ckpt_io.open_safetensors(file) as f:
            keys = [k for k in f.keys() if k.endswith("word_embeddings.weight")]
            if len(keys) == 1:
                t = f.get_tensor(keys[0]).contiguous()
                digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
                return f"trimmed:{size}:{digest}"
    return f"trimmed:{size}" + (f":seed={p['seed']}" if p.get("train_subsample") is not None else "")


def check_compatible(runs: pd.DataFrame) -> None:
    """Raise :class:`IncompatibleRunsError` (naming the runs) unless every run has the same data
    parameters (all config fields but :data:`FREE_PARAMS`), head fingerprint and vocabulary."""
    if runs.empty:
        raise ValueError("no runs given")
    dup = runs["run_id"][runs["run_id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"runs listed twice: {dup}")
    params = {r: {k: v for k, v in _manifest(p)["params"].items() if k not in FREE_PARAMS}
              for r, p in zip(runs["run_id"], runs["path"])}
    keys = sorted({k for v in params.values() for k in v})
    diff = {k: g for k in keys if len(g := _groups({r: v.get(k) for r, v in params.items()})) > 1}
    if diff:
        raise IncompatibleRunsError(
            "runs differ in data parameters (all but lr, batch_size, seed and head must match, so that they share "
            f"vocabulary and evaluation sets): {diff}")
    heads = _groups(dict(zip(runs["run_id"], runs["head_fingerprint"])))
    if len(heads) > 1:
        listing = "; ".join(f"{json.loads(k) or 'no fingerprint'}: {v}" for k, v in heads.items())
        raise IncompatibleRunsError(f"classifier heads are not aligned (head fingerprints differ); refusing to "
                                    f"combine runs: {listing}")
    vocab = _groups({r: vocabulary_key(p) for r, p in zip(runs["run_id"], runs["path"])})
    if len(vocab) > 1:
        listing = "; ".join(f"{json.loads(k)}: {v}" for k, v in vocab.items())
        raise IncompatibleRunsError(
            "runs have different vocabularies (trimmed to seed-dependent training subsamples?); their weights cannot "
            f"be averaged: {listing}")


def _config(path: str | Path) -> TrainConfig:
    return TrainConfig(**_manifest(path)["params"])


# --------------------------------------------------------------------------- store rows
def store_rows(rows: pd.DataFrame, source_lang: str) -> pd.DataFrame:
    """Training's tidy rows in the store's conventions (source language ``en``, ``acc``), conformed."""
    rows = rows.copy()
    rows.loc[rows["lang"] == source_lang, "lang"] = R.SOURCE_LANG
    rows["metric"] = rows["metric"].replace(STORE_METRIC)
    return R.conform(rows)


def collect_run_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's ``metrics.parquet`` (snapshot and variant rows), concatenated, in store form."""
    frames = []
    for path in runs["path"]:
        cfg = _config(path)
        frames.append(store_rows(pd.read_parquet(Path(path) / "metrics.parquet"), cfg.source_lang()))
    return R.conform(pd.concat(frames, ignore_index=True)) if frames else R.empty_frame()


# --------------------------------------------------------------------------- content keys
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


@dataclass
class _Snapshot:
    run_id: str
    snapshot: int
    rank: int
    score: float
    path: Path


def kept_snapshots(path: str | Path, primary: str | None = None) -> list[_Snapshot]:
    """A run's kept top-k snapshots (``checkpoints/topk_<rank>``) with their English dev score
    (the score taken when the snapshot was, as training ranked them)."""
    m = _manifest(path)
    cfg = TrainConfig(**m["params"])
    primary = primary or metrics.PRIMARY_METRIC[cfg.task]
    snaps = m.get("topk_snapshots") or []
    if not snaps:
        return []
    df = pd.read_parquet(Path(path) / "metrics.parquet")
    dataset, lang, split = cfg.dev_sets()[0]
    df = df[(df["kind"] == "snapshot") & (df["dataset"] == dataset) & (df["lang"] == lang) & (df["split"] == split)
            & (df["metric"] == primary)]
    score = dict(zip(df["name"].astype(str), df["value"].astype(float)))
    return [_Snapshot(m["run_id"], int(s), rank, score[str(s)], Path(path) / "checkpoints" / f"topk_{rank}.safetensors")
            for rank, s in enumerate(snaps)]


def soup_members(snapshots: dict[str, list[_Snapshot]], run_ids: Sequence[str], k: int) -> list[_Snapshot]:
    """The ``k`` snapshots with the best English dev among ``run_ids``' kept ones (ties: run id,
    then snapshot, so the choice depends only on the set of runs); fewer if fewer are kept."""
    pool = [s for r in run_ids for s in snapshots.get(r, [])]
    return sorted(pool, key=lambda s: (-s.score, s.run_id, s.snapshot))[:k]


# --------------------------------------------------------------------------- planning
@dataclass
class _Item:
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
    snapshots: dict[str, list[_Snapshot]]
    soup_k: int | None
    items: list[_Item]
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


def base_identity(runs: pd.DataFrame) -> dict[str, str]:
    """What θ₀ (pretrained encoder + the run's frozen, aligned head) is made of, per run: the
    model, the vocabulary and the head fingerprint -- plus the seed when task adapters (initialised
    with the run's seed) are part of the weights. Runs with different identities have different θ₀."""
    out = {}
    for run_id, path, fp in zip(runs["run_id"], runs["path"], runs["head_fingerprint"]):
        p = _manifest(path)["params"]
        ident = {"model": p.get("model_name"), "vocabulary": vocabulary_key(path), "head": fp}
        if p.get("adapters"):
            ident["adapter_seed"] = p.get("seed")
        out[run_id] = json.dumps(ident, sort_keys=True)
    return out


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
        ids = _groups(base_identity(runs))
        base_id = next(iter(ids))
        if len(ids) > 1:
            raise IncompatibleRunsError(
                f"merge method(s) {[s.method for s in specs if s.info.needs_base]} need one θ₀ (pretrained weights + "
                f"head) for all runs, but the runs' θ₀ differ: {list(ids.values())}")
    paths = dict(zip(runs["run_id"], (Path(p) for p in runs["path"])))
    first = runs["run_id"].iloc[0]
    cfg = _config(paths[first])
    n_cfg = len(runs[["lr", "batch_size"]].drop_duplicates())
    r_eff = min(int(r_max), n_cfg)
    if r_eff < r_max:
        warnings.warn(f"only {n_cfg} (lr, batch_size) configurations: r_max capped at {r_eff} (asked {r_max})",
                      stacklevel=3)
    samplings = [int(s) for s in samplings]
    orders = {s: S.sample_runs(runs, r_eff, seed=s) for s in samplings}

    # soups: each run's kept snapshots and their English dev scores
    snapshots: dict[str, list[_Snapshot]] = {}
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
    items: list[_Item] = []
    skipped = 0
    for s in samplings:
        order = orders[s]
        for spec in specs:
            for v in merging.merged_variants(spec, variants, method_variants):
                for r in range(1, r_eff + 1):
                    items.append(_Item("average", v, s, r, order[:r], average_key(v, order[:r], spec),
                                       [paths[i] / "checkpoints" / f"{v}.safetensors" for i in order[:r]], spec))
        if soup_k:
            for r in range(1, r_eff + 1):
                chosen = soup_members(snapshots, order[:r], soup_k)
                if len(chosen) < soup_k:
                    skipped += 1
                    continue
                items.append(_Item("soup", f"top{soup_k}", s, r, order[:r],
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


# --------------------------------------------------------------------------- the evaluation cache
@dataclass
class _Store:
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


def _complete(rows: pd.DataFrame, expected: set[tuple[str, str, str, str]]) -> bool:
    have = set(zip(rows["dataset"], rows["split"], rows["lang"], rows["metric"]))
    return expected <= have


def open_cache(plan: CrossRunPlan, results_path: str | Path, runs: pd.DataFrame) -> _Store:
    """The store's cross-run rows indexed for :func:`cache_status` (warns about stale names)."""
    store = _Store(Path(results_path), plan.cfg.task, plan.cfg.model_name)
    store.load(plan.key_of_row)
    stale = _stale_names(store, runs, plan.r_eff, dict(plan.orders))
    if stale:
        warnings.warn(f"{len(stale)} cross-run name(s) in {results_path} list members this pool of runs would not "
                      f"sample (another pool of runs?), e.g. {stale[:3]}; names this pass computes are overwritten, "
                      f"the others stay: use a fresh results_path when the pool of runs changes", stacklevel=3)
    return store


def cache_status(store: _Store, it: _Item, expected: set) -> str:
    """stored (this method and name, same members), reused (same content under another name) or evaluate."""
    stored = store.by_name.get((it.method, it.name))
    if stored is not None and stored[0] == it.members_str and _complete(stored[1], expected):
        return "stored"
    cached = store.by_key.get(it.key)
    return "reused" if cached is not None and _complete(cached, expected) else "evaluate"


def reuse_rows(store: _Store, it: _Item, rows: pd.DataFrame, flush: bool = False) -> None:
    """Store ``rows`` (scores of the same weights) under ``it``'s name, method and members."""
    rows = rows.copy()
    rows["name"] = it.name
    rows["run_id"] = it.name
    rows["members"] = it.members_str
    rows["method"] = it.method
    store.add(it.key, rows, flush=flush)


# --------------------------------------------------------------------------- execution
def average_runs(
    runs: pd.DataFrame,
    *,
    variants: Sequence[str] = AVERAGE_VARIANTS,
    r_max: int = 10,
    samplings: Iterable[int] = range(10),
    soup_k: int | None = 5,
    methods: Any = None,
    method_variants: Sequence[str] | None = None,
    results_path: str | Path,
    keep_checkpoints: bool = False,
    averages_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Accumulative merges (and soups) of ``runs`` for every sampling, evaluated once each.

    ``runs``: :func:`find_runs`' frame (checked again). For each sampling seed ``s`` in
    ``samplings``, :func:`ofa_lib.results.selection.sample_runs` orders ``min(r_max, #configs)`` runs;
    for each merge method (``methods``: see :func:`ofa_lib.merge.merging.parse_methods`; default the
    uniform mean) and variant (methods other than uniform: only ``method_variants`` when given),
    the merges of the first r = 1…r_max runs are computed (incremental
    methods: streamed, each checkpoint read once; others: in row blocks of all r inputs) and
    scored on English dev and every test set; with ``soup_k`` (None or 0: no soups), the soup of
    the ``soup_k`` best kept snapshots by English dev among the first r runs is scored too (r
    where fewer than ``soup_k`` snapshots are kept are skipped with a warning). Rows are appended
    to ``results_path`` after each evaluation, with the method's label in ``method``; weights
    already evaluated (same content key, any name) are not evaluated again. With
    ``keep_checkpoints`` every computed merge is written (atomically) to ``averages_dir`` (default
    ``<runs_root>/../averages/<task>/``) as ``<kind>-<variant>-<content digest>.safetensors``.
    Methods that need θ₀ write it there once (``base-<digest>.safetensors``, fp32).

    Returns the tidy rows of every requested (method, name) (new or cached);
    ``.attrs["stats"]`` holds the counts: ``evaluations`` done, ``dev_evaluations`` (greedy
    soup's English-dev trials), ``reused`` (content already in the store under another name),
    ``already_stored`` (this very name), ``avoided`` (= reused + already_stored),
    ``soups_skipped``, ``checkpoint_reads``, ``seconds`` (all), ``setup_seconds`` (building the
    model skeleton and evaluation sets, only when something is evaluated), ``eval_seconds``,
    ``fisher_computed`` / ``fisher_reused`` / ``fisher_seconds`` (the ``fisher`` method's diagonals).
    """
    t_start = time.perf_counter()
    plan = plan_pass(runs, variants=variants, r_max=r_max, samplings=samplings, soup_k=soup_k, methods=methods,
                     method_variants=method_variants, averages_dir=averages_dir)
    store = open_cache(plan, results_path, runs)
    stats = execute_pass(plan, store, keep_checkpoints=keep_checkpoints, device=device, progress=progress)
    stats["seconds"] = round(time.perf_counter() - t_start, 2)
    print(f"average_runs: {stats['evaluations']} evaluation(s), {stats['avoided']} avoided "
          f"({stats['reused']} reused by content, {stats['already_stored']} already stored), "
          f"{stats['checkpoint_reads']} checkpoint read(s), {stats['seconds']:.1f} s"
          + (f"; Fisher diagonals: {stats['fisher_computed']} computed, {stats['fisher_reused']} read "
             f"({stats['fisher_seconds']:.1f} s)" if stats["fisher_computed"] or stats["fisher_reused"] else ""))
    wanted = {(it.method, it.name) for it in plan.items}
    out = R.read(results_path) if Path(results_path).exists() else R.empty_frame()
    out = out[(out["task"] == plan.cfg.task) & (out["model"] == plan.cfg.model_name) & out["kind"].isin(R.CROSS_KINDS)]
    out = out[[(m, n) in wanted for m, n in zip(out["method"], out["name"])]].reset_index(drop=True)
    out.attrs["stats"] = stats
    return out


def execute_pass(plan: CrossRunPlan, store: _Store, *, keep_checkpoints: bool = False, device: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Compute and evaluate what :func:`plan_pass` listed and the cache does not hold; returns the stats."""
    cfg, source_lang = plan.cfg, plan.source_lang
    stats: dict[str, Any] = {"evaluations": 0, "dev_evaluations": 0, "reused": 0, "already_stored": 0, "avoided": 0,
                             "soups_skipped": plan.soups_skipped, "checkpoint_reads": 0, "seconds": 0.0,
                             "setup_seconds": 0.0, "eval_seconds": 0.0, "fisher_computed": 0, "fisher_reused": 0,
                             "fisher_seconds": 0.0}
    own_scores: dict[str, pd.DataFrame] = {}  # run id -> its own variant rows (for the r = 1 consistency check)
    skeleton: dict[str, Any] = {}
    needs_base = any(s.info.needs_base for s in plan.specs)
    needs_fisher = any(s.info.needs_fisher for s in plan.specs)
    fisher_batches: dict = {}
    base_file = plan.avg_dir / f"base-{key_digest([plan.base_id])}.safetensors"

    def ckpt_path(item: _Item) -> Path:
        return plan.avg_dir / f"{item.kind}-{item.variant}-{key_digest(item.key)}.safetensors"

    def model_and_sets():
        if not skeleton:
            t0 = time.perf_counter()
            prep = training.prepare(cfg)
            if needs_base:  # θ₀ is the skeleton before any merge is loaded into it
                _write_base(prep, base_file, {_manifest(p).get("head_fingerprint") for p in plan.paths.values()})
            dev, precision, _ = training.resolve_runtime(cfg, device)  # the runs' precision rule, on this machine
            skeleton.update(model=prep.model.to(dev).eval(), sets=prep.dev_sets[:1] + prep.test_sets, device=dev,
                            autocast=training.AUTOCAST.get(precision))
            if needs_fisher:  # its English training features serve the diagonals
                skeleton["prep"] = prep
            del prep
            stats["setup_seconds"] = round(time.perf_counter() - t0, 2)
        return skeleton

    def base() -> Path:
        model_and_sets()
        if not base_file.is_file():  # the skeleton was built by an earlier pass step: build θ₀ afresh
            _write_base(training.prepare(cfg), base_file,
                        {_manifest(p).get("head_fingerprint") for p in plan.paths.values()})
        return base_file

    def fishers(spec: merging.MergeSpec, paths: list[Path]) -> list[Path]:
        """Each input's stored diagonal (computed with the skeleton once, then read)."""
        out = []
        for path in paths:
            t0 = time.perf_counter()
            sk = model_and_sets()
            f, computed = fisher_diagonal_of(path, spec, plan.avg_dir / "fisher", sk["prep"], model=sk["model"],
                                             device=sk["device"], autocast_dtype=sk["autocast"], progress=progress,
                                             batches=fisher_batches)
            stats["fisher_computed" if computed else "fisher_reused"] += 1
            stats["fisher_seconds"] += time.perf_counter() - t0
            out.append(f)
        return out

    def score(state: dict[str, torch.Tensor], sets) -> dict:
        sk = model_and_sets()
        sk["model"].load_state_dict(state, strict=True)
        return {s.key: evaluation.score(sk["model"], s, cfg.task, batch_size=cfg.eval_batch_size, device=sk["device"],
                                        autocast_dtype=sk["autocast"]) for s in sets}

    def evaluate(it: _Item, state: dict[str, torch.Tensor]) -> None:
        sk = model_and_sets()
        t0 = time.perf_counter()
        rows = _cross_rows(cfg, it, score(state, sk["sets"]), source_lang)
        store.add(it.key, rows, flush=True)
        stats["evaluations"] += 1
        stats["eval_seconds"] += time.perf_counter() - t0
        if it.kind == "average" and it.r == 1 and it.spec.method == "uniform":
            _check_r1(it, rows, plan.paths[it.members[0]], source_lang, own_scores)
        it.status = "evaluated"

    def save(it: _Item, state: dict[str, torch.Tensor]) -> None:
        if keep_checkpoints and not ckpt_path(it).is_file():
            info = ckpt_io.checkpoint_info(it.paths[0])
            meta = {ckpt_io.FINGERPRINT_KEY: info.fingerprint or "",
                    ckpt_io.AVERAGE_METHOD_KEY: ("running_mean" if it.spec.method == "uniform" else it.method)
                    if it.kind == "average" else "uniform_soup",
                    ckpt_io.AVERAGE_INPUTS_KEY: json.dumps([str(p) for p in it.paths]),
                    "ofa_content_key": json.dumps(it.key), "ofa_members": it.members_str}
            ckpt_io.save_checkpoint(state, ckpt_path(it), metadata=meta)

    def needs_weights(it: _Item) -> bool:
        return it.status == "evaluate" or (keep_checkpoints and not ckpt_path(it).is_file())

    def finish(it: _Item, state: dict[str, torch.Tensor]) -> None:
        save(it, state)
        if it.status == "evaluate":
            evaluate(it, state)

    greedy = _Greedy(plan, store, stats, score, model_and_sets) if any(s.info.needs_scores for s in plan.specs) else None
    bar = tqdm(total=len(plan.items), desc=f"average {cfg.task}", disable=not progress)
    groups: dict[tuple, list[_Item]] = defaultdict(list)
    for it in plan.items:
        groups[(it.kind, it.sampling, it.method, it.variant if it.kind == "average" else f"r{it.r}")].append(it)
    for group in groups.values():
        for it in group:  # decided now, so that what earlier groups evaluated is reused
            it.status = cache_status(store, it, plan.expected)
            if it.status == "stored":
                stats["already_stored"] += 1
            elif it.status == "reused":
                reuse_rows(store, it, store.by_key[it.key])
                stats["reused"] += 1
        todo = [it for it in group if needs_weights(it)]
        spec = group[0].spec
        if not todo:
            pass
        elif group[0].kind == "soup":
            for it in todo:
                stats["checkpoint_reads"] += len(it.paths)
                finish(it, averaging.uniform_soup(it.paths))
        elif spec.info.needs_scores and greedy is not None:  # greedy soup: English-dev trials, then a uniform mean
            for it in todo:
                greedy.run(it, finish, needs_weights)
        elif spec.info.incremental:  # θ̄_1 … θ̄_r streamed, each checkpoint read once
            last_r = max(it.r for it in todo)
            by_r = {it.r: it for it in group}
            stream = merging.incremental_states(spec, by_r[last_r].paths, base=base() if spec.info.needs_base else None,
                                                fishers=fishers(spec, by_r[last_r].paths) if spec.info.needs_fisher else None)
            for r, state in enumerate(stream, start=1):
                stats["checkpoint_reads"] += 1
                if needs_weights(by_r[r]):
                    finish(by_r[r], state)
                if r == last_r:
                    break
        else:  # all r inputs per tensor, in row blocks
            for it in todo:
                stats["checkpoint_reads"] += len(it.paths)
                finish(it, merging.merge_files(spec, it.paths, base=base() if spec.info.needs_base else None))
        store.flush()
        bar.update(len(group))
        bar.set_postfix(evaluated=stats["evaluations"], cached=stats["reused"] + stats["already_stored"])
    bar.close()
    store.flush()
    stats["avoided"] = stats["reused"] + stats["already_stored"]
    stats["eval_seconds"] = round(stats["eval_seconds"], 2)
    stats["fisher_seconds"] = round(stats["fisher_seconds"], 2)
    return stats


def fisher_diagonal_of(checkpoint: str | Path, spec: merging.MergeSpec, cache_dir: str | Path, prep: "training.Prepared",
                       *, model: torch.nn.Module | None = None, device: Any = None, autocast_dtype: Any = None,
                       progress: bool = True, batches: dict | None = None) -> tuple[Path, bool]:
    """The stored diagonal Fisher of ``checkpoint`` for ``spec``'s options (``fisher`` merges): read
    from ``cache_dir`` when there (:func:`ofa_lib.train.fisher.cached_diagonal`: by the checkpoint's
    sha256 and the options), else computed with ``model`` (default ``prep.model``; its weights are
    replaced by the checkpoint's) on ``examples`` seeded English rows of ``split`` (``prep``'s
    training features or first dev set, :class:`ofa_lib.train.measures.MeasureData`) and written
    atomically. ``batches``: a dict that keeps the batches between calls. Returns ``(path, computed)``."""
    opts = fisher.diagonal_options(spec.opts)

    def compute() -> tuple[dict[str, torch.Tensor], int]:
        target = prep.model if model is None else model
        target.load_state_dict(ckpt_io.load_checkpoint(checkpoint), strict=True)
        key = (opts["split"], opts["examples"], opts["seed"])
        cache = {} if batches is None else batches
        if key not in cache:
            data = measures.MeasureData.from_prepared(prep, "", n_examples=int(opts["examples"]), seed=int(opts["seed"]))
            cache[key] = data.train if opts["split"] == "train" else data.source
        return fisher.fisher_diagonal(target, cache[key], label_mode=str(opts["labels"]), seed=int(opts["seed"]),
                                      device=device, autocast_dtype=autocast_dtype, progress=progress)

    return fisher.cached_diagonal(checkpoint, opts, cache_dir, compute)


def run_fisher_diagonal(run_dir: str | Path, variant: str = "ca", methods: Any = "fisher", *,
                        cache_dir: str | Path | None = None, device: str | None = None) -> Path:
    """The stored diagonal Fisher of one run's ``variant`` checkpoint (for ``ofa-merge --fisher``),
    with the options of the ``fisher`` entry of ``methods`` (:func:`ofa_lib.merge.merging.parse_methods`;
    default ``fisher`` with its defaults), in ``cache_dir`` (default the pass's
    ``<runs_root>/../averages/<task>/fisher``); computed once, then read."""
    run_dir = Path(run_dir)
    spec = next((s for s in merging.parse_methods(methods) if s.info.needs_fisher), None)
    if spec is None:
        raise merging.MergeSpecError(f"run_fisher_diagonal: methods={methods!r} has no fisher entry")
    if variant not in AVERAGE_VARIANTS + ("trg_dev",):
        raise ValueError(f"run_fisher_diagonal: unknown variant {variant!r}; expected one of {AVERAGE_VARIANTS}")
    m = _manifest(run_dir)
    ckpt_io.verify_recorded(run_dir, m.get("checkpoint_sha256") or {}, m["run_id"])
    cfg = TrainConfig(**m["params"])
    cache_dir = Path(cache_dir) if cache_dir else run_dir.parent.parent / "averages" / cfg.task / "fisher"
    checkpoint = run_dir / "checkpoints" / f"{variant}.safetensors"
    sha = ckpt_io.cached_sha256(checkpoint)
    path = fisher.diagonal_file(cache_dir, sha, fisher.diagonal_options(spec.opts))
    if path.is_file() and fisher.diagonal_mismatch(path, sha, fisher.diagonal_options(spec.opts)) is None:
        return path  # nothing to prepare
    prep = training.prepare(cfg)
    dev, precision, _ = training.resolve_runtime(cfg, device)
    path, _ = fisher_diagonal_of(checkpoint, spec, cache_dir, prep, model=prep.model.to(dev), device=dev,
                                 autocast_dtype=training.AUTOCAST.get(precision))
    return path


def base_file_of_run(run_dir: str | Path, averages_dir: str | Path | None = None) -> Path:
    """θ₀ of one finished run (``ofa-merge --base-from-run``): the pretrained encoder with the run's
    vocabulary and frozen, aligned head, built from the run's config (:func:`ofa_lib.train.training.prepare`)
    and written once in fp32 where the cross-run pass keeps it
    (``<averages_dir or runs_root/../averages/<task>>/base-<digest>.safetensors``, the same file)."""
    run_dir = Path(run_dir)
    m = _manifest(run_dir)
    ckpt_io.verify_recorded(run_dir, m.get("checkpoint_sha256") or {}, m["run_id"])
    runs = pd.DataFrame([{"run_id": m["run_id"], "path": str(run_dir), "head_fingerprint": m.get("head_fingerprint")}])
    base_id = next(iter(_groups(base_identity(runs))))  # as plan_pass names it
    cfg = TrainConfig(**m["params"])
    avg_dir = Path(averages_dir) if averages_dir else run_dir.parent.parent / "averages" / cfg.task
    path = avg_dir / f"base-{key_digest([base_id])}.safetensors"
    if not path.is_file():
        _write_base(training.prepare(cfg), path, {m.get("head_fingerprint")})
    return path


def _write_base(prep: "training.Prepared", path: Path, fps: set) -> None:
    """Write θ₀ (the prepared, not yet trained model: pretrained encoder, trimmed vocabulary, the
    run's head) in fp32, after checking its head is the runs' (same fingerprint, ``fps``)."""
    if path.is_file():
        return
    if fps != {prep.head_fingerprint}:
        raise IncompatibleRunsError(f"θ₀ built from the first run's config has head fingerprint {prep.head_fingerprint}, "
                                    f"the runs {sorted(map(str, fps))}: refusing to merge task vectors")
    ckpt_io.save_checkpoint({k: v.detach() for k, v in prep.model.state_dict().items()}, path, dtype=torch.float32,
                              metadata={ckpt_io.FINGERPRINT_KEY: prep.head_fingerprint, "ofa_base": "theta0"})


class _Greedy:
    """Greedy soups (Wortsman et al. 2022) in the pass: the r candidates sorted by their English
    dev score (ties: run id, so the soup depends only on the set), each added when the English dev
    score of the uniform soup does not drop. A soup's dev score comes from the store (any uniform
    average of the same set was scored on English dev) or is evaluated on English dev only."""

    def __init__(self, plan: CrossRunPlan, store: _Store, stats: dict, score, model_and_sets) -> None:
        self.plan, self.store, self.stats, self.score, self.model_and_sets = plan, store, stats, score, model_and_sets
        self.dev_cache: dict[tuple, float] = {}
        cfg = plan.cfg
        dataset, _, split = cfg.dev_sets()[0]
        primary = metrics.PRIMARY_METRIC[cfg.task]
        self.dev_row = (dataset, split, R.SOURCE_LANG, STORE_METRIC.get(primary, primary))
        self.primary = primary
        own = collect_run_metrics(pd.DataFrame({"path": [str(p) for p in plan.paths.values()]}))
        own = own[(own["kind"] == "variant") & (own["split"] == split) & (own["lang"] == R.SOURCE_LANG)
                  & (own["dataset"] == dataset) & (own["metric"] == self.dev_row[3])]
        self.own_dev = {(r, v): float(x) for r, v, x in zip(own["run_id"], own["name"], own["value"])}

    def dev_score(self, variant: str, members: list[str]) -> float:
        key = average_key(variant, members)
        if key in self.dev_cache:
            return self.dev_cache[key]
        rows = self.store.by_key.get(key)
        if rows is not None:
            hit = rows[[tuple(x) == self.dev_row for x in zip(rows["dataset"], rows["split"], rows["lang"], rows["metric"])]]
            if len(hit):
                self.dev_cache[key] = float(hit["value"].iloc[0])
                return self.dev_cache[key]
        paths = [self.plan.paths[m] / "checkpoints" / f"{variant}.safetensors" for m in members]
        state = averaging.average_checkpoints(paths, dtype=torch.float32)
        self.stats["checkpoint_reads"] += len(paths)
        t0 = time.perf_counter()
        dev_set = self.model_and_sets()["sets"][0]
        self.dev_cache[key] = float(self.score(state, [dev_set])[dev_set.key][self.primary])
        self.stats["dev_evaluations"] += 1
        self.stats["eval_seconds"] += time.perf_counter() - t0
        return self.dev_cache[key]

    def kept(self, variant: str, candidates: list[str]) -> list[str]:
        missing = [c for c in candidates if (c, variant) not in self.own_dev]
        if missing:
            raise ValueError(f"greedy_soup: no English dev score of the {variant} weights of run(s) {missing}")
        order = sorted(candidates, key=lambda c: (-self.own_dev[(c, variant)], c))
        soup, best = [order[0]], self.dev_score(variant, [order[0]])
        for c in order[1:]:
            score = self.dev_score(variant, soup + [c])
            if score >= best:
                soup, best = soup + [c], score
        return soup

    def run(self, it: _Item, finish: Callable[[_Item, dict[str, torch.Tensor]], None],
            needs_weights: Callable[[_Item], bool]) -> None:
        """Choose ``it``'s soup; reuse the scores of the uniform mean of the kept runs when the store
        has them, else compute that mean (streamed) and hand it to ``finish``."""
        soup = self.kept(it.variant, it.members)
        print(f"greedy_soup {it.name}: kept {len(soup)} of {it.r}: {','.join(soup)}")
        rows = self.store.by_key.get(average_key(it.variant, soup))
        if it.status == "evaluate" and rows is not None and _complete(rows, self.plan.expected):
            reuse_rows(self.store, it, rows, flush=True)
            self.stats["reused"] += 1
            it.status = "reused"
        if not needs_weights(it):
            return
        paths = [self.plan.paths[m] / "checkpoints" / f"{it.variant}.safetensors" for m in soup]
        state = None
        for state in averaging.running_average(paths, dtype=torch.float32):
            self.stats["checkpoint_reads"] += 1
        finish(it, state)


def _stale_names(store: _Store, runs: pd.DataFrame, r_eff: int, orders: dict[int, list[str]]) -> list[str]:
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


def _cross_rows(cfg: TrainConfig, it: _Item, scores, source_lang: str) -> pd.DataFrame:
    rows = pd.DataFrame(training.tidy_rows(cfg, it.kind, it.name, scores, step=0, epoch=0.0))
    rows["run_id"] = it.name
    rows["members"] = it.members_str
    rows["method"] = it.method
    rows["lr"] = math.nan
    rows["epoch"] = math.nan
    for c in ("batch_size", "seed", "step"):
        rows[c] = pd.NA
    return store_rows(rows, source_lang)


def _check_r1(it: _Item, rows: pd.DataFrame, run_path: Path, source_lang: str, cache: dict) -> None:
    """Warn when the r = 1 average (the run's own stored weights) scores differently on the test
    sets from the run's own evaluation of that stored variant: the skeleton or evaluation sets
    would not match. (Dev sets are not compared: training keeps LAST/SRC-DEV/TRG-DEV's dev
    scores from when the snapshot was taken, before it was stored in ``storage_dtype``.)"""
    run_id = it.members[0]
    if run_id not in cache:
        own = store_rows(pd.read_parquet(run_path / "metrics.parquet"), source_lang)
        cache[run_id] = own[(own["kind"] == "variant") & (own["split"] == "test")]
    own = cache[run_id]
    own = own[own["name"] == it.variant].set_index(["dataset", "split", "lang", "metric"])["value"]
    mine = rows[rows["split"] == "test"].set_index(["dataset", "split", "lang", "metric"])["value"]
    diff = (mine - own.reindex(mine.index)).abs()
    if diff.isna().any() or float(diff.max()) > 1e-6:
        warnings.warn(f"{it.name}: the r=1 average of run {run_id} ({it.variant}) scores differently from the run's "
                      f"own evaluation (max |diff| {float(diff.max()):.4g}; missing {int(diff.isna().sum())})",
                      stacklevel=2)


# --------------------------------------------------------------------------- notebook helpers
def runs_overview(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table for display (short fingerprints, no paths)."""
    out = runs.drop(columns=["path"]).copy()
    out["head_fingerprint"] = out["head_fingerprint"].str[:12]
    return out.set_index("run_id")


def summary_by_r(results_path: str | Path, task: str, sampling_seeds: str | Iterable[int] = "all",
                 model: str | None = None, soup_k: int | None = 5) -> pd.DataFrame:
    """Mean ± std over samplings (×100) per r: Max. SRC-DEV and accumulative averaging per
    variant (:func:`ofa_lib.results.selection.table1`), plus Max. TRG-DEV and SOUP (top ``soup_k``,
    :func:`ofa_lib.results.selection.table2`), as one wide frame (rows r)."""
    data = S.CrossRunData.from_tidy(R.read(results_path), task, model=model)
    ps = S.per_sampling(data, sampling_seeds)
    t1, t2 = S.table1(ps), S.table2(ps, soup_variant=f"top{soup_k or 0}")
    def cell(d: pd.DataFrame) -> pd.Series:
        return d["mean"].map("{:.1f}".format) + " ± " + d["std"].map(lambda x: "–" if pd.isna(x) else f"{x:.1f}")

    a = t1.assign(column=t1["selection"] + ":" + t1["variant"], cell=cell(t1))
    b = t2[t2["method"].isin(["max_trg_dev", "soup"])]
    b = b.assign(column=b["method"], cell=cell(b))
    wide = pd.concat([a, b]).pivot(index="r", columns="column", values="cell")
    order = [f"{m}:{v}" for v in S.TABLE1_VARIANTS for m in ("max_src_dev", "acc_avg")] + ["max_trg_dev", "soup"]
    cols = [c for c in order if c in wide.columns]
    return wide[cols]
