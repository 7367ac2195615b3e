"""Scheduled unfreezing (Algorithm 1 of the scheduled-unfreezing paper) and tr(F) tracking during a run.

Blocks: a fully fine-tuned encoder has ``embeddings`` and one ``layer.<i>`` block per transformer
layer; with task adapters (:mod:`ofa_lib.models.adapters`) one ``adapter.<i>`` block per layer and the base
model frozen. The task head (``head``: classifier, pooler) is always trainable. Only parameters that
are trainable when the run starts take part (word embeddings frozen by a preset stay frozen).

Schedules (``k = unfreeze_every`` steps; "step s" = after s optimizer steps, before step s + 1):

- ``none``: everything trainable from the start (standard fine-tuning).
- ``lpft``: head only for k steps, then every block at once (linear probing, then fine-tuning).
- ``gu``: top block at step 0, then the next one down every k steps (gradual unfreezing).
- ``gu_reverse``: the same bottom-up.
- ``random``: the same in a seeded random order (a permutation of the blocks, fixed by the run's seed).
- ``fun``: top block at step 0, then every k steps the still-frozen block with the largest tr(F)
  (:func:`ofa_lib.train.fisher.fisher_trace`) on ``fisher_batches`` training batches.

Frozen blocks are ``requires_grad=False`` with no gradient, so AdamW (which skips parameters whose
gradient is ``None``) leaves them and their moments untouched; they are in the optimizer from the
start so that unfreezing needs no new parameter group and resuming restores the optimizer as is.
The events applied are kept in the run's resume state and written to ``manifest.json``
(``unfreezing.events``: ``{step, block}``); tr(F) measurements go to ``fisher.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ofa_lib.data.features import collate
from ofa_lib.io import write_parquet
from ofa_lib.train.blocks import block_of, model_blocks, set_trainable
from ofa_lib.train.fisher import fisher_trace

SCHEDULES = ("none", "lpft", "gu", "gu_reverse", "random", "fun")
FISHER_LABELS = ("sample", "argmax")
FISHER_COLUMNS = ["step", "epoch", "block", "trace", "trainable", "n_trainable"]
def schedule_order(schedule: str, blocks: list[str], seed: int) -> list[str]:
    """The order in which blocks (given bottom to top) are unfrozen; for ``fun`` only the first is fixed."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unfreeze={schedule!r} is invalid: expected one of {SCHEDULES}")
    top_down = list(reversed(blocks))
    if schedule == "gu_reverse":
        return list(blocks)
    if schedule == "random":
        perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(int(seed))).tolist()
        return [blocks[i] for i in perm]
    if schedule == "fun":
        return top_down[:1]
    return top_down  # gu, lpft, none


