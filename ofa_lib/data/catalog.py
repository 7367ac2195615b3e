"""What exists: the benchmarks, their label spaces and the errors of reading them.

:data:`DATASETS` holds one :class:`DatasetInfo` per benchmark (task, mirror folder, API splits, labels).
Splits are always called ``train`` / ``validation`` / ``test`` whatever the files or hub splits are called.
Labels are ids into fixed lists: ``NLI_LABELS``; one shared ``NER_LABELS`` for every NER dataset (DATE → O
by default, as in the published study; :func:`ner_labels` with ``with_date=True`` appends ``B-DATE, I-DATE``
as ids 7, 8); ``SIB_TOPICS`` (SIB-200's seven topics, sorted by name); ``SENTIMENT_LABELS``.
Which languages can be read now is :mod:`ofa_lib.data.locate`'s (it looks at the mirror and the hub).
"""

from __future__ import annotations

from dataclasses import dataclass

from ofa_lib import tasks as tasks_lib
from ofa_lib.data import hub

SPLITS = ("train", "validation", "test")
NLI_LABELS = ["entailment", "neutral", "contradiction"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
DATE_LABELS = ["B-DATE", "I-DATE"]
SENTIMENT_LABELS = ["negative", "neutral", "positive"]
SIB_TOPICS = ["entertainment", "geography", "health", "politics", "science/technology", "sports", "travel"]
TASKS = tasks_lib.NAMES


class MalformedDataWarning(UserWarning):
    """A data file holds records that cannot be parsed; they were skipped."""


class DataError(ValueError):
    """A data file or hub copy cannot be used; the message names the file (and line) and what was expected."""


class DataUnavailableError(DataError, FileNotFoundError):
    """No place holds the data asked for; the message names the places tried and the fix."""


def ner_labels(with_date: bool = False) -> list[str]:
    """The shared NER label list; ``with_date`` appends ``B-DATE, I-DATE`` (ids 7, 8)."""
    return NER_LABELS + DATE_LABELS if with_date else list(NER_LABELS)


def ner_label_ids(map_date_to_o: bool) -> dict[str, int]:
    """NER tag name -> study id; ``map_date_to_o`` maps ``B-DATE, I-DATE`` to ``O`` (0), else to 7, 8."""
    label_ids = {name: i for i, name in enumerate(ner_labels(with_date=True))}
    if map_date_to_o:
        label_ids.update({"B-DATE": 0, "I-DATE": 0})
    return label_ids


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


def check_dataset(dataset: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``dataset``; a ``ValueError`` listing the known datasets if there is none."""
    if dataset not in DATASETS:
        raise ValueError(
            f"dataset={dataset!r} is unknown; available: {', '.join(DATASETS)}"
        )
    return DATASETS[dataset]


def task_of(dataset: str) -> str:
    """The task kind of ``dataset``: one of ``nli, ner, qa, sib, sentiment``."""
    return check_dataset(dataset).task


def label_names(dataset: str) -> list[str]:
    """Label names of ``dataset`` (ids are list positions); QA has none.

    NER datasets share ``NER_LABELS``; use ``ner_labels(True)`` for the list with DATE.
    SIB-200's seven topics are sorted by name.
    """
    return list(check_dataset(dataset).fixed_labels)
