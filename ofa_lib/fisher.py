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
from collections.abc import Iterable, Mapping

import torch

LABEL_MODES = ("sample", "argmax")
ESTIMATORS = ("batch", "example")
TARGET_KEYS = ("labels", "start_positions", "end_positions")
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def default_blocks(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every parameter in a block: ``embeddings``, ``layer.<i>``, ``adapter.<i>``, ``head`` (see :mod:`unfreezing`)."""
    from .unfreezing import model_blocks

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


def sampled_log_likelihood(outputs, batch: Mapping[str, torch.Tensor], mode: str, gen: torch.Generator) -> tuple[torch.Tensor, int]:
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
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode={label_mode!r} is invalid: expected one of {LABEL_MODES}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is invalid: expected one of {ESTIMATORS}")
    blocks = default_blocks(model) if blocks is None else blocks
    params_by_name = dict(model.named_parameters())
    for name, names in blocks.items():
        unknown = [n for n in names if n not in params_by_name]
        if unknown:
            raise ValueError(f"fisher_trace: block {name!r} names parameters the model lacks: {unknown[:3]}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)

    work = copy.deepcopy(model).to(device).eval()
    work_params = dict(work.named_parameters())
    wanted = {n for names in blocks.values() for n in names}
    for name, param in work_params.items():
        param.requires_grad_(name in wanted)
    tracked = [work_params[n] for n in sorted(wanted)]
    sums = {name: torch.zeros((), dtype=torch.float64) for name in blocks}
    gen = torch.Generator().manual_seed(int(seed))
    examples = 0
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
            for name, names in blocks.items():
                for n_ in names:
                    grad = work_params[n_].grad
                    if grad is not None:
                        sums[name] += grad.detach().double().pow(2).sum().cpu()
            if estimator == "batch":
                examples += n
            else:
                examples += 1
    if examples == 0:
        raise ValueError("fisher_trace: no batches given")
    out = {name: float(total / examples) for name, total in sums.items()}
    out["total"] = float(sum(out.values()))
    del work
    return out
