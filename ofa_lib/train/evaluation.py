"""Scoring a model on (dataset, language, split) sets: batched inference with length-sorted
dynamic padding, then the task's metric (accuracy, entity F1, SQuAD F1/EM), all in [0, 1]."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch

from ofa_lib.data import features
from ofa_lib.progress import beat
from ofa_lib.train import metrics

# Columns the model needs per task at inference (others stay in ``rows`` for scoring).
_KEEP = ("input_ids", "attention_mask", "token_type_ids", "labels", "word_index", "example_id", "offset_mapping")


@dataclass
class EvalSet:
    """One evaluation set, featurized once and batched by length."""

    dataset: str
    lang: str
    split: str
    examples: datasets.Dataset
    rows: list[dict[str, Any]] = field(repr=False)
    batches: list[list[int]] = field(repr=False)
    label_all_subtokens: bool = False
    batch_size: int = 64

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.dataset, self.lang, self.split)

    def __len__(self) -> int:
        return len(self.examples)


def texts_of(task: str, dataset: datasets.Dataset) -> Iterable[str]:
    """Every text field the task tokenizes (for vocabulary trimming)."""
    if task == "nli":
        yield from dataset["premise"]
        yield from dataset["hypothesis"]
    elif task == "ner":
        for tokens in dataset["tokens"]:
            yield " ".join(tokens)
    elif task == "qa":
        yield from dataset["question"]
        yield from dataset["context"]
    else:
        yield from dataset["text"]


def make_eval_set(task: str, key: tuple[str, str, str], examples: datasets.Dataset, tokenizer: Any, *,
                  max_length: int, doc_stride: int = 128, label_all_subtokens: bool = False,
                  batch_size: int = 64) -> EvalSet:
    """Featurize ``examples`` for evaluation and precompute length-sorted batches."""
    feats = features.featurize(task, examples, tokenizer, max_length, train=False,
                               label_all_subtokens=label_all_subtokens, doc_stride=doc_stride)
    rows = feats.select_columns([c for c in _KEEP if c in feats.column_names]).to_list()
    batches = features.length_sorted_batches([len(r["input_ids"]) for r in rows], batch_size)
    return EvalSet(*key, examples=examples, rows=rows, batches=batches, label_all_subtokens=label_all_subtokens,
                   batch_size=batch_size)


@torch.no_grad()
def predict(model: torch.nn.Module, eval_set: EvalSet, *, batch_size: int | None = None, device: torch.device | str = "cpu",
            autocast_dtype: torch.dtype | None = None, pad_token_id: int | None = None) -> list[Any]:
    """Raw outputs per feature row, in the original order: class logits, token logits or (start, end) logits."""
    device = torch.device(device)
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    batches = eval_set.batches
    if batch_size is not None and batch_size != eval_set.batch_size:  # else the precomputed batches
        batches = features.length_sorted_batches([len(r["input_ids"]) for r in eval_set.rows], batch_size)
    was_training = model.training
    model.eval()
    outputs: list[Any] = []
    for batch_idx in batches:
        beat()  # an evaluation advancing is progress (ofa_lib.progress)
        rows = [eval_set.rows[i] for i in batch_idx]
        batch = features.collate(rows, pad)
        batch.pop("labels", None)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(**batch)
        lengths = [len(r["input_ids"]) for r in rows]
        if hasattr(out, "start_logits"):
            start, end = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            outputs += [(start[j, :n], end[j, :n]) for j, n in enumerate(lengths)]
        elif out.logits.dim() == 3:
            pred = out.logits.argmax(-1).cpu().numpy()
            outputs += [pred[j, :n] for j, n in enumerate(lengths)]
        else:
            outputs += list(out.logits.float().cpu().numpy())
    model.train(was_training)
    return features.restore_order(batches, outputs)


def score(model: torch.nn.Module, eval_set: EvalSet, task: str, *, batch_size: int | None = None,
          device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """The task's metrics for ``model`` on ``eval_set`` (values in [0, 1])."""
    outputs = predict(model, eval_set, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
    if task == "qa":
        start = [o[0] for o in outputs]
        end = [o[1] for o in outputs]
        texts = features.qa_postprocess(eval_set.examples, eval_set.rows, start, end)
        gold = {str(i): list(a["text"]) for i, a in zip(eval_set.examples["id"], eval_set.examples["answers"])}
        return metrics.squad_f1_em(texts, gold)
    if task == "ner":
        names = eval_set.examples.features["ner_tags"].feature.names
        id2label = getattr(model.config, "id2label", None) or dict(enumerate(names))
        return metrics.ner_f1(*ner_sequences(outputs, eval_set, names, id2label))
    return metrics.accuracy([int(np.argmax(o)) for o in outputs], list(eval_set.examples["label"]))


def ner_sequences(outputs: list[np.ndarray], eval_set: EvalSet, gold_names: list[str],
                  id2label: dict[int, str]) -> tuple[list[list[str]], list[list[str]]]:
    """(predicted, gold) tag sequences: per word (first sub-token; truncated words → O), or per
    labelled sub-token when the set was featurized with ``label_all_subtokens``."""
    preds, golds = [], []
    for pred, row, tags in zip(outputs, eval_set.rows, eval_set.examples["ner_tags"]):
        if eval_set.label_all_subtokens:
            keep = [k for k, lab in enumerate(row["labels"]) if lab != -100]
            preds.append([id2label[int(pred[k])] for k in keep])
            golds.append([gold_names[row["labels"][k]] for k in keep])
        else:
            words = ["O"] * len(tags)
            for k, w in enumerate(row["word_index"]):
                if w >= 0:
                    words[w] = id2label[int(pred[k])]
            preds.append(words)
            golds.append([gold_names[t] for t in tags])
    return preds, golds
