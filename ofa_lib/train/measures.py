"""Generalization measures of one checkpoint (docs/method.md §6; arXiv 2404.15928).

Every measure is a pure function of ``(model, batches, seed)``: ``batches`` is a list of
collated batches (:func:`make_batches`), the model comes back exactly as it was (weights,
``train``/``eval`` mode, ``requires_grad``, ``.grad``), the global RNG is not touched (seeded
``torch.Generator`` only) and the forward passes run in eval mode (no dropout), so the value is
deterministic for a seed. Costs are in forward (F) and backward (B) passes over the batches.

========================  ============================================  =====================  =========================
name                      what                                          data                   tasks
========================  ============================================  =====================  =========================
``margin_src``            mean p(y) − max_{c≠y} p(c)                    English dev, labels    nli, sib, ner (tokens)
``margin_trg``            mean top-1 − top-2 probability (label-free)   target dev text        nli, sib, ner, qa
``sharpness_jiang``       max loss increase inside |δᵢ| ≤ α(|wᵢ|+ε)     English train, labels  all
``sharpness_diff``        mean loss difference at random nearby points  English train, labels  all
``frobenius``             ‖θ − θ₀‖_F of the encoder (θ₀ = pretrained)   none                   all
``fisher_trace``          tr(F) (:func:`ofa_lib.train.fisher.fisher_trace`)   English train text     as fisher.py
========================  ============================================  =====================  =========================

Larger margins and smaller sharpness are expected to go with better transfer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    import pandas as pd

from ofa_lib import models
from ofa_lib.data import features
from ofa_lib.train import fisher

Batch = dict[str, torch.Tensor]
Device = torch.device | str | None  # where a measure runs (None: the model's device)
MEASURES = ("margin_src", "margin_trg", "sharpness_jiang", "sharpness_diff", "frobenius", "fisher_trace")
# which direction is "better" for selection: +1 larger is better, -1 smaller is better
DIRECTION = {"margin_src": 1, "margin_trg": 1, "sharpness_jiang": -1, "sharpness_diff": -1, "frobenius": -1,
             "fisher_trace": -1}
LABEL_FREE = ("margin_trg", "sharpness_jiang", "sharpness_diff", "frobenius", "fisher_trace")  # no target labels
BATCH_SIZE = 32  # measure batches: the same for every run, whatever its training batch size
UNSUPPORTED = {("qa", "margin_src"): "QA evaluation features carry no answer positions (use margin_trg)"}


class MeasureError(ValueError):
    """A measure cannot be computed for this model or data; the message says why."""


def check_supported(task: str, names: Iterable[str]) -> None:
    """Raise :class:`MeasureError` naming the first unknown or unsupported measure."""
    for name in names:
        if name not in MEASURES:
            raise MeasureError(f"unknown measure {name!r}; expected some of {MEASURES}")
        if (task, name) in UNSUPPORTED:
            raise MeasureError(f"measure {name!r} is not supported for task {task!r}: {UNSUPPORTED[(task, name)]}")


# --------------------------------------------------------------------------- batches
def make_batches(rows: Sequence[Mapping[str, Any]], pad_token_id: int, *, n_examples: int | None = 64,
                 batch_size: int = 32, seed: int = 0, drop_labels: bool = False) -> list[Batch]:
    """Up to ``n_examples`` rows (a seeded subset; ``None``: all), length-sorted, collated into
    batches of ``batch_size``. ``drop_labels`` removes labels and answer positions."""
    if not rows:
        raise MeasureError("no rows to build measure batches from")
    idx = np.arange(len(rows))
    if n_examples is not None and n_examples < len(rows):
        idx = np.sort(np.random.default_rng(seed).choice(len(rows), size=n_examples, replace=False))
    chosen = [rows[int(i)] for i in idx]
    out = []
    for b in features.length_sorted_batches([len(r["input_ids"]) for r in chosen], batch_size):
        batch = features.collate([chosen[i] for i in b], pad_token_id)
        if drop_labels:
            for key in ("labels", "start_positions", "end_positions"):
                batch.pop(key, None)
        out.append(batch)
    return out


# --------------------------------------------------------------------------- model hygiene
@contextmanager
def preserved(model: torch.nn.Module, *, eval_mode: bool = True) -> Iterator[torch.nn.Module]:
    """Run a block on ``model`` and restore it exactly afterwards: parameter values (copied
    back bit for bit), ``.grad``, ``requires_grad`` and train/eval mode of every submodule."""
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, v, g, f in zip(params, values, grads, flags):
                p.copy_(v)
                p.grad = g
                p.requires_grad_(f)
        for m, mode in zip(model.modules(), modes):
            m.training = mode


def _device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _n(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0])


def mean_loss(model: torch.nn.Module, batches: Sequence[Batch], *, device: Device = None, autocast_dtype: torch.dtype | None = None) -> float:
    """Example-weighted mean of the model's own loss over ``batches`` (no grad; cost: 1 F)."""
    device = _device(model, device)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            with _autocast(device, autocast_dtype):
                loss = model(**_to(batch, device)).loss
            if loss is None:
                raise MeasureError("the model returned no loss: the batches carry no labels")
            total += float(loss) * _n(batch)
            count += _n(batch)
    return total / count


