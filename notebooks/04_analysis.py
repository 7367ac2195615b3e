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
# Parameters: papermill overrides them (see params/reproduce_paper.yaml).
# source: "released" (the authors' released results) or a tidy results parquet file or folder
source = "released"
model = "xlm-roberta-large"
tasks = ["nli", "tydiqa", "ner"]
# sampling_seeds: "authors" (all but seed 1, as the authors' script), "all", or a list of seeds
sampling_seeds = "authors"
# tables and figures go to <outputs_root>/<report_name>/
report_name = "paper"
# outputs_root: None means outputs/reports of the repository; a relative path starts in notebooks/
outputs_root = None
# data_dir: None means OFA_DATA_DIR or ../shared/data
data_dir = None
# r of the per-language gain heatmap
gain_r = 10
# description: a paragraph shown at the top of the report (e.g. what a demo grid scaled down)
description = None
# diagnosis: None, or a folder written by `python -m ofa_lib.analysis.diagnose RUN_A RUN_B ... --out FOLDER`
# (shown beside the score-vs-r figure; a relative path starts in notebooks/), or "auto": the report folder's
# diagnosis/ when one was written there (`make demo-diagnosis` does for the demo)
diagnosis = None


# %% [markdown]
# # One For All & All For One — cross-run analysis
#
# Reproduces the run-by-run analysis of *One For All & All For One: Bypassing Hyperparameter
# Tuning with Model Averaging for Cross-Lingual Transfer* (Schmidt et al., EMNLP Findings 2023,
# arXiv 2310.10532): for an ordered sample of runs with different (learning rate, batch size),
# does picking the run with the best **English dev** score (*Max. SRC-DEV*) transfer as well as
# **accumulatively averaging** the runs' weights? Scores are the flat mean over all target
# languages of the test sets (English excluded), ×100; mean ± std (ddof = 1) over samplings.
#
# Every number below is computed by `ofa_lib` from the results named in the parameters; nothing
# is typed by hand. Re-run with `make reproduce-paper` (or papermill with other parameters).

# %%
from ofa_lib.grid import notebook_params

notebook_params.check(globals(), "04_analysis")  # unknown parameters and wrong types: refused here
from IPython.display import Markdown, display

from ofa_lib.analysis import plots
from ofa_lib.analysis import report as rp

out_dir = rp.report_dir(report_name, outputs_root)
data = rp.load(source, tasks, model=model, data_dir=data_dir)
tables = rp.compute_tables(data, sampling_seeds)
written = rp.write_tables(tables, out_dir)
params = dict(source=source, model=model, tasks=tasks, sampling_seeds=sampling_seeds,
              report_name=report_name, outputs_root=outputs_root, data_dir=data_dir, gain_r=gain_r,
              diagnosis=diagnosis)
display(Markdown(rp.provenance_markdown(data, params, sampling_seeds, out_dir)))

# %%
if description:
    display(Markdown(f"**This analysis.** {description}"))

# %% [markdown]
# ## Headline
#
# The best single model that source-language validation can find, against the averaged models
# and the target-language oracle at the largest number of runs.

# %%
display(Markdown(rp.headline_markdown(tables["table1"], tables["table2"])))

# %% [markdown]
# ## Table 1 — Max. SRC-DEV vs accumulative averaging
#
# For each sampling (an ordered list of runs, one per distinct (lr, batch) configuration) and each
# r = 1…10: **Max. SRC-DEV** reports the test score of the run, among the first r, whose
# variant-v weights have the best English dev score (ties keep the earlier run); **accumulative
# averaging** reports the test score of the uniform average of the first r runs' variant-v weights.
# Variants: LAST (final snapshot), SRC-DEV (snapshot with best English dev), CA (average of the
# run's snapshots). Averaging cells are green when ≥ 0.2 above the best Max. SRC-DEV value of that
# task and variant (any r), yellow when within ±0.1 of it (`table1.csv`).

# %%
if rp.same_runs_note(tables["per_sampling"]):
    display(Markdown(rp.same_runs_note(tables["per_sampling"])))
rp.style_table1(tables["table1"])

# %% [markdown]
# ## Table 2 — oracle selection and model soups
#
# **Max. SRC-DEV** here uses the SRC-DEV variant (one checkpoint chosen by English dev);
# **Max. TRG-DEV** picks the run with the best mean target-language dev score and reports its
# TRG-DEV variant (per-language best snapshot) — an oracle that true zero-shot transfer may not
# use; **Acc. avg. (CA)** averages the runs' CA weights; **SOUP** averages the 5 snapshots with the
# best English dev among the first r runs (`table2.csv`).

# %%
rp.wide_table2(tables["table2"])

