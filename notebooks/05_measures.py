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
runs_root = None             # default outputs/runs
results_path = None          # the results store 03_average wrote (runs' rows + averages); None: outputs/results/<task>.parquet,
                             # or only the runs' own rows when that file does not exist
report_name = "measures"     # → outputs/reports/<report_name>/ unless output_dir is given
output_dir = None
description = ""             # shown at the top (grids pass theirs)
measures = ["margin_src", "margin_trg", "sharpness_jiang", "sharpness_diff", "frobenius", "fisher_trace"]
variants = ["last", "src_dev", "ca", "trg_dev"]  # checkpoints measured (and correlated) per run
n_examples = None            # examples per measure data set; None: the runs' measure_examples
measure_options = {}         # per measure keyword arguments, e.g. {"sharpness_jiang": {"alpha": 5e-4, "steps": 3}}
n_bootstrap = 1000           # bootstrap resamples for the rank-correlation intervals
seed = 0                     # bootstrap seed
sampling_seeds = "all"       # samplings used by the selection table ("all", "authors" or a list)
n_samplings = 10             # samplings drawn when the results store has no averages
r_max = 10
flat_variant = "ca"          # whose weights are averaged for the flatness question
flat_samplings = 3           # how many samplings' averages are measured (0: skip)
device = None                # auto: cuda for the paper preset (fails without it), else cuda if available, else cpu
threads = None               # torch CPU threads


# %% [markdown]
# # 05 · Generalization measures: do label-free signals pick models as well as averaging?
#
# For every run of a pool and each of its kept checkpoints (LAST, SRC-DEV, CA, TRG-DEV) this notebook takes the generalization measures of `ofa_lib.train.measures` — margin on English dev (labels), label-free margin (top-1 − top-2 probability) on unlabelled target-language dev text, Jiang et al.'s worst-case sharpness in a relative box, the difference-based sharpness at random nearby points, the Frobenius distance of the encoder from its pretrained weights and tr(F) — from the runs' `measures.parquet` where training recorded them, else computed on the stored checkpoints. It then asks (1) how well each measure ranks checkpoints by target-language test score (Spearman ρ, Kendall τ, bootstrap 95% intervals), (2) how selecting one run by a measure compares with Max SRC-DEV, Max TRG-DEV (an oracle: it sees target labels) and accumulative averaging in the Table-1 layout, and (3) whether averaged weights are flatter than the runs they average.
#
# Run headless: `papermill notebooks/05_measures.ipynb out.ipynb -p task sib -p runs_root outputs/runs/<grid>`; in a grid: a `pipeline` step after `03_average.ipynb`.

# %%
from ofa_lib.grid import notebook_params

notebook_params.check(globals(), "05_measures")  # unknown parameters and wrong types: refused here
import warnings
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Markdown, display

from ofa_lib import results
from ofa_lib.analysis import label_free, plots, report
from ofa_lib.merge import pool
from ofa_lib.results import selection
from ofa_lib.train import measures as M
from ofa_lib.train import runs as runs_lib

if threads:
    torch.set_num_threads(int(threads))
M.check_supported(task, measures)  # fails here, naming the measure, before any work
out = Path(output_dir) if output_dir else report.report_dir(report_name)
out.mkdir(parents=True, exist_ok=True)
runs = label_free.find_runs(runs_root, task)  # same data, head and vocabulary; optimizers may differ
results_path = Path(results_path) if results_path else pool.default_results_path(task)
own = pool.collect_run_metrics(runs)
tidy = results.read(results_path) if results_path.is_file() else own
tidy = tidy[~tidy["kind"].isin(["snapshot", "variant"]) | tidy["run_id"].isin(runs["run_id"])]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    data = selection.CrossRunData.from_tidy(pd.concat([tidy[~tidy["kind"].isin(["snapshot", "variant"])], own]),
                                            task, n_samplings=n_samplings, r_max=r_max)
if description:
    display(Markdown(description))
runs.drop(columns=["path"]).set_index("run_id")

# %% [markdown]
# ## The measures of every checkpoint
#
# `source`: *recorded* during training (at the snapshot the variant was taken from; CA measured at the end) or *computed* here on the stored checkpoint (fp32, the same batches for every run). Seconds per value are wall-clock on this machine.

# %%
rows = label_free.measure_table(runs, measures, variants=variants, n_examples=n_examples, options=measure_options,
                                cache_path=out / "measures_computed.parquet", device=device)
