"""The pool of finished runs a cross-run pass combines (docs/method.md §4): :func:`find_runs` lists them and
:func:`check_compatible` refuses runs that must not be merged (data parameters, head fingerprint, vocabulary);
:func:`collect_run_metrics` puts their own scores into the results store's form; :func:`kept_snapshots` and
:func:`base_identity` read what soups and task-vector methods need from a run folder."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ofa_lib import results as R
from ofa_lib.models import ckpt_io
from ofa_lib.paths import outputs_dir
from ofa_lib.train import metrics, training
from ofa_lib.train.config import TrainConfig
from ofa_lib.train.runs import read_manifest, run_config

# config fields that may differ between runs that are combined (everything else must match)
# how a run is optimised or measured, not its data, vocabulary or head: runs may differ in these and
# still be averaged (AdamW and SAM runs, runs that record different measures or tr(F) tracking)
PROCEDURE_PARAMS = ("optimizer", "sam_rho", "fisher_penalty_weight", "measures", "measure_examples",
                    "fisher_every", "fisher_batches", "fisher_labels", "group_by_length")


FREE_PARAMS = ("lr", "batch_size", "seed", "head") + PROCEDURE_PARAMS


RUN_COLUMNS = ["run_id", "task", "lr", "batch_size", "seed", "head", "head_fingerprint", "vocab_size",
               "top_k", "path"]


# how the store names what training calls otherwise (results.SCHEMA's documented conventions)
STORE_METRIC = {"accuracy": "acc"}


class IncompatibleRunsError(ValueError):
    """Runs that must not be combined (data parameters, head fingerprint or vocabulary differ)."""


def default_results_path(task: str) -> Path:
    """``outputs/results/<task>.parquet``: where one task's tidy rows (runs and averages) go."""
    return outputs_dir() / "results" / f"{task}.parquet"


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


def groups(values: dict[str, Any]) -> dict[str, list[str]]:
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
    m = read_manifest(path)
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
    params = {r: {k: v for k, v in read_manifest(p)["params"].items() if k not in FREE_PARAMS}
              for r, p in zip(runs["run_id"], runs["path"])}
    keys = sorted({k for v in params.values() for k in v})
    diff = {k: g for k in keys if len(g := groups({r: v.get(k) for r, v in params.items()})) > 1}
    if diff:
        raise IncompatibleRunsError(
            "runs differ in data parameters (all but lr, batch_size, seed and head must match, so that they share "
            f"vocabulary and evaluation sets): {diff}")
    heads = groups(dict(zip(runs["run_id"], runs["head_fingerprint"])))
    if len(heads) > 1:
        listing = "; ".join(f"{json.loads(k) or 'no fingerprint'}: {v}" for k, v in heads.items())
        raise IncompatibleRunsError(f"classifier heads are not aligned (head fingerprints differ); refusing to "
                                    f"combine runs: {listing}")
    vocab = groups({r: vocabulary_key(p) for r, p in zip(runs["run_id"], runs["path"])})
    if len(vocab) > 1:
        listing = "; ".join(f"{json.loads(k)}: {v}" for k, v in vocab.items())
        raise IncompatibleRunsError(
            "runs have different vocabularies (trimmed to seed-dependent training subsamples?); their weights cannot "
            f"be averaged: {listing}")


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
        cfg = run_config(path)
        frames.append(store_rows(pd.read_parquet(Path(path) / "metrics.parquet"), cfg.source_lang()))
    return R.conform(pd.concat(frames, ignore_index=True)) if frames else R.empty_frame()


@dataclass
class Snapshot:
    run_id: str
    snapshot: int
    rank: int
    score: float
    path: Path


def kept_snapshots(path: str | Path, primary: str | None = None) -> list[Snapshot]:
    """A run's kept top-k snapshots (``checkpoints/topk_<rank>``) with their English dev score
    (the score taken when the snapshot was, as training ranked them)."""
    m = read_manifest(path)
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
    return [Snapshot(m["run_id"], int(s), rank, score[str(s)], Path(path) / "checkpoints" / f"topk_{rank}.safetensors")
            for rank, s in enumerate(snaps)]


def base_identity(runs: pd.DataFrame) -> dict[str, str]:
    """What θ₀ (pretrained encoder + the run's frozen, aligned head) is made of, per run: the
    model, the vocabulary and the head fingerprint -- plus the seed when task adapters (initialised
    with the run's seed) are part of the weights. Runs with different identities have different θ₀."""
    out = {}
    for run_id, path, fp in zip(runs["run_id"], runs["path"], runs["head_fingerprint"]):
        p = read_manifest(path)["params"]
        ident = {"model": p.get("model_name"), "vocabulary": vocabulary_key(path), "head": fp}
        if p.get("adapters"):
            ident["adapter_seed"] = p.get("seed")
        out[run_id] = json.dumps(ident, sort_keys=True)
    return out


def runs_overview(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table for display (short fingerprints, no paths)."""
    out = runs.drop(columns=["path"]).copy()
    out["head_fingerprint"] = out["head_fingerprint"].str[:12]
    return out.set_index("run_id")
