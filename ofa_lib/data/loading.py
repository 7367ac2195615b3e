"""Loading every benchmark as a ``datasets.Dataset``: from the offline mirror, or from its public hub copy.

``load_split(dataset, lang, split)`` is the entry point; where it reads from is :func:`ofa_lib.data.locate.locate`'s
rule, the mirror's files are read by :mod:`ofa_lib.data.readers` and the hub's splits by
:mod:`ofa_lib.data.hub_rows`. :func:`source_of` says where a loaded split came from (mirror path and file hash, or
hub repository, config and revision); runs record it in their manifest.

Columns by task:

- ``nli``: ``premise, hypothesis, label`` (ClassLabel entailment / neutral / contradiction;
  MultiNLI's word ``contradictory`` maps to 2 like XNLI's ``contradiction``).
- ``ner``: ``tokens, ner_tags`` over one shared label list ``NER_LABELS`` (DATE → O by default,
  as in the published study); ``map_date_to_o=False`` keeps ``B-DATE, I-DATE`` as ids 7, 8.
- ``qa``: ``id, title, context, question, answers`` (SQuAD v1.1 layout).
- ``sib`` / ``sentiment``: ``text, label``.

Malformed records are skipped with a ``MalformedDataWarning`` naming the file, the lines and the reason
(:mod:`ofa_lib.data.readers`); a split with no rows is a :class:`~ofa_lib.data.catalog.DataError`.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ofa_lib.data.catalog import (
    DATASETS,
    NLI_LABELS,
    SENTIMENT_LABELS,
    SIB_TOPICS,
    DataError,
    MalformedDataWarning,
    ner_labels,
)
from ofa_lib.data.hub_rows import hub_columns, load_hub_rows
from ofa_lib.data.locate import Location, locate_checked, mirror_files
from ofa_lib.data.readers import PARSERS
from ofa_lib.io import file_sha256
from ofa_lib.paths import REPO_ROOT

logger = logging.getLogger(__name__)


def _features(name: str, map_date_to_o: bool) -> datasets.Features:
    task = DATASETS[name].task
    string = datasets.Value("string")
    if task == "nli":
        return datasets.Features(
            {"premise": string, "hypothesis": string, "label": datasets.ClassLabel(names=NLI_LABELS)}
        )
    if task == "ner":
        names = ner_labels(with_date=not map_date_to_o)
        return datasets.Features(
            {"tokens": datasets.List(string), "ner_tags": datasets.List(datasets.ClassLabel(names=names))}
        )
    if task == "qa":
        return datasets.Features(
            {
                "id": string,
                "title": string,
                "context": string,
                "question": string,
                "answers": {"text": datasets.List(string), "answer_start": datasets.List(datasets.Value("int32"))},
            }
        )
    names = SIB_TOPICS if task == "sib" else SENTIMENT_LABELS
    return datasets.Features({"text": string, "label": datasets.ClassLabel(names=names)})


@functools.lru_cache(maxsize=None)
def _load_full(
    name: str, kind: str, where: str, lang: str, split: str, map_date_to_o: bool
) -> tuple[datasets.Dataset, tuple[str, ...], str, dict[str, Any]]:
    """Read one split once per process: (dataset, problems, label for messages, source record)."""
    if kind == "mirror":
        root = Path(where)
        paths = mirror_files(name, root, lang, split)
        columns, problems = PARSERS[name](paths, {"map_date_to_o": map_date_to_o})
        label = str(paths[0])
        source = {"source": "mirror", "root": str(root),
                  "files": [{"path": str(p.relative_to(root)), "sha256": file_sha256(p), "bytes": p.stat().st_size}
                            for p in paths]}
    else:
        raw, source = load_hub_rows(name, lang, split, Location(kind, where))
        label = f"{where} ({source['config']}/{source['split']})"
        columns, problems = hub_columns(name, raw, label, map_date_to_o)
    ds = datasets.Dataset.from_dict(columns, features=_features(name, map_date_to_o), split=split)
    return ds, tuple(problems), label, source


def _report(where: str, problems: tuple[str, ...]) -> None:
    msg = f"{where}: skipped {len(problems)} malformed record(s): " + " | ".join(problems)
    logger.warning(msg)
    warnings.warn(msg, MalformedDataWarning, stacklevel=3)


def subsample_indices(n_rows: int, n: int, seed: int = 0) -> list[int]:
    """``n`` distinct row indices out of ``n_rows``, seeded, in increasing order."""
    if n >= n_rows:
        return list(range(n_rows))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.permutation(n_rows)[:n])


def load_split(
    dataset: str,
    lang: str,
    split: str,
    *,
    subsample: int | None = None,
    seed: int = 0,
    map_date_to_o: bool = True,
    source: str = "auto",
) -> datasets.Dataset:
    """Load one split of one language as a ``datasets.Dataset`` (see the module docstring).

    ``subsample=n`` keeps a seeded random subset of ``n`` rows (original order; the same
    rows for the same seed; the whole split if ``n`` is larger). ``map_date_to_o`` only
    matters for NER. ``source`` = ``auto`` (mirror, else hub) | ``mirror`` | ``hub``.
    Malformed records are skipped with a ``MalformedDataWarning``; an empty split is a :class:`DataError`.
    """
    if subsample is not None and (isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1):
        raise ValueError(f"subsample={subsample!r} must be a positive int or None")
    loc = locate_checked(dataset, lang, split, source)
    full, problems, where, _ = _load_full(dataset, loc.kind, loc.where, lang, split, bool(map_date_to_o))
    if problems:
        _report(where, problems)
    if len(full) == 0:
        raise DataError(f"{where}: {dataset}/{lang}/{split} has no examples (a header or an empty file only); "
                        "expected at least one")
    ds = copy.deepcopy(full)  # shares the Arrow data; in-place format changes stay local
    if subsample is not None and subsample < len(ds):
        ds = ds.select(subsample_indices(len(ds), subsample, seed))
    return ds


def source_of(dataset: str, lang: str, split: str, *, map_date_to_o: bool = True, source: str = "auto") -> dict[str, Any]:
    """Where ``load_split(dataset, lang, split)`` reads from now: a JSON-able record for run manifests.

    Mirror: root, file paths, sha256 and sizes. Hub: repository, config, split, revision (and the commit
    when the hub was contacted; a local clone's path and git commit). Reads the split (cached) if needed.
    """
    loc = locate_checked(dataset, lang, split, source)
    return dict(_load_full(dataset, loc.kind, loc.where, lang, split, bool(map_date_to_o))[3])


def describe_sources(records: dict[str, dict[str, Any]]) -> str:
    """One line saying where a run's data came from, e.g. ``mirror /data (12 files); hub facebook/xnli@<commit>``."""
    mirror = sorted({r["root"] for r in records.values() if r.get("source") == "mirror"})
    files = sum(len(r.get("files", [])) for r in records.values() if r.get("source") == "mirror")
    hubs = sorted({f"{r['repo']}@{r.get('commit') or r.get('git_commit') or r.get('revision', 'main')}"
                   + (" (local clone)" if r.get("source") == "hub-local" else "")
                   for r in records.values() if r.get("source") in ("hub", "hub-local")})
    parts = [f"mirror {_beside_repo(root)} ({files} files)" for root in mirror] + [f"hub {h}" for h in hubs]
    return "; ".join(parts) or "unknown"


def _beside_repo(root: str) -> str:
    """A mirror folder next to the repository (``../shared/data``) as a path relative to it, so that reports read
    the same on every clone; elsewhere as recorded."""
    path = Path(root)
    if not path.is_absolute():
        return root
    for p, repo in ((Path(os.path.normpath(path)), REPO_ROOT), (path.resolve(), REPO_ROOT.resolve())):
        if p.is_relative_to(repo.parent):  # as written first: ../shared may be a link to elsewhere
            return os.path.relpath(p, repo)
    return root
