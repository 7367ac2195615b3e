"""Diagnosing accumulative averaging of CA weights (issue 18): is a weak CA average a defect or
the runs' own early, unconverged snapshots?

Measures on finished runs, every score by the runs' own evaluation code (:func:`ofa_lib.train.evaluation.score`
on the sets :func:`ofa_lib.train.setup.prepare` builds, in the precision the runs were scored in):

* :func:`interpolation_curve` -- English dev and mean target test along θ(t) = (1 − t)·A + t·B;
* :func:`distances` -- each stored model's L2 distance from the start weights θ₀ (the prepared, untrained
  model: pretrained encoder, trimmed vocabulary and the runs' head, as :mod:`ofa_lib.merge.merging` builds it);
* :func:`r1_check` -- averaging one run (``running_average`` of its file) scores what the run stored;
* :func:`ca_drop_earliest` -- CA without its earliest k snapshots, from the snapshots the run kept
  (exact only where they suffice, see its docstring); :func:`unstored_mean` -- the mean of the snapshots
  a run did not keep, recovered from CA;
* :func:`dtype_effect` -- averaging in fp32 against averaging in the runs' storage dtype.

Everything goes into one tidy table (:data:`COLUMNS`): ``analysis``, ``subject``, ``x``, ``measure``,
``value`` (scores in [0, 1]) and ``note``. CLI: ``python -m ofa_lib.analysis.diagnose RUN_A RUN_B [RUN ...] --out DIR``
writes ``diagnosis.parquet``, ``diagnosis.csv``, ``diagnosis.png/svg`` and ``diagnosis.md`` (the generated
summary, :func:`summary_sentences`).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ofa_lib.analysis import plots
from ofa_lib.io import write_parquet, write_text
from ofa_lib.merge import averaging
from ofa_lib.models import ckpt_io
from ofa_lib.train import evaluation, hardware, runs, setup, training
from ofa_lib.train.metrics import PRIMARY_METRIC

StateDict = dict[str, torch.Tensor]
COLUMNS = ["analysis", "subject", "x", "measure", "value", "note"]
STORED = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _row(analysis: str, subject: str, x: float | str, measure: str, value: float, note: str = "") -> dict:
    return {"analysis": analysis, "subject": subject, "x": str(x), "measure": measure, "value": float(value),
            "note": note}


# --------------------------------------------------------------------------- weights arithmetic (pure)

def interpolate(a: StateDict, b: StateDict, t: float) -> StateDict:
    """θ(t) = (1 − t)·a + t·b in fp32 for floating tensors; non-floating tensors must be equal and are copied."""
    if a.keys() != b.keys():
        raise ckpt_io.CheckpointMismatchError(f"interpolate: the two state dicts differ in keys "
                                              f"({sorted(a.keys() ^ b.keys())[:5]})")
    out: StateDict = {}
    for k, va in a.items():
        vb = b[k]
        if va.shape != vb.shape:
            raise ckpt_io.CheckpointMismatchError(f"interpolate: {k!r} has shapes {tuple(va.shape)} and {tuple(vb.shape)}")
        if not va.is_floating_point():
            if not torch.equal(va, vb):
                raise ckpt_io.CheckpointMismatchError(f"interpolate: non-floating tensor {k!r} differs")
            out[k] = va.clone()
            continue
        out[k] = torch.lerp(va.float(), vb.float(), float(t))
    return out


def l2_distance(a: StateDict, b: StateDict) -> float:
    """‖a − b‖₂ over all floating tensors together (fp32 differences, float64 sum of squares)."""
    if a.keys() != b.keys():
        raise ckpt_io.CheckpointMismatchError(f"l2_distance: the state dicts differ in keys ({sorted(a.keys() ^ b.keys())[:5]})")
    total = 0.0
    for k, va in a.items():
        if va.is_floating_point():
            total += float((va.float() - b[k].float()).double().pow(2).sum())
    return math.sqrt(total)


def mean_in_dtype(states: Sequence[StateDict], dtype: torch.dtype) -> StateDict:
    """The running mean θ̄_r = θ̄_{r−1} + (θ_r − θ̄_{r−1}) / r computed in ``dtype`` arithmetic (each input cast
    to it first), as averaging would be without fp32 accumulation; returned in fp32."""
    mean: StateDict = {}
    for r, s in enumerate(states, start=1):
        for k, v in s.items():
            if not v.is_floating_point():
                mean.setdefault(k, v.clone())
                continue
            x = v.to(dtype)
            mean[k] = x.clone() if r == 1 else mean[k] + (x - mean[k]) / r
    return {k: (v.float() if v.is_floating_point() else v) for k, v in mean.items()}


def snapshots_after(n: int, k: int, known: dict[int, StateDict], ca: StateDict) -> StateDict | None:
    """The mean of snapshots k+1 … n of a run whose CA (fp32 mean of all n) is ``ca``, from the snapshots
    ``known`` (index → weights): directly when all of k+1 … n are known, else as (n·CA − Σ_{i≤k} θ_i)/(n − k)
    when all of 1 … k are; None when neither holds. ``k = 0`` is CA itself."""
    if not 0 <= k < n:
        raise ValueError(f"snapshots_after: k must be in 0..{n - 1}, got {k}")
    if k == 0:
        return {key: v.clone() for key, v in ca.items()}
    later, earlier = range(k + 1, n + 1), range(1, k + 1)
    if all(i in known for i in later):
        return mean_in_dtype([known[i] for i in later], torch.float32)
    if all(i in known for i in earlier):
        out = {}
        for key, v in ca.items():
            if not v.is_floating_point():
                out[key] = v.clone()
                continue
            early = sum(known[i][key].float() for i in earlier)
            out[key] = (n * v.float() - early) / (n - k)
        return out
    return None


def unstored_mean(n: int, known: dict[int, StateDict], ca: StateDict) -> tuple[list[int], StateDict | None]:
    """(indices, mean) of the snapshots of 1 … n not in ``known``: (n·CA − Σ_known θ_i) / #missing, the part of
    CA no stored file shows; ``([], None)`` when every snapshot is known."""
    missing = [i for i in range(1, n + 1) if i not in known]
    if not missing:
        return [], None
    out = {}
    for key, v in ca.items():
        if not v.is_floating_point():
            out[key] = v.clone()
            continue
        kept = sum((known[i][key].float() for i in known), torch.zeros_like(v, dtype=torch.float32))
        out[key] = (n * v.float() - kept) / len(missing)
    return missing, out


# --------------------------------------------------------------------------- a run's stored models

def stored_snapshots(run: runs.Run) -> dict[int, Path]:
    """Snapshot index → a file holding that snapshot's weights, from what the run kept: LAST (the final
    snapshot), SRC-DEV and TRG-DEV (the snapshots they were chosen from) and the top-k files."""
    m = run.manifest
    n = int(run.config.num_snapshots)
    ck = run.path / "checkpoints"
    out: dict[int, Path] = {}
    for i, snap in enumerate(m.get("topk_snapshots") or []):
        out[int(snap)] = ck / f"topk_{i}.safetensors"
    for name, snap in (("src_dev", m.get("src_dev_snapshot")), ("trg_dev", m.get("trg_dev_snapshot")), ("last", n)):
        if snap is not None:
            out.setdefault(int(snap), ck / f"{name}.safetensors")
    return {k: out[k] for k in sorted(out) if out[k].is_file()}


def snapshot_rows(run: runs.Run) -> list[dict]:
    """The per-snapshot English dev and mean target dev the run measured when it took each snapshot."""
    cfg, met = run.config, run.metrics
    d = met[(met["kind"] == "snapshot") & (met["metric"] == run.primary) & (met["split"] != "test")]
    src = cfg.source_lang()
    rows = []
    for name, g in d.groupby("name", sort=False):
        en = g[(g["lang"] == src) & (g["dataset"] == cfg.source_dev_dataset)]["value"]
        trg = g[g["lang"] != src]["value"]
        rows.append(_row("snapshot", run.manifest["run_id"], int(name), "en_dev", float(en.mean())))
        rows.append(_row("snapshot", run.manifest["run_id"], int(name), "trg_dev", float(trg.mean())))
    return sorted(rows, key=lambda r: (int(r["x"]), r["measure"]))


# --------------------------------------------------------------------------- scoring with the runs' evaluation

@dataclass
class Scorer:
    """The runs' skeleton model, start weights θ₀ and evaluation sets, built once from one run's config.

    ``scores(state)`` loads weights into the skeleton and returns English dev and the flat mean of the target
    test sets (primary metric), exactly as training and ``03_average`` score models."""

    cfg: "training.TrainConfig"
    model: torch.nn.Module
    theta0: StateDict
    dev_set: evaluation.EvalSet
    test_sets: list[evaluation.EvalSet]
    device: torch.device
    autocast: torch.dtype | None
    head_fingerprint: str
    evaluations: int = 0
    seconds: float = 0.0
    cache: dict = field(default_factory=dict)

    @classmethod
    def from_run(cls, run: runs.Run, device: str | None = None) -> "Scorer":
        """Prepare the model and sets of ``run``'s config; refuses when θ₀'s head is not the run's."""
        cfg = run.config
        prep = setup.prepare(cfg)
        if prep.head_fingerprint != run.manifest.get("head_fingerprint"):
            raise ckpt_io.CheckpointMismatchError(
                f"run {cfg.run_id}: θ₀ rebuilt from its config has head fingerprint {prep.head_fingerprint}, "
                f"the run recorded {run.manifest.get('head_fingerprint')}")
        dev, _, _ = hardware.resolve_runtime(cfg, device)
        # score in the precision the runs were scored in, so that the r = 1 check can be exact
        precision = run.manifest.get("precision", "fp32")
        theta0 = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                  for k, v in prep.model.state_dict().items()}
        return cls(cfg, prep.model.to(dev).eval(), theta0, prep.dev_sets[0], list(prep.test_sets), dev,
                   hardware.AUTOCAST.get(precision), prep.head_fingerprint)

    def check_run(self, run: runs.Run) -> None:
        """Refuse a run whose θ₀ (model, vocabulary, head) is not this scorer's."""
        if run.manifest.get("head_fingerprint") != self.head_fingerprint or \
                int(run.manifest.get("vocab_size", -1)) != int(self.model.config.vocab_size):
            raise ckpt_io.CheckpointMismatchError(
                f"run {run.manifest['run_id']} has another head or vocabulary than run {self.cfg.run_id}: "
                "diagnose runs of one grid together")

    def per_set(self, state: StateDict) -> dict[tuple[str, str, str], float]:
        """Primary metric per evaluation set (the source dev set first) of ``state``."""
        import time

        t0 = time.perf_counter()
        self.model.load_state_dict(state, strict=True)
        metric = PRIMARY_METRIC[self.cfg.task]
        out = {s.key: evaluation.score(self.model, s, self.cfg.task, batch_size=self.cfg.eval_batch_size,
                                       device=self.device, autocast_dtype=self.autocast)[metric]
               for s in [self.dev_set] + self.test_sets}
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        return out

    def scores(self, state: StateDict) -> dict[str, float]:
        """``en_dev`` and ``trg_test`` (flat mean over the target test sets) of ``state``."""
        per = self.per_set(state)
        return {"en_dev": per[self.dev_set.key], "trg_test": float(np.mean([per[s.key] for s in self.test_sets]))}


