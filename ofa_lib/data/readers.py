"""The offline mirror's file formats, read into the study's columns (one parser per dataset: :data:`PARSERS`).

Malformed NER sentences are skipped and returned as problems (the caller warns with a
``MalformedDataWarning`` naming the file, the lines and the reason), never silently and never by shifting
tags. The only ones in the data are two sentences of ``masakhaner2/xho/train.txt`` that contain a line with an
empty token (the line is `` O``: the token was lost, only the tag is left). Skipping them turns the file's
5,718 sentences into 5,716 examples (dev 817 and test 1,633 are unaffected). A file that cannot be read at all
(not UTF-8, a bad label, truncated JSON, the wrong field separator) is a
:class:`~ofa_lib.data.catalog.DataError` naming the file and line and what was expected.

Text is kept as the files have it: MultiNLI is Moses-tokenised, and the tweets keep their
literal ``\\u2019``-style escapes and CSV-style doubled quotes.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable

from ofa_lib.data.catalog import SIB_TOPICS, DataError, ner_label_ids

# column name -> its values, one per example: a split in the study's layout (mirror and hub rows alike)
Columns = dict[str, list[Any]]

# MultiNLI label words -> XNLI ids.
_MNLI_WORDS = {"entailment": 0, "neutral": 1, "contradictory": 2, "contradiction": 2}


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


def _parse_ner(paths: list[Path], opts: dict) -> tuple[Columns, list[str]]:
    """CoNLL-style sentences; a sentence with any bad line is skipped and reported."""
    path = paths[0]
    tab_format = path.suffix == ".conllu"  # WikiANN: index<TAB>token<TAB>tag
    label_ids = ner_label_ids(opts["map_date_to_o"])
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


# dataset name -> parser of its mirror files (``mirror_files`` order) into (columns, problems); options:
# ``map_date_to_o``
PARSERS: dict[str, Callable[[list[Path], dict], tuple[Columns, list[str]]]] = {
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
