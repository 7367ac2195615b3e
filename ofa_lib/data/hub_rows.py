"""A split of a dataset's public hub copy, read with ``datasets.load_dataset`` and mapped onto the study's columns.

Hub rows get the same columns and label ids as the mirror's (:mod:`ofa_lib.data.readers`): labels are matched
by name, never by position (``label_aliases`` of the :class:`~ofa_lib.data.hub.HubSource` rename the hub's);
rows without a gold label, NER rows whose tokens and tags disagree or hold an empty token, and QA answers not
at their offset are returned as problems.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import datasets

from ofa_lib.data import hub
from ofa_lib.data.catalog import (
    DATASETS,
    NLI_LABELS,
    SENTIMENT_LABELS,
    SIB_TOPICS,
    DataError,
    ner_label_ids,
)
from ofa_lib.data.locate import Location
from ofa_lib.data.readers import Columns


def _class_names(feature: Any) -> list[str] | None:
    """The ClassLabel names of a feature (or of a list of ClassLabels), else None."""
    inner = getattr(feature, "feature", feature)
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def _label_mapper(where: str, column: str, feature: Any, targets: dict[str, int],
                  aliases: dict[str, str]) -> Callable[[Any], int | None]:
    """value -> study id (None: unlabelled, e.g. -1). Names are matched by name, never by position."""
    names = _class_names(feature)

    def by_name(name: str) -> int:
        name = aliases.get(name, name)
        if name not in targets:
            raise DataError(f"{where}: column {column!r} holds label {name!r}; expected one of {sorted(targets)}")
        return targets[name]

    if names is not None:
        table = [by_name(n) for n in names]

        def named(v: Any) -> int | None:
            if v is None or v < 0:
                return None
            if v >= len(table):
                raise DataError(f"{where}: column {column!r} holds id {v}; its ClassLabel has {len(table)} names")
            return table[v]
        return named

    def plain(v: Any) -> int | None:
        if isinstance(v, str):
            return by_name(v)
        if v is None or v < 0:
            return None
        if v >= len(set(targets.values())):
            raise DataError(f"{where}: column {column!r} holds id {v}; expected 0..{len(set(targets.values())) - 1}")
        return int(v)  # plain ints are taken in the study's order (the cards' ClassLabel order)
    return plain


def hub_columns(name: str, ds: datasets.Dataset, where: str, map_date_to_o: bool) -> tuple[Columns, list[str]]:
    """Map a hub split onto the study's columns and label ids (see the module docstring)."""
    src = hub.SOURCES[name]
    task = DATASETS[name].task

    def col(study: str, default: Any = ...) -> list[Any]:
        hub_name = src.columns.get(study, study)
        if hub_name not in ds.column_names:
            if default is not ...:
                return [default] * len(ds)
            raise DataError(f"{where}: has no column {hub_name!r}; found {ds.column_names}")
        return ds[hub_name]

    def feature(study: str) -> Any:
        return ds.features[src.columns.get(study, study)]

    problems: list[str] = []
    if task in ("nli", "sib", "sentiment"):
        if task == "nli":
            targets = {n: i for i, n in enumerate(NLI_LABELS)} | {"contradictory": 2}
            label_col = "label"
        elif task == "sib":
            targets, label_col = {n: i for i, n in enumerate(SIB_TOPICS)}, "category"
        else:
            targets, label_col = {n: i for i, n in enumerate(SENTIMENT_LABELS)}, "label"
        mapper = _label_mapper(where, label_col, feature(label_col), targets, src.label_aliases)
        labels = [mapper(v) for v in col(label_col)]
        keep = [i for i, v in enumerate(labels) if v is not None]
        if len(keep) < len(labels):
            problems.append(f"{len(labels) - len(keep)} row(s) without a gold label (label -1)")
        texts = ["premise", "hypothesis"] if task == "nli" else ["text"]
        out = {c: col(c) for c in texts}
        if len(keep) < len(labels):
            out = {c: [values[i] for i in keep] for c, values in out.items()}
        out["label"] = [labels[i] for i in keep]
        return out, problems
    if task == "ner":
        label_ids = ner_label_ids(map_date_to_o)
        mapper = _label_mapper(where, "ner_tags", feature("ner_tags"), label_ids, src.label_aliases)
        tokens, tags = [], []
        for i, (toks, ids) in enumerate(zip(col("tokens"), col("ner_tags"))):
            if len(toks) != len(ids):
                problems.append(f"row {i}: {len(toks)} tokens but {len(ids)} tags")
            elif any(not t.strip() for t in toks):
                problems.append(f"row {i}: empty token (only the tag is left)")
            elif toks:
                tokens.append(list(toks))
                tags.append([mapper(v) for v in ids])
        return {"tokens": tokens, "ner_tags": tags}, problems
    # qa
    out = {"id": [str(x) for x in col("id")], "title": col("title", ""), "context": col("context"),
           "question": col("question"), "answers": []}
    for qid, context, ans in zip(out["id"], out["context"], col("answers")):
        texts, starts = list(ans["text"]), [int(s) for s in ans["answer_start"]]
        for text, start in zip(texts, starts):
            if context[start : start + len(text)] != text:
                problems.append(f"question {qid}: answer {text!r} not at offset {start}")
        out["answers"].append({"text": texts, "answer_start": starts})
    return out, problems


def load_hub_rows(name: str, lang: str, split: str, loc: Location) -> tuple[datasets.Dataset, dict[str, Any]]:
    """One split of the hub copy through ``datasets.load_dataset`` (the repo or its local clone)."""
    src = hub.SOURCES[name]
    hub_split = src.splits[split]
    kwargs: dict[str, Any] = {}
    config = None if src.layout == "parquet-branch" else src.configs[lang]
    if src.layout == "parquet-branch":
        kwargs["data_files"] = src.data_files(lang, split)
        if loc.kind == "hub":
            kwargs["revision"] = src.revision
    label = f"{src.repo} (config {src.configs[lang]}, split {hub_split})"
    try:
        ds = datasets.load_dataset(loc.where, config, split=hub_split, **kwargs)
    except Exception as exc:  # network, a missing config, a changed repository: say which copy failed
        raise DataError(f"{loc.describe()}: loading {label} for {name}/{lang}/{split} failed: "
                        f"{type(exc).__name__}: {exc}") from exc
    prefix = src.id_prefix.get(lang)
    if prefix:  # one config for every language (TyDiQA): ids start with the language name
        ds = ds.filter(lambda ids: [i.startswith(prefix) for i in ids], input_columns="id", batched=True)
    source: dict[str, Any] = {"source": loc.kind, "repo": src.repo, "config": src.configs[lang], "split": hub_split,
                              "revision": src.revision or "main"}
    if loc.kind == "hub-local":
        source["path"] = loc.where
        head = _git_head(Path(loc.where))
        if head:
            source["git_commit"] = head
    files = [Path(f["filename"]) for f in ds.cache_files]
    commit = files[0].parent.name if files else ""
    if loc.kind == "hub" and re.fullmatch(r"[0-9a-f]{40}", commit):
        source["commit"] = commit  # datasets caches a hub split under the repository's commit hash
    source["fingerprint"] = ds._fingerprint
    return ds, source


def _git_head(path: Path) -> str | None:
    """The commit a local git clone is at (read from .git, no subprocess), else None."""
    head = path / ".git" / "HEAD"
    if not head.is_file():
        return None
    ref = head.read_text().strip()
    if ref.startswith("ref: "):
        target = path / ".git" / ref[5:]
        return target.read_text().strip() if target.is_file() else None
    return ref
