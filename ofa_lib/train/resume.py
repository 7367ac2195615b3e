"""A run's resume state: model, optimizer moments, CA mean, RNG and the loop's state in one safetensors file
replaced atomically, the record of a finished training (``resume/final.json``) and the clean-up of what a
killed run left behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ofa_lib import io
from ofa_lib.models import ckpt_io
from ofa_lib.models.running_mean import RunningMean

RESUME_FILE = "state.safetensors"  # resume/<this>: the whole resume state, one file


def save_resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any], ca: RunningMean,
                scaler: "torch.amp.GradScaler | None" = None) -> None:
    """Model, optimizer moments, CA mean, RNG (CPU and CUDA) and the loop's state, in ONE safetensors file
    (``state.safetensors``; the JSON-able part in its metadata) replaced atomically: a kill leaves the previous
    state or the new one, never new weights paired with an old step."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().float() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            tensors[f"optim.{pid}.{k}"] = v.detach().reshape(-1) if v.dim() == 0 else v.detach()
    if ca.mean is not None:
        tensors.update({f"ca.{k}": v for k, v in ca.mean.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on the GPU draws from its generator
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(), "ca_count": ca.count,
            "state": state, "scaler": scaler.state_dict() if scaler is not None else None, "optim_shapes": {f"{pid}.{k}": list(v.shape) for pid, s in opt["state"].items() for k, v in s.items()}}
    path.mkdir(parents=True, exist_ok=True)
    ckpt_io.save_checkpoint(tensors, path / RESUME_FILE, metadata={"ofa_resume": json.dumps(meta)})
    (path / "state.json").unlink(missing_ok=True)  # the two-file format of older versions: never pair with it


def load_resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ca: RunningMean,
                scaler: "torch.amp.GradScaler | None" = None) -> dict[str, Any] | None:
    """Restore what :func:`save_resume` wrote; ``None`` when there is nothing (complete) to resume."""
    if not (path / RESUME_FILE).is_file():
        return None
    meta_text = ckpt_io.read_metadata(path / RESUME_FILE).get("ofa_resume")
    if meta_text is None:  # written by an older version: its state.json beside it, or nothing complete
        if not (path / "state.json").is_file():
            return None
        meta_text = (path / "state.json").read_text()
    meta = json.loads(meta_text)
    tensors = ckpt_io.load_checkpoint(path / RESUME_FILE)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, shape in meta["optim_shapes"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = tensors[f"optim.{key}"].reshape(shape)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    ca_state = {k[3:]: v for k, v in tensors.items() if k.startswith("ca.")}
    if ca_state:
        ca.mean, ca.count = ca_state, meta["ca_count"]
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda_states = [tensors[k].to(torch.uint8) for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                                              key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    return meta["state"]


def clean_litter(out: Path, *, done: bool) -> list[Path]:
    """Remove what a killed run left in its folder: the temp files of interrupted atomic writes and, in a
    run that is done, the resume state (a kill between the manifest's ``done`` and its removal)."""
    removed = [p for p in out.rglob(".*.tmp") if io.is_temp(p)] if out.is_dir() else []
    for path in removed:
        io.remove(path)
    if done and (out / "resume").exists():
        removed.append(out / "resume")
        io.remove_tree(out / "resume")
    return removed


def read_final(out: Path) -> dict[str, Any] | None:
    """The state of a run whose training finished (``resume/final.json``), ``None`` before that."""
    file = out / "resume" / "final.json"
    return json.loads(file.read_text()) if file.is_file() else None
