"""Merge methods against direct implementations of their published definitions, DARE by its
properties, the registry's checks and content keys, and the ofa-merge command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ofa_lib import io
from ofa_lib.merge import cli as merge_cli
from ofa_lib.merge import merging, planning
from ofa_lib.models import ckpt_io
from ofa_lib.models.ckpt_io import (
    CheckpointMismatchError,
    NonFiniteError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)

FP = "cd" * 32  # a head fingerprint
SHAPES = {"emb.weight": (37, 6), "layer.weight": (5, 4), "layer.bias": (5,), "head.weight": (3, 5)}


def _models(tmp: Path, n: int, seed: int = 0, dtype=torch.float32) -> tuple[Path, list[Path], dict, list[dict]]:
    """θ₀ and n fine-tuned 'models' (θ₀ + a random task vector each) as files, and their fp32 values."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    base["pos"] = torch.arange(4)  # an integer buffer: copied
    thetas = [{k: (v + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype) if v.is_floating_point() else v
               for k, v in base.items()} for _ in range(n)]
    save_checkpoint(base, tmp / "base.safetensors", metadata={"ofa_head_fingerprint": FP})
    paths = []
    for i, th in enumerate(thetas):
        paths.append(tmp / f"m{i}.safetensors")
        save_checkpoint(th, paths[-1], metadata={"ofa_head_fingerprint": FP, "ofa_run_id": f"run{i}"})
    as32 = [{k: v.float() if v.is_floating_point() else v for k, v in th.items()} for th in thetas]
    return tmp / "base.safetensors", paths, base, as32


# --------------------------------------------------------------------------- independent references (numpy)
def ref_task_arithmetic(base, thetas, lam):
    return base + lam * sum(t - base for t in thetas)


def ref_ties(base, thetas, density, lam):
    """Yadav et al. 2023, Algorithm 1, written out with numpy: trim, elect, disjoint merge."""
    taus = [t - base for t in thetas]
    k = int(math.floor(density * base.size))
    trimmed = []
    for tau in taus:
        flat = tau.reshape(-1)
        keep = np.zeros(flat.size, dtype=bool)
        if k:
            keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
        trimmed.append(np.where(keep, flat, 0.0).reshape(tau.shape))
    trimmed = np.stack(trimmed)
    gamma = np.sign(trimmed.sum(axis=0))
    merged = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        vals = [trimmed[(i,) + idx] for i in range(len(taus))
                if trimmed[(i,) + idx] != 0 and np.sign(trimmed[(i,) + idx]) == gamma[idx]]
        merged[idx] = np.mean(vals) if vals else 0.0
    return base + lam * merged


def _np(sd):
    return {k: v.double().numpy() for k, v in sd.items() if v.is_floating_point()}


@pytest.mark.parametrize("n", [1, 3, 4])
def test_task_arithmetic_and_ties_match_their_definitions(tmp_path, n):
    base_file, paths, base, thetas = _models(tmp_path, n)
    b, ts = _np(base), [_np(t) for t in thetas]
    got = merging.merge_files(merging.make_spec("task_arithmetic", {"lambda": 0.4}), paths, base=base_file)
    for key in b:
        np.testing.assert_allclose(got[key].numpy(), ref_task_arithmetic(b[key], [t[key] for t in ts], 0.4),
                                   rtol=0, atol=2e-6)
    assert torch.equal(got["pos"], torch.arange(4))
    for density, lam in ((0.2, 1.0), (0.5, 0.7), (1.0, 1.0)):
        got = merging.merge_files(merging.make_spec("ties", {"density": density, "lambda": lam}), paths, base=base_file)
        for key in b:
            np.testing.assert_allclose(got[key].numpy(), ref_ties(b[key], [t[key] for t in ts], density, lam),
                                       rtol=0, atol=2e-6, err_msg=f"{key} density={density}")


