"""Every figure of the study: the house style (:func:`pyplot`), :func:`save_figure`, and one function
per figure, grouped by the notebook that shows it (01 data, 02 training, 04 analysis, 05 measures,
06 unfreezing, the CA diagnosis). Figure functions take tidy frames and return a matplotlib figure;
the numbers come from the analysis modules, never from here.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import pandas as pd

from ofa_lib import results as R
from ofa_lib.analysis import unfreezing_report
from ofa_lib.analysis.report import SELECTION_LABEL, TASK_LABEL, VARIANT_LABEL
from ofa_lib.io import atomic_path
from ofa_lib.results import selection as S
from ofa_lib.train import runs

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# ---------------------------------------------------------------- the house style
def pyplot() -> Any:
    """matplotlib.pyplot with the house style (Agg backend outside notebooks, reproducible SVGs)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "ofa", "figure.dpi": 100, "font.size": 9})
    return plt


@contextlib.contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    """numpy's global RNG seeded for the block and restored after it: figures that jitter are byte-reproducible."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def save_figure(fig: "Figure", out_dir: str | os.PathLike, stem: str, dpi: int = 110) -> Any:
    """Write ``<stem>.png`` and ``<stem>.svg`` atomically, close the figure and return an
    ``IPython.display.Image`` of the PNG (so the notebook shows exactly what was saved)."""
    plt = pyplot()
    out_dir = Path(out_dir)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    png = buf.getvalue()
    with atomic_path(out_dir / f"{stem}.png") as tmp:
        tmp.write_bytes(png)
    with atomic_path(out_dir / f"{stem}.svg") as tmp:
        fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    try:
        from IPython.display import Image
    except ImportError:  # pragma: no cover
        return png
    return Image(data=png, format="png")


# ---------------------------------------------------------------- 01 data
def _dataset_colors(dsets: list[str]) -> list:
    plt = pyplot()
    palette = plt.get_cmap("tab10")
    index = {d: i for i, d in enumerate(dict.fromkeys(dsets))}
    return [palette(index[d] % 10) for d in dsets]


def _length_groups(lengths: pd.DataFrame) -> tuple[list[str], list[pd.DataFrame], list[str]]:
    groups = list(lengths.groupby(["dataset", "lang"], sort=False))
    labels = [f"{d} · {lang}" for (d, lang), _ in groups]
    dsets = [d for (d, _), _ in groups]
    return labels, [g for _, g in groups], dsets


def plot_lengths(lengths: pd.DataFrame, max_length: int, title: str = "") -> "Figure":
    """Horizontal box plot of tokens per example, one box per (dataset, language), all
    sampled splits pooled; the dashed line is ``max_length``."""
    plt = pyplot()
    labels, groups, dsets = _length_groups(lengths)
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.24 * len(labels)))
    parts = ax.boxplot([g["tokens"].to_numpy() for g in groups], vert=False, patch_artist=True, widths=0.6,
                       flierprops=dict(marker=".", markersize=2, alpha=0.4), medianprops=dict(color="black"))
    for box, color in zip(parts["boxes"], _dataset_colors(dsets)):
        box.set_facecolor(color)
        box.set_alpha(0.6)
    ax.set_yticks(range(1, len(labels) + 1), labels)
    ax.invert_yaxis()
    ax.axvline(max_length, color="crimson", ls="--", lw=1)
    ax.text(max_length, 0.01, f" max_length={max_length}", color="crimson", va="bottom", fontsize=8,
            transform=ax.get_xaxis_transform())
    ax.set_xlabel("tokens per example (special tokens included, no truncation)")
    ax.set_title(title or "Token lengths per language")
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_truncation(lengths: pd.DataFrame, max_length: int, qa: bool = False, title: str = "") -> "Figure":
    """Bar per (dataset, language): % of sampled examples longer than ``max_length``
    (QA: % of questions cut into more than one window)."""
    plt = pyplot()
    labels, groups, dsets = _length_groups(lengths)
    shares = [100 * g["truncated"].mean() for g in groups]
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.24 * len(labels)))
    y = np.arange(len(labels))
    ax.barh(y, shares, color=_dataset_colors(dsets), alpha=0.75)
    for yi, s in zip(y, shares):
        ax.text(s, yi, f" {s:.1f}%" if s >= 1 or s == 0 else f" {s:.2f}%", va="center", fontsize=7)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, max(5.0, max(shares) * 1.18 if shares else 5.0))
    what = "questions needing more than one window" if qa else f"examples longer than {max_length} tokens"
    ax.set_xlabel(f"% of {what}")
    ax.set_title(title or ("Windows" if qa else "Truncation") + f" at max_length={max_length}")
    ax.grid(axis="x", alpha=0.3)
    return fig


# ---------------------------------------------------------------- 02 one run
def plot_training(run: runs.Run) -> "Figure":
    """Training loss (left) and snapshot dev scores (right)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    if not run.train_log.empty:
        log = run.train_log
        ax1.plot(log.step, log.loss, alpha=0.35, lw=0.8, label="loss")
        ax1.plot(log.step, log.loss.rolling(max(1, len(log) // 20), min_periods=1).mean(), lw=1.8, label="smoothed")
        ax1.set(xlabel="step", ylabel="training loss", title="training loss")
        ax1.legend()
    curves = runs.snapshot_curves(run)
    if not curves.empty:
        (curves * 100).plot(ax=ax2, marker="o")
        ax2.set(xlabel="step", ylabel=f"{run.primary} ×100", title="snapshots on dev")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 04 analysis
def fig_score_vs_r(t1: pd.DataFrame, t2: pd.DataFrame) -> "Figure":
    """Rows: tasks; columns: variants. Max. SRC-DEV vs accumulative averaging (mean +- std
    band over samplings) against r, with Max. TRG-DEV and SOUP (top-5) dashed."""
    plt = pyplot()
    tasks = list(dict.fromkeys(t1["task"]))
    variants = list(S.TABLE1_VARIANTS)
    fig, axes = plt.subplots(len(tasks), len(variants), figsize=(3.6 * len(variants), 2.7 * len(tasks)),
                             squeeze=False, sharex=True)
    styles = {
        ("max_src_dev", None): dict(color="#d95f02", marker="o", label="Max. SRC-DEV"),
        ("acc_avg", None): dict(color="#1b9e77", marker="s", label="Acc. averaging"),
        ("max_trg_dev", "t2"): dict(color="#7570b3", ls="--", label="Max. TRG-DEV (oracle)"),
        ("soup", "t2"): dict(color="#666666", ls=":", label="SOUP (top-5)"),
    }
    for i, task in enumerate(tasks):
        for j, v in enumerate(variants):
            ax = axes[i, j]
            for (method, src), st in styles.items():
                if src is None:
                    d = t1[(t1["task"] == task) & (t1["selection"] == method) & (t1["variant"] == v)]
                else:
                    d = t2[(t2["task"] == task) & (t2["method"] == method)]
                if d.empty:
                    continue
                d = d.sort_values("r")
                ax.plot(d["r"], d["mean"], lw=1.5, ms=3.5, **st)
                sd = d["std"].fillna(0)
                ax.fill_between(d["r"], d["mean"] - sd, d["mean"] + sd, color=st["color"],
                                alpha=0.15 if src is None else 0.07, lw=0)
            ax.set_title(f"{TASK_LABEL.get(task, task)} – {VARIANT_LABEL[v]}")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("target test score (×100)")
            if i == len(tasks) - 1:
                ax.set_xlabel("r (runs)")
            ax.set_xticks(range(1, int(t1["r"].max()) + 1))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def fig_spread(per_sampling: pd.DataFrame, variants: Sequence[str] = S.TABLE1_VARIANTS) -> "Figure":
    """Box + strip plot of the per-sampling scores by r, Max. SRC-DEV vs averaging."""
    plt = pyplot()
    import seaborn as sns

    ps = per_sampling[per_sampling["method"].isin(["max_src_dev", "acc_avg"])
                      & per_sampling["variant"].isin(variants)].copy()
    ps["score100"] = ps["score"] * 100
    ps["method"] = ps["method"].map(SELECTION_LABEL)
    tasks = list(dict.fromkeys(ps["task"]))
    fig, axes = plt.subplots(len(tasks), len(variants), figsize=(3.6 * len(variants), 2.7 * len(tasks)),
                             squeeze=False)
    palette = {SELECTION_LABEL["max_src_dev"]: "#d95f02", SELECTION_LABEL["acc_avg"]: "#1b9e77"}
    hue_order = [SELECTION_LABEL["max_src_dev"], SELECTION_LABEL["acc_avg"]]
    for i, task in enumerate(tasks):
        for j, v in enumerate(variants):
            ax = axes[i, j]
            d = ps[(ps["task"] == task) & (ps["variant"] == v)]
            sns.boxplot(data=d, x="r", y="score100", hue="method", hue_order=hue_order,
                        palette=palette, ax=ax, fliersize=0, linewidth=0.7, legend=False,
                        boxprops=dict(alpha=0.5))
            with _seeded_numpy(i * len(variants) + j):  # seaborn jitters with numpy's global RNG
                sns.stripplot(data=d, x="r", y="score100", hue="method", hue_order=hue_order,
                              palette=palette, ax=ax, dodge=True, size=2.2, jitter=0.15,
                              legend=(i == 0 and j == 0))
            ax.set_title(f"{TASK_LABEL.get(task, task)} – {VARIANT_LABEL[v]}")
            ax.set_xlabel("r (runs)" if i == len(tasks) - 1 else "")
            ax.set_ylabel("score (×100)" if j == 0 else "")
            ax.grid(alpha=0.3, axis="y")
    leg = axes[0, 0].get_legend()
    if leg is not None:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        leg.remove()
        fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False,
                   bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def fig_language_gain(gain: pd.DataFrame, r: int = 10) -> "Figure":
    """Heatmap per task: variants x target languages, gain of averaging over Max. SRC-DEV."""
    plt = pyplot()
    import seaborn as sns

    tasks = list(dict.fromkeys(gain["task"]))
    if not tasks:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no per-language average scores", ha="center")
        return fig
    widths = [gain[gain["task"] == t][["dataset", "lang"]].drop_duplicates().shape[0] for t in tasks]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(8, 0.22 * max(widths) + 2), 1.9 * len(tasks) + 0.6),
                             squeeze=False)
    for i, task in enumerate(tasks):
        d = gain[gain["task"] == task].copy()
        lim = max(float(np.nanmax(np.abs(d["gain"]))), 0.1)
        d["label"] = d["dataset"] + ":" + d["lang"]
        m = d.pivot(index="variant", columns="label", values="gain")
        m = m.reindex([v for v in S.TABLE1_VARIANTS if v in m.index])
        m.index = [VARIANT_LABEL[v] for v in m.index]
        ax = axes[i, 0]
        annot = m.shape[1] <= 30
        sns.heatmap(m, ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim, linewidths=0.3,
                    annot=annot, fmt=".1f", annot_kws={"size": 6},
                    cbar_kws={"label": "Δ (×100)", "pad": 0.01})
        ax.set_title(f"{TASK_LABEL.get(task, task)}: accumulative averaging − Max. SRC-DEV at r={r}"
                     " (mean over samplings; blue = averaging better)")
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", labelsize=7, rotation=90)
        ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return fig


def fig_table3(t3: pd.DataFrame) -> "Figure":
    """Heatmaps of Table 3: lr x batch size, one row per task, one column per variant."""
    plt = pyplot()
    import seaborn as sns

    tasks = list(dict.fromkeys(t3["task"]))
    variants = [v for v in R.VARIANTS if v in set(t3["variant"])]
    fig, axes = plt.subplots(len(tasks), len(variants), figsize=(2.9 * len(variants), 2.8 * len(tasks)),
                             squeeze=False)
    for i, task in enumerate(tasks):
        d = t3[t3["task"] == task]
        vmin, vmax = float(d["mean"].min()), float(d["mean"].max())
        for j, v in enumerate(variants):
            ax = axes[i, j]
            m = d[d["variant"] == v].pivot(index="lr", columns="batch_size", values="mean")
            m.index = [f"{x:.1e}" for x in m.index]
            sns.heatmap(m, ax=ax, annot=True, fmt=".1f", cmap="viridis", vmin=vmin, vmax=vmax,
                        cbar=(j == len(variants) - 1), annot_kws={"size": 7})
            ax.set_title(f"{TASK_LABEL.get(task, task)} – {VARIANT_LABEL[v]}")
            ax.set_xlabel("batch size" if i == len(tasks) - 1 else "")
            ax.set_ylabel("learning rate" if j == 0 else "")
            ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return fig


def fig_merge_methods(mt: pd.DataFrame) -> "Figure":
    """Columns: variants (rows: tasks). Target test score against r per merge method (mean ± std
    band over samplings), with Max. SRC-DEV (dashed) and Max. TRG-DEV (dotted)."""
    plt = pyplot()
    tasks = list(dict.fromkeys(mt["task"]))
    variants = list(dict.fromkeys(mt["variant"]))
    fig, axes = plt.subplots(len(tasks), len(variants), figsize=(3.8 * len(variants), 2.9 * len(tasks)),
                             squeeze=False, sharex=True)
    methods = list(dict.fromkeys(mt["method"]))
    colours = plt.get_cmap("tab10")
    for i, task in enumerate(tasks):
        for j, v in enumerate(variants):
            ax = axes[i, j]
            for k, m in enumerate(methods):
                d = mt[(mt["task"] == task) & (mt["variant"] == v) & (mt["method"] == m)].sort_values("r")
                if d.empty:
                    continue
                st = {"max_src_dev": dict(color="#444444", ls="--", label="Max. SRC-DEV"),
                      "max_trg_dev": dict(color="#999999", ls=":", label="Max. TRG-DEV (oracle)")}.get(
                    m, dict(color=colours(k % 10), marker="o", ms=3, label=m))
                ax.plot(d["r"], d["mean"], lw=1.4, **st)
                sd = d["std"].fillna(0)
                if m not in ("max_src_dev", "max_trg_dev"):
                    ax.fill_between(d["r"], d["mean"] - sd, d["mean"] + sd, color=st["color"], alpha=0.1, lw=0)
            ax.set_title(f"{TASK_LABEL.get(task, task)} – {VARIANT_LABEL.get(v, v)}")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("target test score (×100)")
            if i == len(tasks) - 1:
                ax.set_xlabel("r (runs)")
            ax.set_xticks(range(1, int(mt["r"].max()) + 1))
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False, bbox_to_anchor=(0.5, -0.06))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


