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
results_path = None          # default outputs/results/<task>.parquet (runs' rows and averages)
variants = ["last", "src_dev", "ca"]
r_max = 10                   # capped at the number of (lr, batch) configurations
n_samplings = 10             # sampling seeds 0 .. n_samplings-1
soup_k = 5                   # snapshots per soup, 0 for none; runs need top_k above 0
methods = ["uniform"]         # merge methods (ofa_lib.merge.merging): names, or a mapping name -> options,
                             # e.g. {"uniform": {}, "ties": {"density": 0.2, "lambda": 1.0}}
method_variants = None       # variants the methods other than uniform merge (None: all of `variants`)
keep_checkpoints = False     # write the averaged weights under <runs_root>/../averages/
device = None                # auto: cuda for the paper preset (fails without it), else cuda if available, else cpu
threads = None               # torch CPU threads


# %% [markdown]
# # 03 · Across runs: accumulative averaging and soups
#
# For each sampling (an ordered list of runs, one per distinct (lr, batch) configuration, drawn by `selection.sample_runs`) and each variant (LAST, SRC-DEV, CA), the uniform average of the first r runs' weights θ̄_r = θ̄_{r-1} + (θ_r − θ̄_{r-1}) / r is streamed (one checkpoint read per step), loaded into one model and scored on English dev, target dev and target test; SOUP averages the `soup_k` kept snapshots with the best English dev among the first r runs. Every set of weights is evaluated once: rows already in the results store for the same members (in any order, under any sampling) are reused, so a re-run or an interrupted pass costs only what is missing.
#
# Run headless: `papermill notebooks/03_average.ipynb out.ipynb -p task sib`; then `notebooks/04_analysis.ipynb` with `source` = the results file.
#
# `methods` adds other merge rules of the same runs (`ofa_lib.merge.merging`: uniform, task_arithmetic, ties, dare_linear, dare_ties, fisher, greedy_soup), each row tagged with the method and its options in the store's `method` column. `fisher` weights each run per parameter by its diagonal Fisher on English training data, computed once per run checkpoint into `<averages>/fisher/` (docs/method.md §6).

# %%
from ofa_lib.grid import notebook_params

notebook_params.check(globals(), "03_average")  # unknown parameters and wrong types: refused here
import pandas as pd
import torch

from ofa_lib import results
from ofa_lib.merge import crossrun, pool

if threads:
    torch.set_num_threads(int(threads))
results_path = results_path or pool.default_results_path(task)
runs = pool.find_runs(runs_root, task)  # refuses runs that cannot be combined, naming them
pool.runs_overview(runs)

# %% [markdown]
# ## The runs' own rows (snapshots and variants) into the results store

# %%
stored = results.append(results_path, pool.collect_run_metrics(runs))
print(f"{results_path}: {len(stored)} rows")

# %% [markdown]
# ## Accumulative averages and soups (evaluated once each; appended as they are scored)

# %%
rows = crossrun.average_runs(runs, variants=variants, r_max=r_max, samplings=range(n_samplings),
                             soup_k=soup_k, methods=methods, method_variants=method_variants,
                             results_path=results_path, keep_checkpoints=keep_checkpoints, device=device)

# %% [markdown]
# ## Evaluations done and avoided

# %%
pd.Series(rows.attrs["stats"], dtype=object).to_frame("count / seconds")

# %% [markdown]
# ## Max. SRC-DEV vs accumulative averaging by r
#
# Target test score (flat mean over target languages, ×100), mean ± std over samplings. Full tables and figures: `notebooks/04_analysis.ipynb` with `source` = the results file.

# %%
crossrun.summary_by_r(results_path, task, soup_k=soup_k)
