"""The task head: which parameters the pretrained checkpoint lacks, and how a run sets them up (trained with
the run, a shared random initialisation ``init:<seed>``, or a frozen head file from a head-tuning run)."""

from __future__ import annotations

from pathlib import Path

import torch

from ofa_lib import models
from ofa_lib.models import ckpt_io
from ofa_lib.train.config import TrainConfig


def head_keys(model: torch.nn.Module, model_name: str) -> list[str]:
    """Parameters the pretrained checkpoint does not hold: the task head (e.g. pooler + classifier)."""
    pretrained = models.pretrained_keys(model_name)
    prefix = getattr(model, "base_model_prefix", "") + "."

    def stored(name: str) -> bool:  # checkpoints hold "bert.x" or "x" (base model saved alone)
        return name in pretrained or (name.startswith(prefix) and name[len(prefix):] in pretrained) or prefix + name in pretrained

    keys = sorted(k for k, _ in model.named_parameters() if not stored(k))
    if len(keys) * 4 > len(list(model.parameters())):
        raise RuntimeError(f"{len(keys)} parameters look new relative to {model_name}: the checkpoint's names do not match")
    return keys


def init_head(model: torch.nn.Module, keys: list[str], seed: int) -> None:
    """Deterministic head initialisation shared by every run with the same seed."""
    gen = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in keys:
            param = params[key]
            if key.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def load_head(model: torch.nn.Module, keys: list[str], path: str | Path) -> None:
    """Load a trained head file; refuse one that does not fit this model (names the parameter)."""
    state = ckpt_io.load_checkpoint(path)
    params = dict(model.named_parameters())
    missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
    if missing or extra:
        raise ValueError(f"parameter head={str(path)!r} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key in keys:
        if tuple(state[key].shape) != tuple(params[key].shape):
            raise ValueError(f"parameter head={str(path)!r} does not fit the model: {key} has shape "
                             f"{tuple(state[key].shape)}, the model expects {tuple(params[key].shape)}")
    with torch.no_grad():
        for key in keys:
            params[key].copy_(state[key].to(params[key].dtype))


def setup_head(model: torch.nn.Module, cfg: TrainConfig) -> tuple[list[str], str]:
    """Apply ``cfg.head`` (``train`` | ``init:<seed>`` | path: frozen) → (head keys, fingerprint)."""
    keys = head_keys(model, cfg.model_name)
    if cfg.head_file:
        load_head(model, keys, cfg.head_file)
        for name, param in model.named_parameters():
            if name in keys:
                param.requires_grad_(False)
    else:  # "init:<seed>" shares one initialisation across runs; "train" seeds it with the run
        init_head(model, keys, int(cfg.head[5:]) if cfg.head.startswith("init:") else cfg.seed)
    state = model.state_dict()
    return keys, ckpt_io.head_fingerprint({k: state[k] for k in keys}, keys)