# --------------------------------------------------------------------------- margins
def _probabilities(out: Any) -> list[torch.Tensor]:
    """Class (or position) probabilities per output head: [B, C], [B, T, C] or start/end [B, T]."""
    if getattr(out, "start_logits", None) is not None:
        return [out.start_logits.float().softmax(-1), out.end_logits.float().softmax(-1)]
    return [out.logits.float().softmax(-1)]


def _token_mask(batch: Batch) -> torch.Tensor:
    """Tokens that count for token classification: labelled positions when labels are there
    (only their position is used, never their value), else the attention mask."""
    if "labels" in batch and batch["labels"].dim() == 2:
        return batch["labels"] != -100
    return batch["attention_mask"].bool()


def margin(model: torch.nn.Module, batches: Sequence[Batch], *, device: Device = None, autocast_dtype: torch.dtype | None = None, seed: int = 0) -> float:
    """Mean margin p(y) − max_{c≠y} p(c) of the true label (in [-1, 1]); cost: 1 F.

    Sequence classification: per example; token classification: per labelled token (labels
    −100 skipped). QA is not supported (evaluation features have no answer positions).
    ``seed`` is unused (deterministic); it is accepted for a uniform signature.
    """
    device = _device(model, device)
    total, count = 0.0, 0
    with preserved(model), torch.no_grad():
        for batch in batches:
            if "labels" not in batch:
                raise MeasureError("margin needs labelled batches ('labels'); QA features are not supported")
            batch = _to(batch, device)
            labels = batch.pop("labels")
            with _autocast(device, autocast_dtype):
                out = model(**batch)
            if getattr(out, "start_logits", None) is not None:
                raise MeasureError("margin is not supported for question answering")
            probs = _probabilities(out)[0]
            keep = labels != -100
            lab = labels.clamp(min=0)
            true = probs.gather(-1, lab.unsqueeze(-1)).squeeze(-1)
            other = probs.scatter(-1, lab.unsqueeze(-1), -1.0).amax(-1)
            gap = (true - other)[keep]
            total += float(gap.sum())
            count += int(keep.sum())
    if count == 0:
        raise MeasureError("margin: no labelled examples or tokens in the batches")
    return total / count


def label_free_margin(model: torch.nn.Module, batches: Sequence[Batch], *, device: Device = None, autocast_dtype: torch.dtype | None = None,
                      seed: int = 0) -> float:
    """Mean top-1 minus top-2 probability on unlabelled text (in [0, 1]); cost: 1 F.

    Sequence classification: per example; token classification: per token (labelled positions
    if the batch has labels, else every attended token); QA: the mean of the start and end
    distributions' margins per feature. Label values are never read.
    """
    device = _device(model, device)
    total, count = 0.0, 0
    with preserved(model), torch.no_grad():
        for batch in batches:
            batch = _to(batch, device)
            mask = _token_mask(batch)
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
            with _autocast(device, autocast_dtype):
                out = model(**inputs)
            heads = _probabilities(out)
            gaps = []
            for probs in heads:
                if getattr(out, "start_logits", None) is not None:  # positions: mask padding out
                    probs = probs.masked_fill(~batch["attention_mask"].bool(), 0.0)
                top = probs.topk(2, dim=-1).values
                gaps.append(top[..., 0] - top[..., 1])
            gap = torch.stack(gaps).mean(0)
            if gap.dim() == 2:  # token classification
                gap = gap[mask]
            total += float(gap.sum())
            count += int(gap.numel())
    if count == 0:
        raise MeasureError("label_free_margin: the batches hold no tokens")
    return total / count


