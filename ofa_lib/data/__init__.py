"""Loading every benchmark as a ``datasets.Dataset``: from the offline mirror, or from its public hub copy.

``load_split(dataset, lang, split)`` is the entry point. Splits are always called ``train`` /
``validation`` / ``test`` whatever the files or hub splits are called.

**Where data comes from — one rule everywhere** (:func:`locate`): the mirror (``$OFA_DATA_DIR``, else
``../shared/data`` beside the repository) when it holds the files of that dataset × language × split;
else the dataset's public hub copy (:mod:`ofa_lib.data.hub`; ``$OFA_HUB_ROOT/org/name`` when that local clone
exists, else the hub itself unless ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` is set); else a
:class:`DataUnavailableError` naming the dataset, the places tried and the ``ofa-data fetch`` command
that fixes it. Hub rows are mapped onto the same columns and label ids as the mirror's.
:func:`source_of` says where a loaded split came from (mirror path and file hash, or hub repository,
config and revision); runs record it in their manifest.

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
A file that cannot be read at all (not UTF-8, a bad label, truncated JSON, the wrong field
separator, no rows) is a :class:`DataError` naming the file and line and what was expected.

Text is kept as the files have it: MultiNLI is Moses-tokenised, and the tweets keep their
literal ``\\u2019``-style escapes and CSV-style doubled quotes.
"""

from __future__ import annotations

import copy
import csv
import functools
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import datasets
import numpy as np

from ofa_lib import tasks as tasks_lib
from ofa_lib.data import hub
from ofa_lib.io import file_sha256
from ofa_lib.paths import REPO_ROOT

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
NLI_LABELS = ["entailment", "neutral", "contradiction"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
DATE_LABELS = ["B-DATE", "I-DATE"]
SENTIMENT_LABELS = ["negative", "neutral", "positive"]
SIB_TOPICS = ["entertainment", "geography", "health", "politics", "science/technology", "sports", "travel"]
TASKS = tasks_lib.NAMES

# MultiNLI label words -> XNLI ids.
_MNLI_WORDS = {"entailment": 0, "neutral": 1, "contradictory": 2, "contradiction": 2}


class MalformedDataWarning(UserWarning):
    """A data file holds records that cannot be parsed; they were skipped."""


class DataError(ValueError):
    """A data file or hub copy cannot be used; the message names the file (and line) and what was expected."""


class DataUnavailableError(DataError, FileNotFoundError):
    """No place holds the data asked for; the message names the places tried and the fix."""


def ner_labels(with_date: bool = False) -> list[str]:
    """The shared NER label list; ``with_date`` appends ``B-DATE, I-DATE`` (ids 7, 8)."""
    return NER_LABELS + DATE_LABELS if with_date else list(NER_LABELS)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetInfo:
    """One benchmark: where it lives under the mirror and what it holds."""

    name: str
    task: str
    folder: str  # relative to the mirror root
    splits: tuple[str, ...]  # API split names (a language may have fewer, e.g. TyDiQA)
    fixed_labels: tuple[str, ...]
    description: str = ""

    @property
    def languages(self) -> list[str]:
        """Languages available now (see :func:`languages`)."""
        return languages(self.name)

    @property
    def label_names(self) -> list[str]:
        """Label names (NER: the default list, DATE mapped to O)."""
        return label_names(self.name)

    @property
    def hub(self) -> hub.HubSource:
        """The public hub copy of this dataset."""
        return hub.SOURCES[self.name]


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo("mnli15k", "nli", "nli", ("train",), tuple(NLI_LABELS),
                    "first 15,001 MultiNLI train pairs (English)"),
        DatasetInfo("multinli", "nli", "nli/multinli", ("train",), tuple(NLI_LABELS),
                    "MultiNLI train, 392,702 pairs (English; the paper's NLI training set)"),
        DatasetInfo("xnli", "nli", "nli/xnli", ("validation", "test"), tuple(NLI_LABELS),
                    "XNLI dev/test, 15 languages"),
        DatasetInfo("indicxnli", "nli", "nli/indicxnli", ("validation", "test"), tuple(NLI_LABELS),
                    "IndicXNLI dev/test, 11 Indic languages"),
        DatasetInfo("wikiann", "ner", "ner/wikiann", SPLITS, tuple(NER_LABELS),
                    "WikiANN (PAN-X) XTREME splits"),
        DatasetInfo("masakhaner", "ner", "ner/masakhaner", SPLITS, tuple(NER_LABELS),
                    "MasakhaNER 1.0, 10 African languages"),
        DatasetInfo("masakhaner2", "ner", "ner/masakhaner2", SPLITS, tuple(NER_LABELS),
                    "MasakhaNER 2.0, 20 African languages"),
        DatasetInfo("conll2003", "ner", "ner/conll2003_en", SPLITS, tuple(NER_LABELS),
                    "English CoNLL-2003 without MISC"),
        DatasetInfo("tydiqa_goldp", "qa", "qa/tydiqa_goldp", ("train", "validation"), (),
                    "TyDiQA-GoldP; train and validation, 9 languages"),
        DatasetInfo("xquad", "qa", "qa/xquad", ("test",), (), "XQuAD, 12 languages"),
        DatasetInfo("sib200", "sib", "cls/sib200", SPLITS, tuple(SIB_TOPICS),
                    "SIB-200 topic classification, 205 languages"),
        DatasetInfo("umsab", "sentiment", "cls/umsab_sentiment", SPLITS,
                    tuple(SENTIMENT_LABELS), "multilingual tweet sentiment, 8 languages"),
    ]
}

