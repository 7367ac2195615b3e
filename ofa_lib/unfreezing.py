"""Scheduled unfreezing (Algorithm 1 of the scheduled-unfreezing paper) and tr(F) tracking during a run.

Blocks: a fully fine-tuned encoder has ``embeddings`` and one ``layer.<i>`` block per transformer
layer; with task adapters (:mod:`ofa_lib.adapters`) one ``adapter.<i>`` block per layer and the base
model frozen. The task head (``head``: classifier, pooler) is always trainable. Only parameters that
are trainable when the run starts take part (word embeddings frozen by a preset stay frozen).

Schedules (``k = unfreeze_every`` steps; "step s" = after s optimizer steps, before step s + 1):

- ``none``: everything trainable from the start (standard fine-tuning).
- ``lpft``: head only for k steps, then every block at once (linear probing, then fine-tuning).
- ``gu``: top block at step 0, then the next one down every k steps (gradual unfreezing).
- ``gu_reverse``: the same bottom-up.
- ``random``: the same in a seeded random order (a permutation of the blocks, fixed by the run's seed).
- ``fun``: top block at step 0, then every k steps the still-frozen block with the largest tr(F)
  (:func:`ofa_lib.fisher.fisher_trace`) on ``fisher_batches`` training batches.

Frozen blocks are ``requires_grad=False`` with no gradient, so AdamW (which skips parameters whose
gradient is ``None``) leaves them and their moments untouched; they are in the optimizer from the
start so that unfreezing needs no new parameter group and resuming restores the optimizer as is.
The events applied are kept in the run's resume state and written to ``manifest.json``
(``unfreezing.events``: ``{step, block}``); tr(F) measurements go to ``fisher.parquet``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import adapters as adapters_mod
from .fisher import fisher_trace

SCHEDULES = ("none", "lpft", "gu", "gu_reverse", "random", "fun")
FISHER_LABELS = ("sample", "argmax")
FISHER_COLUMNS = ["step", "epoch", "block", "trace", "trainable", "n_trainable"]
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


def set_trainable(model: torch.nn.Module, names: list[str], trainable: bool) -> None:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(trainable)
        if not trainable:
            params[name].grad = None


@dataclass
class Unfreezer:
    """The schedule and tr(F) tracking of one run (created by :func:`ofa_lib.training._train`)."""

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
    def create(cls, cfg, model: torch.nn.Module, train_rows: list[dict], pad_token_id: int, device: torch.device,
               autocast: torch.dtype | None) -> "Unfreezer | None":
        """The run's unfreezer, or ``None`` when the run neither schedules nor measures tr(F)."""
        if cfg.unfreeze == "none" and not cfg.fisher_every:
            return None
        from .features import collate

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
        from .io import write_parquet

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


# --------------------------------------------------------------------------- analysis helpers
def fisher_curve(fisher: pd.DataFrame) -> pd.DataFrame:
    """The paper's curve: per run and step, tr(F) summed over the trainable blocks (head excluded)
    divided by their number (``mean_trainable``), and over all blocks (``total``)."""
    enc = fisher[fisher.block != "head"]
    keys = [c for c in ("run_id", "step", "epoch") if c in enc.columns]
    total = enc.groupby(keys).trace.sum().rename("total")
    trainable = enc[enc.trainable].groupby(keys).trace.agg(["sum", "count"])
    mean = (trainable["sum"] / trainable["count"]).rename("mean_trainable")
    return pd.concat([total, mean], axis=1).reset_index()


def schedule_table(events: list[dict[str, Any]], blocks: list[str]) -> pd.DataFrame:
    """Per unfreezing event: its position, step, block and the block's depth from the top (0 = top)."""
    top_down = list(reversed(blocks))
    return pd.DataFrame([{"position": i, "step": e["step"], "block": e["block"], "depth_from_top": top_down.index(e["block"])}
                         for i, e in enumerate(events)])


# --------------------------------------------------------------------------- 06_unfreezing: across runs
def setting_of(params: dict[str, Any]) -> str:
    """A run's training setting: its schedule, ``+ada<r>`` with task adapters (e.g. ``gu+ada16``)."""
    return str(params.get("unfreeze", "none")) + (f"+ada{params['adapters']}" if params.get("adapters") else "")


def find_schedule_runs(runs_root: str | Path | None, task: str) -> pd.DataFrame:
    """Finished runs of ``task`` (:func:`ofa_lib.crossrun.find_runs`, unchecked: settings differ) with
    ``setting``, ``schedule``, ``every`` and ``adapters`` columns."""
    import json

    from .crossrun import find_runs

    runs = find_runs(runs_root, task, check=False)
    if runs.empty:
        raise FileNotFoundError(f"no finished {task} runs under {runs_root}")
    params = [json.loads((Path(p) / "manifest.json").read_text())["params"] for p in runs["path"]]
    return runs.assign(setting=[setting_of(p) for p in params], schedule=[p.get("unfreeze", "none") for p in params],
                       every=[p.get("unfreeze_every") for p in params], adapters=[p.get("adapters", 0) for p in params])


