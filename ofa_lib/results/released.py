"""The authors' released results (arXiv 2310.10532) read into the tidy table: per task the random-access
(``*_ra``) and zero-shot (``*_zs``) files under ``<data>/results/ofa_xlt_released``, their columns mapped onto
the study's run × snapshot × dataset × language × metric rows (:func:`import_released`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ofa_lib.paths import data_dir as _default_data_dir
from ofa_lib.results import (
    ALL,
    RUN_TABLE_COLUMNS,
    SOURCE_LANG,
    TASK_METRIC,
    VARIANTS,
    conform,
    cross_name,
    join_members,
)

RELEASED_SUBDIR = Path("results") / "ofa_xlt_released"
_RA_FILE = {"nli": "nli_ra.parquet", "ner": "ner_ra.parquet", "tydiqa": "tyqa_ra.parquet"}
_ZS_FILE = {"nli": "nli_zs.parquet", "ner": "ner_zs.parquet", "tydiqa": "tydiqa_zs.parquet"}
# datasets whose non-English test columns make up the study's target set, and their counts
TARGET_DATASETS = {
    "nli": ("xnli", "indicxnli"),
    "ner": ("wikiann", "masakhaner", "masakhaner2"),
    "tydiqa": ("tydiqa",),
}
N_TARGETS = {"nli": 25, "ner": 54, "tydiqa": 8}
# the source-language dev set the released validation_* columns were computed on (as the
# authors' framework names it: XNLI/WikiANN/TyDiQA English dev); used as the tidy dataset
SOURCE_DATASET = {"nli": "xnli", "ner": "wikiann", "tydiqa": "tydiqa"}
SCALE = {"nli": 1.0, "ner": 1.0, "tydiqa": 100.0}  # released TyDiQA scores are percentages
# column suffix -> study variant
RELEASED_VARIANT = {"last": "last", "oracle-source": "src_dev", "avg-ckpt": "ca", "oracle": "trg_dev"}
# _ra `weights` -> (tidy kind, method, variant)
RELEASED_WEIGHTS = {
    "ralast": ("average", "acc_avg", "last"),
    "rasrcdev": ("average", "acc_avg", "src_dev"),
    "raca": ("average", "acc_avg", "ca"),
    "ratop3": ("soup", "soup", "top3"),
    "ratop5": ("soup", "soup", "top5"),
    "ratop10": ("soup", "soup", "top10"),
}
_COL_RE = re.compile(
    r"^(?P<dataset>[a-z0-9]+)_(?P<lang>[a-z]+)_(?P<metric>acc|f1|exact_match)"
    r"(?:_(?P<variant>last|oracle-source|avg-ckpt|oracle))?$"
)


def _parse_columns(columns: Iterable[str], task: str) -> pd.DataFrame:
    """Test columns of the study's datasets -> frame column, dataset, lang, metric, variant."""
    rows = []
    for c in columns:
        name = "t" + c if (task == "tydiqa" and c.startswith("ydiqa_")) else c  # upstream quirk
        m = _COL_RE.match(name)
        if not m or m["dataset"] not in TARGET_DATASETS[task] or m["metric"] != TASK_METRIC[task]:
            continue
        rows.append(
            {"column": c, "dataset": m["dataset"], "lang": m["lang"], "metric": m["metric"],
             "variant": RELEASED_VARIANT.get(m["variant"]) if m["variant"] else None}
        )
    return pd.DataFrame(rows, columns=["column", "dataset", "lang", "metric", "variant"])