# File name of each API split, per dataset (a callable gives the path from (root, lang)).
_FILE_SPLIT = {"train": "train", "validation": "dev", "test": "test"}
_UMSAB_SPLIT = {"train": "train", "validation": "val", "test": "test"}
_SINGLE_LANG = ("mnli15k", "multinli", "conll2003")  # English only: no language in the path


def mirror_files(name: str, root: Path, lang: str, split: str) -> list[Path]:
    """The file(s) of one (dataset, lang, split) in a mirror rooted at ``root``; they may not exist."""
    folder = root / DATASETS[name].folder
    if name == "mnli15k":
        return [folder / "multinli.train.en.15k.tsv"]
    if name == "multinli":
        return [folder / f"{split}.tsv"]
    if name in ("xnli", "indicxnli"):
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


def mirror_root() -> Path:
    """The mirror folder: ``$OFA_DATA_DIR``, else ``../shared/data`` beside the repository (may not exist)."""
    env = os.environ.get("OFA_DATA_DIR")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


@functools.lru_cache(maxsize=None)
def _discover_languages(name: str, root: str) -> tuple[str, ...]:
    """Languages with at least one split file of ``name`` under the mirror ``root``."""
    info = DATASETS[name]
    folder = Path(root) / info.folder
    if name in _SINGLE_LANG:
        have = any(p.is_file() for s in info.splits for p in mirror_files(name, Path(root), "en", s))
        return ("en",) if have else ()
    if name in ("xnli", "indicxnli"):
        langs = {p.stem for s in info.splits for p in (folder / s).glob("*.tsv")}
    elif name == "xquad":
        langs = {p.stem for p in folder.glob("*.json")}
    else:  # one sub-folder per language (sib200 also holds a stray nqo_Nkoo.zip: ignored)
        langs = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
    return tuple(sorted(langs))


def _mirror_languages(name: str) -> tuple[str, ...]:
    root = mirror_root()
    return _discover_languages(name, str(root)) if root.is_dir() else ()


def _check_dataset(dataset: str) -> DatasetInfo:
    if dataset not in DATASETS:
        raise ValueError(
            f"dataset={dataset!r} is unknown; available: {', '.join(DATASETS)}"
        )
    return DATASETS[dataset]


def _hub_usable(dataset: str) -> str | None:
    """How the hub copy of ``dataset`` would be reached now: a local clone's path, the repo id, or None."""
    src = hub.SOURCES[dataset]
    local = src.local_dir()
    if local is not None:
        return str(local)
    return None if hub.hub_offline() else src.repo