def load(path: Path) -> StateDict:
    """A checkpoint's weights in fp32 (ckpt_io's reader: refuses truncated or damaged files)."""
    return ckpt_io.load_checkpoint(path, dtype=torch.float32)


def _score_rows(scorer: Scorer, analysis: str, subject: str, x, state: StateDict, note: str = "") -> list[dict]:
    return [_row(analysis, subject, x, m, v, note) for m, v in scorer.scores(state).items()]


# --------------------------------------------------------------------------- the analyses

def stored_scores(run: runs.Run, variant: str, scorer: Scorer) -> dict[str, float]:
    """``en_dev`` and ``trg_test`` of a run's stored variant from its ``metrics.parquet`` (no evaluation; the
    r = 1 check shows these are what re-scoring the file gives on test). English dev of LAST and SRC-DEV was
    measured when the snapshot was taken, before it was stored in the storage dtype."""
    met = run.metrics
    d = met[(met["kind"] == "variant") & (met["name"] == variant) & (met["metric"] == run.primary)]
    d = d.set_index(["dataset", "lang", "split"])["value"]
    return {"en_dev": float(d.get(scorer.dev_set.key, np.nan)),
            "trg_test": float(np.mean([d.get(s.key, np.nan) for s in scorer.test_sets]))}


def interpolation_curve(scorer: Scorer, a: tuple[runs.Run, str], b: tuple[runs.Run, str], ts: Sequence[float],
                        subject: str) -> list[dict]:
    """English dev and mean target test along θ(t) = (1 − t)·A + t·B for each t of ``ts`` (A, B: (run, variant)),
    plus ‖A − B‖. Ends t = 0 and 1 not in ``ts`` come from the runs' stored scores (note ``stored``)."""
    (ra, va), (rb, vb) = a, b
    wa, wb = load(ra.path / "checkpoints" / f"{va}.safetensors"), load(rb.path / "checkpoints" / f"{vb}.safetensors")
    rows = [_row("interpolation", subject, "", "l2_a_b", l2_distance(wa, wb))]
    ts = [round(float(t), 4) for t in ts]
    for t, (run, v) in ((0.0, a), (1.0, b)):
        if t not in ts:
            rows += [_row("interpolation", subject, t, m, x, "stored") for m, x in stored_scores(run, v, scorer).items()]
    for t in tqdm(ts, desc=f"interpolate {subject}", leave=False):
        rows += _score_rows(scorer, "interpolation", subject, t, interpolate(wa, wb, t))
    return rows


