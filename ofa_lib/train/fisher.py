"""Trace of the Fisher information per block of parameters (Algorithm 2 of the scheduled-unfreezing paper).

``tr(F) = E_x E_{y ~ p(y|x)} ||∇_w log p(y|x)||²``: the *true* Fisher (labels drawn from the model's
own predictive distribution), not the empirical Fisher (true labels). ``label_mode="argmax"`` uses
the model's most likely label instead, which is what the authors' code did.

Estimator (``estimator="batch"``, the default, as in Algorithm 2): one forward and one backward pass
per batch of ``B`` examples on the summed log-likelihood ``Σ_i log p(y_i|x_i)``; per parameter the
squared gradient, summed over the block and divided by ``B``. With sampled labels this is unbiased
for tr(F): the cross terms ``∇log p(y_i|x_i)·∇log p(y_j|x_j)`` have zero mean because
``E_{y~p}[∇log p(y|x)] = 0``. With argmax labels the cross terms do not vanish and the batch
estimate is biased upwards (use ``estimator="example"``). Cost: one training step per batch
(forward + backward through the blocks' parameters). ``estimator="example"`` runs every example
alone (``B`` passes per batch): exact per-example squared norms, ``B`` times the cost.

An "example" is one sequence: for NER ``log p(y|x) = Σ_t log p(y_t|x)`` over the labelled tokens
(label ≠ -100; without labels, every attended token), for QA ``log p(start) + log p(end)`` (start
and end drawn independently, as the training loss treats them), with padding positions masked out
of the distributions so that padding never changes the estimate.

The model passed in is never modified: the work happens on a deep copy in eval mode (no dropout),
and labels are drawn from a private generator seeded by ``seed`` (the global RNG is untouched, so
measuring tr(F) during training does not change the training itself).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ofa_lib.models import ckpt_io
from ofa_lib.train.blocks import model_blocks

LABEL_MODES = ("sample", "argmax")
ESTIMATORS = ("batch", "example")
TARGET_KEYS = ("labels", "start_positions", "end_positions")
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def default_blocks(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every parameter in a block: ``embeddings``, ``layer.<i>``, ``adapter.<i>``, ``head`` (see :mod:`unfreezing`)."""
    return model_blocks(model, include_head=True, include_frozen=True)


