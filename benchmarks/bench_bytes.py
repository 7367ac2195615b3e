"""Benchmark: bytes written and kept per run, computed for XLM-R large and measured on the demo.

XLM-R large (the paper grids ``params/grids/paper_{nli,ner,tydiqa}.yaml``): per run, from the cost model
(``ofa_lib.grid.cost.estimate``: what a run keeps and writes now, at most, and what the layout before issue 16
wrote: a file per variant and a resume state at every snapshot).

The demo (``outputs/runs/demo``, after ``make demo``): every finished run folder measured read-only, bytes
counted once per inode (as ``du`` does); the code version from the runs' manifests; and, for runs written
before variants of one snapshot shared a file, what sharing saves on them: their checkpoints grouped by the
sha256 of their tensor bytes (every file's header names its variant, so file hashes differ); a file whose
weights another variant of the run already has is what a hard link would not have written or kept.

    python benchmarks/bench_bytes.py [--demo outputs/runs/demo] [--json benchmarks/raw/bytes.json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import _common as _c

GRIDS = ("paper_nli", "paper_ner", "paper_tydiqa", "demo")  # the paper grids (XLM-R large), and the demo's


AUTHORS_HOURS_PER_RUN = 350 / 64  # the authors' ~350 V100-hours per task over its 63 runs + head run


def paper_rows() -> tuple[list[tuple], dict]:
    """Cost-model bytes of one grid run (median over the grid's runs) of each grid of :data:`GRIDS`. Where the
    grid's data is not here (the paper grids need the full MultiNLI / WikiANN / TyDiQA), the training time that
    sets the number of resume states comes from the authors' V100-hours instead of the token count."""
    from ofa_lib.data import catalog
    from ofa_lib.grid import cost
    from ofa_lib.grid import spec as grid_spec

    rows, data_out = [], {}
    for name in GRIDS:
        grid = grid_spec.load_grid(name)
        cfg = grid.runs[-1].cfg
        try:
            est = cost.estimate(grid)
            runs = [r for r in est.runs if r.role == "grid"]
            med = {k: statistics.median(getattr(r, k) for r in runs)
                   for k in ("bytes_kept", "bytes_written", "bytes_written_before")}
            basis = f"estimate on {est.device}"
        except (catalog.DataUnavailableError, ValueError):  # data (or some of its languages) not in the mirror
            train_s = AUTHORS_HOURS_PER_RUN * 3600
            kept, written, before = cost.run_bytes(
                cfg, None, cost.resume_writes(train_s, cfg.num_snapshots, None),
                cost.resume_writes(train_s, cfg.num_snapshots, cfg.resume_every_minutes))
            med = {"bytes_kept": kept, "bytes_written": written, "bytes_written_before": before}
            basis = f"{AUTHORS_HOURS_PER_RUN:.1f} h per run (the authors' V100-hours; the data is not here)"
        fewest, most = cost.stored_snapshots(cfg)
        rows.append((name, cfg.model_name, cfg.storage_dtype, cfg.num_snapshots, cfg.top_k, basis,
                     _c.fmt_bytes(med["bytes_kept"]), _c.fmt_bytes(med["bytes_written"]),
                     _c.fmt_bytes(med["bytes_written_before"]), f"{med['bytes_written'] / med['bytes_written_before']:.2f}×"))
        data_out[name] = dict(med, stored_snapshots=[fewest, most], basis=basis)
    return rows, data_out


def tensor_sha256(path: Path) -> str:
    """sha256 of a safetensors file's tensor bytes, its header (names, metadata) left out: equal for files that
    hold the same weights under another variant name."""
    import hashlib
    import struct

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        h.update(json.dumps(header, sort_keys=True).encode())  # names, dtypes, shapes, offsets
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def demo_runs(root: Path) -> tuple[str, dict]:
    """The finished demo runs measured read-only, and what shared variant files would save on them."""
    from ofa_lib import io

    done = [p.parent for p in sorted(root.glob("*/manifest.json"))
            if json.loads(p.read_text()).get("status") == "done"] if root.is_dir() else []
    if not done:
        return f"Demo runs: not measured (`{root}` has no finished run: run `make demo` first).", {}
    rows, per_run = [], []
    commits = set()
    for run in done:
        m = json.loads((run / "manifest.json").read_text())
        commits.add(m.get("environment", {}).get("git_commit"))
        files = [p for p in run.rglob("*") if p.is_file()]
        ckpts = [p for p in (run / "checkpoints").glob("*.safetensors")]
        linked = len({p.stat().st_ino for p in ckpts}) < len(ckpts)
        # the manifests' file hashes cannot show it: each file's header names its variant (and safetensors writes
        # the header in a per-process order), so equal weights are found by the hash of the tensor bytes
        by_hash: dict[str, list[str]] = {}
        for p in ckpts:
            by_hash.setdefault(tensor_sha256(p), []).append(str(p.relative_to(run)))
        dup = [rel for rels in by_hash.values() for rel in sorted(rels)[1:]]  # beyond the first of each content
        dup_bytes = 0 if linked else sum((run / rel).stat().st_size for rel in dup)
        total = io.unique_bytes(files)
        ckpt_bytes = io.unique_bytes(ckpts)
        per_run.append({"run": run.name, "bytes": total, "checkpoint_bytes": ckpt_bytes, "files": len(files),
                        "checkpoints": len(ckpts), "duplicate_files": dup, "duplicate_bytes": dup_bytes,
                        "already_linked": linked, "resume_writes": m.get("resume_writes"),
                        "git_commit": m.get("environment", {}).get("git_commit")})
        rows.append((run.name, len(ckpts), _c.fmt_bytes(total), _c.fmt_bytes(ckpt_bytes), len(dup),
                     _c.fmt_bytes(dup_bytes), _c.fmt_bytes(total - dup_bytes), m.get("resume_writes", "–")))
    total_all = sum(r["bytes"] for r in per_run)
    dup_all = sum(r["duplicate_bytes"] for r in per_run)
    table = _c.md_table(["run", "checkpoint files", "run folder (du)", "checkpoints", "same-content variant files",
                         "their bytes", "with shared files", "resume writes"], rows, "lrrrrrrr")
    text = (f"Demo runs (`{root}`, {len(done)} finished runs, measured read-only, a hard-linked file counted once "
            f"as `du` does), written by commit(s) {', '.join(sorted(c or '?' for c in commits))}:\n\n{table}\n\n"
            f"In all {_c.fmt_bytes(total_all)}; storing each snapshot once (LAST / SRC-DEV / TRG-DEV / top-k of the "
            f"same snapshot as hard links; found by equal sha256 of their tensor bytes) keeps "
            f"{_c.fmt_bytes(total_all - dup_all)} ({dup_all / total_all:.0%} less), and writes as much less.")
    return text, {"root": str(root), "runs": per_run, "bytes": total_all, "duplicate_bytes": dup_all,
                  "git_commits": sorted(c or "?" for c in commits)}


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, default=_c.REPO / "outputs" / "runs" / "demo", help="demo runs folder")
    _c.add_output_args(ap, "bytes")
    args = ap.parse_args(argv)
    rows, paper = paper_rows()
    table = _c.md_table(["grid", "model", "storage", "snapshots", "top_k", "training time from", "kept ≤",
                         "written ≤", "written before", "written / before"], rows, "lllrrlrrrr")
    demo_text, demo = demo_runs(args.demo)
    text = (
        "Per run of each paper grid (XLM-R large) and of the demo grid (the embedded model, trimmed vocabulary; "
        "median over the grid's runs; computed by the cost model "
        "`ofa_lib.grid.cost`, the same numbers `python -m ofa_lib.grid plan GRID --estimate` prints). Kept: LAST, "
        "SRC-DEV, TRG-DEV and the top-k in the storage dtype, a variant that is the same snapshot as another "
        "stored once (at most: every one a different snapshot), CA in fp32. Written: every snapshot's weights at "
        "most once, CA, and the resume states (fp32 weights, AdamW moments, CA) at the first snapshot and every "
        "`resume_every_minutes` of training. Before: a file per variant, rewritten whenever a snapshot improved "
        "it, and a resume state at every snapshot but the last.\n\n"
        f"{table}\n\n{demo_text}")
    nli = paper["paper_nli"]
    summary = [_c.summary_row("bytes written per run, XLM-R large NLI (computed)", _c.fmt_bytes(nli["bytes_written"]),
                              f"before: {_c.fmt_bytes(nli['bytes_written_before'])}",
                              f"{nli['bytes_written'] / nli['bytes_written_before']:.2f}×")]
    if demo:
        summary.append(_c.summary_row(f"bytes kept, demo ({len(demo['runs'])} runs, measured)",
                                      _c.fmt_bytes(demo["bytes"] - demo["duplicate_bytes"]),
                                      f"a file per variant: {_c.fmt_bytes(demo['bytes'])}",
                                      f"{(demo['bytes'] - demo['duplicate_bytes']) / demo['bytes']:.2f}×"))
    _c.write_result(name="bytes", title="Bytes written and kept per run", markdown=text, summary=summary,
                    data={"paper": paper, "demo": demo}, started=started, json_path=_c.json_target(args.json),
                    md_path=args.out)


if __name__ == "__main__":
    main()