def distances(scorer: Scorer, run: runs.Run, variants: Iterable[str] = ("last", "src_dev", "ca")) -> list[dict]:
    """L2 distance from θ₀ of each stored variant of ``run`` and of each snapshot it kept."""
    rid = run.manifest["run_id"]
    rows = [_row("distance", rid, v, "l2_theta0", l2_distance(load(run.path / "checkpoints" / f"{v}.safetensors"), scorer.theta0))
            for v in variants]
    rows += [_row("distance", rid, f"snapshot {k}", "l2_theta0", l2_distance(load(p), scorer.theta0))
             for k, p in stored_snapshots(run).items()]
    return rows


def r1_check(scorer: Scorer, run: runs.Run, variants: Iterable[str] = ("last", "src_dev", "ca")) -> list[dict]:
    """Averaging one run returns that run's scores: the r = 1 running average of each variant file, scored
    here, against the run's own test scores in ``metrics.parquet``; ``max_abs_diff`` per variant."""
    rid, met = run.manifest["run_id"], run.metrics
    own = met[(met["kind"] == "variant") & (met["split"] == "test") & (met["metric"] == run.primary)]
    rows = []
    for v in variants:
        path = run.path / "checkpoints" / f"{v}.safetensors"
        state = next(averaging.running_average([path]))
        per = scorer.per_set(state)
        stored = own[own["name"] == v].set_index(["dataset", "lang", "split"])["value"]
        diffs = [abs(per[s.key] - float(stored.get(s.key, np.nan))) for s in scorer.test_sets]
        rows.append(_row("r1_check", rid, v, "max_abs_diff", float(np.max(diffs)),
                         "" if np.isfinite(diffs).all() else "a test set missing from metrics.parquet"))
        rows.append(_row("r1_check", rid, v, "trg_test", float(np.mean([per[s.key] for s in scorer.test_sets]))))
        rows.append(_row("r1_check", rid, v, "trg_test_stored", float(np.mean([stored.get(s.key, np.nan) for s in scorer.test_sets]))))
    return rows