def known_languages(dataset: str) -> list[str]:
    """Every language ``dataset`` has in the mirror or in its hub copy, reachable now or not (sorted)."""
    _check_dataset(dataset)
    return sorted(set(_mirror_languages(dataset)) | set(hub.SOURCES[dataset].configs))


def languages(dataset: str) -> list[str]:
    """Languages of ``dataset`` available now: the mirror's, plus the hub copy's when it can be reached.

    Raises :class:`DataUnavailableError` (naming the fix) when there are none.
    """
    _check_dataset(dataset)
    langs = set(_mirror_languages(dataset))
    if _hub_usable(dataset):
        langs |= set(hub.SOURCES[dataset].configs)
    if not langs:
        raise DataUnavailableError(_unavailable_message([(dataset, None, None)]))
    return sorted(langs)


def task_of(dataset: str) -> str:
    """The task kind of ``dataset``: one of ``nli, ner, qa, sib, sentiment``."""
    return _check_dataset(dataset).task


def label_names(dataset: str) -> list[str]:
    """Label names of ``dataset`` (ids are list positions); QA has none.

    NER datasets share ``NER_LABELS``; use ``ner_labels(True)`` for the list with DATE.
    SIB-200's seven topics are sorted by name.
    """
    return list(_check_dataset(dataset).fixed_labels)


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class Location:
    """Where one (dataset, lang, split) is read from: ``kind`` mirror | hub | hub-local."""

    kind: str
    where: str  # the mirror root, the hub repo id or the local clone's folder

    def describe(self) -> str:
        return {"mirror": "mirror", "hub": "hub", "hub-local": "local hub clone"}[self.kind] + f" {self.where}"


def _hub_has(dataset: str, lang: str, split: str) -> bool:
    src = hub.SOURCES[dataset]
    return lang in src.configs and split in src.splits


def locate(dataset: str, lang: str, split: str, source: str = "auto") -> Location:
    """Where ``load_split(dataset, lang, split)`` reads from now (mirror, else hub; see the module docstring).

    ``source="mirror"`` or ``"hub"`` allows only that place. Raises :class:`DataUnavailableError`.
    """
    root = mirror_root()
    if source in ("auto", "mirror") and root.is_dir():
        if all(p.is_file() for p in mirror_files(dataset, root, lang, split)):
            return Location("mirror", str(root))
    if source in ("auto", "hub") and _hub_has(dataset, lang, split):
        where = _hub_usable(dataset)
        if where is not None:
            return Location("hub-local" if where != hub.SOURCES[dataset].repo else "hub", where)
    raise DataUnavailableError(_unavailable_message([(dataset, lang, split)], source=source))


def _fetch_command(keys: Iterable[tuple[str, str | None, str | None]]) -> str:
    names = sorted({d for d, _, _ in keys})
    langs = sorted({lang for _, lang, _ in keys if lang})
    target = os.environ.get("OFA_DATA_DIR") or "../shared/data"
    return f"ofa-data fetch {' '.join(names)}" + (f" --langs {','.join(langs)}" if langs else "") + f" --to {target}"


