# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
# Parameters
task = "sib"                 # nli | ner | qa | sib
runs_root = None             # the runs (a grid's outputs/runs/<name>); default outputs/runs
report_name = "unfreezing"
output_dir = None            # default outputs/reports/<report_name>
variant = "last"             # the variant of each run in the transfer table
average_variants = ["last", "ca"]  # accumulative averaging per setting (0 settings: skipped)
r_max = 4                    # capped at the number of (lr, batch) configurations per setting
n_samplings = 3
device = None                # auto: cuda for the paper preset (fails without it), else cuda if available, else cpu
threads = None               # torch CPU threads


# %% [markdown]
# # 06 · Scheduled unfreezing and the trace of the Fisher information
#
# Runs trained with `unfreeze` = `none` (standard), `lpft`, `gu` (top-down, one block every k steps), `gu_reverse`, `random` or `fun` (next: the still-frozen block with the largest tr(F)), over the layers of a fully fine-tuned model or over bottleneck task adapters (`adapters` = 16). A *setting* is a schedule, `+ada16` with adapters. This notebook shows (1) tr(F) over training per setting (the paper's "hill"), (2) the order FUN chose against GU's top-down diagonal, (3) transfer per setting like the paper's Table 2 (mean ± std over runs), and (4) whether accumulative averaging of runs of one setting beats averaging runs of another (e.g. GU vs standard), which neither paper measured.
#
# Run headless: `papermill notebooks/06_unfreezing.ipynb out.ipynb -p runs_root outputs/runs/demo_unfreezing`, or as the pipeline of `python -m ofa_lib.grid run params/grids/demo_unfreezing.yaml`.

# %%
from ofa_lib.grid import notebook_params

notebook_params.check(globals(), "06_unfreezing")  # unknown parameters and wrong types: refused here
from pathlib import Path

import torch
from IPython.display import Markdown, display

from ofa_lib.analysis import plots, report, unfreezing_report

if threads:
    torch.set_num_threads(int(threads))
out = Path(output_dir) if output_dir else report.report_dir(report_name)
out.mkdir(parents=True, exist_ok=True)
runs = unfreezing_report.find_schedule_runs(runs_root, task)
runs.groupby("setting")[["lr", "batch_size", "seed", "every"]].agg(lambda x: sorted(set(x)))

# %% [markdown]
# ## tr(F) during training
#
# Every `fisher_every` steps, tr(F) = E_x E_{y~p(y|x)} ‖∇ log p(y|x)‖² per block on `fisher_batches` fixed training batches (labels drawn from the model; `fisher.parquet` of each run). Left: summed over the trainable blocks and divided by their number, as the paper plots it (undefined before the first block is unfrozen); right: summed over all blocks, trainable or not.

# %%
fisher = unfreezing_report.load_fisher(runs)
if len(fisher):
    curves = unfreezing_report.fisher_curve(fisher).merge(runs[["run_id", "setting"]], on="run_id")
    report.write_csv(curves, out / "fisher_curves.csv")
    display(plots.save_figure(plots.fig_fisher_curves(fisher), out, "fisher_curves"))
    display(curves.groupby("setting").agg(peak=("mean_trainable", "max"),
                                            peak_step=("mean_trainable", lambda s: curves.step[s.idxmax()]),
                                            final=("total", "last")))
else:
    print("no run recorded tr(F) (train with fisher_every > 0)")

# %% [markdown]
# ## The order of unfreezing
#
# Each event's block as its depth from the top (0 = the top layer) against the event's position; GU is the dashed diagonal. Where FUN's dots follow it, FUN recovered the top-down schedule (the paper's Fig. 5).

# %%
events = unfreezing_report.load_events(runs)
if len(events):
    report.write_csv(events, out / "unfreezing_events.csv")
    display(plots.save_figure(plots.fig_schedule_order(events), out, "unfreezing_order"))
    display(events.pivot_table(index="setting", columns="position", values="depth_from_top", aggfunc="mean").round(1))
else:
    print("no scheduled run")

# %% [markdown]
# ## Transfer per setting (the paper's Table 2)
#
# Primary metric ×100 of each run's `variant`: English (source dev; the runs score no English test), the target language that is lowest on average over all runs, and the mean over target languages; mean ± std over the runs of a setting (their seeds and learning rates).

# %%
per_run, table2 = unfreezing_report.transfer_table(runs, variant)
report.write_csv(per_run, out / "transfer_per_run.csv")
report.write_csv(table2.reset_index(), out / "transfer_table.csv")
table2

# %% [markdown]
# ## Averaging across runs, per setting
#
# Within each setting with at least two (lr, batch) configurations: Max. SRC-DEV against accumulative averaging of the first r sampled runs (`crossrun.average_runs`, one results store per setting in the output directory), target test mean ×100, mean ± std over samplings. Does averaging GU runs beat averaging standard runs?

# %%
t1 = unfreezing_report.averaging_by_setting(runs, out, variants=list(average_variants), r_max=r_max,
                                     n_samplings=n_samplings, device=device)
if len(t1):
    report.write_csv(t1, out / "averaging_by_setting.csv")
    display(plots.save_figure(plots.fig_averaging(t1, average_variants[0]), out, "averaging_by_setting"))
    display(t1.assign(cell=t1["mean"].map("{:.1f}".format) + " ± " + t1["std"].map("{:.1f}".format))
              .pivot_table(index=["setting", "r"], columns=["selection", "variant"], values="cell", aggfunc="first"))
    display(Markdown(unfreezing_report.averaging_answer(t1, average_variants[0])))
else:
    print("no setting has two (lr, batch) configurations: nothing to average")

# %% [markdown]
# Tables (CSV) and figures (PNG, SVG) are in the output directory.

# %%
print(out)
