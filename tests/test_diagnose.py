"""CA diagnosis tooling (ofa_lib.analysis.diagnose): the weights arithmetic on small tensors (fast). The end-to-end
``python -m ofa_lib.analysis.diagnose`` was run on the demo's runs (issue 18's note)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from ofa_lib.analysis import diagnose as D


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


def test_verdict_from_numbers():
    def frame(last_ca_drop, r1=0.0):
        rows = [D._row("start", "theta0", "", "en_dev", 0.25), D._row("r1_check", "a", "ca", "max_abs_diff", r1)]
        rows += [D._row("snapshot", "a", k, "en_dev", 0.25 if k < 3 else 0.7) for k in range(1, 6)]
        last, ca, drop = last_ca_drop
        rows += [D._row("r1_check", "a", "last", "trg_test_stored", last), D._row("r1_check", "a", "ca", "trg_test_stored", ca),
                 D._row("ca_drop", "a", 0, "trg_test", ca), D._row("ca_drop", "a", 2, "trg_test", drop)]
        return pd.DataFrame(rows, columns=D.COLUMNS)

    assert D.verdict(frame((0.57, 0.26, 0.55))) == "unconverged"  # 29 of the 31 points back without snapshots 1-2
    assert D.verdict(frame((0.57, 0.26, 0.30))) == "open"
    assert D.verdict(frame((0.57, 0.60, 0.60))) == "ca_not_weaker"
    assert D.verdict(frame((0.57, 0.26, 0.55), r1=0.01)) == "defect"
    assert D.run_findings(frame((0.57, 0.26, 0.55)))["early"].iloc[0] == 2


def test_the_report_finds_a_diagnosis_in_its_folder_when_asked_to(tmp_path):
    from ofa_lib.analysis import report

    assert report.diagnosis_folder(None, tmp_path) is None
    assert report.diagnosis_folder("auto", tmp_path) is None  # nothing written yet: the report says how
    (tmp_path / "diagnosis").mkdir()
    (tmp_path / "diagnosis" / "diagnosis.md").write_text("CA trails LAST because ...")
    assert report.diagnosis_folder("auto", tmp_path) == tmp_path / "diagnosis"
    assert report.diagnosis_folder(str(tmp_path / "x"), tmp_path) == tmp_path / "x"
    assert "CA trails LAST" in report.diagnosis_markdown(report.diagnosis_folder("auto", tmp_path))
    with pytest.raises(FileNotFoundError, match="parameter diagnosis="):
        report.diagnosis_markdown(tmp_path / "x")