def load_fisher(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's ``fisher.parquet`` with its setting, lr, batch size and seed (empty if none has one)."""
    frames = [pd.read_parquet(Path(r.path) / "fisher.parquet").assign(setting=r.setting, lr=r.lr, batch_size=r.batch_size,
                                                                      seed=r.seed)
              for r in runs.itertuples() if (Path(r.path) / "fisher.parquet").is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_events(runs: pd.DataFrame) -> pd.DataFrame:
    """The unfreezing events every scheduled run applied (:func:`schedule_table` + run and setting)."""
    import json

    frames = []
    for r in runs.itertuples():
        unf = json.loads((Path(r.path) / "manifest.json").read_text()).get("unfreezing")
        if unf and unf["events"]:
            frames.append(schedule_table(unf["events"], unf["blocks"]).assign(run_id=r.run_id, setting=r.setting,
                                                                              n_blocks=len(unf["blocks"])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _pm(mean: pd.Series, std: pd.Series) -> pd.Series:
    return mean.map("{:.1f}".format) + " ± " + std.map(lambda x: "–" if pd.isna(x) else f"{x:.1f}")


def transfer_table(runs: pd.DataFrame, variant: str = "last") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paper Table 2 for our runs: per setting English (source dev), the lowest target language (lowest
    mean over all runs, the same language for every setting) and the target average, ×100, mean ± std
    over runs. Returns ``(per-run numbers, the formatted table)``."""
    from .config import TrainConfig
    from .metrics import PRIMARY_METRIC

    per_run = []
    for r in runs.itertuples():
        import json

        cfg = TrainConfig(**json.loads((Path(r.path) / "manifest.json").read_text())["params"])
        m = pd.read_parquet(Path(r.path) / "metrics.parquet")
        m = m[(m.kind == "variant") & (m.name == variant) & (m.metric == PRIMARY_METRIC[cfg.task])]
        src = cfg.dev_sets()[0]
        en = m[(m.dataset == src[0]) & (m.lang == src[1]) & (m.split == src[2])].value
        row = {"run_id": r.run_id, "setting": r.setting, "lr": r.lr, "batch_size": r.batch_size, "seed": r.seed,
               "en": float(en.iloc[0]) * 100 if len(en) else float("nan")}
        for d, lang, split in cfg.test_sets():
            v = m[(m.dataset == d) & (m.lang == lang) & (m.split == split)].value
            row[f"{d}/{lang}"] = float(v.iloc[0]) * 100
        per_run.append(row)
    per_run = pd.DataFrame(per_run)
    langs = [c for c in per_run.columns if "/" in c]
    per_run["average"] = per_run[langs].mean(axis=1)
    lowest = per_run[langs].mean().idxmin()
    cols = {"en": "English", lowest: f"lowest ({lowest})", "average": "average"}
    g = per_run.groupby("setting", sort=False)
    table = pd.DataFrame({label: _pm(g[c].mean(), g[c].std(ddof=1)) for c, label in cols.items()})
    table["runs"] = g.size()
    return per_run, table


def averaging_by_setting(runs: pd.DataFrame, out_dir: str | Path, *, variants: list[str], r_max: int, n_samplings: int,
                         device: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Max. SRC-DEV vs accumulative averaging by r (paper Table 1 rows), separately per setting.

    Each setting with runs of at least two (lr, batch) configurations gets its own results store
    ``<out_dir>/results_<setting>.parquet`` (runs of different settings are never averaged together);
    averaging itself is :func:`ofa_lib.crossrun.average_runs`. Returns :func:`ofa_lib.selection.table1` + ``setting``."""
    from . import crossrun, results, selection

    frames = []
    for setting, group in runs.groupby("setting", sort=False):
        n_cfg = len(group[["lr", "batch_size"]].drop_duplicates())
        if n_cfg < 2:
            print(f"{setting}: {n_cfg} (lr, batch) configuration: nothing to average")
            continue
        path = Path(out_dir) / f"results_{setting}.parquet"
        if path.exists():  # rows of runs that are gone (an edited grid), and the averages they were members of
            stored = results.read(path)
            results.drop_runs(path, set(stored.loc[stored.kind.isin(["snapshot", "variant"]), "run_id"]) - set(group.run_id))
        cols = [c for c in crossrun.RUN_COLUMNS if c in group.columns]
        results.append(path, crossrun.collect_run_metrics(group[cols]))
        crossrun.average_runs(group[cols], variants=variants, r_max=r_max, samplings=range(n_samplings), soup_k=None,
                              results_path=path, device=device, progress=progress)
        task = group.task.iloc[0]
        data = selection.CrossRunData.from_tidy(results.read(path), task, n_samplings=n_samplings, r_max=r_max)
        frames.append(selection.table1(selection.per_sampling(data, "all")).assign(setting=setting))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def averaging_answer(t1: pd.DataFrame, variant: str = "last", reference: str = "none") -> str:
    """The answer to "does averaging runs of setting X beat averaging standard runs?", in one paragraph with
    numbers: per setting, accumulative averaging and Max. SRC-DEV at the setting's largest r, each setting's
    averaging compared with the ``reference`` setting's (at the largest r both reach)."""
    d = t1[t1.variant == variant]
    if d.empty:
        return f"No setting could be averaged on the {variant} weights (each needs two (lr, batch) configurations)."
    parts = []
    for setting, g in d.groupby("setting", sort=False):
        at_max = g[g.r == g.r.max()].set_index("selection")
        avg, src = at_max.loc["acc_avg"], at_max.loc["max_src_dev"]
        parts.append(f"**{setting}** at r = {int(avg['r'])}: averaging {avg['mean']:.1f} ± {np.nan_to_num(avg['std']):.1f} "
                     f"vs Max SRC-DEV {src['mean']:.1f} ± {np.nan_to_num(src['std']):.1f}")
    text = f"On the {variant} weights (target test mean ×100, mean ± std over samplings): " + "; ".join(parts) + "."
    if reference in set(d.setting):
        for setting in [s for s in d.setting.unique() if s != reference]:
            r = min(d[d.setting == setting].r.max(), d[d.setting == reference].r.max())
            at = d[(d.r == r) & (d.selection == "acc_avg")].set_index("setting")["mean"]
            diff = at[setting] - at[reference]
            text += (f" Averaging {setting} runs {'beats' if diff > 0 else 'does not beat'} averaging {reference} runs "
                     f"at r = {int(r)} ({diff:+.1f} points).")
    return text


def _colors(settings: list[str]) -> dict[str, Any]:
    from .report import _plt

    cmap = _plt().get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(settings)}


def fig_fisher_curves(fisher: pd.DataFrame):
    """tr(F) over training per setting: the paper's per-trainable-block mean (left) and the total (right);
    one thin line per run, the mean over runs thick."""
    from .report import _plt

    plt = _plt()
    curves = fisher_curve(fisher).merge(fisher[["run_id", "setting"]].drop_duplicates(), on="run_id")
    colors = _colors(sorted(curves.setting.unique()))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, col, title in zip(axes, ("mean_trainable", "total"),
                              ("tr(F) per trainable block (paper's Fig. 3)", "tr(F) summed over all blocks")):
        for setting, d in curves.groupby("setting"):
            for _, run in d.groupby("run_id"):
                ax.plot(run.step, run[col], color=colors[setting], alpha=0.3, lw=0.8)
            mean = d.groupby("step")[col].mean()
            ax.plot(mean.index, mean.values, color=colors[setting], lw=2, label=setting)
        ax.set(title=title, xlabel="step", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_schedule_order(events: pd.DataFrame):
    """Which block each event unfroze (depth from the top, 0 = top) against its position: GU is the
    diagonal, FUN's choices are dots (the paper's Fig. 5); one panel, jittered per setting."""
    from .report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    n = int(events.n_blocks.max())
    ax.plot([0, n - 1], [0, n - 1], color="grey", lw=1, ls="--", label="top-down (GU)")
    settings = sorted(events.setting.unique())
    colors = _colors(settings)
    for i, setting in enumerate(settings):
        d = events[events.setting == setting]
        mean = d.groupby("position").depth_from_top.mean()
        ax.scatter(d.position + (i - len(settings) / 2) * 0.08, d.depth_from_top, s=14, alpha=0.6, color=colors[setting])
        ax.plot(mean.index, mean.values, color=colors[setting], lw=1.5, label=f"{setting} (mean)")
    ax.set(xlabel="unfreezing event", ylabel="block unfrozen (depth from the top)", title="Unfreezing order")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_averaging(t1: pd.DataFrame, variant: str = "last"):
    """Target score vs r per setting: accumulative averaging (solid) and Max. SRC-DEV (dashed), mean ± std."""
    from .report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    d = t1[t1.variant == variant]
    colors = _colors(sorted(d.setting.unique()))
    for (setting, sel), g in d.groupby(["setting", "selection"]):
        ls = "-" if sel == "acc_avg" else "--"
        ax.plot(g.r, g["mean"], ls=ls, color=colors[setting], marker="o", ms=3, label=f"{setting}: {sel}")
        ax.fill_between(g.r, g["mean"] - g["std"].fillna(0), g["mean"] + g["std"].fillna(0), color=colors[setting], alpha=0.1)
    ax.set(xlabel="r (runs)", ylabel="target test score (×100)", title=f"Averaging across runs ({variant})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
