"""Reading one run's outputs (``outputs/runs/<run_id>/``) back as tables and plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ofa_lib.train.config import SOURCE_LANG, TrainConfig
from ofa_lib.train.metrics import PRIMARY_METRIC


@dataclass
class Run:
    """A finished (or running) run: its manifest, tidy metrics and training log."""

    path: Path
    manifest: dict[str, Any]
    metrics: pd.DataFrame
    train_log: pd.DataFrame

    @property
    def task(self) -> str:
        return self.manifest["params"]["task"]

    @property
    def config(self) -> TrainConfig:
        """The run's training configuration, from its manifest."""
        return TrainConfig(**self.manifest["params"])

    @property
    def primary(self) -> str:
        return PRIMARY_METRIC[self.task]

    def summary(self) -> pd.DataFrame:
        """One-row overview: status, steps, timings, chosen snapshots."""
        m = self.manifest
        timings = m.get("timings", {})
        return pd.DataFrame([{
            "run_id": m["run_id"], "status": m["status"], "steps": m.get("total_steps"),
            "train features": m.get("n_train_features"), "vocab": m.get("vocab_size"),
            "trainable params": m.get("trainable"), "SRC-DEV snapshot": m.get("src_dev_snapshot"),
            "TRG-DEV snapshot": m.get("trg_dev_snapshot"),
            "train s": round(timings.get("train_s", float("nan")), 1),
            "examples/s": round(timings.get("train_examples_per_s", float("nan")), 1),
            "head fingerprint": (m.get("head_fingerprint") or "")[:12],
        }]).set_index("run_id")


def read_manifest(path: str | Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """A run folder's ``manifest.json`` (the one place that parses it); ``None`` when it has none and
    ``missing_ok``, else :class:`FileNotFoundError` naming the file."""
    file = Path(path) / "manifest.json"
    if not file.is_file():
        if missing_ok:
            return None
        raise FileNotFoundError(f"{file} does not exist: not a run directory")
    return json.loads(file.read_text())


def run_config(path: str | Path) -> TrainConfig:
    """The training configuration a run folder records in its manifest."""
    return TrainConfig(**read_manifest(path)["params"])


def load_run(path: str | Path) -> Run:
    """Read a run directory written by :func:`ofa_lib.train.training.run_training`."""
    path = Path(path)
    manifest = read_manifest(path)
    metrics = pd.read_parquet(path / "metrics.parquet") if (path / "metrics.parquet").is_file() else pd.DataFrame()
    log = pd.read_parquet(path / "train_log.parquet") if (path / "train_log.parquet").is_file() else pd.DataFrame()
    return Run(path, manifest, metrics, log)


def config_table(cfg: TrainConfig) -> pd.DataFrame:
    """The resolved parameters of a run, one row per parameter."""
    rows = [{"parameter": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else v} for k, v in cfg.canonical().items()]
    return pd.DataFrame(rows + [{"parameter": "run_id", "value": cfg.run_id}]).set_index("parameter")


def variant_table(run: Run, split: str = "test") -> pd.DataFrame:
    """Primary metric ×100 per (dataset, language) × variant, with the flat target mean."""
    df = run.metrics
    df = df[(df.kind == "variant") & (df.split == split) & (df.metric == run.primary)]
    table = df.pivot_table(index=["dataset", "lang"], columns="name", values="value") * 100
    table.loc[("mean", "all targets"), :] = table.mean()
    cols = [c for c in ("last", "src_dev", "ca", "trg_dev") if c in table.columns]
    return table[cols + [c for c in table.columns if c not in cols]].round(1)


def snapshot_curves(run: Run) -> pd.DataFrame:
    """Per snapshot: step, English dev and mean target dev (primary metric)."""
    df = run.metrics
    df = df[(df.kind == "snapshot") & (df.metric == run.primary)].copy()
    src_lang = SOURCE_LANG.get(run.manifest["params"]["train_dataset"], "en")
    src_dataset = run.manifest["params"]["source_dev_dataset"]
    is_src = (df.dataset == src_dataset) & (df.lang == src_lang)
    out = pd.DataFrame({
        "English dev": df[is_src].groupby("step").value.mean(),
        "mean target dev": df[~is_src].groupby("step").value.mean(),
    })
    return out


def trg_dev_choices(run: Run) -> pd.DataFrame:
    """The snapshot TRG-DEV picks per target language, against the run-level choices."""
    m = run.manifest
    rows = [{"target": k, "best snapshot": v} for k, v in (m.get("trg_dev_per_language") or {}).items()]
    table = pd.DataFrame(rows)
    if not table.empty:
        table["SRC-DEV snapshot"] = m.get("src_dev_snapshot")
        table["TRG-DEV (mean) snapshot"] = m.get("trg_dev_snapshot")
    return table