@dataclass
class ReleasedResults:
    """The authors' released results for one task and model.

    Attributes
    ----------
    runs: the ``*_zs`` rows of the model (one per fine-tuning run, original columns).
    cross: the ``*_ra`` rows with ``approach == "all"`` (original columns).
    targets: ``(dataset, lang)`` pairs of the target languages (25 / 54 / 8).
    run_table: one row per run, see :data:`RUN_TABLE_COLUMNS` (scores in [0, 1]).
    averages: one row per cross-run evaluation: ``method`` (acc_avg | soup), ``variant``
        (last, src_dev, ca | top3, top5, top10), ``sampling`` (int), ``r`` (int), ``ids``
        (tuple of run ids, sampling order) and ``score`` (flat target mean in [0, 1]).
    """

    task: str
    model: str
    runs: pd.DataFrame
    cross: pd.DataFrame
    targets: list[tuple[str, str]]
    run_table: pd.DataFrame
    averages: pd.DataFrame
    _columns_zs: pd.DataFrame = field(repr=False, default=None)
    _columns_ra: pd.DataFrame = field(repr=False, default=None)

    @property
    def metric(self) -> str:
        return TASK_METRIC[self.task]

    @property
    def sampling_seeds(self) -> list[int]:
        return sorted(self.averages["sampling"].unique().tolist())

    def to_tidy(self) -> pd.DataFrame:
        """All of it as tidy rows (:data:`SCHEMA`), per language.

        Runs: ``kind="variant"`` rows per variant with the test scores of every target
        language plus English (``lang="en"``), the source dev score (``split="validation"``,
        ``lang="en"``, dataset :data:`SOURCE_DATASET`) for last/src_dev/ca, and
        ``validation_oracle`` as ``name="trg_dev", dataset="*", lang="*"``.
        Cross-run rows: ``kind="average"`` (``acc_avg:<v>:r=<r>:sampling=<s>``) and
        ``kind="soup"`` (``soup:top<k>:r=<r>:sampling=<s>``) with per-language test scores
        and ``members``. TyDiQA exact-match and NLI's AmericasNLI/JamPatois are left out.
        """
        scale = SCALE[self.task]
        metric = self.metric
        # --- runs: test columns
        cz = self._columns_zs[self._columns_zs["variant"].notna()]
        base = self.runs[["id", "lr", "bs", "seed"]].rename(
            columns={"id": "run_id", "bs": "batch_size"}
        )
        long = self.runs[["id"] + cz["column"].tolist()].melt(
            id_vars="id", var_name="column", value_name="value"
        ).rename(columns={"id": "run_id"})
        long = long.merge(cz, on="column", how="left").rename(columns={"variant": "name"})
        long["split"] = "test"
        # --- runs: validation columns
        vals = []
        for col, v in (("validation_last", "last"), ("validation_oracle-source", "src_dev"),
                       ("validation_avg-ckpt", "ca")):
            vals.append(pd.DataFrame({"run_id": self.runs["id"], "name": v,
                                      "dataset": SOURCE_DATASET[self.task], "lang": SOURCE_LANG,
                                      "value": self.runs[col]}))
        vals.append(pd.DataFrame({"run_id": self.runs["id"], "name": "trg_dev", "dataset": ALL,
                                  "lang": ALL, "value": self.runs["validation_oracle"]}))
        val = pd.concat(vals, ignore_index=True)
        val["split"] = "validation"
        val["metric"] = metric
        runs = pd.concat([long.drop(columns="column"), val], ignore_index=True)
        runs = runs.merge(base, on="run_id", how="left")
        runs["kind"] = "variant"
        runs["members"] = ""
        # --- cross-run rows
        cr = self._columns_ra
        cross = self.cross.copy()
        kinds = cross["weights"].map(lambda w: RELEASED_WEIGHTS[w][0])
        cross["_name"] = [
            cross_name(RELEASED_WEIGHTS[w][1], RELEASED_WEIGHTS[w][2], int(r), int(s))
            for w, r, s in zip(cross["weights"], cross["num_models"], cross["seed"])
        ]
        cross["_kind"] = kinds
        cross["_members"] = cross["ids"].map(join_members)
        cl = cross[["_name", "_kind", "_members"] + cr["column"].tolist()].melt(
            id_vars=["_name", "_kind", "_members"], var_name="column", value_name="value"
        ).merge(cr, on="column", how="left")
        cl = cl.rename(columns={"_name": "name", "_kind": "kind", "_members": "members"})
        cl["run_id"] = cl["name"]
        cl["split"] = "test"
        out = pd.concat([runs, cl.drop(columns=["column", "variant"])], ignore_index=True)
        out["value"] = out["value"] / scale
        out["task"] = self.task
        out["model"] = self.model
        return conform(out)


def _flat_mean(frame: pd.DataFrame, columns: list[str], scale: float) -> pd.Series:
    return (frame[columns].astype("float64") / scale).mean(axis=1)