def test_uniform_is_todays_mean_bit_for_bit(tmp_path):
    from ofa_lib.merge import averaging

    _, paths, _, thetas = _models(tmp_path, 3, dtype=torch.bfloat16)
    got = merging.merge_files(merging.make_spec("linear"), paths)  # the alias
    want = averaging.average_checkpoints(paths, dtype=torch.float32)
    for key in want:
        assert torch.equal(got[key], want[key])
    mean = torch.stack([t["layer.weight"] for t in thetas]).mean(0)
    torch.testing.assert_close(got["layer.weight"], mean, rtol=0, atol=1e-6)
    stream = list(merging.incremental_states(merging.make_spec("uniform"), paths))
    for a, b in zip(stream, averaging.running_average(paths, dtype=torch.float32)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_task_arithmetic_incremental_equals_one_shot(tmp_path):
    base_file, paths, _, _ = _models(tmp_path, 4, dtype=torch.float16)
    spec = merging.make_spec("task_arithmetic")
    for r, state in enumerate(merging.incremental_states(spec, paths, base=base_file), start=1):
        one = merging.merge_files(spec, paths[:r], base=base_file)
        for key in one:
            torch.testing.assert_close(state[key], one[key], rtol=0, atol=1e-6)


def test_ties_over_several_blocks_equals_the_whole_tensor(tmp_path, monkeypatch):
    """Tensors larger than a block: the per-tensor threshold found by radix select over blocks."""
    base_file, paths, _, _ = _models(tmp_path, 3)
    spec = merging.make_spec("ties", {"density": 0.3})
    whole = merging.merge_files(spec, paths, base=base_file)
    monkeypatch.setattr(ckpt_io, "BLOCK", 24)  # 3 inputs -> 8 elements per block: emb (222) in 28+ blocks
    blocked = merging.merge_files(spec, paths, base=base_file)
    for key in whole:
        assert torch.equal(whole[key], blocked[key]), key


def test_dare_drops_rescales_and_is_reproducible(tmp_path, monkeypatch):
    big = {"w": (400, 250)}
    monkeypatch.setattr(sys.modules[__name__], "SHAPES", big)
    base_file, paths, base, thetas = _models(tmp_path, 2)
    tau = [t["w"] - base["w"] for t in thetas]
    for density in (0.1, 0.5, 0.9):
        spec = merging.make_spec("dare_linear", {"density": density, "lambda": 1.0, "seed": 3})
        got = merging.merge_files(spec, paths[:1], base=base_file)["w"] - base["w"]
        kept = got != 0
        assert abs(kept.float().mean().item() - density) < 0.01  # 100 000 entries: kept fraction ≈ density
        torch.testing.assert_close(got[kept], tau[0][kept] / density, rtol=1e-5, atol=1e-6)  # rescaled by 1/density
        again = merging.merge_files(spec, paths[:1], base=base_file)["w"] - base["w"]
        assert torch.equal(again, got)  # fixed seed: the same masks
        other = merging.merge_files(merging.make_spec("dare_linear", {"density": density, "seed": 4}), paths[:1],
                                    base=base_file)["w"] - base["w"]
        assert not torch.equal(other != 0, kept)
    # two inputs: independent masks per input position; the mean of the two rescaled task vectors
    spec = merging.make_spec("dare_linear", {"density": 0.5})
    two = merging.merge_files(spec, paths, base=base_file)["w"] - base["w"]
    m0 = merging.dare_mask(0, 0, "w", 0, 100_000, 0.5).view(400, 250)
    m1 = merging.dare_mask(0, 1, "w", 0, 100_000, 0.5).view(400, 250)
    assert 0.2 < (m0 & m1).float().mean().item() < 0.3  # independent: ≈ 0.25 overlap
    want = (torch.where(m0, tau[0] / 0.5, 0) + torch.where(m1, tau[1] / 0.5, 0)) / 2
    torch.testing.assert_close(two, want, rtol=1e-5, atol=1e-6)
    # dare_ties = TIES' elect and disjoint mean of the dropped, rescaled task vectors
    ties_d = merging.merge_files(merging.make_spec("dare_ties", {"density": 0.5}), paths, base=base_file)["w"] - base["w"]
    dropped = np.stack([torch.where(m0, tau[0] / 0.5, 0).double().numpy(), torch.where(m1, tau[1] / 0.5, 0).double().numpy()])
    ref = ref_ties(np.zeros((400, 250)), list(dropped), 1.0, 1.0)
    np.testing.assert_allclose(ties_d.double().numpy(), ref, rtol=0, atol=2e-6)
    # masks do not depend on where a tensor is cut into blocks
    cat = torch.cat([merging.dare_mask(7, 1, "w", 0, 30_001, 0.4), merging.dare_mask(7, 1, "w", 30_001, 69_999, 0.4)])
    assert torch.equal(cat, merging.dare_mask(7, 1, "w", 0, 100_000, 0.4))


def test_checks_name_the_file(tmp_path):
    base_file, paths, base, thetas = _models(tmp_path, 2)
    ties = merging.make_spec("ties")
    with pytest.raises(merging.MergeSpecError, match="needs the pretrained weights"):
        merging.merge_files(ties, paths)
    bad_head = dict(thetas[1])
    save_checkpoint(bad_head, tmp_path / "other.safetensors", metadata={"ofa_head_fingerprint": "ef" * 32})
    with pytest.raises(CheckpointMismatchError, match="other.safetensors"):
        merging.merge_files(ties, [paths[0], tmp_path / "other.safetensors"], base=base_file)
    save_checkpoint(base, tmp_path / "b2.safetensors", metadata={"ofa_head_fingerprint": "ef" * 32})
    with pytest.raises(CheckpointMismatchError, match="b2.safetensors"):
        merging.merge_files(ties, paths, base=tmp_path / "b2.safetensors")
    nan = dict(thetas[1], **{"layer.bias": torch.tensor([0.0, math.nan, 0, 0, 0])})
    save_checkpoint(nan, tmp_path / "nan.safetensors", metadata={"ofa_head_fingerprint": FP})
    for name in ("ties", "dare_ties", "task_arithmetic"):  # TIES' trim would otherwise drop the NaN silently
        with pytest.raises(NonFiniteError, match=r"nan.safetensors.*'layer.bias'"):
            merging.merge_files(merging.make_spec(name), [paths[0], tmp_path / "nan.safetensors"], base=base_file)
    short = {k: v for k, v in thetas[1].items() if k != "layer.bias"}
    save_checkpoint(short, tmp_path / "short.safetensors", metadata={"ofa_head_fingerprint": FP})
    with pytest.raises(CheckpointMismatchError, match="short.safetensors"):
        merging.merge_files(ties, [paths[0], tmp_path / "short.safetensors"], base=base_file)
    with pytest.raises(merging.MergeSpecError, match="03_average"):
        merging.merge_files(merging.make_spec("greedy_soup"), paths)


def test_registry_specs_and_content_keys():
    specs = merging.parse_methods({"ties": {"density": 0.2, "lambda": 1.0}, "linear": None})
    assert [s.label for s in specs] == ["ties(density=0.2,lambda=1.0)", "uniform"]
    assert merging.parse_methods(None) == [merging.make_spec("uniform")]
    for bad, match in ((["ties", "nope"], "unknown merge method 'nope'"), ({"ties": {"densty": 0.2}}, r"ties: unknown option"),
                       ({"ties": {"density": 1.5}}, "0 < density <= 1"), (["uniform", "linear"], "listed twice"),
                       ({"dare_ties": {"seed": 1.5}}, "non-negative integer"), ([{"ties": {}}], "method names")):
        with pytest.raises(merging.MergeSpecError, match=match):
            merging.parse_methods(bad)
    for s in [merging.make_spec(m) for m in merging.METHODS]:
        assert merging.spec_from_label(s.label) == s
    # the uniform key is the one the store always had (old cache entries hit); the others differ by
    # method and options, and keep the order only where it matters
    uni, ties = merging.make_spec("uniform"), merging.make_spec("ties")
    assert planning.average_key("ca", ["b", "a"]) == ("average", "ca", ("a", "b")) == uni.key("ca", ["a", "b"])
    assert ties.key("ca", ["b", "a"]) == ties.key("ca", ["a", "b"]) != uni.key("ca", ["a", "b"])
    assert ties.key("ca", ["a"]) != merging.make_spec("ties", {"density": 0.3}).key("ca", ["a"])
    dare = merging.make_spec("dare_ties")
    assert dare.key("ca", ["b", "a"]) != dare.key("ca", ["a", "b"])


def test_ofa_merge_command(tmp_path, capsys):
    base_file, paths, base, thetas = _models(tmp_path, 3)
    out = tmp_path / "out" / "ties.safetensors"
    cmd = [sys.executable, "-m", "ofa_lib.merge.cli", "--method", "ties", "--base", str(base_file), "--density", "0.5",
           "--lambda", "0.8", "--out", str(out), *map(str, paths)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = load_checkpoint(out)
    assert all(v.dtype == torch.float32 for k, v in got.items() if k != "pos")
    b, ts = _np(base), [_np(t) for t in thetas]
    for key in b:
        np.testing.assert_allclose(got[key].numpy(), ref_ties(b[key], [t[key] for t in ts], 0.5, 0.8), rtol=0, atol=2e-6)
    meta = read_metadata(out)
    assert meta[merging.METHOD_KEY] == "ties(density=0.5,lambda=0.8)"
    assert json.loads(meta[merging.OPTIONS_KEY]) == {"density": 0.5, "lambda": 0.8}
    inputs = json.loads(meta[merging.INPUTS_KEY])
    assert [i["sha256"] for i in inputs] == [io.file_sha256(p) for p in paths] and inputs[0]["run_id"] == "run0"
    assert json.loads(meta[merging.BASE_KEY])["sha256"] == io.file_sha256(base_file)
    assert meta["ofa_head_fingerprint"] == FP
    # errors: exit status 2, the file named, nothing written
    save_checkpoint(dict(thetas[0], **{"layer.bias": torch.zeros(6)}), tmp_path / "wide.safetensors",
                    metadata={"ofa_head_fingerprint": FP})
    code = merge_cli.main(["--method", "uniform", "--out", str(tmp_path / "u.safetensors"), str(paths[0]),
                         str(tmp_path / "wide.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "wide.safetensors" in err and "layer.bias" in err
    assert not (tmp_path / "u.safetensors").exists()
    assert merge_cli.main(["--method", "uniform", "--density", "0.5", "--out", str(tmp_path / "u.safetensors"),
                         *map(str, paths)]) == 2  # an option the method does not take


# --------------------------------------------------------------------------- fisher
def _fishers(tmp: Path, paths: list[Path], spec, seed: int = 1, zero: str = "layer.bias") -> tuple[list[Path], list[dict]]:
    """A stored diagonal per input (random non-negative, some exact zeros; ``zero``: 0 in every input)."""
    from ofa_lib.train import fisher

    gen = torch.Generator().manual_seed(seed)
    opts = fisher.diagonal_options(spec.opts)
    out, values = [], []
    for i, p in enumerate(paths):
        diag = {}
        for k, s in SHAPES.items():
            f = torch.rand(s, generator=gen) ** 3 * 1e-3
            f[torch.rand(s, generator=gen) < 0.2] = 0.0
            diag[k] = torch.zeros(s) if k == zero else f
        out.append(fisher.diagonal_file(tmp / "fisher", io.file_sha256(p), opts))
        fisher.save_diagonal(diag, out[-1], checkpoint_sha256=io.file_sha256(p), options=opts, examples=8)
        values.append({k: v.double().numpy() for k, v in diag.items()})
    return out, values


def ref_fisher(thetas, fishers, floor):
    """Matena & Raffel 2022, eq. 2 with a floor: Σ max(F, ε) θ / Σ max(F, ε)."""
    w = [np.maximum(f, floor) for f in fishers]
    return sum(wi * t for wi, t in zip(w, thetas)) / sum(w)


@pytest.mark.parametrize("n", [1, 3])
def test_fisher_matches_the_weighted_mean_and_falls_back_to_uniform(tmp_path, monkeypatch, n):
    _, paths, _, thetas = _models(tmp_path, n, dtype=torch.bfloat16)
    spec = merging.make_spec("fisher", {"examples": 8, "floor": 1e-8})
    fpaths, fvals = _fishers(tmp_path, paths, spec)
    ts = [_np(t) for t in thetas]
    got = merging.merge_files(spec, paths, fishers=fpaths)
    for key in SHAPES:
        want = ref_fisher([t[key] for t in ts], [f[key] for f in fvals], 1e-8)
        np.testing.assert_allclose(got[key].numpy(), want, rtol=2e-6, atol=2e-6, err_msg=key)
    # Fisher 0 in every input: the uniform mean
    np.testing.assert_allclose(got["layer.bias"].numpy(), np.mean([t["layer.bias"] for t in ts], axis=0), rtol=0, atol=1e-6)
    assert torch.equal(got["pos"], torch.arange(4))
    # incremental over r: each r is the merge of the first r inputs; row blocks change nothing
    for r, state in enumerate(merging.incremental_states(spec, paths, fishers=fpaths), start=1):
        one = merging.merge_files(spec, paths[:r], fishers=fpaths[:r])
        for key in one:
            torch.testing.assert_close(state[key], one[key], rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(ckpt_io, "BLOCK", 24)
    blocked = merging.merge_files(spec, paths, fishers=fpaths)
    assert all(torch.equal(blocked[k], got[k]) for k in got)


def test_fisher_refuses_diagonals_of_other_checkpoints_or_options(tmp_path):
    from ofa_lib.train import fisher

    _, paths, _, thetas = _models(tmp_path, 2)
    spec = merging.make_spec("fisher", {"examples": 8})
    fpaths, _ = _fishers(tmp_path, paths, spec)
    with pytest.raises(CheckpointMismatchError, match=r"m0.safetensors.*computed for the checkpoint with sha256"):
        merging.merge_files(spec, paths, fishers=fpaths[::-1])
    with pytest.raises(CheckpointMismatchError, match="computed with options"):
        merging.merge_files(merging.make_spec("fisher", {"examples": 9}), paths, fishers=fpaths)
    with pytest.raises(merging.MergeSpecError, match="one Fisher diagonal per input"):
        merging.merge_files(spec, paths, fishers=fpaths[:1])
    with pytest.raises(merging.MergeSpecError, match="one Fisher diagonal per input"):
        next(merging.incremental_states(spec, paths))
    short = tmp_path / "short.safetensors"
    sha = io.file_sha256(paths[0])
    fisher.save_diagonal({"emb.weight": torch.ones(SHAPES["emb.weight"])}, short, checkpoint_sha256=sha,
                         options=fisher.diagonal_options(spec.opts), examples=8)
    with pytest.raises(CheckpointMismatchError, match=r"short.safetensors has no tensor 'head.weight'"):
        merging.merge_files(spec, paths[:1], fishers=[short])
    for bad, match in (({"fisher": {"split": "test"}}, r"fisher.split: expected one of \['train', 'dev'\]"),
                       ({"fisher": {"examples": 0}}, "positive integer"), ({"fisher": {"floor": 0}}, "positive number"),
                       ({"fisher": {"density": 0.5}}, "unknown option")):
        with pytest.raises(merging.MergeSpecError, match=match):
            merging.parse_methods(bad)


def test_ofa_merge_fisher(tmp_path, capsys):
    _, paths, _, thetas = _models(tmp_path, 3)
    spec = merging.make_spec("fisher", {"examples": 8, "split": "dev", "labels": "argmax"})
    fpaths, fvals = _fishers(tmp_path, paths, spec)
    out = tmp_path / "fisher.safetensors"
    args = ["--method", "fisher", "--floor", "1e-9", "--out", str(out)]
    assert merge_cli.main(args + [a for f in fpaths for a in ("--fisher", str(f))] + [str(p) for p in paths]) == 0
    got, ts = load_checkpoint(out), [_np(t) for t in thetas]
    for key in SHAPES:
        np.testing.assert_allclose(got[key].numpy(), ref_fisher([t[key] for t in ts], [f[key] for f in fvals], 1e-9),
                                   rtol=2e-6, atol=2e-6)
    meta = read_metadata(out)
    assert meta[merging.METHOD_KEY] == "fisher(examples=8,floor=1e-09,labels='argmax',seed=0,split='dev')"
    assert [f["sha256"] for f in json.loads(meta[merging.FISHERS_KEY])] == [io.file_sha256(f) for f in fpaths]
    capsys.readouterr()
    assert merge_cli.main(args + [str(p) for p in paths]) == 2 and "--fisher F once per input" in capsys.readouterr().err
    assert merge_cli.main(args + ["--fisher", str(fpaths[1]), "--fisher", str(fpaths[0]), str(paths[0]), str(paths[1])]) == 2
    assert "computed for the checkpoint" in capsys.readouterr().err
    assert merge_cli.main(["--method", "uniform", "--fisher", str(fpaths[0]), "--out", str(tmp_path / "u.safetensors"),
                         str(paths[0])]) == 2