report.write_csv(rows, out / "measures.csv")
frame = label_free.variant_frame(rows, data.run_table, runs)
report.write_csv(frame, out / "checkpoints.csv")
display(rows.groupby(["measure", "source"])["seconds"].agg(["count", "mean"]).round(2))
frame.round(4)

# %% [markdown]
# ## Does the measure rank checkpoints like the target-language test score?
#
# One point per (run, variant); Spearman ρ and Kendall τ with percentile-bootstrap 95% intervals. `expected_sign`: +1 where a larger value should go with better transfer (margins), −1 where smaller should (sharpness, distance, tr(F)). With few runs the intervals are wide: read them before the point estimates.

# %%
corr = label_free.rank_correlations(frame, measures, "test", n_bootstrap=n_bootstrap, seed=seed)
report.write_csv(corr, out / "rank_correlations.csv")
display(corr.round(3))
plots.save_figure(plots.fig_correlations(frame, measures), out, "measures_vs_test")

# %% [markdown]
# ### Per snapshot (measures recorded during training) against the mean target **dev** score
#
# Snapshots are only scored on dev sets, so this is the dev score; empty when no run recorded measures.

# %%
snaps = label_free.snapshot_frame(rows, own, runs)
if len(snaps):
    snap_corr = label_free.rank_correlations(snaps, measures, "dev_trg", n_bootstrap=n_bootstrap, seed=seed)
    report.write_csv(snaps, out / "snapshots.csv")
    report.write_csv(snap_corr, out / "rank_correlations_snapshots.csv")
    display(snap_corr.round(3))
else:
    print("no measures recorded at snapshots (train with measures=[...] to get them)")

# %% [markdown]
# ## By optimizer: test score (×100) and measures, mean over runs

# %%
cols = [c for c in ["test", *measures] if c in frame.columns]
by_opt = frame.assign(test=frame["test"] * 100).groupby(["optimizer", "variant"])[cols].mean()
report.write_csv(by_opt.reset_index(), out / "by_optimizer.csv")
by_opt.round(4)

# %% [markdown]
# ## Selecting one run by a measure (Table-1 layout)
#
# For each sampling and r the candidates are the same first r runs that Max SRC-DEV and accumulative averaging see (the averages' members when `03_average` wrote them, else `selection.sample_runs`). Test score ×100, mean ± std over samplings; Max TRG-DEV reports the TRG-DEV variant (an oracle), acc_avg the measured accumulative averages.

# %%
ps = label_free.per_sampling_measures(data, frame, sampling_seeds)
table = label_free.selection_table(ps)
report.write_csv(table, out / "selection_table.csv")
display(label_free.wide_selection(table))
plots.save_figure(plots.fig_selection(table, "ca" if "ca" in variants else variants[0]), out, "selection_vs_r")

# %% [markdown]
# ## Which label-free selection comes closest to Max TRG-DEV?

# %%
close = label_free.closest_to_trg_dev(ps)
report.write_csv(close, out / "closest_to_trg_dev.csv")
display(Markdown(label_free.closest_sentence(close, ps)))
close

# %% [markdown]
# ## Are averaged weights flatter than the runs they average?
#
# The uniform average of the `flat_variant` weights of the r candidate runs of a sampling, measured like a run; `flatter`: its sharpness is below every member's.

# %%
sharp = [m for m in measures if m.startswith("sharpness")]
if flat_samplings and sharp and len(runs) > 1:
    first = runs_lib.run_config(runs["path"].iloc[0])
    sk = label_free.Skeleton(first, n_examples or int(first.measure_examples), device)
    flat = label_free.averaged_flatness(runs, data, frame, sk, variant=flat_variant,
                                        samplings=data.sampling_seeds[:flat_samplings], names=sharp, options=measure_options)
    report.write_csv(flat, out / "averaged_flatness.csv")
    display(Markdown(f"Averages flatter than every member: {int(flat['flatter'].sum())} of {len(flat)} "
                     f"(sampling × measure); mean average / mean member sharpness: "
                     + ", ".join(f"{m}: {g['average'].mean():.4g} / {g['members_mean'].mean():.4g}" for m, g in flat.groupby('measure'))))
    display(flat.drop(columns=["members"]).round(5))
else:
    print("skipped (flat_samplings=0, no sharpness measure, or a single run)")

# %% [markdown]
# Tables (CSV) and figures (PNG, SVG) are in the output directory.

# %%
print(out)