# %% [markdown]
# ## Accumulative averaging against Max. SRC-DEV, paired over samplings
#
# The tables above give mean ± std over samplings, as the paper does. Both methods see the same r runs
# in each sampling, so the honest comparison is paired: per sampling, the score of accumulative
# averaging minus that of Max. SRC-DEV (points). Cells: the mean difference, its 95% percentile
# bootstrap interval over samplings (10,000 resamples, seed 0), and how many samplings favour
# averaging / tie / favour Max. SRC-DEV. "CA vs SRC-DEV" is Table 2's pair (averaged CA weights
# against the single checkpoint chosen on English dev). An r marked "(same runs)" has every sampling
# holding the same runs: one repeated value, not independent evidence (`paired.csv`).

# %%
display(Markdown(rp.paired_sentence(tables["paired"])))
rp.wide_paired(tables["paired"])

# %% [markdown]
# ## Score against the number of runs
#
# Lines: mean over samplings; bands: ± one standard deviation. Max. TRG-DEV (dashed) and SOUP
# (dotted) do not depend on the variant and are repeated in each column for reference.

# %%
plots.save_figure(plots.fig_score_vs_r(tables["table1"], tables["table2"]), out_dir, "score_vs_r")

# %% [markdown]
# ### Why averaging CA weights can fall behind
#
# CA is the uniform mean of all of a run's snapshots. Where the store holds the runs' per-snapshot English
# dev scores (our runs; not the released results), the sentence below says, from those numbers, how a
# run's CA compares with its LAST and whether that gap sits in the runs whose first snapshots were still
# unconverged (`snapshot_convergence.csv`). With the `diagnosis` parameter, the full diagnosis
# (interpolation curves, distances from the start weights, the r = 1 check, CA without its earliest
# snapshots, fp32 against the storage dtype; `python -m ofa_lib.analysis.diagnose`) is shown as well.

# %%
conv = rp.snapshot_convergence(data)
if len(conv):
    rp.write_csv(conv, out_dir / "snapshot_convergence.csv")
    display(Markdown(rp.ca_sentence(conv)))
else:
    print("no per-snapshot rows in the results (the released results keep none)")
diagnosis_dir = rp.diagnosis_folder(diagnosis, out_dir)
if diagnosis_dir:
    from IPython.display import Image
    display(Markdown(rp.diagnosis_markdown(diagnosis_dir)))
    display(Image(filename=str(diagnosis_dir / "diagnosis.png")))
elif diagnosis == "auto":
    from ofa_lib.paths import repo_relative
    where = repo_relative(out_dir / "diagnosis")
    display(Markdown(f"No diagnosis in `{where}` yet: `python -m ofa_lib.analysis.diagnose RUN_A RUN_B ... --out "
                     f"{where}` writes one, the next report shows it (for the demo: `make demo-diagnosis`)."))

# %% [markdown]
# ## Spread across samplings
#
# Each dot is one sampling; boxes show quartiles. The width of a box is how much the reported
# number depends on which runs happened to be trained: compare how it changes with r for
# selection and for averaging.

# %%
plots.save_figure(plots.fig_spread(tables["per_sampling"]), out_dir, "spread_by_r")

# %% [markdown]
# ## Where averaging helps: per target language
#
# Gain (×100) of accumulative averaging over Max. SRC-DEV for each target language, at the r
# given by `gain_r`, averaged over samplings (blue: averaging better; colour scale per task).

# %%
gain = rp.per_language_gain(data, tables["per_sampling"], r=gain_r)
rp.write_csv(gain, out_dir / "language_gain.csv")
plots.save_figure(plots.fig_language_gain(gain, r=gain_r), out_dir, "language_gain")

# %% [markdown]
# ## Table 3 — single runs by hyperparameter configuration
#
# Mean ± std over the training seeds of each (lr, batch) configuration of the target test score
# of each variant (TRG-DEV: per-language best snapshot on target dev, an oracle) (`table3.csv`).

# %%
plots.save_figure(plots.fig_table3(tables["table3"]), out_dir, "table3_heatmap")

# %%
rp.wide_table3(tables["table3"])

# %% [markdown]
# ## Merge methods: does anything beat the uniform mean?
#
# Every merge rule `03_average` computed (its `methods` parameter; the store's `method` column) on the first r runs of each sampling, against selecting one of the same r runs: target test score ×100, mean ± std over samplings (`merge_methods.csv`). Task-vector methods start from θ₀ (the pretrained encoder with the runs' frozen head); GREEDY SOUP keeps a run only if the English dev score of the soup does not drop, so like Max. SRC-DEV it uses no target-language data; Max. TRG-DEV is the oracle.

# %%
merge_ps, merge_tab = rp.merge_methods(data, sampling_seeds)
if len(merge_tab):
    rp.write_csv(merge_tab, out_dir / rp.MERGE_FILE)
    display(Markdown(rp.merge_sentence(merge_tab, merge_ps)))
    display(rp.wide_merge_table(merge_tab))
    display(plots.save_figure(plots.fig_merge_methods(merge_tab), out_dir, "merge_methods"))
else:
    print("no merge rows (the released results, or no averages in the store)")

# %% [markdown]
# ## Files

# %%
display(Markdown("\n".join(f"- `{p.name}`" for p in sorted(out_dir.iterdir())
                             if p.suffix in {".csv", ".png", ".svg"})))