def _log_probs(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def _pick(log_probs: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Labels per row of ``log_probs`` [..., C]: drawn from exp(log_probs) or its argmax."""
    flat = log_probs.detach().reshape(-1, log_probs.shape[-1]).cpu()
    if mode == "argmax":
        labels = flat.argmax(-1)
    else:  # inverse CDF, one uniform per row: masked (zero-probability) columns never change the draw
        cdf = flat.double().exp().cumsum(-1)
        cdf = cdf / cdf[:, -1:]
        u = torch.rand(flat.shape[0], generator=gen, dtype=torch.float64)
        labels = torch.searchsorted(cdf, u[:, None]).squeeze(-1).clamp_(max=flat.shape[-1] - 1)
    return labels.reshape(log_probs.shape[:-1]).to(log_probs.device)


def sampled_log_likelihood(outputs: Any, batch: Mapping[str, torch.Tensor], mode: str, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """``(Σ over examples of log p(ŷ|x), number of examples)`` for labels ŷ chosen by ``mode``."""
    attention = batch.get("attention_mask")
    if getattr(outputs, "start_logits", None) is not None:  # QA: start and end over the real tokens
        mask = attention.bool() if attention is not None else None
        total = outputs.start_logits.new_zeros((), dtype=torch.float32)
        for logits in (outputs.start_logits, outputs.end_logits):
            lp = _log_probs(logits, mask)
            total = total + lp.gather(-1, _pick(lp, mode, gen)[:, None]).sum()
        return total, outputs.start_logits.shape[0]
    logits = outputs.logits
    lp = _log_probs(logits, None)
    y = _pick(lp, mode, gen)
    chosen = lp.gather(-1, y[..., None]).squeeze(-1)
    if logits.dim() == 3:  # token classification: labelled tokens, else attended tokens
        labels = batch.get("labels")
        keep = labels.ne(-100) if labels is not None and labels.dim() == 2 else (
            attention.bool() if attention is not None else torch.ones_like(chosen, dtype=torch.bool))
        chosen = chosen.masked_fill(~keep, 0.0)
    elif logits.dim() != 2:
        raise ValueError(f"fisher_trace: logits of shape {tuple(logits.shape)} are neither [B, C] nor [B, T, C]")
    return chosen.sum(), logits.shape[0]


def _rows(batch: Mapping[str, torch.Tensor]) -> Iterable[dict[str, torch.Tensor]]:
    n = next(iter(batch.values())).shape[0]
    for i in range(n):
        yield {k: v[i:i + 1] for k, v in batch.items()}


@torch.no_grad()
def _zero(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def _prepare(model: torch.nn.Module, wanted: set[str], label_mode: str, estimator: str,
             device: torch.device | str | None) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter], torch.device]:
    """A private eval-mode copy of ``model`` on ``device`` whose only gradients are ``wanted``'s."""
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode={label_mode!r} is invalid: expected one of {LABEL_MODES}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is invalid: expected one of {ESTIMATORS}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    work = copy.deepcopy(model).to(device).eval()
    work_params = dict(work.named_parameters())
    for name, param in work_params.items():
        param.requires_grad_(name in wanted)
    return work, work_params, device


def _squared_grads(work: torch.nn.Module, work_params: dict[str, torch.nn.Parameter], names: list[str],
                   batches: Iterable[dict[str, torch.Tensor]], *, label_mode: str, seed: int, device: torch.device,
                   autocast_dtype: torch.dtype | None, estimator: str) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """The one Fisher loop: per pass (a batch, or one example with ``estimator="example"``) the
    gradients of ``log p(ŷ|x)`` for ``names`` (None where a parameter gets none) and how many
    examples the pass counts for (``B`` for a batch pass, 1 per example)."""
    tracked = [work_params[n] for n in names]
    gen = torch.Generator().manual_seed(int(seed))
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if k in INPUT_KEYS or k == "labels"}
        pieces = _rows(batch) if estimator == "example" else [batch]
        for piece in pieces:
            inputs = {k: v for k, v in piece.items() if k in INPUT_KEYS}
            with torch.enable_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                outputs = work(**inputs)
                loglik, n = sampled_log_likelihood(outputs, piece, label_mode, gen)
            _zero(tracked)
            loglik.backward()
            yield {n_: work_params[n_].grad for n_ in names}, (n if estimator == "batch" else 1)


def fisher_trace(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, label_mode: str = "sample",
                 seed: int = 0, blocks: dict[str, list[str]] | None = None, device: torch.device | str | None = None,
                 autocast_dtype: torch.dtype | None = None, estimator: str = "batch") -> dict[str, float]:
    """Empirical tr(F) = E_x E_{y~p(y|x)} ||grad log p(y|x)||^2 per block of parameters (+ key "total").

    ``batches``: collated batches (``input_ids``, ``attention_mask``, ... ; ``labels`` only serve to
    find NER's labelled tokens, their values are never used). ``blocks``: block name → parameter
    names (default :func:`default_blocks`); the gradient is taken for exactly these parameters, frozen
    or not. Returns the per-block traces (sum over the block's parameters of the per-example
    expected squared gradient) and ``total``, their sum. See the module docstring for the estimator.
    """
    blocks = default_blocks(model) if blocks is None else blocks
    params_by_name = dict(model.named_parameters())
    for name, names in blocks.items():
        unknown = [n for n in names if n not in params_by_name]
        if unknown:
            raise ValueError(f"fisher_trace: block {name!r} names parameters the model lacks: {unknown[:3]}")
    wanted = {n for names in blocks.values() for n in names}
    work, work_params, device = _prepare(model, wanted, label_mode, estimator, device)
    sums = {name: torch.zeros((), dtype=torch.float64) for name in blocks}
    examples = 0
    for grads, n in _squared_grads(work, work_params, sorted(wanted), batches, label_mode=label_mode, seed=seed,
                                   device=device, autocast_dtype=autocast_dtype, estimator=estimator):
        for name, names in blocks.items():
            for n_ in names:
                if grads[n_] is not None:
                    sums[name] += grads[n_].detach().double().pow(2).sum().cpu()
        examples += n
    if examples == 0:
        raise ValueError("fisher_trace: no batches given")
    out = {name: float(total / examples) for name, total in sums.items()}
    out["total"] = float(sum(out.values()))
    del work
    return out


def fisher_diagonal(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, label_mode: str = "sample",
                    seed: int = 0, device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
                    estimator: str = "example", progress: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """Per-parameter diagonal Fisher ``F[w] = E_x E_{y~p(y|x)} (∂ log p(y|x) / ∂w)²`` of every
    parameter of ``model`` (frozen ones too), fp32 on the CPU, and the number of examples.

    The same loop as :func:`fisher_trace` (one forward and backward per pass), keeping each
    parameter's squared gradient instead of its block's sum. The default ``estimator="example"``
    squares each example's own gradient (Matena & Raffel's per-example estimate, unbiased with
    either label mode); ``"batch"`` squares a batch's summed gradient (cheaper; unbiased only with
    sampled labels). A parameter that never gets a gradient (unused) has Fisher 0.
    """
    names = [n for n, _ in model.named_parameters()]
    work, work_params, device = _prepare(model, set(names), label_mode, estimator, device)
    # fp32 sums on the model's device, squared in place (addcmul): no per-pass temporaries of the model's size;
    # a few hundred non-negative terms lose nothing that matters in fp32
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in work_params.items()}
    examples = 0
    passes = _squared_grads(work, work_params, names, batches, label_mode=label_mode, seed=seed, device=device,
                            autocast_dtype=autocast_dtype, estimator=estimator)
    for grads, n in tqdm(passes, desc="fisher diagonal", disable=not progress, leave=False):
        for name, grad in grads.items():
            if grad is not None:
                g = grad.detach().float()
                sums[name].addcmul_(g, g)
        examples += n
    if examples == 0:
        raise ValueError("fisher_diagonal: no batches given")
    del work
    return {n: s.div_(examples).cpu() for n, s in sums.items()}, examples


# --------------------------------------------------------------------------- stored diagonals
DIAGONAL_SPLITS = ("train", "dev")       # English training features or English dev (the merge's data)
DIAGONAL_OPTIONS = ("examples", "split", "labels", "seed")  # what a diagonal depends on (besides the weights)
CHECKPOINT_SHA_KEY = "ofa_fisher_checkpoint_sha256"  # metadata of a stored diagonal: whose weights
OPTIONS_KEY = "ofa_fisher_options"                   # JSON of the diagonal options (+ estimator)
EXAMPLES_KEY = "ofa_fisher_examples"                 # how many examples it averaged (≤ examples)


def diagonal_options(options: Mapping[str, object]) -> dict[str, object]:
    """The options a diagonal depends on, from a merge spec's options (+ the fixed estimator)."""
    missing = [k for k in DIAGONAL_OPTIONS if k not in options]
    if missing:
        raise ValueError(f"fisher diagonal: missing option(s) {missing}")
    return {**{k: options[k] for k in DIAGONAL_OPTIONS}, "estimator": "example"}


def diagonal_file(cache_dir: str | os.PathLike, checkpoint_sha256: str, options: Mapping[str, object]) -> Path:
    """``<cache_dir>/fisher-<digest>.safetensors``: the digest is of the checkpoint's sha256 and the options."""
    key = json.dumps({"checkpoint_sha256": checkpoint_sha256, "options": dict(options)}, sort_keys=True)
    return Path(cache_dir) / f"fisher-{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"


def diagonal_mismatch(path: str | os.PathLike, checkpoint_sha256: str, options: Mapping[str, object]) -> str | None:
    """Why the stored diagonal ``path`` is not the one of that checkpoint and options (None: it is)."""
    meta = ckpt_io.read_metadata(path)
    if meta.get(CHECKPOINT_SHA_KEY) != checkpoint_sha256:
        return (f"it was computed for the checkpoint with sha256 {meta.get(CHECKPOINT_SHA_KEY) or 'unrecorded'}, "
                f"not {checkpoint_sha256}")
    stored = json.loads(meta.get(OPTIONS_KEY) or "null")
    if stored != json.loads(json.dumps(dict(options))):
        return f"it was computed with options {stored}, not {dict(options)}"
    return None


def save_diagonal(diagonal: Mapping[str, torch.Tensor], path: str | os.PathLike, *, checkpoint_sha256: str,
                  options: Mapping[str, object], examples: int, metadata: Mapping[str, str] | None = None) -> None:
    """Write a diagonal atomically (fp32 safetensors) with the checkpoint's sha256 and the options."""
    meta = {**dict(metadata or {}), CHECKPOINT_SHA_KEY: checkpoint_sha256,
            OPTIONS_KEY: json.dumps(dict(options), sort_keys=True), EXAMPLES_KEY: str(int(examples))}
    ckpt_io.save_checkpoint(diagonal, path, dtype=torch.float32, metadata=meta)


def cached_diagonal(checkpoint: str | os.PathLike, options: Mapping[str, object], cache_dir: str | os.PathLike,
                    compute: Callable[[], tuple[dict[str, torch.Tensor], int]]) -> tuple[Path, bool]:
    """The stored diagonal of ``checkpoint`` (its current bytes, by sha256) with ``options``:
    ``(path, computed)``. Read from ``cache_dir`` when a file there records that sha256 and those
    options; else ``compute()`` (→ diagonal, examples) is called and its result written atomically
    (a stored file that records something else is replaced, with a warning)."""
    sha = ckpt_io.cached_sha256(checkpoint)
    path = diagonal_file(cache_dir, sha, options)
    if path.is_file():
        try:
            why = diagonal_mismatch(path, sha, options)
        except ckpt_io.CorruptCheckpointError as exc:
            why = str(exc)
        if why is None:
            return path, False
        warnings.warn(f"stored Fisher diagonal {path} does not belong to {checkpoint}: {why}; computing it again",
                      stacklevel=2)
    diagonal, examples = compute()
    save_diagonal(diagonal, path, checkpoint_sha256=sha, options=options, examples=examples,
                  metadata={"ofa_fisher_checkpoint": str(checkpoint)})
    return path, True