# --------------------------------------------------------------------------- sharpness
def _perturbed_params(model: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    if which == "trainable":
        params = [p for p in model.parameters() if p.requires_grad]
    elif which == "all":
        params = list(model.parameters())
    else:
        raise MeasureError(f"params={which!r}: expected 'trainable' or 'all'")
    if not params:
        raise MeasureError("no parameters to perturb (every parameter is frozen; pass params='all')")
    return params


def sharpness_jiang(model: torch.nn.Module, batches: Sequence[Batch], *, alpha: float = 1e-3, eps: float = 1e-3,
                    steps: int = 5, step_size: float | None = None, params: str = "trainable", seed: int = 0,
                    device: Device = None, autocast_dtype: torch.dtype | None = None) -> float:
    """Jiang et al.'s magnitude-aware worst-case sharpness: ``max L(w+δ) − L(w)`` over the box
    ``|δᵢ| ≤ α(|wᵢ| + ε)``, searched by projected sign-gradient ascent from a seeded random
    start in the box (``steps`` steps of ``step_size`` × box, default 2/steps; every visited point
    counts). Loss = the model's own (labelled batches), fixed weights for α: no search over α.
    ``params``: "trainable" (default; frozen embeddings stay put) or "all".
    Cost: (steps + 2) F + steps B. A loss that does not depend on the weights gives exactly 0.
    """
    if alpha <= 0 or steps < 1:
        raise MeasureError(f"sharpness_jiang: alpha={alpha} must be > 0 and steps={steps} >= 1")
    device = _device(model, device)
    step_size = 2.0 / steps if step_size is None else step_size
    gen = torch.Generator().manual_seed(seed)
    with preserved(model):
        chosen = _perturbed_params(model, params)
        base = [p.detach().clone() for p in chosen]
        box = [alpha * (b.abs() + eps) for b in base]
        loss0 = mean_loss(model, batches, device=device, autocast_dtype=autocast_dtype)
        delta = [(torch.rand(b.shape, generator=gen) * 2 - 1).to(b.device) * r for b, r in zip(base, box)]
        for p in chosen:
            p.requires_grad_(True)
        worst = -math.inf
        for it in range(steps + 1):
            with torch.no_grad():
                for p, b, d in zip(chosen, base, delta):
                    p.copy_(b + d)
            last = it == steps
            total, count = 0.0, 0
            grads = [torch.zeros_like(b) for b in base]
            for batch in batches:
                batch = _to(batch, device)
                with torch.set_grad_enabled(not last), _autocast(device, autocast_dtype):
                    loss = model(**batch).loss
                if not last:
                    gs = torch.autograd.grad(loss * _n(batch), chosen, allow_unused=True)
                    for acc, g in zip(grads, gs):
                        if g is not None:
                            acc += g.float()
                total += float(loss.detach()) * _n(batch)
                count += _n(batch)
            worst = max(worst, total / count)
            if not last:
                with torch.no_grad():
                    delta = [torch.maximum(torch.minimum(d + step_size * r * g.sign(), r), -r)
                             for d, r, g in zip(delta, box, grads)]
    return worst - loss0


def sharpness_diff(model: torch.nn.Module, batches: Sequence[Batch], *, noise_scale: float = 1e-2,
                   n_samples: int = 5, relative: bool = True, projection: str = "box", alpha: float = 1e-2,
                   eps: float = 1e-3, params: str = "trainable", seed: int = 0, device: Device = None,
                   autocast_dtype: torch.dtype | None = None) -> float:
    """Difference-based sharpness: mean over ``n_samples`` random nearby points of L(w+δ) − L(w).

    δ = ``noise_scale`` · z with z ~ N(0, I) (seeded), times ``(|wᵢ|+ε)`` when ``relative``, then
    projected: ``"box"`` clips to |δᵢ| ≤ ``alpha``(|wᵢ|+ε) (Jiang's neighbourhood), ``"ball"``
    rescales δ to norm at most ``alpha``·‖w‖, ``"none"`` keeps it. No gradients; cost:
    (n_samples + 1) F. Our reading of the paper's estimate (loss differences at random nearby
    points, projected); a constant loss gives exactly 0.
    """
    if projection not in ("box", "ball", "none"):
        raise MeasureError(f"sharpness_diff: projection={projection!r}: expected 'box', 'ball' or 'none'")
    if noise_scale <= 0 or n_samples < 1:
        raise MeasureError(f"sharpness_diff: noise_scale={noise_scale} must be > 0 and n_samples={n_samples} >= 1")
    device = _device(model, device)
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    with preserved(model):
        chosen = _perturbed_params(model, params)
        base = [p.detach().clone() for p in chosen]
        loss0 = mean_loss(model, batches, device=device, autocast_dtype=autocast_dtype)
        w_norm = math.sqrt(sum(float(b.float().pow(2).sum()) for b in base))
        for _ in range(n_samples):
            delta = []
            for b in base:
                d = torch.randn(b.shape, generator=gen).to(device=b.device, dtype=b.dtype) * noise_scale
                if relative:
                    d = d * (b.abs() + eps)
                if projection == "box":
                    r = alpha * (b.abs() + eps)
                    d = torch.maximum(torch.minimum(d, r), -r)
                delta.append(d)
            if projection == "ball":
                norm = math.sqrt(sum(float(d.float().pow(2).sum()) for d in delta))
                scale = min(1.0, alpha * w_norm / max(norm, 1e-30))
                delta = [d * scale for d in delta]
            with torch.no_grad():
                for p, b, d in zip(chosen, base, delta):
                    p.copy_(b + d)
            diffs.append(mean_loss(model, batches, device=device, autocast_dtype=autocast_dtype) - loss0)
    return float(np.mean(diffs))


# --------------------------------------------------------------------------- distance from init
_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}


