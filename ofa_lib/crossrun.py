"""Across runs for OUR runs (docs/method.md §4): accumulative averaging and soups, evaluated once.

:func:`find_runs` lists the finished runs under ``outputs/runs`` and checks that they can be
combined: same data parameters (every config field except lr, batch_size, seed and head), the
same head fingerprint and the same vocabulary. :func:`average_runs` then, for each sampling
seed, takes the ordered run list of :func:`ofa_lib.selection.sample_runs`, streams
θ̄_1 … θ̄_r of each variant with :func:`ofa_lib.averaging.running_average` (each checkpoint read
once), loads each θ̄_r into ONE model skeleton (built once with :func:`ofa_lib.training.prepare`
of the first run's config, whose featurized dev/test sets are reused) and scores it on the
source dev, target dev and target test sets. Soups average the ``soup_k`` kept top-k snapshots
with the best English dev among the first r runs.

Rows go to the tidy results store (:func:`ofa_lib.results.append`) after every evaluation, as
``kind="average"`` (``acc_avg:<variant>:r=<r>:sampling=<s>``) and ``kind="soup"``
(``soup:top<k>:r=<r>:sampling=<s>``) rows with ``run_id == name`` and ``members`` = the r run
ids in sampling order (the contract of :mod:`ofa_lib.results` / :mod:`ofa_lib.selection`).

The cache: a set of weights is identified by its content -- ``("average", variant, sorted
member run ids)`` for averages (the uniform mean does not depend on the order), ``("soup",
sorted (run id, snapshot) pairs)`` for soups. Before evaluating, the store is searched for rows
with the same content key (under any name); if found, their scores are copied under the new
name and nothing is evaluated. So samplings whose first r runs are the same set, r = 1 across
samplings, and re-running the notebook cost no evaluation; an interrupted pass resumes.

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
from typing import Any, Iterable, Sequence

import pandas as pd
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import averaging, evaluation, metrics, training
from . import results as R
from . import selection as S
from .config import TrainConfig
from .paths import outputs_dir

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
        with safe_open(str(file), framework="pt") as f:
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
def average_key(variant: str, members: Iterable[str]) -> tuple:
    """Content key of the uniform average of the members' ``variant`` weights (order-free)."""
    return ("average", variant, tuple(sorted(members)))


def soup_key(pairs: Iterable[tuple[str, int]]) -> tuple:
    """Content key of the uniform average of ``(run id, snapshot)`` snapshots (order-free)."""
    return ("soup", tuple(sorted((str(r), int(s)) for r, s in pairs)))


def key_digest(key: tuple) -> str:
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


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


# --------------------------------------------------------------------------- the pass
@dataclass
class _Item:
    kind: str          # average | soup
    variant: str       # last/src_dev/ca or top<k>
    sampling: int
    r: int
    members: list[str]
    key: tuple
    paths: list[Path]  # soups: the snapshot files
    name: str = ""
    status: str = ""   # stored | reused | evaluate

    @property
    def members_str(self) -> str:
        return R.join_members(self.members)


@dataclass
class _Store:
    """The results store's cross-run rows, indexed by name and by content key."""

    path: Path
    task: str
    model: str
    by_name: dict[str, tuple[str, pd.DataFrame]] = field(default_factory=dict)
    by_key: dict[tuple, pd.DataFrame] = field(default_factory=dict)
    pending: list[pd.DataFrame] = field(default_factory=list)

    def load(self, key_of_row) -> None:
        if not self.path.exists():
            return
        d = R.read(self.path)
        d = d[(d["task"] == self.task) & (d["model"] == self.model) & d["kind"].isin(["average", "soup"])]
        for name, g in d.groupby("name", sort=False):
            members = str(g["members"].iloc[0])
            self.by_name[name] = (members, g)
            key = key_of_row(name, R.members_list(members))
            if key is not None:
                self.by_key.setdefault(key, g)

    def add(self, key: tuple, rows: pd.DataFrame, flush: bool) -> None:
        name = rows["name"].iloc[0]
        self.by_name[name] = (rows["members"].iloc[0], rows)
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