def import_released(
    task: str, model: str = "xlm-roberta-large", data_dir: str | os.PathLike | None = None
) -> ReleasedResults:
    """Read the authors' released results of ``task`` (nli | tydiqa | ner) for ``model``.

    Follows docs/method.md §4 "Regenerating the authors' numbers": target columns
    (NLI: xnli_* and indicxnli_* = 25; NER: wikiann, masakhaner, masakhaner2 = 54; TyDiQA:
    8 non-English F1, ``ydiqa_*`` read as ``tydiqa_*``), English dropped, one flat mean over
    all target columns; cross-run rows with ``approach == "all"``; TyDiQA / 100.
    """
    if task not in _ZS_FILE:
        raise ValueError(f"unknown task {task!r}; released results exist for {sorted(_ZS_FILE)}")
    root = Path(data_dir) if data_dir is not None else _default_data_dir()
    folder = root / RELEASED_SUBDIR
    zs_all = pd.read_parquet(folder / _ZS_FILE[task])
    ra_all = pd.read_parquet(folder / _RA_FILE[task])
    zs = zs_all[zs_all["model"] == model].reset_index(drop=True)
    ra = ra_all[(ra_all["model"] == model) & (ra_all["approach"] == "all")].reset_index(drop=True)
    if zs.empty:
        raise ValueError(
            f"no released {task} runs for model {model!r}; models: {sorted(zs_all['model'].unique())}"
        )
    scale = SCALE[task]
    cz = _parse_columns(zs.columns, task)
    cr = _parse_columns(ra.columns, task)
    targets_z = sorted({(d, lang) for d, lang in zip(cz["dataset"], cz["lang"]) if lang != SOURCE_LANG})
    if len(targets_z) != N_TARGETS[task]:
        raise ValueError(f"{task}: expected {N_TARGETS[task]} target languages, found {len(targets_z)}")
    # --- run table straight from the wide frame (flat mean over target columns)
    rt = pd.DataFrame({
        "run_id": zs["id"].astype("str"),
        "lr": zs["lr"].astype("float64"),
        "batch_size": zs["bs"].astype("Int64"),
        "seed": zs["seed"].astype("Int64"),
    })
    for v in VARIANTS:
        rt[f"dev_src_{v}"] = np.nan
        rt[f"dev_trg_{v}"] = np.nan
    rt["dev_src_last"] = zs["validation_last"] / scale
    rt["dev_src_src_dev"] = zs["validation_oracle-source"] / scale
    rt["dev_src_ca"] = zs["validation_avg-ckpt"] / scale
    rt["dev_trg_trg_dev"] = zs["validation_oracle"] / scale
    for v in VARIANTS:
        cols = cz[(cz["variant"] == v) & (cz["lang"] != SOURCE_LANG)]
        if len(cols) != N_TARGETS[task]:
            raise ValueError(f"{task}: variant {v} has {len(cols)} target columns")
        rt[f"test_{v}"] = _flat_mean(zs, cols["column"].tolist(), scale)
    rt = rt[RUN_TABLE_COLUMNS]
    # --- cross-run rows
    tcols = cr[cr["lang"] != SOURCE_LANG]
    if len(tcols) != N_TARGETS[task]:
        raise ValueError(f"{task}: cross-run rows have {len(tcols)} target columns")
    if not ra.empty:
        averages = pd.DataFrame({
            "method": ra["weights"].map(lambda w: RELEASED_WEIGHTS[w][1]),
            "variant": ra["weights"].map(lambda w: RELEASED_WEIGHTS[w][2]),
            "sampling": ra["seed"].astype(int),
            "r": ra["num_models"].astype(int),
            "ids": ra["ids"].map(lambda a: tuple(str(i) for i in a)),
            "score": _flat_mean(ra, tcols["column"].tolist(), scale),
        })
    else:
        averages = pd.DataFrame(columns=["method", "variant", "sampling", "r", "ids", "score"])
    bad = averages[averages["ids"].map(len) != averages["r"]]
    if len(bad):
        raise ValueError(f"{task}: {len(bad)} cross-run rows whose ids do not have r entries")
    unknown = set(i for ids in averages["ids"] for i in ids) - set(rt["run_id"])
    if unknown:
        raise ValueError(f"{task}: cross-run rows name runs not in the run table: {sorted(unknown)[:5]}")
    averages = averages.sort_values(["method", "variant", "sampling", "r"]).reset_index(drop=True)
    return ReleasedResults(
        task=task, model=model, runs=zs, cross=ra, targets=targets_z, run_table=rt,
        averages=averages, _columns_zs=cz, _columns_ra=cr,
    )
