"""CA diagnosis tooling (ofa_lib.diagnose): the weights arithmetic on small tensors (fast), and the whole
diagnosis on two REAL smoke runs (slow)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from ofa_lib import config, diagnose as D, training


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g),
             "ids": torch.arange(3)} for _ in range(n)]


def test_interpolate_and_distance():
    a, b = _states(2)
    assert torch.equal(D.interpolate(a, b, 0.0)["w"], a["w"]) and torch.allclose(D.interpolate(a, b, 1.0)["w"], b["w"])
    mid = D.interpolate(a, b, 0.5)
    assert torch.allclose(mid["w"], (a["w"] + b["w"]) / 2) and torch.equal(mid["ids"], a["ids"])
    want = math.sqrt(float(((a["w"] - b["w"]) ** 2).sum() + ((a["b"] - b["b"]) ** 2).sum()))
    assert D.l2_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert D.l2_distance(a, a) == 0.0
    # the midpoint is half-way: distances add up along the line
    assert D.l2_distance(a, mid) == pytest.approx(want / 2, rel=1e-5)
    bad = dict(b, ids=torch.arange(1, 4))
    with pytest.raises(ValueError, match="non-floating tensor 'ids' differs"):
        D.interpolate(a, bad, 0.5)


def test_ca_drop_from_kept_snapshots():
    snaps = _states(5, seed=1)
    n = 5
    ca = D.mean_in_dtype(snaps, torch.float32)
    allk = dict(enumerate(snaps, start=1))
    for k in range(n):
        want = D.mean_in_dtype(snaps[k:], torch.float32)
        got = D.snapshots_after(n, k, allk, ca)
        assert torch.allclose(got["w"], want["w"], atol=1e-6), k
    # only the late snapshots kept (top-k of a converging run): k >= 2 exact from them, k = 1 not computable
    late = {i: allk[i] for i in (3, 4, 5)}
    assert D.snapshots_after(n, 1, late, ca) is None
    assert torch.allclose(D.snapshots_after(n, 2, late, ca)["w"], D.mean_in_dtype(snaps[2:], torch.float32)["w"], atol=1e-6)
    # only the early ones kept: subtracted from n·CA
    early = {1: allk[1], 2: allk[2]}
    assert torch.allclose(D.snapshots_after(n, 2, early, ca)["w"], D.mean_in_dtype(snaps[2:], torch.float32)["w"], atol=1e-5)
    missing, um = D.unstored_mean(n, late, ca)
    assert missing == [1, 2] and torch.allclose(um["w"], (snaps[0]["w"] + snaps[1]["w"]) / 2, atol=1e-5)
    assert D.unstored_mean(n, allk, ca) == ([], None)
    with pytest.raises(ValueError, match="k must be in 0..4"):
        D.snapshots_after(n, 5, allk, ca)


def test_mean_in_dtype_rounds_like_the_dtype():
    snaps = [{"w": torch.full((8,), 1.0 + i * 1e-4)} for i in range(4)]
    fp32 = D.mean_in_dtype(snaps, torch.float32)["w"]
    fp16 = D.mean_in_dtype(snaps, torch.float16)["w"]
    assert fp32.dtype == fp16.dtype == torch.float32
    assert float((fp32 - 1.00015).abs().max()) < 1e-6
    assert float((fp16 - fp32).abs().max()) > 1e-5  # fp16 cannot hold 1 + 1.5e-4 (its step near 1 is ~1e-3)


# ---------------------------------------------------------------- the whole diagnosis on real smoke runs

SMALL = dict(seed=1, num_snapshots=3, top_k=1, head="init:0", train_subsample=24, dev_subsample=8, test_subsample=8)


@pytest.mark.slow
def test_diagnose_smoke_runs(tmp_path):
    root = tmp_path / "runs"
    paths = [training.run_training(config.make_config("sib", "smoke", lr=lr, batch_size=8, **SMALL), root, progress=False)
             for lr in (5e-5, 1e-4)]
    df = D.diagnose(paths, ts=(0.0, 0.5, 1.0))
    assert list(df.columns) == D.COLUMNS
    # r = 1: averaging one run's file scores what the run stored, exactly
    r1 = df[(df["analysis"] == "r1_check") & (df["measure"] == "max_abs_diff")]
    assert len(r1) == 6 and float(r1["value"].max()) <= 1e-6
    # the interpolation's ends are the runs' own models
    r1s = df[(df["analysis"] == "r1_check") & (df["measure"] == "trg_test")].set_index(["subject", "x"])["value"]
    ida = paths[0].name
    curve = df[(df["analysis"] == "interpolation") & (df["measure"] == "trg_test") & df["subject"].str.startswith("CA ")]
    curve = curve[curve["subject"].str.endswith(f"LAST {ida}")].set_index("x")["value"]
    assert curve["0.0"] == pytest.approx(r1s[(ida, "ca")]) and curve["1.0"] == pytest.approx(r1s[(ida, "last")])
    # top_k=1 keeps the SRC-DEV snapshot and LAST: k = 0 (CA) always; the rest only where the kept files allow
    drop = df[(df["analysis"] == "ca_drop") & (df["measure"] == "trg_test")]
    assert len(drop) == 2 * 3 and drop[drop["x"] == "0"]["value"].notna().all()
    assert (df["analysis"] == "ca_unstored").any() or (df["measure"] == "max_abs_diff").sum() > 6
    # ends not evaluated come from the stored scores; unknown analyses are refused
    few = D.diagnose(paths, ts=(0.5,), analyses=("interpolation",))
    ends = few[(few["analysis"] == "interpolation") & (few["measure"] == "trg_test") & (few["note"] == "stored")]
    assert len(ends) == 6 and set(few["analysis"]) == {"start", "interpolation", "snapshot", "r1_check"}
    with pytest.raises(ValueError, match="unknown analyses"):
        D.diagnose(paths, analyses=("nope",))
    dist = df[(df["analysis"] == "distance") & (df["x"] == "ca")]["value"]
    assert (dist > 0).all()
    assert set(df[df["analysis"] == "dtype"]["x"]) == {"float32", "float16"}
    text = D.summary_sentences(df)
    assert text.count("Run ") == 2 and "Averaging one run returns that run's stored test scores exactly" in text
    assert "Verdict:" in text
    written = D.write_outputs(df, tmp_path / "diag")
    assert all(p.stat().st_size > 0 for p in written)
    pd.testing.assert_frame_equal(pd.read_parquet(written[0]), df.reset_index(drop=True), check_like=True)
