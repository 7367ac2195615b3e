"""Loading the benchmark copies in ``../shared/data`` as ``datasets.Dataset`` objects.

Every file is parsed here (no hub); ``load_split(dataset, lang, split)`` is the entry point.
Splits are always called ``train`` / ``validation`` / ``test`` whatever the file names are.

Columns by task:

- ``nli``: ``premise, hypothesis, label`` (ClassLabel entailment / neutral / contradiction;
  MultiNLI's word ``contradictory`` maps to 2 like XNLI's ``contradiction``).
- ``ner``: ``tokens, ner_tags`` over one shared label list ``NER_LABELS`` (DATE → O by default,
  as in the published study); ``map_date_to_o=False`` keeps ``B-DATE, I-DATE`` as ids 7, 8.
- ``qa``: ``id, title, context, question, answers`` (SQuAD v1.1 layout).
- ``sib`` / ``sentiment``: ``text, label``.

Malformed NER sentences are skipped with a ``MalformedDataWarning`` naming the file, the
lines and the reason, never silently and never by shifting tags. The only ones in the data
are two sentences of ``masakhaner2/xho/train.txt`` that contain a line with an empty token
(the line is `` O``: the token was lost, only the tag is left). Skipping them turns the
file's 5,718 sentences into 5,716 examples (dev 817 and test 1,633 are unaffected).

Text is kept as the files have it: MultiNLI is Moses-tokenised, and the tweets keep their
literal ``\\u2019``-style escapes and CSV-style doubled quotes.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np

from ofa_lib.paths import data_dir

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
NLI_LABELS = ["entailment", "neutral", "contradiction"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
DATE_LABELS = ["B-DATE", "I-DATE"]
SENTIMENT_LABELS = ["negative", "neutral", "positive"]
TASKS = ("nli", "ner", "qa", "sib", "sentiment")

# MultiNLI label words -> XNLI ids.
_MNLI_WORDS = {"entailment": 0, "neutral": 1, "contradictory": 2, "contradiction": 2}


class MalformedDataWarning(UserWarning):
    """A data file holds records that cannot be parsed; they were skipped."""


def ner_labels(with_date: bool = False) -> list[str]:
    """The shared NER label list; ``with_date`` appends ``B-DATE, I-DATE`` (ids 7, 8)."""
    return NER_LABELS + DATE_LABELS if with_date else list(NER_LABELS)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetInfo:
    """One benchmark: where it lives under the data directory and what it holds."""

    name: str
    task: str
    folder: str  # relative to data_dir()
    splits: tuple[str, ...]  # API split names (a language may have fewer, e.g. TyDiQA)
    fixed_labels: tuple[str, ...] | None = None  # None: read from the data (SIB-200)
    description: str = ""

    @property
    def languages(self) -> list[str]:
        """Languages discovered from the data folder (sorted)."""
        return languages(self.name)

    @property
    def label_names(self) -> list[str]:
        """Label names (NER: the default list, DATE mapped to O)."""
        return label_names(self.name)


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo("mnli15k", "nli", "nli", ("train",), tuple(NLI_LABELS),
                    "first 15,001 MultiNLI train pairs (English)"),
        DatasetInfo("xnli", "nli", "nli/xnli", ("validation", "test"), tuple(NLI_LABELS),
                    "XNLI dev/test, 15 languages"),
        DatasetInfo("wikiann", "ner", "ner/wikiann", SPLITS, tuple(NER_LABELS),
                    "WikiANN (PAN-X) XTREME splits, 6 languages"),
        DatasetInfo("masakhaner", "ner", "ner/masakhaner", SPLITS, tuple(NER_LABELS),
                    "MasakhaNER 1.0, 10 African languages"),
        DatasetInfo("masakhaner2", "ner", "ner/masakhaner2", SPLITS, tuple(NER_LABELS),
                    "MasakhaNER 2.0, 20 African languages"),
        DatasetInfo("conll2003", "ner", "ner/conll2003_en", SPLITS, tuple(NER_LABELS),
                    "English CoNLL-2003 without MISC"),
        DatasetInfo("tydiqa_goldp", "qa", "qa/tydiqa_goldp", ("train", "validation"), (),
                    "TyDiQA-GoldP; train for en/ko/sw, validation for 9 languages"),
        DatasetInfo("xquad", "qa", "qa/xquad", ("test",), (), "XQuAD, 12 languages"),
        DatasetInfo("sib200", "sib", "cls/sib200", SPLITS, None,
                    "SIB-200 topic classification, 205 languages"),
        DatasetInfo("umsab", "sentiment", "cls/umsab_sentiment", SPLITS,
                    tuple(SENTIMENT_LABELS), "multilingual tweet sentiment, 8 languages"),
    ]
}

# File name of each API split, per dataset (a callable gives the path from (root, lang)).
_FILE_SPLIT = {"train": "train", "validation": "dev", "test": "test"}
_UMSAB_SPLIT = {"train": "train", "validation": "val", "test": "test"}


def _files(name: str, root: Path, lang: str, split: str) -> list[Path]:
    """The file(s) holding one (dataset, lang, split); they may not exist."""
    folder = root / DATASETS[name].folder
    if name == "mnli15k":
        return [folder / "multinli.train.en.15k.tsv"]
    if name == "xnli":
        return [folder / split / f"{lang}.tsv"]
    if name == "wikiann":
        return [folder / lang / f"{split}.conllu"]
    if name in ("masakhaner", "masakhaner2"):
        return [folder / lang / f"{_FILE_SPLIT[split]}.txt"]
    if name == "conll2003":
        return [folder / f"{_FILE_SPLIT[split]}.txt"]
    if name == "tydiqa_goldp":
        return [folder / lang / f"{split}.json"]
    if name == "xquad":
        return [folder / f"{lang}.json"]
    if name == "sib200":
        return [folder / lang / f"{_FILE_SPLIT[split]}.tsv"]
    if name == "umsab":
        stem = _UMSAB_SPLIT[split]
        return [folder / lang / f"{stem}_text.txt", folder / lang / f"{stem}_labels.txt"]
    raise AssertionError(name)


@functools.lru_cache(maxsize=None)
def _discover_languages(name: str, root: str) -> tuple[str, ...]:
    folder = Path(root) / DATASETS[name].folder
    if name in ("mnli15k", "conll2003"):
        langs: set[str] = {"en"}
    elif name == "xnli":
        langs = {p.stem for s in DATASETS[name].splits for p in (folder / s).glob("*.tsv")}
    elif name == "xquad":
        langs = {p.stem for p in folder.glob("*.json")}
    else:  # one sub-folder per language (sib200 also holds a stray nqo_Nkoo.zip: ignored)
        langs = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
    return tuple(sorted(langs))


def _check_dataset(dataset: str) -> DatasetInfo:
    if dataset not in DATASETS:
        raise ValueError(
            f"dataset={dataset!r} is unknown; available: {', '.join(DATASETS)}"
        )
    return DATASETS[dataset]


def languages(dataset: str) -> list[str]:
    """Languages of ``dataset`` found in the data directory (sorted)."""
    _check_dataset(dataset)
    return list(_discover_languages(dataset, str(data_dir())))


def task_of(dataset: str) -> str:
    """The task kind of ``dataset``: one of ``nli, ner, qa, sib, sentiment``."""
    return _check_dataset(dataset).task


@functools.lru_cache(maxsize=None)
def _sib_topics(root: str) -> tuple[str, ...]:
    folder = Path(root) / DATASETS["sib200"].folder
    topics: set[str] = set()
    for lang in _discover_languages("sib200", root):
        path = folder / lang / "labels.txt"
        if path.is_file():
            topics.update(t.strip() for t in path.read_text(encoding="utf-8").split("\n") if t.strip())
    return tuple(sorted(topics))


def label_names(dataset: str) -> list[str]:
    """Label names of ``dataset`` (ids are list positions); QA has none.

    NER datasets share ``NER_LABELS``; use ``ner_labels(True)`` for the list with DATE.
    SIB-200 topics are the union of every language's ``labels.txt``, sorted.
    """
    info = _check_dataset(dataset)
    if info.fixed_labels is not None:
        return list(info.fixed_labels)
    return list(_sib_topics(str(data_dir())))


def available_splits(dataset: str, lang: str) -> list[str]:
    """The splits that exist on disk for (``dataset``, ``lang``)."""
    info = _check_dataset(dataset)
    root = data_dir()
    _check_lang(info, lang, root)
    return [s for s in info.splits if all(p.is_file() for p in _files(dataset, root, lang, s))]


def _check_lang(info: DatasetInfo, lang: str, root: Path) -> None:
    langs = _discover_languages(info.name, str(root))
    if lang not in langs:
        raise ValueError(
            f"lang={lang!r} is unknown for dataset={info.name!r}; available: {', '.join(langs)}"
        )


# --------------------------------------------------------------------------- parsers

Columns = dict[str, list[Any]]


def _read_lines(path: Path) -> list[str]:
    """Lines split on ``\\n`` only (tweets may hold other Unicode line separators)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_tsv(path: Path, header: list[str]) -> list[list[str]]:
    """Rows of a TSV with a known header; quotes are plain text (``csv.QUOTE_NONE``)."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        got = next(reader, None)
        if got != header:
            raise ValueError(f"{path}: expected header {header}, found {got}")
        rows = []
        for row in reader:
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: expected {len(header)} tab-separated fields, got {len(row)}"
                )
            rows.append(row)
    return rows


def _parse_mnli(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    rows = _read_tsv(paths[0], ["premise", "hypo", "label"])
    bad = [r[2] for r in rows if r[2] not in _MNLI_WORDS]
    if bad:
        raise ValueError(f"{paths[0]}: unknown label words {sorted(set(bad))}")
    return {
        "premise": [r[0] for r in rows],
        "hypothesis": [r[1] for r in rows],
        "label": [_MNLI_WORDS[r[2]] for r in rows],
    }, []


def _parse_xnli(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    rows = _read_tsv(paths[0], ["id", "premise", "hypothesis", "label"])
    labels = [int(r[3]) for r in rows]
    if any(lab not in (0, 1, 2) for lab in labels):
        raise ValueError(f"{paths[0]}: label ids outside 0..2")
    return {"premise": [r[1] for r in rows], "hypothesis": [r[2] for r in rows], "label": labels}, []


def _parse_ner(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    """CoNLL-style sentences; a sentence with any bad line is skipped and reported."""
    path = paths[0]
    tab_format = path.suffix == ".conllu"  # WikiANN: index<TAB>token<TAB>tag
    label_ids = {name: i for i, name in enumerate(ner_labels(with_date=True))}
    if opts["map_date_to_o"]:
        label_ids.update({"B-DATE": 0, "I-DATE": 0})
    tokens: list[list[str]] = []
    tags: list[list[int]] = []
    problems: list[str] = []
    sent_toks: list[str] = []
    sent_tags: list[int] = []
    sent_start, sent_bad = 0, []

    def close(end_line: int) -> None:
        if sent_bad:
            problems.append(f"sentence at lines {sent_start}-{end_line}: " + "; ".join(sent_bad))
        elif sent_toks:
            tokens.append(list(sent_toks))
            tags.append(list(sent_tags))
        sent_toks.clear()
        sent_tags.clear()
        sent_bad.clear()

    lines = _read_lines(path)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            close(lineno - 1)
            continue
        if not sent_toks and not sent_bad:
            sent_start = lineno
        if tab_format:
            parts = line.split("\t")
            token, tag = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
            shape_ok = len(parts) == 3
        else:
            parts = line.split(" ")
            shape_ok = len(parts) == 2
            token, tag = (parts[0], parts[1]) if shape_ok else ("", "")
        if not shape_ok:
            sent_bad.append(f"line {lineno} {line!r}: expected 'token tag' fields")
        elif not token.strip():
            sent_bad.append(f"line {lineno} {line!r}: empty token (only the tag is left)")
        elif tag not in label_ids:
            sent_bad.append(f"line {lineno} {line!r}: unknown tag {tag!r}")
        else:
            sent_toks.append(token)
            sent_tags.append(label_ids[tag])
    close(len(lines))
    return {"tokens": tokens, "ner_tags": tags}, problems


def _parse_squad(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    with open(paths[0], encoding="utf-8") as fh:
        data = json.load(fh)["data"]
    cols: Columns = {k: [] for k in ("id", "title", "context", "question", "answers")}
    problems = []
    for article in data:
        title = article.get("title", "")
        for para in article["paragraphs"]:
            context = para["context"]
            for qa in para["qas"]:
                texts = [a["text"] for a in qa["answers"]]
                starts = [int(a["answer_start"]) for a in qa["answers"]]
                for text, start in zip(texts, starts):
                    if context[start : start + len(text)] != text:
                        problems.append(f"question {qa['id']}: answer {text!r} not at offset {start}")
                cols["id"].append(str(qa["id"]))
                cols["title"].append(title)
                cols["context"].append(context)
                cols["question"].append(qa["question"])
                cols["answers"].append({"text": texts, "answer_start": starts})
    return cols, problems


def _parse_sib(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    rows = _read_tsv(paths[0], ["index_id", "category", "text"])
    topics = {t: i for i, t in enumerate(opts["topics"])}
    unknown = sorted({r[1] for r in rows} - set(topics))
    if unknown:
        raise ValueError(f"{paths[0]}: topics {unknown} are not in the labels.txt files")
    return {"text": [r[2] for r in rows], "label": [topics[r[1]] for r in rows]}, []


def _parse_umsab(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    texts = _read_lines(paths[0])
    labels = [int(x) for x in _read_lines(paths[1])]
    if len(texts) != len(labels):
        raise ValueError(f"{paths[0]} has {len(texts)} lines but {paths[1]} has {len(labels)}")
    if any(lab not in (0, 1, 2) for lab in labels):
        raise ValueError(f"{paths[1]}: labels outside 0..2")
    return {"text": texts, "label": labels}, []


_PARSERS: dict[str, Callable[[list[Path], dict], tuple[Columns, list[str]]]] = {
    "mnli15k": _parse_mnli,
    "xnli": _parse_xnli,
    "wikiann": _parse_ner,
    "masakhaner": _parse_ner,
    "masakhaner2": _parse_ner,
    "conll2003": _parse_ner,
    "tydiqa_goldp": _parse_squad,
    "xquad": _parse_squad,
    "sib200": _parse_sib,
    "umsab": _parse_umsab,
}


def _features(name: str, map_date_to_o: bool, root: str) -> datasets.Features:
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
    names = list(_sib_topics(root)) if task == "sib" else SENTIMENT_LABELS
    return datasets.Features({"text": string, "label": datasets.ClassLabel(names=names)})


@functools.lru_cache(maxsize=None)
def _load_full(
    name: str, root: str, lang: str, split: str, map_date_to_o: bool
) -> tuple[datasets.Dataset, tuple[str, ...], str]:
    """Parse one split once per process: (dataset, problems, file label for messages)."""
    paths = _files(name, Path(root), lang, split)
    opts: dict[str, Any] = {"map_date_to_o": map_date_to_o}
    if name == "sib200":
        opts["topics"] = _sib_topics(root)
    columns, problems = _PARSERS[name](paths, opts)
    ds = datasets.Dataset.from_dict(columns, features=_features(name, map_date_to_o, root), split=split)
    where = str(paths[0].relative_to(root)) if paths[0].is_relative_to(root) else str(paths[0])
    return ds, tuple(problems), where


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
) -> datasets.Dataset:
    """Load one split of one language as a ``datasets.Dataset`` (see the module docstring).

    ``subsample=n`` keeps a seeded random subset of ``n`` rows (original order; the same
    rows for the same seed; the whole split if ``n`` is larger). ``map_date_to_o`` only
    matters for NER. Malformed records are skipped with a ``MalformedDataWarning``.
    """
    info = _check_dataset(dataset)
    if split not in info.splits:
        raise ValueError(
            f"split={split!r} is unknown for dataset={dataset!r}; available: {', '.join(info.splits)}"
        )
    if subsample is not None and (isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1):
        raise ValueError(f"subsample={subsample!r} must be a positive int or None")
    root = data_dir()
    _check_lang(info, lang, root)
    missing = [p for p in _files(dataset, root, lang, split) if not p.is_file()]
    if missing:
        have = available_splits(dataset, lang)
        raise ValueError(
            f"split={split!r} does not exist for dataset={dataset!r}, lang={lang!r} "
            f"(no {missing[0]}); available for this language: {', '.join(have) or 'none'}"
        )
    full, problems, where = _load_full(dataset, str(root), lang, split, bool(map_date_to_o))
    if problems:
        _report(where, problems)
    ds = copy.deepcopy(full)  # shares the Arrow data; in-place format changes stay local
    if subsample is not None and subsample < len(ds):
        ds = ds.select(subsample_indices(len(ds), subsample, seed))
    return ds