def ca_drop_earliest(scorer: Scorer, run: runs.Run, ks: Iterable[int] | None = None) -> list[dict]:
    """CA without the earliest k snapshots (the mean of snapshots k+1 … n), k = 0 … n−1 by default, scored.

    A run keeps only some snapshots (LAST, SRC-DEV, TRG-DEV, top-k by English dev) and CA as a running mean, so
    the mean of k+1 … n is exact only when those are all kept, or when 1 … k all are (subtracted from n·CA; the
    kept files are in the storage dtype, so that difference carries its rounding). Other k get a row saying they
    cannot be computed. Also scores :func:`unstored_mean` (the snapshots never kept) and checks, when every
    snapshot is kept, that their mean reproduces CA (``max_abs_diff``)."""
    rid, n = run.manifest["run_id"], int(run.config.num_snapshots)
    ca = load(run.path / "checkpoints" / "ca.safetensors")
    known = {k: load(p) for k, p in stored_snapshots(run).items()}
    rows = [_row("ca_drop", rid, "", "stored_snapshots", len(known), ",".join(map(str, known)))]
    for k in tqdm(list(range(n)) if ks is None else list(ks), desc=f"CA drop-k {rid}", leave=False):
        state = snapshots_after(n, k, known, ca)
        if state is None:
            rows.append(_row("ca_drop", rid, k, "trg_test", math.nan, "not computable from the kept snapshots"))
            continue
        rows += _score_rows(scorer, "ca_drop", rid, k, state, f"mean of snapshots {k + 1}..{n}")
    missing, um = unstored_mean(n, known, ca)
    if um is not None:
        rows += _score_rows(scorer, "ca_unstored", rid, len(missing), um, "mean of snapshots " + ",".join(map(str, missing)))
        rows.append(_row("ca_unstored", rid, len(missing), "l2_theta0", l2_distance(um, scorer.theta0)))
    else:
        full = mean_in_dtype([known[i] for i in range(1, n + 1)], torch.float32)
        rows.append(_row("ca_drop", rid, 0, "max_abs_diff",
                         max(float((full[k] - ca[k]).abs().max()) for k in ca if ca[k].is_floating_point()),
                         "mean of the kept snapshots against the stored CA"))
    return rows


