"""``ofa-merge``: merge any set of compatible safetensors checkpoints with one method of the registry
(:mod:`ofa_lib.merge.merging`), outside the study; ``--base-from-run`` finds θ₀ of a run folder as the
cross-run pass does (:func:`ofa_lib.merge.execution.base_file_of_run`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from ofa_lib.merge import execution
from ofa_lib.merge.merging import (
    ALIASES,
    METHODS,
    MergeSpecError,
    make_spec,
    merge_files,
    spec_from_fishers,
)


def main(argv: Sequence[str] | None = None) -> int:
    """``ofa-merge --method M [--base BASE] [--density D] [--lambda L] [--seed S] [--fisher F --fisher F … [--floor E]]
    --out OUT IN…``"""
    methods = sorted(m for m, info in METHODS.items() if not info.needs_scores) + sorted(ALIASES)
    parser = argparse.ArgumentParser(
        prog="ofa-merge", description="Merge compatible safetensors checkpoints (same keys and shapes, aligned "
        "heads, finite values) into one fp32 safetensors file whose metadata records the method, its options and "
        "the sha256 of every input and of θ₀.")
    parser.add_argument("--method", required=True, choices=methods)
    parser.add_argument("--base", type=Path, help="θ₀: the pretrained weights with the runs' head (task_arithmetic, "
                        "ties, dare_*); 03_average writes it as <averages>/base-<digest>.safetensors")
    parser.add_argument("--base-from-run", type=Path, metavar="RUN_DIR",
                        help="θ₀ built from a finished run's config (pretrained encoder, the run's vocabulary and "
                        "head), written once as <runs_root>/../averages/<task>/base-<digest>.safetensors, the file "
                        "03_average uses; instead of --base")
    parser.add_argument("--density", type=float, help="ties, dare_*: fraction of each task vector kept")
    parser.add_argument("--lambda", dest="lam", type=float, help="scale of the merged task vector")
    parser.add_argument("--seed", type=int, help="dare_*: seed of the drop masks")
    parser.add_argument("--fisher", type=Path, action="append", metavar="F",
                        help="fisher: the stored Fisher diagonal of an input, once per input in the order of IN "
                        "(03_average writes them under <averages>/fisher/; each records its checkpoint's sha256 "
                        "and options, checked here)")
    parser.add_argument("--floor", type=float, help="fisher: least Fisher weight (parameters below it in every "
                        "input get equal weights)")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file (written atomically)")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IN")
    args = parser.parse_args(argv)
    given = {k: v for k, v in (("density", args.density), ("lambda", args.lam), ("seed", args.seed),
                               ("floor", args.floor)) if v is not None}
    try:
        if ALIASES.get(args.method, args.method) == "fisher":
            # the diagonal options (examples, split, labels, seed) are the ones the stored diagonals record
            if args.seed is not None or args.density is not None or args.lam is not None:
                raise MergeSpecError("ofa-merge: fisher takes --fisher files and --floor only")
            if not args.fisher:
                raise MergeSpecError("ofa-merge: fisher needs --fisher F once per input (the stored Fisher diagonals)")
            spec = spec_from_fishers(args.fisher, args.floor)
        else:
            spec = make_spec(args.method, given, where="ofa-merge")
            if args.fisher:
                raise MergeSpecError(f"ofa-merge: --fisher is not used by {spec.method}")
        if args.base is not None and args.base_from_run is not None:
            raise MergeSpecError("ofa-merge: give --base or --base-from-run, not both")
        if (args.base is not None or args.base_from_run is not None) and not spec.info.needs_base:
            raise MergeSpecError(f"ofa-merge: --base/--base-from-run is not used by {spec.method}")
        if args.out.suffix != ".safetensors":
            raise MergeSpecError(f"ofa-merge: --out {args.out} must end in .safetensors")
        if args.base_from_run is not None:
            if not (args.base_from_run / "manifest.json").is_file():
                raise FileNotFoundError(f"--base-from-run {args.base_from_run}: no manifest.json (not a run folder)")
            args.base = execution.base_file_of_run(args.base_from_run)
            print(f"ofa-merge: θ₀ of run {args.base_from_run.name}: {args.base}")
        merge_files(spec, args.inputs, base=args.base, fishers=args.fisher, dtype=torch.float32, out_path=args.out)
    except (ValueError, OSError) as err:  # spec, mismatch, non-finite, corrupt, incompatible runs; missing files
        print(f"ofa-merge: error: {err}", file=sys.stderr)
        return 2
    print(f"ofa-merge: {spec.label} of {len(args.inputs)} checkpoint(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