def _unavailable_message(keys: list[tuple[str, str | None, str | None]], source: str = "auto",
                         unreachable: dict[str, str] | None = None) -> str:
    root = mirror_root()
    env = "OFA_DATA_DIR=" + os.environ["OFA_DATA_DIR"] if os.environ.get("OFA_DATA_DIR") else "../shared/data"
    shown = ", ".join(f"{d}/{lang}/{s}" if lang else d for d, lang, s in keys[:8])
    more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
    tried = []
    if source != "hub":
        tried.append(f"the mirror {root} ({env}; " + ("it lacks these files" if root.is_dir() else "does not exist") + ")")
    if source != "mirror":
        repos = sorted({hub.SOURCES[d].repo for d, _, _ in keys})
        hub_root = os.environ.get("OFA_HUB_ROOT")
        tried.append(f"a local hub clone under OFA_HUB_ROOT={hub_root} (no {', '.join(repos)} there)" if hub_root
                     else "a local hub clone (OFA_HUB_ROOT is not set)")
        if hub.hub_offline():
            state = "offline, HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set"
        elif unreachable:
            state = "did not answer: " + "; ".join(f"{r}: {e}" for r, e in sorted(unreachable.items()))
        else:
            state = "no copy of these there"
        tried.append(f"the hub ({', '.join(repos)}: {state})")
        missing_hub = [f"{d}/{lang}/{s}" for d, lang, s in keys if lang and s and not _hub_has(d, lang, s)]
        if missing_hub:
            tried.append(f"(the hub copy has no {', '.join(missing_hub[:4])})")
    note = ""
    if any(d == "multinli" for d, _, _ in keys) and root.is_dir() and _discover_languages("mnli15k", str(root)):
        note = (" The mirror holds only the 15,001-pair MultiNLI slice (dataset mnli15k); the paper preset trains on "
                "the full MultiNLI and does not substitute the slice.")
    return (f"no copy of {shown}{more} can be read: tried {'; '.join(tried)}.{note} Fix: on a machine with a network "
            f"run `{_fetch_command(keys)}` and point OFA_DATA_DIR at that folder (or let the hub be used: unset "
            "HF_DATASETS_OFFLINE, or clone the hub repositories under OFA_HUB_ROOT).")


def available_splits(dataset: str, lang: str) -> list[str]:
    """The splits of (``dataset``, ``lang``) that can be read now (mirror files or a reachable hub copy)."""
    info = _check_dataset(dataset)
    _check_lang(info, lang)
    out = []
    for split in info.splits:
        try:
            locate(dataset, lang, split)
        except DataUnavailableError:
            continue
        out.append(split)
    return out


def _check_lang(info: DatasetInfo, lang: str) -> None:
    langs = languages(info.name)
    if lang not in langs:
        raise ValueError(
            f"lang={lang!r} is unknown for dataset={info.name!r}; available: {', '.join(langs)}"
        )


def require(keys: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], Location]:
    """Locate every (dataset, lang, split) without reading it; one :class:`DataUnavailableError` lists all missing.

    Cheap (file existence and environment checks only): grids and runs call it before any expensive work.
    """
    found: dict[tuple[str, str, str], Location] = {}
    missing: list[tuple[str, str | None, str | None]] = []
    for key in dict.fromkeys(keys):
        _check_dataset(key[0])
        try:
            found[key] = locate(*key)
        except DataUnavailableError:
            missing.append(key)
    # the hub is not offline by configuration: make sure it answers (one short request per repository),
    # so that a machine without a network fails here, not in every run's data loading
    unreachable = {loc.where: err for loc in {loc for loc in found.values() if loc.kind == "hub"}
                   if (err := _probe_hub(loc.where))}
    missing += [key for key, loc in found.items() if loc.kind == "hub" and loc.where in unreachable]
    if missing:
        raise DataUnavailableError(_unavailable_message(missing, unreachable=unreachable))
    return found


@functools.lru_cache(maxsize=None)
def _probe_hub(repo: str, timeout_s: float = 10.0) -> str | None:
    """None when the hub answers for dataset ``repo`` within ``timeout_s``, else the reason."""
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(repo, timeout=timeout_s)
    except Exception as exc:  # no network, a proxy, a missing or gated repository: all mean "cannot read it"
        return f"{type(exc).__name__}: {str(exc)[:160]}"
    return None


# --------------------------------------------------------------------------- reading files

Columns = dict[str, list[Any]]