def dtype_effect(scorer: Scorer, paths: Sequence[Path], subject: str, dtype: torch.dtype) -> list[dict]:
    """The uniform mean of ``paths`` with fp32 accumulation (:func:`ofa_lib.merge.averaging.average_checkpoints`,
    what ``03_average`` does) against the same mean computed in ``dtype`` arithmetic; both scored, and the
    largest weight difference between them."""
    fp32 = averaging.average_checkpoints(list(paths), dtype=torch.float32)
    low = mean_in_dtype([ckpt_io.load_checkpoint(p) for p in paths], dtype)
    name = str(dtype).removeprefix("torch.")
    rows = _score_rows(scorer, "dtype", subject, "float32", fp32) + _score_rows(scorer, "dtype", subject, name, low)
    rows.append(_row("dtype", subject, name, "max_abs_diff",
                     max(float((fp32[k] - low[k]).abs().max()) for k in fp32 if fp32[k].is_floating_point())))
    return rows


ANALYSES = ("interpolation", "distance", "r1", "drop", "dtype")


def diagnose(run_dirs: Sequence[str | Path], ts: Sequence[float] = (0.25, 0.5, 0.75), device: str | None = None,
             drop_ks: Iterable[int] | None = None, analyses: Iterable[str] = ANALYSES) -> pd.DataFrame:
    """The ``analyses`` on ``run_dirs`` (at least two finished runs of one grid; A and B are the first two):
    θ₀'s own scores and the runs' snapshot rows always; ``interpolation``: CA(A)–CA(B), LAST(A)–LAST(B) and
    CA(A)–LAST(A) at each t of ``ts`` (ends from the stored scores unless in ``ts``); ``distance``; ``r1``;
    ``drop``: CA drop-k (``drop_ks``, default all k) and the unstored snapshots per run; ``dtype``: the mean of
    all runs' CA and LAST weights in fp32 and in the storage dtype. Returns the tidy table (:data:`COLUMNS`)."""
    analyses = list(analyses)
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise ValueError(f"diagnose: unknown analyses {unknown}; expected some of {list(ANALYSES)}")
    if len(run_dirs) < 2:
        raise ValueError(f"diagnose: expected at least two run directories, got {len(run_dirs)}")
    if any(not 0.0 <= float(t) <= 1.0 for t in ts):
        raise ValueError(f"diagnose: every t must be in [0, 1], got {list(ts)}")
    loaded = [runs.load_run(p) for p in run_dirs]
    for r in loaded:
        if r.manifest.get("status") != "done":
            raise ValueError(f"{r.path}: run status is {r.manifest.get('status')!r}, expected 'done'")
        ckpt_io.verify_recorded(r.path, r.manifest.get("checkpoint_sha256") or {}, r.manifest["run_id"])
    scorer = Scorer.from_run(loaded[0], device=device)
    for r in loaded[1:]:
        scorer.check_run(r)
    a, b = loaded[0], loaded[1]
    ida, idb = a.manifest["run_id"], b.manifest["run_id"]
    rows = _score_rows(scorer, "start", "theta0", "", scorer.theta0, "pretrained encoder + the runs' head")
    if "interpolation" in analyses:
        rows += interpolation_curve(scorer, (a, "ca"), (b, "ca"), ts, f"CA {ida} → CA {idb}")
        rows += interpolation_curve(scorer, (a, "last"), (b, "last"), ts, f"LAST {ida} → LAST {idb}")
        rows += interpolation_curve(scorer, (a, "ca"), (a, "last"), ts, f"CA {ida} → LAST {ida}")
    storage = STORED[a.config.storage_dtype]
    for r in tqdm(loaded, desc="runs", leave=False):
        rows += snapshot_rows(r)
        rows += [_row("r1_check", r.manifest["run_id"], v, "trg_test_stored", stored_scores(r, v, scorer)["trg_test"],
                      "stored") for v in ("last", "ca") if "r1" not in analyses]
        rows += distances(scorer, r) if "distance" in analyses else []
        rows += r1_check(scorer, r) if "r1" in analyses else []
        rows += ca_drop_earliest(scorer, r, drop_ks) if "drop" in analyses else []
    if "dtype" in analyses:
        names = ",".join(r.manifest["run_id"] for r in loaded)
        for v in ("ca", "last"):
            rows += dtype_effect(scorer, [r.path / "checkpoints" / f"{v}.safetensors" for r in loaded],
                                 f"{v.upper()} mean of {names}", storage if storage != torch.float32 else torch.bfloat16)
    out = pd.DataFrame(rows, columns=COLUMNS)
    out.attrs["evaluations"], out.attrs["eval_seconds"] = scorer.evaluations, round(scorer.seconds, 1)
    return out


