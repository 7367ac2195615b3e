"""Task metrics, all as fractions in [0, 1] (never percentages).

The metric logic lives in self-contained ``evaluate`` module scripts under
``ofa_lib/train/metric_modules/<name>/<name>.py`` (loadable offline with ``evaluate.load(<path>)``,
see :func:`load_metric`). The plain functions here call the same code directly, without
``evaluate``'s Arrow round trip, so both routes give identical numbers.

- NLI / SIB / sentiment: :func:`accuracy`.
- NER: :func:`ner_f1`, entity-level micro P/R/F1 with seqeval (default = conlleval mode, IOB2).
  Word-level scoring (the study's default: one tag per word, the label predicted on the
  word's first sub-token) and the authors' sub-token-level scoring (every sub-token carries a
  tag) are the same metric applied to different tag sequences; the caller builds them.
- QA: :func:`squad_f1_em`, SQuAD v1.1 F1 / exact match divided by 100.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ofa_lib import tasks as tasks_lib

if TYPE_CHECKING:  # evaluate (and datasets) are slow to import; only load_metric needs them
    import evaluate

METRIC_MODULES_DIR = Path(__file__).resolve().parent / "metric_modules"
AVAILABLE_METRICS: tuple[str, ...] = ("accuracy", "seqeval_f1", "squad_v1")

METRICS_BY_TASK: dict[str, list[str]] = {name: list(task.metrics) for name, task in tasks_lib.TASKS.items()}
PRIMARY_METRIC: dict[str, str] = {name: task.primary_metric for name, task in tasks_lib.TASKS.items()}


def metric_module_path(name: str) -> Path:
    """Path of the local ``evaluate`` script of metric ``name`` (one of :data:`AVAILABLE_METRICS`)."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(
            f"unknown metric {name!r}; available local metric modules: {', '.join(AVAILABLE_METRICS)}"
        )
    path = METRIC_MODULES_DIR / name / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"metric module script missing: {path}")
    return path


@functools.lru_cache(maxsize=None)
def load_metric(name: str) -> "evaluate.EvaluationModule":
    """Load our local ``evaluate`` module ``name`` (cached per process; never touches the network).

    The path handed to ``evaluate.load`` is the ``.py`` file itself: evaluate 0.4.6 then goes
    straight to its local-script factory, with no Hub lookup, so it works with
    ``HF_HUB_OFFLINE=1`` and no network. ``keep_in_memory=True`` keeps the predictions out of
    the on-disk Arrow cache (no file locks shared between concurrent processes).
    """
    import evaluate

    return evaluate.load(str(metric_module_path(name)), keep_in_memory=True)


@functools.lru_cache(maxsize=None)
def _script(name: str) -> ModuleType:
    """The metric script imported as a plain module (for its scoring functions)."""
    path = metric_module_path(name)
    spec = importlib.util.spec_from_file_location(f"ofa_lib._metric_script_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    """``{"accuracy": fraction of predictions equal to their reference}``."""
    return {"accuracy": _script("accuracy").accuracy_score(predictions, references)}


def ner_f1(predictions: list[list[str]], references: list[list[str]]) -> dict[str, float]:
    """Entity-level micro ``{"precision", "recall", "f1"}`` of IOB2 tag sequences (seqeval default mode).

    One list of tags per sentence. Works on any tag sequences: word-level (first sub-token's
    label per word) or sub-token-level (every sub-token labelled) — the caller builds them.
    """
    return _script("seqeval_f1").entity_scores(predictions, references)


def squad_f1_em(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """SQuAD v1.1 ``{"f1", "exact_match"}`` in [0, 1]: question id -> predicted text / gold texts."""
    return _script("squad_v1").squad_scores(predictions, references)


def normalize_answer(text: str) -> str:
    """The SQuAD v1.1 answer normalisation (lowercase, no punctuation/articles, single spaces)."""
    return _script("squad_v1").normalize_answer(text)


def task_metrics(task: str) -> list[str]:
    """Metric names reported for ``task`` (first is not necessarily primary; see :data:`PRIMARY_METRIC`)."""
    if task not in METRICS_BY_TASK:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(METRICS_BY_TASK)}")
    return list(METRICS_BY_TASK[task])