def n_unfrozen(schedule: str, every: int, n_blocks: int, step: int) -> int:
    """How many blocks are trainable from step ``step`` on (Algorithm 1 with uniform interval k)."""
    if schedule == "none":
        return n_blocks
    if schedule == "lpft":
        return n_blocks if step >= every else 0
    return min(n_blocks, step // every + 1)


def select_fun(traces: dict[str, float], frozen: list[str]) -> str:
    """FUN's choice: the frozen block with the largest tr(F) (ties: the one listed first)."""
    if not frozen:
        raise ValueError("select_fun: no frozen block left")
    best = frozen[0]
    for block in frozen[1:]:
        if traces[block] > traces[best]:
            best = block
    return best


@dataclass
class Unfreezer:
    """The schedule and tr(F) tracking of one run (created by :func:`ofa_lib.train.training._train`)."""

    model: torch.nn.Module
    schedule: str
    every: int
    blocks: dict[str, list[str]]          # schedulable blocks, bottom to top
    head: list[str]                       # trainable head parameters (always trainable)
    fisher_every: int
    fisher_labels: str
    fisher_batches: list[dict[str, torch.Tensor]]
    seed: int
    device: torch.device
    autocast: torch.dtype | None
    order: list[str] = field(default_factory=list)
    unfrozen: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, cfg: Any, model: torch.nn.Module, train_rows: list[dict], pad_token_id: int, device: torch.device,
               autocast: torch.dtype | None) -> "Unfreezer | None":
        """The run's unfreezer, or ``None`` when the run neither schedules nor measures tr(F)."""
        if cfg.unfreeze == "none" and not cfg.fisher_every:
            return None
        blocks = model_blocks(model)
        if not blocks:
            raise ValueError("unfreeze: the model has no trainable encoder block to schedule")
        head = [n for n, p in model.named_parameters() if p.requires_grad and block_of(n) == "head"]
        gen = torch.Generator().manual_seed(10_000 + cfg.seed)  # fixed tr(F) batches, the same at every measurement
        perm = torch.randperm(len(train_rows), generator=gen).tolist()
        need = cfg.fisher_batches * cfg.batch_size
        idx = (perm * (need // max(1, len(perm)) + 1))[:need]
        batches = [collate([train_rows[i] for i in idx[j:j + cfg.batch_size]], pad_token_id)
                   for j in range(0, need, cfg.batch_size)]
        self = cls(model, cfg.unfreeze, cfg.unfreeze_every, blocks, head, cfg.fisher_every, cfg.fisher_labels,
                   batches, cfg.seed, device, autocast)
        self.order = schedule_order(cfg.unfreeze, list(blocks), cfg.seed)
        return self

    # ------------------------------------------------------------------ state
    def start(self, state: dict[str, Any]) -> None:
        """Freeze every scheduled block, then re-apply the events in ``state`` (a resumed run)."""
        state.setdefault("unfreeze_events", [])
        state.setdefault("fisher_rows", [])
        if self.schedule != "none":
            for names in self.blocks.values():
                set_trainable(self.model, names, False)
        else:
            self.unfrozen = list(self.blocks)
        for event in state["unfreeze_events"]:
            self._unfreeze(event["block"])

    def _unfreeze(self, block: str) -> None:
        set_trainable(self.model, self.blocks[block], True)
        self.unfrozen.append(block)

    def frozen(self) -> list[str]:
        """Still-frozen blocks, top to bottom."""
        return [b for b in reversed(list(self.blocks)) if b not in self.unfrozen]

    # ------------------------------------------------------------------ the hook
    def traces(self, step: int) -> dict[str, float]:
        blocks = dict(self.blocks)
        if self.head:
            blocks["head"] = self.head
        was_training = self.model.training
        out = fisher_trace(self.model, self.fisher_batches, label_mode=self.fisher_labels, seed=self.seed * 100_003 + step,
                           blocks=blocks, device=self.device, autocast_dtype=self.autocast)
        self.model.train(was_training)
        return out

    def before_step(self, step: int, state: dict[str, Any], epoch: float) -> None:
        """At step ``step`` (before the optimizer step ``step + 1``): measure tr(F) when due, then unfreeze."""
        target = n_unfrozen(self.schedule, self.every, len(self.blocks), step)
        fun_due = self.schedule == "fun" and len(self.unfrozen) < target and len(self.unfrozen) >= len(self.order)
        traces = self.measure(step, state, epoch, force=fun_due)
        while len(self.unfrozen) < target:
            k = len(self.unfrozen)
            block = self.order[k] if k < len(self.order) else select_fun(traces, self.frozen())
            self._unfreeze(block)
            state["unfreeze_events"].append({"step": step, "block": block})

    def measure(self, step: int, state: dict[str, Any], epoch: float, force: bool = False) -> dict[str, float] | None:
        """tr(F) per block when due (every ``fisher_every`` steps) or forced; rows go to ``state["fisher_rows"]``."""
        if not force and not (self.fisher_every and step % self.fisher_every == 0):
            return None
        traces = self.traces(step)
        state["fisher_rows"] += [
            {"step": step, "epoch": float(epoch), "block": b, "trace": float(v),
             "trainable": b == "head" or b in self.unfrozen, "n_trainable": len(self.unfrozen)}
            for b, v in traces.items() if b != "total"]
        return traces

    def finish(self, step: int, state: dict[str, Any], epoch: float, out: Path, run_id: str,
               manifest: dict[str, Any]) -> None:
        """Last tr(F) measurement (when due), ``fisher.parquet`` and the manifest's ``unfreezing`` entry."""
        if not any(r["step"] == step for r in state["fisher_rows"]):
            self.measure(step, state, epoch)  # the trained model's tr(F); no more unfreezing
        if state["fisher_rows"]:
            write_parquet(out / "fisher.parquet",
                          pd.DataFrame(state["fisher_rows"], columns=FISHER_COLUMNS).assign(run_id=run_id, label_mode=self.fisher_labels))
        manifest["unfreezing"] = {
            "schedule": self.schedule, "every": self.every, "blocks": list(self.blocks),
            "events": list(state["unfreeze_events"]), "complete": len(self.unfrozen) == len(self.blocks),
            "fisher_every": self.fisher_every, "fisher_batches": len(self.fisher_batches), "fisher_labels": self.fisher_labels,
        }