# ---------------------------------------------------------------- 05 measures
def fig_correlations(frame: pd.DataFrame, names: Sequence[str], target: str = "test") -> "Figure":
    """One scatter per measure: measure vs ``target`` ×100, a colour per variant, a marker per optimizer."""
    plt = pyplot()
    names = [n for n in names if n in frame.columns]
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.8), squeeze=False)
    markers = dict(zip(sorted(frame["optimizer"].unique()), "os^vD"))
    for ax, name in zip(axes[0], names):
        for (variant, opt), g in frame.groupby(["variant", "optimizer"]):
            ax.scatter(g[name], g[target] * 100, s=18, marker=markers[opt], label=f"{variant} · {opt}")
        ax.set_xlabel(name)
        ax.set_ylabel(f"{target} ×100")
    axes[0][0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def fig_selection(table: pd.DataFrame, variant: str = "ca") -> "Figure":
    """Mean test score (×100) against r for each selection on ``variant`` weights (Max TRG-DEV on trg_dev)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    t = table[(table["variant"] == variant) | (table["selection"] == "max_trg_dev")]
    for sel, g in t.groupby("selection", sort=False):
        style = "--" if sel in ("max_trg_dev", "acc_avg") else "-"
        ax.plot(g["r"], g["mean"], style, marker="o", ms=3, label=sel)
    ax.set_xlabel("r (runs available)")
    ax.set_ylabel("target test ×100")
    ax.set_title(f"selections on {variant} weights")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 06 unfreezing
def _setting_colors(settings: list[str]) -> dict[str, Any]:
    cmap = pyplot().get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(settings)}


def fig_fisher_curves(fisher: pd.DataFrame) -> "Figure":
    """tr(F) over training per setting: the paper's per-trainable-block mean (left) and the total (right);
    one thin line per run, the mean over runs thick."""
    plt = pyplot()
    curves = unfreezing_report.fisher_curve(fisher).merge(fisher[["run_id", "setting"]].drop_duplicates(), on="run_id")
    colors = _setting_colors(sorted(curves.setting.unique()))
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


def fig_schedule_order(events: pd.DataFrame) -> "Figure":
    """Which block each event unfroze (depth from the top, 0 = top) against its position: GU is the
    diagonal, FUN's choices are dots (the paper's Fig. 5); one panel, jittered per setting."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    n = int(events.n_blocks.max())
    ax.plot([0, n - 1], [0, n - 1], color="grey", lw=1, ls="--", label="top-down (GU)")
    settings = sorted(events.setting.unique())
    colors = _setting_colors(settings)
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


