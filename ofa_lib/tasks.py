"""The study's tasks, one entry each: what trains and what is evaluated, the inputs the featurizer reads, the
model head, the metrics, and the names reports and the authors' released results use.

A new task is one :class:`Task` here plus its loader in :mod:`ofa_lib.data` (rows in the study's layout) and
its hub source in :mod:`ofa_lib.data.hub`; configuration, featurizing, models, metrics, grids and reports read it
from here. This module imports nothing of ``ofa_lib``: every stage may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("sequence", "token", "span")  # a label per text (or text pair), a label per word, an answer span


@dataclass(frozen=True)
class Task:
    name: str                     # the one name runs, grids, the results store and reports use
    kind: str                     # one of KINDS: which featurizer, evaluation and head
    columns: tuple[str, ...]      # the columns of the study's layout (ofa_lib.data) the featurizer needs
    head: str                     # the transformers Auto class of the fine-tuned model
    metrics: tuple[str, ...]      # what evaluation reports (ofa_lib.train.metrics)
    primary_metric: str           # the one selection and averaging compare
    data: dict[str, Any]          # cpu/smoke presets: {"train", "source_dev", "targets"} dataset names
    fetch: tuple[str, ...]        # what `ofa-data fetch TASK` downloads: the paper's data for the task
    label: str                    # what reports call it
    paper_data: dict[str, Any] | None = None  # the paper preset's datasets (None: the same as ``data``)
    released: str | None = None   # the task's name in the authors' released results (None: not released)
    text_columns: tuple[str, ...] = field(default=())  # sequence tasks: the text inputs, in order

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        assert self.primary_metric in self.metrics, (self.name, self.primary_metric)
        assert set(self.data) == {"train", "source_dev", "targets"}, self.data


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("nli", "sequence", ("premise", "hypothesis", "label"), "AutoModelForSequenceClassification",
         ("accuracy",), "accuracy",
         {"train": "mnli15k", "source_dev": "xnli", "targets": ["xnli"]},
         ("multinli", "xnli", "indicxnli"), "NLI",
         # the paper's data (arXiv 2310.10532): the full MultiNLI, XNLI + IndicXNLI
         paper_data={"train": "multinli", "source_dev": "xnli", "targets": ["xnli", "indicxnli"]},
         released="nli", text_columns=("premise", "hypothesis")),
    Task("ner", "token", ("tokens", "ner_tags"), "AutoModelForTokenClassification",
         ("f1", "precision", "recall"), "f1",
         {"train": "wikiann", "source_dev": "wikiann", "targets": ["wikiann", "masakhaner", "masakhaner2"]},
         ("wikiann", "masakhaner", "masakhaner2"), "NER", released="ner"),
    Task("qa", "span", ("id", "context", "question", "answers"), "AutoModelForQuestionAnswering",
         ("f1", "exact_match"), "f1",
         {"train": "tydiqa_goldp", "source_dev": "tydiqa_goldp", "targets": ["tydiqa_goldp", "xquad"]},
         ("tydiqa_goldp", "xquad"), "TyDiQA-GoldP",
         paper_data={"train": "tydiqa_goldp", "source_dev": "tydiqa_goldp", "targets": ["tydiqa_goldp"]},
         released="tydiqa"),
    Task("sib", "sequence", ("text", "label"), "AutoModelForSequenceClassification", ("accuracy",), "accuracy",
         {"train": "sib200", "source_dev": "sib200", "targets": ["sib200"]}, ("sib200",), "SIB-200",
         text_columns=("text",)),
    Task("sentiment", "sequence", ("text", "label"), "AutoModelForSequenceClassification", ("accuracy",),
         "accuracy", {"train": "umsab", "source_dev": "umsab", "targets": ["umsab"]}, ("umsab",),
         "Tweet sentiment", text_columns=("text",)),
)}
NAMES: tuple[str, ...] = tuple(TASKS)
# every task by its study name and by its name in the released results ("tydiqa" is "qa")
BY_ANY_NAME: dict[str, Task] = {name: t for t in TASKS.values() for name in (t.name, t.released) if name}


def get(name: str) -> Task:
    """The task called ``name``; a ValueError listing the known ones otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"task={name!r} is unknown; expected one of {', '.join(NAMES)}") from None

