"""Bottleneck task adapters (MAD-X style) inside each layer of a BERT / XLM-R encoder.

Each layer's feed-forward output block computes ``LayerNorm(dropout(dense(h)) + x)``; with an adapter
it computes ``LayerNorm(a(dropout(dense(h))) + x)`` where ``a(z) = z + up(ReLU(down(z)))`` with a
bottleneck of ``hidden_size // reduction`` (MAD-X: reduction factor 16). The adapter is a submodule
``<layer>.output.adapter`` so its parameters have fixed names (``...layer.<i>.output.adapter.down.weight``),
the pretrained keys are unchanged, and checkpoints with adapters are plain safetensors state dicts
that average like any other. Initialisation is seeded (default 0, the same for every run, like the
pretrained weights): weights N(0, 0.02), biases 0. Hand-written because neither ``peft`` nor
``adapters`` is installed here (both need the network); this is the whole module.
"""

from __future__ import annotations

import re
import types

import torch
from torch import nn

ADAPTER_KEY = re.compile(r"\.layer\.(\d+)\.output\.adapter\.")


class Bottleneck(nn.Module):
    """``z + up(ReLU(down(z)))``."""

    def __init__(self, hidden_size: int, reduction: int) -> None:
        super().__init__()
        width = max(1, hidden_size // reduction)
        self.down = nn.Linear(hidden_size, width)
        self.up = nn.Linear(width, hidden_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(torch.relu(self.down(z)))


def _output_with_adapter(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    hidden_states = self.dropout(self.dense(hidden_states))
    return self.LayerNorm(self.adapter(hidden_states) + input_tensor)


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder's transformer layers, bottom to top (``<base>.encoder.layer``)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no encoder.layer list: adapters need a BERT-like encoder")
    return list(layers)


def add_adapters(model: nn.Module, reduction: int = 16, *, seed: int = 0) -> list[str]:
    """Insert one bottleneck adapter after every layer's feed-forward block; freeze everything else
    of the base model (embeddings and layers). The task head keeps its ``requires_grad``.
    Returns the adapters' parameter names."""
    if not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"adapters={reduction!r} is invalid: expected a positive reduction factor such as 16")
    layers = encoder_layers(model)
    gen = torch.Generator().manual_seed(seed)
    base_ids = {id(p) for layer in layers for p in layer.parameters()}
    embeddings = getattr(getattr(model, getattr(model, "base_model_prefix", ""), model), "embeddings", None)
    if embeddings is not None:
        base_ids |= {id(p) for p in embeddings.parameters()}
    for p in model.parameters():
        if id(p) in base_ids:
            p.requires_grad_(False)
    for layer in layers:
        out = layer.output
        if hasattr(out, "adapter"):
            raise ValueError("the model already has adapters")
        if not all(hasattr(out, n) for n in ("dense", "dropout", "LayerNorm")):
            raise ValueError(f"{type(out).__name__} is not a BERT-style feed-forward output block")
        adapter = Bottleneck(out.dense.out_features, reduction).to(out.dense.weight.device, out.dense.weight.dtype)
        with torch.no_grad():
            for lin in (adapter.down, adapter.up):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.02)
                lin.bias.zero_()
        out.adapter = adapter
        out.forward = types.MethodType(_output_with_adapter, out)
    return [n for n, _ in model.named_parameters() if ADAPTER_KEY.search(n)]


def has_adapters(model: nn.Module) -> bool:
    return any(ADAPTER_KEY.search(n) for n, _ in model.named_parameters())