def fig_averaging(t1: pd.DataFrame, variant: str = "last") -> "Figure":
    """Target score vs r per setting: accumulative averaging (solid) and Max. SRC-DEV (dashed), mean ± std."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    d = t1[t1.variant == variant]
    colors = _setting_colors(sorted(d.setting.unique()))
    for (setting, sel), g in d.groupby(["setting", "selection"]):
        ls = "-" if sel == "acc_avg" else "--"
        ax.plot(g.r, g["mean"], ls=ls, color=colors[setting], marker="o", ms=3, label=f"{setting}: {sel}")
        ax.fill_between(g.r, g["mean"] - g["std"].fillna(0), g["mean"] + g["std"].fillna(0), color=colors[setting], alpha=0.1)
    ax.set(xlabel="r (runs)", ylabel="target test score (×100)", title=f"Averaging across runs ({variant})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the CA diagnosis
def fig_diagnosis(df: pd.DataFrame, findings: pd.DataFrame) -> "Figure":
    """Four panels: target test (solid) and English dev (dashed) along each interpolation; English dev per
    snapshot per run with θ₀; target test of CA without its first k snapshots, LAST dotted; distances from θ₀.
    ``df`` is :func:`ofa_lib.analysis.diagnose.diagnose`'s table, ``findings`` its ``run_findings``."""
    def _get(df, analysis, measure, subject=None):
        d = df[(df["analysis"] == analysis) & (df["measure"] == measure)]
        return d if subject is None else d[d["subject"] == subject]

    plt = pyplot()
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    colours = plt.get_cmap("tab10")
    for i, subject in enumerate(dict.fromkeys(_get(df, "interpolation", "trg_test")["subject"])):
        for measure, style in (("trg_test", "-"), ("en_dev", "--")):
            c = _get(df, "interpolation", measure, subject).assign(t=lambda d: d["x"].astype(float)).sort_values("t")
            ax[0].plot(c["t"], 100 * c["value"], style, color=colours(i), marker="o", ms=3,
                       label=subject if measure == "trg_test" else None)
    ax[0].set(xlabel="t in (1 − t)·A + t·B", ylabel="score ×100", title="interpolation (— target test, -- English dev)")
    ax[0].legend(fontsize=6)
    start = _get(df, "start", "en_dev")["value"]
    f = findings
    for i, rid in enumerate(f["run"]):
        s = _get(df, "snapshot", "en_dev", rid).assign(k=lambda d: d["x"].astype(int)).sort_values("k")
        ax[1].plot(s["k"], 100 * s["value"], marker="o", ms=3, color=colours(i), label=rid)
        d = _get(df, "ca_drop", "trg_test", rid).dropna(subset=["value"]).assign(k=lambda d: d["x"].astype(int)).sort_values("k")
        ax[2].plot(d["k"], 100 * d["value"], marker="o", ms=3, color=colours(i), label=rid)
        ax[2].axhline(100 * f.loc[i, "last_trg_test"], color=colours(i), ls=":", lw=1)
    if len(start):
        ax[1].axhline(100 * float(start.iloc[0]), color="grey", ls="--", lw=1, label="θ₀")
    ax[1].set(xlabel="snapshot", ylabel="English dev ×100", title="snapshots on English dev")
    ax[1].legend(fontsize=6)
    ax[2].set(xlabel="earliest snapshots dropped from CA (k)", ylabel="target test ×100",
              title="CA without snapshots 1..k (dotted: LAST)")
    x = np.arange(len(f))
    ax[3].bar(x - 0.2, f["l2_last"], 0.4, label="LAST")
    ax[3].bar(x + 0.2, f["l2_ca"], 0.4, label="CA")
    ax[3].set_xticks(x, f["run"], rotation=30, ha="right", fontsize=6)
    ax[3].set(ylabel="‖θ − θ₀‖₂", title="distance from the start weights")
    ax[3].legend(fontsize=6)
    fig.tight_layout()
    return fig