def average_runs(
    runs: pd.DataFrame,
    *,
    variants: Sequence[str] = AVERAGE_VARIANTS,
    r_max: int = 10,
    samplings: Iterable[int] = range(10),
    soup_k: int | None = 5,
    results_path: str | Path,
    keep_checkpoints: bool = False,
    averages_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Accumulative averages (and soups) of ``runs`` for every sampling, evaluated once each.

    ``runs``: :func:`find_runs`' frame (checked again). For each sampling seed ``s`` in
    ``samplings``, :func:`ofa_lib.selection.sample_runs` orders ``min(r_max, #configs)`` runs;
    for each variant, θ̄_1…θ̄_r are streamed with :func:`ofa_lib.averaging.running_average` and
    scored on every dev and test set; with ``soup_k`` (None or 0: no soups), the soup of the
    ``soup_k`` best kept snapshots by English dev among the first r runs is scored too (r where
    fewer than ``soup_k`` snapshots are kept are skipped with a warning). Rows are appended to
    ``results_path`` after each evaluation; weights already evaluated (same content key, any
    name) are not evaluated again. With ``keep_checkpoints`` every computed average is written
    (atomically) to ``averages_dir`` (default ``<runs_root>/../averages/<task>/``) as
    ``<kind>-<variant>-<content digest>.safetensors``.

    Returns the tidy rows of every requested name (new or cached); ``.attrs["stats"]`` holds
    the counts: ``evaluations`` done, ``reused`` (content already in the store under another
    name), ``already_stored`` (this very name), ``avoided`` (= reused + already_stored),
    ``soups_skipped``, ``checkpoint_reads``, ``seconds`` (all), ``setup_seconds`` (building the
    model skeleton and evaluation sets, only when something is evaluated), ``eval_seconds``.
    """
    t_start = time.perf_counter()
    check_compatible(runs)
    bad = [v for v in variants if v not in AVERAGE_VARIANTS + ("trg_dev",)]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; expected some of {AVERAGE_VARIANTS}")
    paths = dict(zip(runs["run_id"], (Path(p) for p in runs["path"])))
    first = runs["run_id"].iloc[0]
    cfg = _config(paths[first])
    source_lang = cfg.source_lang()
    n_cfg = len(runs[["lr", "batch_size"]].drop_duplicates())
    r_eff = min(int(r_max), n_cfg)
    if r_eff < r_max:
        warnings.warn(f"only {n_cfg} (lr, batch_size) configurations: r_max capped at {r_eff} (asked {r_max})",
                      stacklevel=2)
    samplings = [int(s) for s in samplings]
    orders = {s: S.sample_runs(runs, r_eff, seed=s) for s in samplings}

    # soups: each run's kept snapshots and their English dev scores
    snapshots: dict[str, list[_Snapshot]] = {}
    if soup_k:
        snapshots = {r: kept_snapshots(p) for r, p in paths.items()}
        if not any(snapshots.values()):
            warnings.warn("no run kept top-k snapshots (train with top_k >= 1): soups skipped", stacklevel=2)
            soup_k = None
        else:
            top_k, n_snap = int(cfg.top_k), int(cfg.num_snapshots)
            if top_k < soup_k and top_k < n_snap:
                warnings.warn(f"runs kept only their top_k={top_k} snapshots (< soup_k={soup_k}): a soup's "
                              f"top-{soup_k} among r runs may miss snapshots a run did not keep", stacklevel=2)

    def key_of_row(name: str, members: list[str]) -> tuple | None:
        try:
            method, variant, r, _ = R.parse_cross_name(name)
        except ValueError:
            return None
        if method == "acc_avg":
            return average_key(variant, members)
        if method == "soup" and variant.startswith("top") and variant[3:].isdigit():
            if not all(m in snapshots for m in members):
                return None
            chosen = soup_members(snapshots, members, int(variant[3:]))
            return soup_key((s.run_id, s.snapshot) for s in chosen) if len(chosen) == int(variant[3:]) else None
        return None

    store = _Store(Path(results_path), cfg.task, cfg.model_name)
    store.load(key_of_row)
    stale = _stale_names(store, runs, r_eff, dict(orders))
    if stale:
        warnings.warn(f"{len(stale)} cross-run name(s) in {results_path} list members this pool of runs would not "
                      f"sample (another pool of runs?), e.g. {stale[:3]}; names this pass computes are overwritten, "
                      f"the others stay: use a fresh results_path when the pool of runs changes", stacklevel=2)

    # the work list, in a deterministic order: per sampling, per variant, r = 1..r_eff; then soups
    items: list[_Item] = []
    skipped = 0
    for s in samplings:
        order = orders[s]
        for v in variants:
            for r in range(1, r_eff + 1):
                items.append(_Item("average", v, s, r, order[:r], average_key(v, order[:r]),
                                   [paths[i] / "checkpoints" / f"{v}.safetensors" for i in order[:r]]))
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
                      stacklevel=2)

    # averaged models are scored on English dev and the target test sets (target dev only serves
    # the Max TRG-DEV oracle over single runs)
    expected_sets = [cfg.dev_sets()[0], *cfg.test_sets()]
    expected = {(d, split, R.SOURCE_LANG if lang == source_lang else lang, STORE_METRIC.get(m, m))
                for d, lang, split in expected_sets for m in metrics.task_metrics(cfg.task)}
    avg_dir = Path(averages_dir) if averages_dir else paths[first].parent.parent / "averages" / cfg.task

    def ckpt_path(item: _Item) -> Path:
        return avg_dir / f"{item.kind}-{item.variant}-{key_digest(item.key)}.safetensors"

    for it in items:
        it.name = R.cross_name("acc_avg" if it.kind == "average" else "soup", it.variant, it.r, it.sampling)

    def status(it: _Item) -> str:
        """stored (this name, same members), reused (same content under another name) or evaluate."""
        stored = store.by_name.get(it.name)
        if stored is not None and stored[0] == it.members_str and _complete(stored[1], expected):
            return "stored"
        cached = store.by_key.get(it.key)
        return "reused" if cached is not None and _complete(cached, expected) else "evaluate"

    stats = {"evaluations": 0, "reused": 0, "already_stored": 0, "avoided": 0, "soups_skipped": skipped,
             "checkpoint_reads": 0, "seconds": 0.0, "setup_seconds": 0.0, "eval_seconds": 0.0}
    own_scores = {}  # run id -> its own variant rows (for the r = 1 consistency check)
    skeleton: dict[str, Any] = {}

    def model_and_sets():
        if not skeleton:
            t0 = time.perf_counter()
            prep = training.prepare(cfg)
            dev = torch.device(device) if device else training.pick_device(cfg.precision)
            skeleton.update(model=prep.model.to(dev).eval(), sets=prep.dev_sets[:1] + prep.test_sets, device=dev,
                            autocast=training.AUTOCAST.get(cfg.precision))
            del prep
            stats["setup_seconds"] = round(time.perf_counter() - t0, 2)
        return skeleton

    def evaluate(it: _Item, state: dict[str, torch.Tensor]) -> None:
        sk = model_and_sets()
        t0 = time.perf_counter()
        sk["model"].load_state_dict(state, strict=True)
        scores = {s.key: evaluation.score(sk["model"], s, cfg.task, batch_size=cfg.eval_batch_size, device=sk["device"],
                                          autocast_dtype=sk["autocast"]) for s in sk["sets"]}
        rows = _cross_rows(cfg, it, scores, source_lang)
        store.add(it.key, rows, flush=True)
        stats["evaluations"] += 1
        stats["eval_seconds"] += time.perf_counter() - t0
        if it.kind == "average" and it.r == 1:
            _check_r1(it, rows, paths[it.members[0]], source_lang, own_scores)

    def save(it: _Item, state: dict[str, torch.Tensor]) -> None:
        if keep_checkpoints and not ckpt_path(it).is_file():
            info = averaging.checkpoint_info(it.paths[0])
            meta = {averaging.FINGERPRINT_KEY: info.fingerprint or "",
                    averaging.AVERAGE_METHOD_KEY: "running_mean" if it.kind == "average" else "uniform_soup",
                    averaging.AVERAGE_INPUTS_KEY: json.dumps([str(p) for p in it.paths]),
                    "ofa_content_key": json.dumps(it.key), "ofa_members": it.members_str}
            averaging.save_checkpoint(state, ckpt_path(it), metadata=meta)

    def needs_weights(it: _Item) -> bool:
        return it.status == "evaluate" or (keep_checkpoints and not ckpt_path(it).is_file())

    bar = tqdm(total=len(items), desc=f"average {cfg.task}", disable=not progress)
    groups: dict[tuple, list[_Item]] = defaultdict(list)
    for it in items:
        groups[(it.kind, it.sampling, it.variant if it.kind == "average" else f"r{it.r}")].append(it)
    for (kind, _, _), group in groups.items():
        for it in group:  # decided now, so that what earlier groups evaluated is reused
            it.status = status(it)
            if it.status == "stored":
                stats["already_stored"] += 1
            elif it.status == "reused":
                rows = store.by_key[it.key].copy()
                rows["name"] = it.name
                rows["run_id"] = it.name
                rows["members"] = it.members_str
                store.add(it.key, rows, flush=False)
                stats["reused"] += 1
        todo = [it for it in group if needs_weights(it)]
        if todo and kind == "average":
            last_r = max(it.r for it in todo)
            by_r = {it.r: it for it in group}
            stream = averaging.running_average(by_r[last_r].paths, dtype=torch.float32)
            for r, state in enumerate(stream, start=1):
                stats["checkpoint_reads"] += 1
                it = by_r[r]
                if needs_weights(it):
                    save(it, state)
                    if it.status == "evaluate":
                        evaluate(it, state)
                        it.status = "evaluated"
                if r == last_r:
                    break
        elif todo:
            for it in todo:
                state = averaging.uniform_soup(it.paths)
                stats["checkpoint_reads"] += len(it.paths)
                save(it, state)
                if it.status == "evaluate":
                    evaluate(it, state)
                    it.status = "evaluated"
        store.flush()
        bar.update(len(group))
        bar.set_postfix(evaluated=stats["evaluations"], cached=stats["reused"] + stats["already_stored"])
    bar.close()
    store.flush()
    stats["avoided"] = stats["reused"] + stats["already_stored"]
    stats["seconds"] = round(time.perf_counter() - t_start, 2)
    stats["eval_seconds"] = round(stats["eval_seconds"], 2)
    print(f"average_runs: {stats['evaluations']} evaluation(s), {stats['avoided']} avoided "
          f"({stats['reused']} reused by content, {stats['already_stored']} already stored), "
          f"{stats['checkpoint_reads']} checkpoint read(s), {stats['seconds']:.1f} s")
    names = {it.name for it in items}
    out = R.read(results_path) if Path(results_path).exists() else R.empty_frame()
    out = out[(out["task"] == cfg.task) & (out["model"] == cfg.model_name) & out["name"].isin(names)
              & out["kind"].isin(["average", "soup"])].reset_index(drop=True)
    out.attrs["stats"] = stats
    return out


def _stale_names(store: _Store, runs: pd.DataFrame, r_eff: int, orders: dict[int, list[str]]) -> list[str]:
    """Stored cross-run names whose members are not the first r runs of this pool's sampling s."""
    stale = []
    for name, (members, _) in store.by_name.items():
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
    return sorted(stale)


def _cross_rows(cfg: TrainConfig, it: _Item, scores, source_lang: str) -> pd.DataFrame:
    rows = pd.DataFrame(training.tidy_rows(cfg, it.kind, it.name, scores, step=0, epoch=0.0))
    rows["run_id"] = it.name
    rows["members"] = it.members_str
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
    variant (:func:`ofa_lib.selection.table1`), plus Max. TRG-DEV and SOUP (top ``soup_k``,
    :func:`ofa_lib.selection.table2`), as one wide frame (rows r)."""
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
