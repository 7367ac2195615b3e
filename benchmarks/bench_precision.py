"""Precision on this machine's CPU: fp32 against bf16 autocast, one training step of an e5-small-shaped BERT.

What ``precision: auto`` decides from the hardware (``ofa_lib.train.hardware.resolve_precision``) is
checked here against a measurement: forward + backward + fused AdamW step of a randomly
initialised BERT with multilingual-e5-small's shape (12 layers, hidden 384, 12 heads, FFN 1536,
vocabulary trimmed to 8,000 as the ``cpu`` preset does), batch 16 × 64 tokens, the same batch for
both; the two precisions alternate which goes first, median (min–max) over --repeats after one
warm-up step each. Also records what the CPU reports (torch's capability, AVX512-BF16, AMX,
mkldnn bf16) and what ``auto`` picks.

    python benchmarks/bench_precision.py [--repeats 5] [--json benchmarks/raw/precision.json]
"""

from __future__ import annotations

import argparse
import time

import _common as _c
import torch


def step_seconds(model, batch, optimizer, dtype: torch.dtype | None) -> float:
    """Wall time of one forward/backward/optimizer step (autocast to ``dtype`` when given)."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    _c.add_output_args(parser, "precision")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import BertConfig, BertForSequenceClassification

    from ofa_lib.train import hardware

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=8000, hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
        num_labels=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 8000, (args.batch_size, args.max_length), generator=gen),
             "attention_mask": torch.ones(args.batch_size, args.max_length, dtype=torch.long),
             "labels": torch.randint(0, 3, (args.batch_size,), generator=gen)}
    modes = {"fp32": None, "bf16": torch.bfloat16}
    for dtype in modes.values():  # warm-up (allocator, oneDNN primitives)
        step_seconds(model, batch, optimizer, dtype)
    times: dict[str, list[float]] = {k: [] for k in modes}
    for rep in range(args.repeats):
        for name in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
            times[name].append(step_seconds(model, batch, optimizer, modes[name]))
            print(f"repeat {rep + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    hw = hardware.cpu_precision_support()
    picked, why = hardware.resolve_precision("auto", torch.device("cpu"))
    r = _c.ratio(times["bf16"], times["fp32"])
    table = _c.md_table(["precision", "seconds per step"], [(k, _c.fmt(v, 2)) for k, v in times.items()], "lr")
    faster = "fp32" if r > 1 else "bf16"
    text = (
        f"One training step (forward, backward, clipping, fused AdamW) of a random e5-small-shaped BERT, batch "
        f"{args.batch_size} × {args.max_length} tokens, {args.threads} threads; {args.repeats} repetitions, "
        f"median (min–max).\n\n{table}\n\nbf16 / fp32 time = **{r:.2f}** ({faster} is faster here). The CPU reports: "
        f"capability {hw['capability']}, AVX512-BF16 {hw['avx512_bf16']}, AMX {hw['amx_tile']}, mkldnn bf16 "
        f"{hw['mkldnn_bf16']}. `precision: auto` picks **{picked}** ({why}).")
    agree = (picked == "bf16") == (r < 1)
    summary = [_c.summary_row("precision auto on this CPU (bf16 / fp32 step time)", f"auto → {picked}",
                              "fp32" if picked == "bf16" else "bf16 autocast", f"{r:.2f}×",
                              "auto picks the faster", "met" if agree else "missed",
                              "" if agree else f"auto picked {picked} but {faster} measured faster: "
                              "revisit hardware.cpu_precision_support's rule for this CPU")]
    _c.write_result(name="precision", title="Precision chosen by the hardware (CPU)", markdown=text,
                    summary=summary, data={"seconds": times, "hardware": hw, "auto": picked, "why": why},
                    started=started, json_path=_c.json_target(args.json), md_path=args.out)


if __name__ == "__main__":
    main()
