"""Across runs for OUR runs (docs/method.md §4): accumulative merges and soups, evaluated once.

:func:`ofa_lib.merge.pool.find_runs` lists the finished runs under ``outputs/runs`` and checks that
they can be combined: same data parameters (every config field except lr, batch_size, seed and head),
the same head fingerprint and the same vocabulary. :func:`average_runs` then runs one pass in three
separate steps, one module each:

- **planning** (:func:`ofa_lib.merge.planning.plan_pass`): for each sampling seed the ordered run list of
  :func:`ofa_lib.results.selection.sample_runs`; for each merge method (:mod:`ofa_lib.merge.merging`; default
  the paper's uniform mean), variant and r the merge of the first r runs, and the soups of the
  ``soup_k`` kept top-k snapshots with the best English dev among the first r runs;
- **cache** (:func:`ofa_lib.merge.cache.open_cache`, :func:`~ofa_lib.merge.cache.cache_status`): which of those the results store
  already holds, under this name or under another with the same content;
- **execution** (:func:`ofa_lib.merge.execution.execute_pass`): the rest is computed (incremental methods streamed with
  one checkpoint read per r; the others in row blocks of all r inputs; greedy soups by English-dev
  trials), loaded into ONE model skeleton (built once with :func:`ofa_lib.train.setup.prepare` of
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
(:func:`ofa_lib.merge.execution.fisher_diagonal_of`): computed once per checkpoint (by sha256) and options into
``<averages>/fisher/`` and read from there afterwards.

Methods on task vectors need θ₀: the first run's prepared, untrained model (pretrained encoder,
the runs' vocabulary, their frozen aligned head), written once in fp32 next to the averages;
runs whose θ₀ differ (see :func:`ofa_lib.merge.pool.base_identity`) are refused.

Rows written to the store follow its documented conventions: the source-language rows carry
``lang = "en"`` (:data:`ofa_lib.results.SOURCE_LANG`; SIB-200 calls English ``eng_Latn``) and
accuracy is ``metric = "acc"`` (as :data:`ofa_lib.results.TASK_METRIC`); see :func:`store_rows`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from ofa_lib import results as R
from ofa_lib.merge.cache import open_cache
from ofa_lib.merge.execution import execute_pass
from ofa_lib.merge.planning import AVERAGE_VARIANTS, plan_pass
from ofa_lib.results import selection as S


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
