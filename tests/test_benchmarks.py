"""The benchmark collector's formatting (benchmarks/make_results.py); no benchmark is run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _common as c  # noqa: E402
import make_results  # noqa: E402


def _result(name: str, summary: list[dict], **extra) -> dict:
    return {"name": name, "title": f"{name} title", "date": "2025-01-01T00:00:00+00:00",
            "machine": {"cpu": "Test CPU", "cores": 2, "mem_gib": 8.0, "platform": "Linux", "python": "3.11.7",
                        "versions": {"torch": "2.13.0"}, "git": "abc123", "loadavg": [0.1, 0.2, 0.3]},
            "argv": [f"benchmarks/bench_{name}.py"], "seconds": 12.5, "markdown": f"{name} body table\n",
            "summary": summary, "data": {}, **extra}


def test_fmt_and_stats():
    assert c.fmt([3.0, 1.0, 2.0], 1) == "2.0 (1.0–3.0)"
    assert c.fmt([5.0], 0, "s") == "5 s (1 measurement)"
    assert c.stats([1, 2, 3, 10])["median"] == 2.5
    assert c.fmt_bytes(2.24e9) == "2.24 GB"
    with pytest.raises(ValueError, match="status"):
        c.summary_row("x", "1", "2", "0.5", status="ok")


def test_build_marks_targets_and_missing_parts(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "averaging.json").write_text(json.dumps(_result("averaging", [
        c.summary_row("averaging N=2: wall time", "0.70 s (0.69–0.71)", "reading: 0.40 s", "1.75× reading",
                      "≤ 1.5×", "missed", why="fixed passes dominate at small N"),
        c.summary_row("averaging N=2: peak RSS", "300 MiB", "one file: 224 MiB", "1.34×", "≤ 2.5×", "met"),
    ])))
    (raw / "training_cuda_xlmr-large.json").write_text(json.dumps(_result("training_cuda_xlmr-large", [])))
    (raw / "notes.json").write_text("[1, 2]")  # not a result: ignored
    text = make_results.build(raw, tmp_path / "no_grid_summary.json")

    assert "Test CPU, 2 cores" in text and "torch 2.13.0" in text and "git abc123" in text
    # the summary row keeps ours, the baseline and the ratio side by side, with the target status
    assert "| averaging N=2: wall time | 0.70 s (0.69–0.71) | reading: 0.40 s | 1.75× reading | ≤ 1.5× | ❌ missed |" in text
    assert "✅ met" in text
    assert "fixed passes dominate at small N" in text.split("## Missed targets")[1].split("## 1.")[0]
    assert "averaging body table" in text
    # what was not measured says how to measure it
    assert "Not measured: run `python benchmarks/bench_accumulative.py`" in text
    assert "not measured: run `make demo` first" in text
    assert "training_cuda_xlmr-large title" in text and "no GPU lent" not in text
    assert text.index("## 1.") < text.index("## 2.") < text.index("## 6.") < text.index("## 7.")


def test_build_reads_the_demo_grid_summary(tmp_path):
    grid = tmp_path / "grid_summary.json"
    full = {"wall_s": 960.4, "started": 0, "finished": 960.4, "trained": 6}
    rerun = {"wall_s": 30.0, "started": 2000, "finished": 2030, "trained": 0}
    grid.write_text(json.dumps({"wall_s": 30.0, "runs": 6, "started": 2000, "finished": 2030,
                                "machine": {"host": "box", "cpus": 2}, "invocations": [full, rerun]}))
    text = make_results.build(tmp_path / "empty", grid)
    line = next(x for x in text.splitlines() if x.startswith("Demo grid"))
    # the whole grid's cost, not the re-run that skipped finished runs
    assert "every run trained: **16.0 min** (960 s), started 1970-01-01T00:00:00+00:00" in line
    assert "latest invocation: **0.5 min** (30 s)" in line and "machine: host=box, cpus=2" in line
    assert "Not measured (no GPU lent)" in text
    assert "No benchmark has been run yet" in text


def test_main_writes_atomically(tmp_path):
    out = tmp_path / "RESULTS.md"
    make_results.main(["--raw", str(tmp_path), "--grid-summary", str(tmp_path / "g.json"), "--out", str(out)])
    assert out.read_text().startswith("# Benchmark results")
