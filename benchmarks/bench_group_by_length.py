"""Training batches of similar length (``group_by_length``) against random batches, on this CPU.

The demo's real training data and model: SIB-200's 701 English training sentences featurized as the
``cpu`` preset does (max_length 128), the embedded multilingual-e5-small with the trimmed vocabulary and
frozen word embeddings, AdamW as ``run_training`` builds it. One epoch of training steps per batching
(``--batch-size``), same model weights at the start of each; batchings alternate which goes first over
``--repeats``; median (min–max) of the epoch's step time. Also the padded tokens each batching computes
against the real tokens. Precision: fp32 and, where the CPU has native bf16, bf16 autocast.

    python benchmarks/bench_group_by_length.py [--repeats 2] [--batch-size 16] [--json benchmarks/raw/group_by_length.json]
"""

from __future__ import annotations

import argparse
import copy
import time

import _common as _c
import torch


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    _c.add_output_args(parser, "group_by_length")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ofa_lib.data import features
    from ofa_lib.train import config, hardware, optim, setup

    cfg = config.make_config("sib", "cpu", batch_size=args.batch_size, trim_vocab=True, freeze_embeddings=True,
                             target_langs={"sib200": ["deu_Latn"]}, dev_subsample=8, test_subsample=8)
    prep = setup.prepare(cfg)
    rows = prep.train.select_columns([c for c in ("input_ids", "attention_mask", "token_type_ids", "labels")
                                      if c in prep.train.column_names]).to_list()
    lengths = [len(r["input_ids"]) for r in rows]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed * 1000)).tolist()
    batchings = {"random": [order[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)],
                 "group_by_length": features.length_grouped_batches(lengths, args.batch_size, seed=cfg.seed * 1000)}
    padded = {k: features.padded_tokens(lengths, v) / sum(lengths) for k, v in batchings.items()}
    start = copy.deepcopy(prep.model.state_dict())
    precisions = {"fp32": None}
    if hardware.resolve_precision("auto", torch.device("cpu"))[0] == "bf16":
        precisions["bf16"] = torch.bfloat16

    def epoch(batches, dtype) -> float:
        prep.model.load_state_dict(start)
        prep.model.train()
        opt = torch.optim.AdamW(optim.decay_groups(prep.model, cfg.weight_decay), lr=cfg.lr, fused=True)
        t0 = time.perf_counter()
        for b in batches:
            optim.train_step(prep.model, features.collate([rows[i] for i in b], prep.tokenizer.pad_token_id), opt,
                             autocast_dtype=dtype)
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, dict[str, list[float]]] = {p: {k: [] for k in batchings} for p in precisions}
    for p, dtype in precisions.items():
        epoch(batchings["random"][:3], dtype)  # warm-up
        for rep in range(args.repeats):
            for name in (list(batchings) if rep % 2 == 0 else list(batchings)[::-1]):
                times[p][name].append(epoch(batchings[name], dtype))
                print(f"{p} repeat {rep + 1}: {name} {times[p][name][-1]:.1f} s", flush=True)
    rows_md, summary = [], []
    for p in precisions:
        r = _c.ratio(times[p]["random"], times[p]["group_by_length"])
        for name in batchings:
            rows_md.append((p, name, f"{padded[name]:.2f}×", _c.fmt(times[p][name], 1),
                            f"{len(rows) / _c.stats(times[p][name])['median']:.1f}"))
        summary.append(_c.summary_row(f"one SIB-200 training epoch, batch {args.batch_size}, {p}", "group_by_length",
                                      "random batches", f"{r:.2f}× faster", "> 1.2×", "met" if r > 1.2 else "missed"))
    table = _c.md_table(["precision", "batches", "padded / real tokens", "epoch seconds", "examples/s"], rows_md,
                        "llrrr")
    text = (f"One epoch of SIB-200 English training ({len(rows)} sentences, batch {args.batch_size}) with the "
            f"embedded model as the `cpu` preset trains it, {args.threads} threads; {args.repeats} repetitions, "
            f"median (min–max).\n\n{table}")
    _c.write_result(name="group_by_length", title="Length-grouped training batches (CPU)", markdown=text,
                    summary=summary, data={"seconds": times, "padded_ratio": padded, "rows": len(rows)},
                    started=started, json_path=_c.json_target(args.json), md_path=args.out)


if __name__ == "__main__":
    main()
