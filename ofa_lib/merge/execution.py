"""Executing a planned cross-run pass (:func:`execute_pass`): merges computed (incremental methods streamed,
the others in row blocks, greedy soups by English-dev trials), loaded into one model skeleton and scored;
θ₀ and the Fisher diagonals the methods need are written once next to the averages."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from ofa_lib import results as R
from ofa_lib.merge import averaging, merging
from ofa_lib.merge.cache import Store, cache_status, complete, reuse_rows
from ofa_lib.merge.planning import (
    AVERAGE_VARIANTS,
    CrossRunPlan,
    Item,
    average_key,
    key_digest,
)
from ofa_lib.merge.pool import (
    STORE_METRIC,
    IncompatibleRunsError,
    base_identity,
    collect_run_metrics,
    groups,
    store_rows,
)
from ofa_lib.models import ckpt_io
from ofa_lib.train import (
    evaluation,
    fisher,
    hardware,
    measures,
    metrics,
    setup,
    training,
)
from ofa_lib.train.config import TrainConfig
from ofa_lib.train.runs import read_manifest


def execute_pass(plan: CrossRunPlan, store: Store, *, keep_checkpoints: bool = False, device: str | None = None,
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

    def ckpt_path(item: Item) -> Path:
        return plan.avg_dir / f"{item.kind}-{item.variant}-{key_digest(item.key)}.safetensors"

    def model_and_sets():
        if not skeleton:
            t0 = time.perf_counter()
            prep = setup.prepare(cfg)
            if needs_base:  # θ₀ is the skeleton before any merge is loaded into it
                _write_base(prep, base_file, {read_manifest(p).get("head_fingerprint") for p in plan.paths.values()})
            dev, precision, _ = hardware.resolve_runtime(cfg, device)  # the runs' precision rule, on this machine
            skeleton.update(model=prep.model.to(dev).eval(), sets=prep.dev_sets[:1] + prep.test_sets, device=dev,
                            autocast=hardware.AUTOCAST.get(precision))
            if needs_fisher:  # its English training features serve the diagonals
                skeleton["prep"] = prep
            del prep
            stats["setup_seconds"] = round(time.perf_counter() - t0, 2)
        return skeleton

    def base() -> Path:
        model_and_sets()
        if not base_file.is_file():  # the skeleton was built by an earlier pass step: build θ₀ afresh
            _write_base(setup.prepare(cfg), base_file,
                        {read_manifest(p).get("head_fingerprint") for p in plan.paths.values()})
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

    def evaluate(it: Item, state: dict[str, torch.Tensor]) -> None:
        sk = model_and_sets()
        t0 = time.perf_counter()
        rows = _cross_rows(cfg, it, score(state, sk["sets"]), source_lang)
        store.add(it.key, rows, flush=True)
        stats["evaluations"] += 1
        stats["eval_seconds"] += time.perf_counter() - t0
        if it.kind == "average" and it.r == 1 and it.spec.method == "uniform":
            _check_r1(it, rows, plan.paths[it.members[0]], source_lang, own_scores)
        it.status = "evaluated"

    def save(it: Item, state: dict[str, torch.Tensor]) -> None:
        if keep_checkpoints and not ckpt_path(it).is_file():
            info = ckpt_io.checkpoint_info(it.paths[0])
            meta = {ckpt_io.FINGERPRINT_KEY: info.fingerprint or "",
                    ckpt_io.AVERAGE_METHOD_KEY: ("running_mean" if it.spec.method == "uniform" else it.method)
                    if it.kind == "average" else "uniform_soup",
                    ckpt_io.AVERAGE_INPUTS_KEY: json.dumps([str(p) for p in it.paths]),
                    "ofa_content_key": json.dumps(it.key), "ofa_members": it.members_str}
            ckpt_io.save_checkpoint(state, ckpt_path(it), metadata=meta)

    def needs_weights(it: Item) -> bool:
        return it.status == "evaluate" or (keep_checkpoints and not ckpt_path(it).is_file())

    def finish(it: Item, state: dict[str, torch.Tensor]) -> None:
        save(it, state)
        if it.status == "evaluate":
            evaluate(it, state)

    greedy = _Greedy(plan, store, stats, score, model_and_sets) if any(s.info.needs_scores for s in plan.specs) else None
    bar = tqdm(total=len(plan.items), desc=f"average {cfg.task}", disable=not progress)
    groups: dict[tuple, list[Item]] = defaultdict(list)
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


def fisher_diagonal_of(checkpoint: str | Path, spec: merging.MergeSpec, cache_dir: str | Path, prep: "setup.Prepared",
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
    m = read_manifest(run_dir)
    ckpt_io.verify_recorded(run_dir, m.get("checkpoint_sha256") or {}, m["run_id"])
    cfg = TrainConfig(**m["params"])
    cache_dir = Path(cache_dir) if cache_dir else run_dir.parent.parent / "averages" / cfg.task / "fisher"
    checkpoint = run_dir / "checkpoints" / f"{variant}.safetensors"
    sha = ckpt_io.cached_sha256(checkpoint)
    path = fisher.diagonal_file(cache_dir, sha, fisher.diagonal_options(spec.opts))
    if path.is_file() and fisher.diagonal_mismatch(path, sha, fisher.diagonal_options(spec.opts)) is None:
        return path  # nothing to prepare
    prep = setup.prepare(cfg)
    dev, precision, _ = hardware.resolve_runtime(cfg, device)
    path, _ = fisher_diagonal_of(checkpoint, spec, cache_dir, prep, model=prep.model.to(dev), device=dev,
                                 autocast_dtype=hardware.AUTOCAST.get(precision))
    return path


def base_file_of_run(run_dir: str | Path, averages_dir: str | Path | None = None) -> Path:
    """θ₀ of one finished run (``ofa-merge --base-from-run``): the pretrained encoder with the run's
    vocabulary and frozen, aligned head, built from the run's config (:func:`ofa_lib.train.setup.prepare`)
    and written once in fp32 where the cross-run pass keeps it
    (``<averages_dir or runs_root/../averages/<task>>/base-<digest>.safetensors``, the same file)."""
    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    ckpt_io.verify_recorded(run_dir, m.get("checkpoint_sha256") or {}, m["run_id"])
    runs = pd.DataFrame([{"run_id": m["run_id"], "path": str(run_dir), "head_fingerprint": m.get("head_fingerprint")}])
    base_id = next(iter(groups(base_identity(runs))))  # as plan_pass names it
    cfg = TrainConfig(**m["params"])
    avg_dir = Path(averages_dir) if averages_dir else run_dir.parent.parent / "averages" / cfg.task
    path = avg_dir / f"base-{key_digest([base_id])}.safetensors"
    if not path.is_file():
        _write_base(setup.prepare(cfg), path, {m.get("head_fingerprint")})
    return path


def _write_base(prep: "setup.Prepared", path: Path, fps: set) -> None:
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

    def __init__(self, plan: CrossRunPlan, store: Store, stats: dict, score, model_and_sets) -> None:
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

    def run(self, it: Item, finish: Callable[[Item, dict[str, torch.Tensor]], None],
            needs_weights: Callable[[Item], bool]) -> None:
        """Choose ``it``'s soup; reuse the scores of the uniform mean of the kept runs when the store
        has them, else compute that mean (streamed) and hand it to ``finish``."""
        soup = self.kept(it.variant, it.members)
        print(f"greedy_soup {it.name}: kept {len(soup)} of {it.r}: {','.join(soup)}")
        rows = self.store.by_key.get(average_key(it.variant, soup))
        if it.status == "evaluate" and rows is not None and complete(rows, self.plan.expected):
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


def _cross_rows(cfg: TrainConfig, it: Item, scores, source_lang: str) -> pd.DataFrame:
    rows = pd.DataFrame(training.tidy_rows(cfg, it.kind, it.name, scores, step=0, epoch=0.0))
    rows["run_id"] = it.name
    rows["members"] = it.members_str
    rows["method"] = it.method
    rows["lr"] = math.nan
    rows["epoch"] = math.nan
    for c in ("batch_size", "seed", "step"):
        rows[c] = pd.NA
    return store_rows(rows, source_lang)


def _check_r1(it: Item, rows: pd.DataFrame, run_path: Path, source_lang: str, cache: dict) -> None:
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