def pretrained_reference(model_name: str) -> dict[str, torch.Tensor]:
    """The pretrained encoder weights (names without the base-model prefix, fp32, CPU), word
    embeddings excluded; cached per name. Read with :func:`ofa_lib.models.resolve`'s
    safetensors files, else through :func:`ofa_lib.models.load_pretrained` (encoder)."""
    if model_name not in _REFERENCE:
        from safetensors import safe_open

        path = Path(models.resolve(model_name))
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        ref: dict[str, torch.Tensor] = {}
        if files:
            for file in files:
                with safe_open(file, framework="pt") as fh:
                    for key in fh.keys():
                        if "word_embeddings" not in key:
                            ref[key] = fh.get_tensor(key).float()
        else:
            model, _ = models.load_pretrained(model_name, "encoder")
            ref = {k: v.detach().float().clone() for k, v in model.state_dict().items() if "word_embeddings" not in k}
        _REFERENCE[model_name] = ref
    return _REFERENCE[model_name]


def frobenius_distance(model: torch.nn.Module, reference: Mapping[str, torch.Tensor], *, seed: int = 0,
                       device: Device = None) -> float:
    """‖θ − θ₀‖_F over the encoder parameters that ``reference`` holds (see
    :func:`pretrained_reference`): the new task head is not part of it, and the word embeddings
    are left out (a trimmed vocabulary keeps a subset of the rows, and the cpu/smoke presets
    freeze them anyway). Names are matched with or without the base-model prefix; a shape
    mismatch raises. No forward pass; cost: one pass over the weights. ``seed`` is unused.
    """
    prefix = getattr(model, "base_model_prefix", "") + "."
    total, matched = 0.0, 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "word_embeddings" in name:
                continue
            key = name if name in reference else name[len(prefix):] if name.startswith(prefix) else prefix + name
            if key not in reference:
                continue
            ref = reference[key]
            if tuple(ref.shape) != tuple(param.shape):
                raise MeasureError(f"frobenius_distance: {name} has shape {tuple(param.shape)}, "
                                   f"the pretrained weights {tuple(ref.shape)}")
            total += float((param.detach().float().cpu() - ref).pow(2).sum())
            matched += 1
    if matched == 0:
        raise MeasureError("frobenius_distance: no parameter of the model matches the pretrained weights")
    return math.sqrt(total)


# --------------------------------------------------------------------------- tr(F)
def fisher_trace(model: torch.nn.Module, batches: Sequence[Batch], *, seed: int = 0, device: Device = None,
                 autocast_dtype: torch.dtype | None = None, label_mode: str = "sample") -> float:
    """tr(F) (the ``"total"`` of :func:`ofa_lib.train.fisher.fisher_trace`, labels sampled from the
    model); cost and support as documented there. Restores the model like every measure here."""
    with preserved(model, eval_mode=False):
        result = fisher.fisher_trace(model, batches, label_mode=label_mode, seed=seed, device=device,
                                     autocast_dtype=autocast_dtype)
    return float(result["total"])