# --------------------------------------------------------------------------- what the numbers say

def _get(df: pd.DataFrame, analysis: str, measure: str, subject: str | None = None) -> pd.DataFrame:
    d = df[(df["analysis"] == analysis) & (df["measure"] == measure)]
    return d if subject is None else d[d["subject"] == subject]


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def run_findings(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: English dev of θ₀ and of its best snapshot, the leading snapshots still below half-way between
    them (``early``), target test of LAST and CA, the best CA without its earliest k snapshots (``best_k``,
    ``best_drop``), the unstored snapshots' mean, and the distances of LAST and CA from θ₀."""
    start = _get(df, "start", "en_dev")["value"]
    s0 = float(start.iloc[0]) if len(start) else math.nan
    rows = []
    for rid in dict.fromkeys(_get(df, "snapshot", "en_dev")["subject"]):
        snap = _get(df, "snapshot", "en_dev", rid).assign(k=lambda d: d["x"].astype(int)).sort_values("k")
        best = float(snap["value"].max())
        half = s0 + 0.5 * (best - s0)
        early = 0
        for v in snap["value"]:
            if v >= half:
                break
            early += 1
        r1 = _get(df, "r1_check", "trg_test_stored", rid).set_index("x")["value"]
        drop = _get(df, "ca_drop", "trg_test", rid).dropna(subset=["value"])
        drop = drop.assign(k=drop["x"].astype(int)).sort_values("k")
        dist = _get(df, "distance", "l2_theta0", rid).set_index("x")["value"]
        un = _get(df, "ca_unstored", "trg_test", rid)
        un_en = _get(df, "ca_unstored", "en_dev", rid)
        bi = drop["value"].idxmax() if len(drop) else None
        rows.append({
            "run": rid, "theta0_en_dev": s0, "best_en_dev": best, "early": early, "n_snapshots": len(snap),
            "first_en_dev": float(snap["value"].iloc[0]),
            "last_trg_test": float(r1.get("last", math.nan)), "ca_trg_test": float(r1.get("ca", math.nan)),
            "best_k": int(drop.loc[bi, "k"]) if bi is not None else -1,
            "best_drop": float(drop.loc[bi, "value"]) if bi is not None else math.nan,
            "drop_ks": ",".join(map(str, drop["k"])),
            "unstored": un["note"].iloc[0].removeprefix("mean of snapshots ") if len(un) else "",
            "unstored_trg_test": float(un["value"].iloc[0]) if len(un) else math.nan,
            "unstored_en_dev": float(un_en["value"].iloc[0]) if len(un_en) else math.nan,
            "l2_last": float(dist.get("last", math.nan)), "l2_ca": float(dist.get("ca", math.nan)),
        })
    return pd.DataFrame(rows)


def verdict(df: pd.DataFrame, r1_tol: float = 1e-6) -> str:
    """``defect`` (averaging one run does not reproduce its stored scores), ``unconverged`` (dropping the earliest
    snapshots recovers at least half of CA's gap to LAST, averaged over the runs where CA trails LAST),
    ``ca_not_weaker`` (CA does not trail LAST) or ``open``. The dtype comparison is reported, not judged here:
    the project averages with fp32 accumulation, so a storage-dtype mean is what it would cost to do otherwise."""
    r1 = _get(df, "r1_check", "max_abs_diff")["value"]
    if len(r1) and float(r1.max()) > r1_tol:
        return "defect"
    f = run_findings(df)
    gap = f[f["last_trg_test"] > f["ca_trg_test"]]
    if gap.empty:
        return "ca_not_weaker"
    recovered = ((gap["best_drop"] - gap["ca_trg_test"]) / (gap["last_trg_test"] - gap["ca_trg_test"])).mean()
    return "unconverged" if recovered >= 0.5 else "open"


def summary_sentences(df: pd.DataFrame) -> str:
    """The diagnosis in words, every number from ``df`` (the table :func:`diagnose` returns); points ×100."""
    f = run_findings(df)
    out = []
    s0 = f["theta0_en_dev"].iloc[0] if len(f) else math.nan
    for rec in f.itertuples(index=False):
        s = (f"Run {rec.run}: English dev {_pts(rec.first_en_dev)} at snapshot 1 (θ₀: {_pts(s0)}), best {_pts(rec.best_en_dev)}; "
             f"{rec.early} of its {rec.n_snapshots} snapshots come before it gets half-way there. Target test: LAST "
             f"{_pts(rec.last_trg_test)}, CA {_pts(rec.ca_trg_test)}")
        if rec.best_k > 0:
            s += f", CA without its first {rec.best_k} snapshots {_pts(rec.best_drop)} (k computable: {rec.drop_ks})"
        elif rec.best_k == 0:
            s += f"; dropping early snapshots does not help (k computable: {rec.drop_ks})"
        if rec.unstored:
            s += (f"; the snapshots it never stored ({rec.unstored}), recovered from CA, score {_pts(rec.unstored_trg_test)} "
                  f"on target test and {_pts(rec.unstored_en_dev)} on English dev")
        s += f". Distance from θ₀: LAST {rec.l2_last:.2f}, CA {rec.l2_ca:.2f}."
        out.append(s)
    r1 = _get(df, "r1_check", "max_abs_diff")["value"]
    if len(r1):
        out.append(("Averaging one run returns that run's stored test scores exactly" if float(r1.max()) <= 1e-6 else
                    "Averaging one run does NOT return that run's stored test scores") +
                   f" (largest difference {float(r1.max()):.2g} over {len(r1)} variant files).")
    dt = _get(df, "dtype", "trg_test").pivot_table(index="subject", columns="x", values="value", sort=False)
    for subject, row in dt.iterrows():
        low = [c for c in dt.columns if c != "float32"][0]
        out.append(f"{subject}: averaged in float32 {_pts(row['float32'])}, in {low} {_pts(row[low])} on target test.")
    for subject in dict.fromkeys(_get(df, "interpolation", "trg_test")["subject"]):
        c = _get(df, "interpolation", "trg_test", subject).assign(t=lambda d: d["x"].astype(float)).sort_values("t")
        inner = c[(c["t"] > 0) & (c["t"] < 1)]
        ends = (float(c["value"].iloc[0]), float(c["value"].iloc[-1]))
        lo = float(inner["value"].min()) if len(inner) else math.nan
        hi = float(inner["value"].max()) if len(inner) else math.nan
        shape = ("a barrier between them" if lo < min(ends) - 0.02 else
                 "no barrier: every point in between scores at least as well as the weaker end" if lo >= min(ends) - 1e-9 else
                 "no barrier beyond 2 points")
        out.append(f"Along {subject}: target test {_pts(ends[0])} → {_pts(ends[1])}, between them {_pts(lo)}–{_pts(hi)} "
                   f"({shape}).")
    v = verdict(df)
    out.append({
        "defect": "Verdict: a defect in averaging (the r = 1 check above).",
        "unconverged": "Verdict: no defect. CA is weak because it averages the runs' early snapshots, taken before "
                       "English dev moved from θ₀'s; without them CA recovers at least half of its gap to LAST.",
        "ca_not_weaker": "Verdict: no defect, and CA does not trail LAST in these runs.",
        "open": "Verdict: no defect found, but dropping the early snapshots does not explain CA's gap to LAST.",
    }[v])
    return " ".join(out)


def write_outputs(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``diagnosis.parquet``, ``diagnosis.csv``, ``diagnosis.png/svg`` and ``diagnosis.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(out / "diagnosis.parquet", df)
    write_text(out / "diagnosis.csv", df.to_csv(index=False))
    write_text(out / "diagnosis.md", summary_sentences(df) + "\n")
    plots.save_figure(plots.fig_diagnosis(df, run_findings(df)), out, "diagnosis")
    return [out / n for n in ("diagnosis.parquet", "diagnosis.csv", "diagnosis.md", "diagnosis.png", "diagnosis.svg")]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ofa_lib.analysis.diagnose", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="finished run directories of one grid (the first two are A and B)")
    ap.add_argument("--out", required=True, help="folder for diagnosis.{parquet,csv,md,png,svg}")
    ap.add_argument("--t", default="0.25,0.5,0.75", help="comma-separated t in [0, 1] evaluated along each "
                    "interpolation; ends not listed come from the runs' stored scores (default 0.25,0.5,0.75)")
    ap.add_argument("--drop-k", default=None, help="comma-separated k for CA drop-k (default 0..n-1)")
    ap.add_argument("--analyses", default=",".join(ANALYSES), help=f"comma-separated subset of {','.join(ANALYSES)}")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    for p in args.runs:
        if not (Path(p) / "manifest.json").is_file():
            ap.error(f"{p}: not a run directory (no manifest.json)")
    ks = None
    try:
        ks = [int(k) for k in args.drop_k.split(",")] if args.drop_k else None
        ts = [float(t) for t in args.t.split(",")] if args.t else []
    except ValueError:
        ap.error(f"--drop-k {args.drop_k!r} / --t {args.t!r}: expected comma-separated numbers")
    analyses = [x for x in args.analyses.split(",") if x]
    if set(analyses) - set(ANALYSES):
        ap.error(f"--analyses: unknown {sorted(set(analyses) - set(ANALYSES))}; expected some of {','.join(ANALYSES)}")
    df = diagnose(args.runs, ts=ts, device=args.device, drop_ks=ks, analyses=analyses)
    written = write_outputs(df, args.out)
    print(summary_sentences(df))
    print(f"{df.attrs['evaluations']} evaluations in {df.attrs['eval_seconds']} s; wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
