"""One optimiser step with the base optimiser (AdamW), SAM or the Fisher penalty.

:func:`train_step` is what ``training._train`` calls for every batch; the scheduler and
``zero_grad`` stay with the caller. ``method``:

* ``"adamw"`` -- forward (under autocast when asked), backward, clip the gradient norm to
  ``max_grad_norm``, ``optimizer.step()``: exactly the published recipe.
* ``"sam"`` (Foret et al. 2021) -- gradient g at w; ascend to w + ρ·g/‖g‖ (‖·‖ over the
  trainable parameters, fp32); gradient g' there; restore w bit for bit; clip g' and let the
  base optimiser step with it. Two forward/backward passes per step; the reported loss is the
  one at w and the reported norm that of g' before clipping.
* ``"fisher_penalty"`` (Jastrzebski et al. 2021) -- minimise L + λ·‖∇_w log p(ŷ|x)‖² with ŷ
  drawn from the model's own predictive distribution (seeded per step, so resuming reproduces
  it) and the gradient of the batch-mean log-likelihood: one forward pass, a double backward
  (the model needs eager attention, see :func:`attn_implementation`), then clip and step.
  Sequence classification samples a class per example, token classification a tag per
  labelled token, QA a start and an end position per feature.
"""

from __future__ import annotations

import math
from typing import Any

import torch

METHODS = ("adamw", "sam", "fisher_penalty")


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def attn_implementation(method: str) -> str | None:
    """The attention implementation a method needs: ``"eager"`` for the Fisher penalty's double
    backward (fused attention kernels have no second derivative), else the model's default."""
    return "eager" if method == "fisher_penalty" else None


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast_dtype, device_type: str):
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(**batch)
    return out


def _up(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (autocast outputs) in fp32; fp32/fp64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def sampled_log_likelihood(out: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """Mean log p(ŷ|x) with ŷ sampled (without gradient) from the model's own distribution."""
    if getattr(out, "start_logits", None) is not None:
        parts = []
        pad = ~batch["attention_mask"].bool()
        for logits in (out.start_logits, out.end_logits):  # positions: never a padding position
            logp = _up(logits).masked_fill(pad, float("-inf")).log_softmax(-1)
            y = torch.multinomial(logp.detach().float().exp().cpu(), 1, generator=generator).to(logp.device)
            parts.append(logp.gather(-1, y).mean())
        return (parts[0] + parts[1]) / 2
    logp = _up(out.logits).log_softmax(-1)
    flat = logp.reshape(-1, logp.shape[-1])
    y = torch.multinomial(flat.detach().float().exp().cpu(), 1, generator=generator).to(flat.device)
    ll = flat.gather(-1, y).squeeze(-1)
    if logp.dim() == 3:  # token classification: the positions the task loss counts
        labels = batch.get("labels")
        mask = (labels != -100) if labels is not None else batch["attention_mask"].bool()
        return ll[mask.reshape(-1)].mean()
    return ll.mean()


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, *,
               method: str = "adamw", max_grad_norm: float = 1.0, autocast_dtype: torch.dtype | None = None,
               sam_rho: float = 0.05, fisher_penalty_weight: float = 0.01, seed: int = 0,
               step: int = 0, scaler: "torch.amp.GradScaler | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient(s), clipping and ``optimizer.step()`` for one batch → ``(loss, grad_norm)``. ``batch`` may be a
    list of micro-batches (gradient accumulation, AdamW): one optimizer step on their example-weighted mean loss.

    Gradients are left in ``.grad`` (the caller zeroes them). ``seed`` and ``step`` seed the
    Fisher penalty's label sampling (generator seed ``seed·1_000_003 + step``). ``scaler`` (fp16
    autocast, AdamW only): the loss is scaled before backward, the gradients unscaled before
    clipping, and a step with inf/NaN gradients is skipped while the scale shrinks. Both results
    stay on the device (no host sync here).
    """
    if method not in METHODS:
        raise ValueError(f"optimizer={method!r} is unknown; expected one of {METHODS}")
    if scaler is not None and method != "adamw":
        raise ValueError(f"a GradScaler (fp16) covers optimizer='adamw' only, not {method!r}")
    params = _trainable(model)
    device_type = params[0].device.type
    if isinstance(batch, list) and method != "adamw":
        raise ValueError(f"micro-batches (gradient accumulation) are implemented for 'adamw' only, not {method!r}")
    if method == "adamw":
        micro = batch if isinstance(batch, list) else [batch]
        sizes = [len(next(iter(mb.values()))) for mb in micro]
        loss = None
        for mb, size in zip(micro, sizes):  # accumulation: each micro-batch's mean loss weighted by its share
            part = _forward_loss(model, mb, autocast_dtype, device_type).loss
            if len(micro) > 1:
                part = part * (size / sum(sizes))
            (scaler.scale(part) if scaler is not None else part).backward()
            loss = part.detach() if loss is None else loss + part.detach()
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradient
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
            scaler.update()
            return loss, grad_norm
    elif method == "sam":
        loss = _forward_loss(model, batch, autocast_dtype, device_type).loss
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in params]
            norm = math.sqrt(sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in grads if g is not None))
            scale = sam_rho / (norm + 1e-12)
            saved = [p.detach().clone() for p in params]
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad.to(p.dtype), alpha=scale)
                p.grad = None
        _forward_loss(model, batch, autocast_dtype, device_type).loss.backward()
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
    else:
        out = _forward_loss(model, batch, autocast_dtype, device_type)
        loss = out.loss
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        ll = sampled_log_likelihood(out, batch, gen)
        g = torch.autograd.grad(ll, params, create_graph=True, allow_unused=True)
        penalty = sum(_up(x).pow(2).sum() for x in g if x is not None)
        (loss + fisher_penalty_weight * penalty).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return loss, grad_norm