# --------------------------------------------------------------------------- all at once
@dataclass
class MeasureData:
    """The batches the measures read: English dev with labels, unlabelled target dev text (one
    list per target set, each weighted equally) and English training batches with labels."""

    source: list[Batch]
    targets: list[list[Batch]]
    train: list[Batch]
    model_name: str

    @classmethod
    def from_prepared(cls, prep: Any, model_name: str, *, n_examples: int = 64, batch_size: int = BATCH_SIZE,
                      seed: int = 0) -> "MeasureData":
        """From :class:`ofa_lib.train.setup.Prepared`: ``n_examples`` seeded rows of English dev,
        of each target dev set (labels dropped) and of the training features."""
        pad = prep.tokenizer.pad_token_id
        cols = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions",
                            "end_positions") if c in prep.train.column_names]
        n_train = min(len(prep.train), n_examples)
        train_idx = np.sort(np.random.default_rng(seed).choice(len(prep.train), size=n_train, replace=False))
        train_rows = prep.train.select(train_idx.tolist()).select_columns(cols).to_list()
        kw = dict(n_examples=n_examples, batch_size=batch_size, seed=seed)
        return cls(source=make_batches(prep.dev_sets[0].rows, pad, **kw),
                   targets=[make_batches(s.rows, pad, drop_labels=True, **kw) for s in prep.dev_sets[1:]],
                   train=make_batches(train_rows, pad, n_examples=None, batch_size=batch_size),
                   model_name=model_name)


def compute(model: torch.nn.Module, names: Sequence[str], data: MeasureData, *, seed: int = 0, device: Device = None,
            autocast_dtype: torch.dtype | None = None, options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, tuple[float, float]]:
    """``{name: (value, seconds)}`` for each measure in ``names`` on ``data``; ``options`` maps a
    measure name to keyword arguments of its function (e.g. ``{"sharpness_jiang": {"alpha": 5e-4}}``)."""
    options = dict(options or {})
    kw = dict(seed=seed, device=device, autocast_dtype=autocast_dtype)
    funcs: dict[str, Callable[[], float]] = {
        "margin_src": lambda: margin(model, data.source, **kw, **options.get("margin_src", {})),
        "margin_trg": lambda: float(np.mean([label_free_margin(model, b, **kw, **options.get("margin_trg", {}))
                                             for b in data.targets])),
        "sharpness_jiang": lambda: sharpness_jiang(model, data.train, **kw, **options.get("sharpness_jiang", {})),
        "sharpness_diff": lambda: sharpness_diff(model, data.train, **kw, **options.get("sharpness_diff", {})),
        "frobenius": lambda: frobenius_distance(model, pretrained_reference(data.model_name), seed=seed, device=device),
        "fisher_trace": lambda: fisher_trace(model, data.train, **kw, **options.get("fisher_trace", {})),
    }
    out = {}
    for name in names:
        if name not in funcs:
            raise MeasureError(f"unknown measure {name!r}; expected some of {MEASURES}")
        t0 = time.perf_counter()
        value = funcs[name]()
        out[name] = (float(value), time.perf_counter() - t0)
    return out


def rows(values: Mapping[str, tuple[float, float]], **ids: Any) -> list[dict[str, Any]]:
    """Tidy rows (``measure``, ``value``, ``seconds`` plus ``ids``) of :func:`compute`'s result."""
    return [dict(ids, measure=name, value=v, seconds=s) for name, (v, s) in values.items()]


MEASURE_COLUMNS = ["run_id", "kind", "name", "step", "epoch", "measure", "value", "seconds"]


def with_variant_rows(measure_rows: Sequence[Mapping[str, Any]], source_snapshot: Mapping[str, int]) -> "pd.DataFrame":
    """A run's ``measures.parquet``: the snapshot rows, the rows already measured on variants
    (CA) and, for every variant taken from a snapshot (``source_snapshot``: variant → snapshot
    index, as training's manifest records them), that snapshot's rows as ``kind="variant"``."""
    import pandas as pd

    frame = pd.DataFrame(list(measure_rows), columns=MEASURE_COLUMNS)
    snaps = frame[frame["kind"] == "snapshot"]
    extra = [snaps[snaps["name"] == str(k)].assign(kind="variant", name=variant)
             for variant, k in source_snapshot.items()]
    out = pd.concat([frame] + extra, ignore_index=True)
    return out.astype({"step": "int64", "epoch": "float64", "value": "float64", "seconds": "float64"})
