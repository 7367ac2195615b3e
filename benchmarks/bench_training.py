"""Training throughput: ofa_lib's loop vs transformers' Trainer, side by side.

Identical model (the embedded default, trimmed vocabulary, frozen word embeddings), data
(the same featurized MultiNLI rows, fed to both in the same batches and order), batch size,
max length, bf16 autocast, optimizer recipe (fused AdamW), threads and steps. Throughput = examples/s from the end of step 1 to the end of the last step (step 1,
which warms up allocators, is excluded for both); median of --repeats with min–max.

    python benchmarks/bench_training.py --steps 30 --repeats 3 --out benchmarks/training.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch


def ours(cfg, root: Path) -> float:
    from ofa_lib import training

    out = training.run_training(cfg, root, progress=False)
    log = pd.read_parquet(out / "train_log.parquet")
    steps = len(log)
    return (steps - 1) * cfg.batch_size / (log.step_seconds.iloc[-1] - log.step_seconds.iloc[0])


def trainer(cfg, root: Path) -> float:
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from ofa_lib import training

    prep = training.prepare(cfg)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(root / "trainer"), per_device_train_batch_size=cfg.batch_size, max_steps=len(prep.train) // cfg.batch_size,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=round(cfg.warmup_ratio * (len(prep.train) // cfg.batch_size)), max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="linear", logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, bf16=cfg.precision == "bf16", dataloader_num_workers=0, seed=cfg.seed, disable_tqdm=True,
    )
    # the same batches as ofa_lib's first epoch, in the same order (padding cost depends on the batches)
    order = torch.randperm(len(prep.train), generator=torch.Generator().manual_seed(cfg.seed * 1000)).tolist()
    train = prep.train.select_columns(["input_ids", "attention_mask", "labels"]).select(order)

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    InOrder(model=prep.model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(prep.tokenizer),
            callbacks=[Clock()]).train()
    return (len(stamps) - 1) * cfg.batch_size / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from ofa_lib import config

    results: dict[str, list[float]] = {"ofa_lib": [], "transformers.Trainer": []}
    for rep in range(args.repeats):
        cfg = config.make_config(
            "nli", "cpu", batch_size=args.batch_size, max_length=args.max_length, seed=rep + 1, epochs=1,
            train_subsample=args.steps * args.batch_size, num_snapshots=1, dev_subsample=8, test_subsample=8,
            target_langs={"xnli": ["de"]}, save_resume_state=False)
        with tempfile.TemporaryDirectory() as tmp:
            # alternate the order so neither side always runs on a warmer machine
            for name in (("ofa_lib", "transformers.Trainer") if rep % 2 == 0 else ("transformers.Trainer", "ofa_lib")):
                fn = ours if name == "ofa_lib" else trainer
                results[name].append(fn(cfg, Path(tmp) / name))
                print(f"repeat {rep + 1}: {name} {results[name][-1]:.1f} examples/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    lines = [
        f"Training throughput, MultiNLI, embedded model (trimmed vocab, frozen embeddings, bf16 autocast), batch {args.batch_size}, "
        f"max_length {args.max_length}, {args.threads} threads, {args.steps} steps; median of {args.repeats} (min–max).",
        "", "| loop | examples/s |", "|---|---|",
    ]
    lines += [f"| {k} | {med[k]:.1f} ({min(v):.1f}–{max(v):.1f}) |" for k, v in results.items()]
    lines += ["", f"ratio ofa_lib / Trainer = {med['ofa_lib'] / med['transformers.Trainer']:.2f}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