def _read_text(path: Path) -> str:
    """A file's text; bytes that are not UTF-8 are a :class:`DataError` naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: byte 0x{raw[exc.start]:02x} at offset {exc.start} is not UTF-8; "
                        "expected UTF-8 text") from None


def _read_lines(path: Path) -> list[str]:
    """Lines split on ``\\n`` only (tweets may hold other Unicode line separators)."""
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_tsv(path: Path, header: list[str]) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of a TSV with a known header; quotes are plain text (``csv.QUOTE_NONE``)."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    got = next(reader, None)
    if got != header:
        raise DataError(f"{path}:1: expected the tab-separated header {header}, found {got}")
    rows = []
    for row in reader:
        if len(row) != len(header):
            raise DataError(
                f"{path}:{reader.line_num}: expected {len(header)} tab-separated fields, got {len(row)}"
            )
        rows.append((reader.line_num, row))
    return rows


def _parse_mnli(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    rows = _read_tsv(paths[0], ["premise", "hypo", "label"])
    for line, r in rows:
        if r[2] not in _MNLI_WORDS:
            raise DataError(f"{paths[0]}:{line}: label {r[2]!r} is not one of {sorted(_MNLI_WORDS)}")
    return {
        "premise": [r[0] for _, r in rows],
        "hypothesis": [r[1] for _, r in rows],
        "label": [_MNLI_WORDS[r[2]] for _, r in rows],
    }, []


def _int_label(path: Path, line: int, text: str, allowed: range) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in allowed:
        raise DataError(f"{path}:{line}: label {text!r} is not one of the ids {list(allowed)}")
    return value


def _parse_xnli(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    rows = _read_tsv(paths[0], ["id", "premise", "hypothesis", "label"])
    labels = [_int_label(paths[0], line, r[3], range(3)) for line, r in rows]
    return {"premise": [r[1] for _, r in rows], "hypothesis": [r[2] for _, r in rows], "label": labels}, []


def _ner_label_ids(map_date_to_o: bool) -> dict[str, int]:
    label_ids = {name: i for i, name in enumerate(ner_labels(with_date=True))}
    if map_date_to_o:
        label_ids.update({"B-DATE": 0, "I-DATE": 0})
    return label_ids


def _parse_ner(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    """CoNLL-style sentences; a sentence with any bad line is skipped and reported."""
    path = paths[0]
    tab_format = path.suffix == ".conllu"  # WikiANN: index<TAB>token<TAB>tag
    label_ids = _ner_label_ids(opts["map_date_to_o"])
    tokens: list[list[str]] = []
    tags: list[list[int]] = []
    problems: list[str] = []
    sent_toks: list[str] = []
    sent_tags: list[int] = []
    sent_start, sent_bad = 0, []
    first_line, other_separator = 0, 0

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
        first_line = first_line or lineno
        if not sent_toks and not sent_bad:
            sent_start = lineno
        if tab_format:
            parts = line.split("\t")
            token, tag = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
            shape_ok = len(parts) == 3
            other_separator += "\t" not in line and " " in line
        else:
            parts = line.split(" ")
            shape_ok = len(parts) == 2
            token, tag = (parts[0], parts[1]) if shape_ok else ("", "")
            other_separator += "\t" in line
        if not shape_ok:
            sent_bad.append(f"line {lineno} {line!r}: expected " + ("'index<TAB>token<TAB>tag'" if tab_format else "'token tag'") + " fields")
        elif not token.strip():
            sent_bad.append(f"line {lineno} {line!r}: empty token (only the tag is left)")
        elif tag not in label_ids:
            sent_bad.append(f"line {lineno} {line!r}: unknown tag {tag!r}")
        else:
            sent_toks.append(token)
            sent_tags.append(label_ids[tag])
    close(len(lines))
    if not tokens and first_line:
        # every sentence was malformed: a file in the wrong format, not a few bad records
        expected = "'index<TAB>token<TAB>tag' lines (tab-separated)" if tab_format else "'token tag' lines (one space)"
        found = (" — its lines are " + ("space" if tab_format else "tab") + "-separated") if other_separator else ""
        raise DataError(f"{path}:{first_line}: no sentence could be read: expected {expected}{found}; "
                        f"first problem: {problems[0] if problems else '?'}")
    return {"tokens": tokens, "ner_tags": tags}, problems


def _parse_squad(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    path = paths[0]
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg}); expected a SQuAD v1.1 "
                        "JSON document (is the file truncated?)") from None
    cols: Columns = {k: [] for k in ("id", "title", "context", "question", "answers")}
    problems = []
    try:
        for article in doc["data"]:
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
    except (KeyError, TypeError, ValueError) as exc:
        at = f" (after question {cols['id'][-1]})" if cols["id"] else ""
        raise DataError(f"{path}: not SQuAD v1.1 JSON{at}: {type(exc).__name__} {exc}; expected "
                        "{'data': [{'title', 'paragraphs': [{'context', 'qas': [{'id', 'question', "
                        "'answers': [{'text', 'answer_start'}]}]}]}]}") from None
    return cols, problems


def _parse_sib(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    rows = _read_tsv(paths[0], ["index_id", "category", "text"])
    topics = {t: i for i, t in enumerate(SIB_TOPICS)}
    for line, r in rows:
        if r[1] not in topics:
            raise DataError(f"{paths[0]}:{line}: topic {r[1]!r} is not one of {SIB_TOPICS}")
    return {"text": [r[2] for _, r in rows], "label": [topics[r[1]] for _, r in rows]}, []


def _parse_umsab(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    texts = _read_lines(paths[0])
    labels = [_int_label(paths[1], i, x, range(3)) for i, x in enumerate(_read_lines(paths[1]), start=1)]
    if len(texts) != len(labels):
        raise DataError(f"{paths[0]} has {len(texts)} lines but {paths[1]} has {len(labels)}; expected one label per line")
    return {"text": texts, "label": labels}, []


_PARSERS: dict[str, Callable[[list[Path], dict], tuple[Columns, list[str]]]] = {
    "mnli15k": _parse_mnli,
    "multinli": _parse_xnli,
    "xnli": _parse_xnli,
    "indicxnli": _parse_xnli,
    "wikiann": _parse_ner,
    "masakhaner": _parse_ner,
    "masakhaner2": _parse_ner,
    "conll2003": _parse_ner,
    "tydiqa_goldp": _parse_squad,
    "xquad": _parse_squad,
    "sib200": _parse_sib,
    "umsab": _parse_umsab,
}


# --------------------------------------------------------------------------- hub rows -> study rows


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


def _hub_columns(name: str, ds: datasets.Dataset, where: str, map_date_to_o: bool) -> tuple[Columns, list[str]]:
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
        label_ids = _ner_label_ids(map_date_to_o)
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


def _load_hub_rows(name: str, lang: str, split: str, loc: Location) -> tuple[datasets.Dataset, dict[str, Any]]:
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


# --------------------------------------------------------------------------- loading


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
        columns, problems = _PARSERS[name](paths, {"map_date_to_o": map_date_to_o})
        label = str(paths[0])
        source = {"source": "mirror", "root": str(root),
                  "files": [{"path": str(p.relative_to(root)), "sha256": file_sha256(p), "bytes": p.stat().st_size}
                            for p in paths]}
    else:
        raw, source = _load_hub_rows(name, lang, split, Location(kind, where))
        label = f"{where} ({source['config']}/{source['split']})"
        columns, problems = _hub_columns(name, raw, label, map_date_to_o)
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


def _locate_checked(dataset: str, lang: str, split: str, source: str) -> Location:
    info = _check_dataset(dataset)
    if split not in info.splits:
        raise ValueError(
            f"split={split!r} is unknown for dataset={dataset!r}; available: {', '.join(info.splits)}"
        )
    if source not in ("auto", "mirror", "hub"):
        raise ValueError(f"source={source!r} must be one of auto, mirror, hub")
    if source == "auto":
        _check_lang(info, lang)
    try:
        return locate(dataset, lang, split, source)
    except DataUnavailableError as exc:
        have = [s for s in info.splits if s != split and _can_locate(dataset, lang, s, source)]
        if have:  # the language exists, this split does not (TyDiQA: train only for en/ko/sw in the mirror)
            raise DataUnavailableError(
                f"split={split!r} does not exist for dataset={dataset!r}, lang={lang!r} where data can be read now; "
                f"available for this language: {', '.join(have)}. {exc}") from None
        raise


def _can_locate(dataset: str, lang: str, split: str, source: str) -> bool:
    try:
        locate(dataset, lang, split, source)
        return True
    except DataUnavailableError:
        return False


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
    loc = _locate_checked(dataset, lang, split, source)
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
    loc = _locate_checked(dataset, lang, split, source)
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
