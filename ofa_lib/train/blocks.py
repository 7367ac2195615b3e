"""Blocks of an encoder's parameters: ``embeddings``, ``layer.<i>``, ``adapter.<i>``, ``head``.

Scheduled unfreezing unfreezes them one at a time (:mod:`ofa_lib.train.unfreezing`) and tr(F) is
measured per block (:mod:`ofa_lib.train.fisher`).
"""

from __future__ import annotations

import re

import torch

from ofa_lib.models import adapters as adapters_mod

_LAYER = re.compile(r"\.encoder\.layer\.(\d+)\.")


def block_of(name: str) -> str:
    """Block of a parameter name: ``adapter.<i>``, ``layer.<i>``, ``embeddings`` or ``head``."""
    m = adapters_mod.ADAPTER_KEY.search(name)
    if m:
        return f"adapter.{m.group(1)}"
    m = _LAYER.search(name)
    if m:
        return f"layer.{m.group(1)}"
    return "embeddings" if ".embeddings." in name or name.startswith("embeddings.") else "head"


def _block_rank(block: str) -> tuple[int, int]:
    kind, _, idx = block.partition(".")
    return ({"embeddings": 0, "layer": 1, "adapter": 1, "head": 2}[kind], int(idx) if idx else 0)


def model_blocks(model: torch.nn.Module, *, include_head: bool = False, include_frozen: bool = False) -> dict[str, list[str]]:
    """Block name → parameter names, bottom to top (embeddings, layers / adapters, head last).

    Only parameters with ``requires_grad`` unless ``include_frozen``; blocks left empty are dropped."""
    out: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad or include_frozen:
            block = block_of(name)
            if block != "head" or include_head:
                out.setdefault(block, []).append(name)
    return {b: out[b] for b in sorted(out, key=_block_rank)}


def set_trainable(model: torch.nn.Module, names: list[str], trainable: bool) -> None:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(trainable)
        if not trainable:
            params[name].grad = None
