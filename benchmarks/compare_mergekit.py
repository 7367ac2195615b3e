"""Cross-check: ofa-merge against mergekit's linear, task_arithmetic and ties on a tiny BERT (not a test).

Builds a random BertForSequenceClassification θ₀ (hidden 32, 2 layers, 2 heads, intermediate 64,
vocab 100, 2 labels) and 3 "fine-tuned" checkpoints θᵢ = θ₀ + τᵢ, each saved as a local model
directory (config.json + model.safetensors; the same file is ofa-merge's input), merges them with
both tools and compares the outputs key by key. Three scenarios (density 0.2, λ 0.7):

  gaussian        τᵢ ~ 0.02·N(0, 1): continuous values, no ties
  threshold_ties  θ₀ and τᵢ on the 2⁻⁸ grid (exact in fp32), τᵢ ∈ {0, ±1, ±2, ±3}·2⁻⁸: many |τ|
                  ties at each input's TIES threshold
  zero_sums       distinct |τ| within each input (no threshold ties), inputs 1 and 2 with the same
                  |τ| at each position and random signs: exact zero sums in the sign election

Matching settings (from mergekit 0.1.5's source, merge_methods/generalized_task_arithmetic.py):
  uniform         <-> linear, weight 1 each (normalize: true divides by Σw)
  task_arithmetic <-> task_arithmetic, weight 1 each, normalize: false: θ₀ + λ·Σ wᵢτᵢ
  ties            <-> ties, weight 1 each, normalize: true (÷ Σ of the agreeing weights = the mean of
                      the agreeing entries), density D, lambda λ applied after normalizing

For ties every element that differs is checked against the documented rule differences: a tensor
where ⌊D·numel⌋ = 0 (ofa trims everything, mergekit keeps max(1, ·) entries), a tensor where some
input has ties at its k-th largest |τ| (ofa keeps all of them, mergekit exactly k by argsort), an
element whose election sum is exactly 0 (ofa: sign 0, nothing kept; mergekit: majority +1).
"unexplained" counts the differing elements that none of these covers.

Run it with a THROWAWAY venv that has mergekit (never install mergekit into the project's .venv):

    python3.11 -m venv /tmp/mk-venv
    /tmp/mk-venv/bin/pip install torch==2.13.0   # the CPU wheel, first, so pip keeps it
    /tmp/mk-venv/bin/pip install mergekit        # 0.1.5 resolves beside torch 2.13.0
    /tmp/mk-venv/bin/python benchmarks/compare_mergekit.py \
        [--ofa-merge .venv/bin/ofa-merge] [--out benchmarks/raw/mergekit_compare.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # mergekit's progress bars

import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

R, DENSITY, LAM, TOL = 3, 0.2, 0.7, 1e-6
SCENARIOS = ("gaussian", "threshold_ties", "zero_sums")


def task_vectors(v: torch.Tensor, scenario: str) -> list[torch.Tensor]:
    """R task vectors for the floating tensor ``v`` of θ₀."""
    if scenario == "gaussian":
        return [0.02 * torch.randn_like(v) for _ in range(R)]
    if scenario == "threshold_ties":  # few distinct magnitudes: many ties at every input's threshold
        return [2.0 ** -8 * torch.randint(-3, 4, v.shape).to(v.dtype) for _ in range(R)]
    # zero_sums: distinct magnitudes within each input (no threshold ties); inputs 1 and 2 share theirs,
    # so where both are kept with opposite signs and input 3 is trimmed, the election sum is exactly 0
    mags = [torch.randperm(v.numel()) + 1 for _ in range(R)]
    mags[1] = mags[0]
    return [2.0 ** -20 * (m * (2 * torch.randint(0, 2, m.shape) - 1)).to(v.dtype).reshape(v.shape) for m in mags]


def make_models(root: Path, scenario: str) -> tuple[Path, list[Path]]:
    """θ₀ and R fine-tuned model directories (θᵢ = θ₀ + τᵢ) under ``root``."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if scenario != "gaussian":  # θ₀ on the 2⁻⁸ grid: θ₀ + τ and (θ₀ + τ) − θ₀ are exact in fp32
        sd = {k: (v * 2 ** 8).round() / 2 ** 8 if v.is_floating_point() else v for k, v in sd.items()}
    taus = {k: task_vectors(v, scenario) for k, v in sd.items() if v.is_floating_point()}
    dirs = []
    for i in range(R + 1):  # i = 0: θ₀
        model.load_state_dict({k: v + taus[k][i - 1] if i and k in taus else v for k, v in sd.items()})
        dirs.append(root / ("base" if i == 0 else f"ft{i}"))
        model.save_pretrained(dirs[-1])
    return dirs[0], dirs[1:]


def run_mergekit(method: str, base: Path, fts: list[Path], out: Path) -> dict[str, torch.Tensor]:
    params = {"linear": {},
              "task_arithmetic": {"normalize": False, "lambda": LAM},
              "ties": {"normalize": True, "lambda": LAM, "density": DENSITY}}[method]
    cfg = {"merge_method": method, "dtype": "float32", "out_dtype": "float32",
           "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in fts], "parameters": params}
    if method != "linear":
        cfg["base_model"] = str(base)
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def run_ofa(exe: str, method: str, base: Path, fts: list[Path], out: Path) -> dict[str, torch.Tensor]:
    opts = {"uniform": [], "task_arithmetic": ["--base", base / "model.safetensors", "--lambda", LAM],
            "ties": ["--base", base / "model.safetensors", "--lambda", LAM, "--density", DENSITY]}[method]
    cmd = [exe, "--method", method, *map(str, opts), "--out", str(out), *(str(d / "model.safetensors") for d in fts)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return load_file(out)


def ties_explained(base: dict, fts: list[dict], key: str) -> tuple[str, torch.Tensor]:
    """The documented rule difference that can change TIES on ``key``, and the elements it covers."""
    taus = torch.stack([f[key].float() - base[key].float() for f in fts])
    n = taus[0].numel()
    k = math.floor(DENSITY * n)
    everything = torch.ones(taus.shape[1:], dtype=torch.bool)
    if k == 0:
        return "floor(density*numel)=0", everything
    kth = [t.abs().reshape(-1).kthvalue(n - k + 1).values for t in taus]
    if any(int((t.abs() >= th).sum()) > k for t, th in zip(taus, kth)):
        return "ties at the magnitude threshold", everything
    trimmed = torch.stack([torch.where(t.abs() >= th, t, 0.0) for t, th in zip(taus, kth)])
    return "zero-sum sign election", (trimmed.sum(0) == 0) & (trimmed != 0).any(0)


def compare(ours: dict, theirs: dict, method: str, base: dict, fts: list[dict]) -> dict:
    """Key by key: max |diff| overall and outside the documented differences, elements over TOL by cause."""
    worst, worst_key, other, over, unexplained, causes, tensors = 0.0, None, 0.0, 0, 0, {}, {}
    for key in sorted(set(ours) & set(theirs)):
        d = (ours[key].double() - theirs[key].double()).abs()
        if float(d.max()) > worst:
            worst, worst_key = float(d.max()), key
        cause, covered = "", torch.zeros(d.shape, dtype=torch.bool)
        if method == "ties":
            cause, covered = ties_explained(base, fts, key)
        if (~covered).any():
            other = max(other, float(d[~covered].max()))
        diff = d > TOL
        if diff.any():
            n_cov, n_left = int((diff & covered).sum()), int((diff & ~covered).sum())
            over += n_cov + n_left
            unexplained += n_left
            if n_cov:
                causes[cause] = causes.get(cause, 0) + n_cov
            tensors[key] = {"elements": n_cov + n_left, "max_abs": float(d.max()), "cause": cause if n_cov else "",
                            "unexplained": n_left}
    return {"max_abs_diff": worst, "worst_key": worst_key, "max_abs_diff_outside_documented": other,
            "elements_over_tol": over, "unexplained": unexplained, "elements_by_cause": causes,
            "keys_only_mergekit": sorted(set(theirs) - set(ours)), "keys_only_ofa": sorted(set(ours) - set(theirs)),
            "differing_tensors": tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ofa-merge", default=".venv/bin/ofa-merge")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/raw/mergekit_compare.json"))
    args = ap.parse_args()
    pairs = {"uniform": "linear", "task_arithmetic": "task_arithmetic", "ties": "ties"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in SCENARIOS:
            root = Path(tmp) / scenario
            base, fts = make_models(root, scenario)
            sd_base = load_file(base / "model.safetensors")
            sd_fts = [load_file(d / "model.safetensors") for d in fts]
            for ofa_m, mk_m in pairs.items():
                ours = run_ofa(args.ofa_merge, ofa_m, base, fts, root / f"ofa-{ofa_m}.safetensors")
                theirs = run_mergekit(mk_m, base, fts, root / f"mk-{mk_m}")
                results.append({"scenario": scenario, "ofa_method": ofa_m, "mergekit_method": mk_m,
                                **compare(ours, theirs, ofa_m, sd_base, sd_fts)})
    print(f"{'scenario':15} {'ofa-merge':16} {'mergekit':16} {'max|diff|':>9} {'outside doc.':>12} "
          f"{'elems>tol':>9} {'unexpl.':>7}  elements over tol by documented cause")
    for r in results:
        print(f"{r['scenario']:15} {r['ofa_method']:16} {r['mergekit_method']:16} {r['max_abs_diff']:9.3g} "
              f"{r['max_abs_diff_outside_documented']:12.3g} {r['elements_over_tol']:9d} {r['unexplained']:7d}  "
              f"{r['elements_by_cause'] or ''}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "mergekit": version("mergekit"),
                                    "transformers": version("transformers"), "r": R, "density": DENSITY,
                                    "lambda": LAM, "tol": TOL, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
