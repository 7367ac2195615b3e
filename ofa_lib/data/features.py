"""Turning examples from ``ofa_lib.data`` into model inputs, and model outputs back.

- ``featurize(task, dataset, tokenizer, max_length, train=...)``: tokenized columns ready for
  ``collate`` (no padding here; batches are padded dynamically). Results are cached as Arrow
  files under ``outputs/cache/features/``, keyed by the dataset fingerprint, the tokenizer
  (class, vocabulary size and a hash of its whole pipeline), the options and
  ``FEATURES_VERSION``; a second call with the same inputs reads the file back.
- ``qa_postprocess``: SQuAD v1.1 span selection over all windows of each question.
- ``collate``: dynamic padding; ``length_sorted_batches`` / ``restore_order``: fast evaluation;
  ``length_grouped_batches``: training batches of similar length (``group_by_length``), ``padded_tokens``.

Only the standard fast-tokenizer API is used (``__call__``, ``word_ids()``, offsets,
``pad_token_id``, ``cls_token_id``).

NER conventions: ``labels`` holds the word's tag on its first sub-token and -100 elsewhere;
``label_all_subtokens=True`` (the original authors' convention) labels every sub-token, a
continuation of a ``B-X`` word getting ``I-X``. ``word_index`` is the word number on a word's
first sub-token and -1 elsewhere, so predictions can be scored on words. Words that have no
sub-token in the features (cut by ``max_length`` truncation, or empty after the tokenizer's
normalisation) must be predicted as ``O`` by the evaluation.

QA conventions (as Hugging Face's ``run_qa``): the question comes first, the context is cut
into windows of ``max_length`` tokens that overlap by ``doc_stride`` tokens; train windows
without the (first) answer point at the CLS token. Eval features keep ``example_id`` and an
``offset_mapping`` with ``[-1, -1]`` on every token that is not context.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import datasets
import numpy as np
import torch

from ofa_lib import tasks as tasks_lib
from ofa_lib.data.catalog import ner_labels
from ofa_lib.paths import cache_dir

FEATURES_VERSION = "1"
FEATURE_TASKS = tasks_lib.NAMES
_NO_OFFSET = [-1, -1]


# --------------------------------------------------------------------------- cache keys


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A content hash of a tokenizer: class, vocab size, specials and its whole pipeline.

    The path it was loaded from is left out on purpose: the same tokenizer from another
    folder reuses the cache, a different one (e.g. a trimmed vocabulary) never does.
    """
    h = hashlib.sha256()
    parts = [
        type(tokenizer).__name__,
        str(len(tokenizer)),
        str(getattr(tokenizer, "all_special_ids", "")),
        str(getattr(tokenizer, "padding_side", "")),
        str(getattr(tokenizer, "model_input_names", "")),
    ]
    h.update("\0".join(parts).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        return h.hexdigest()
    # Hash the pipeline's parts one by one (fast even for a 250k vocabulary): the whole
    # serialisation would also record the last call's truncation/padding, which is no identity.
    for part in ("model", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        component = getattr(backend, part, None)
        h.update(part.encode())
        h.update(component.__getstate__() if component is not None else b"null")
    added = sorted((i, str(t)) for i, t in backend.get_added_tokens_decoder().items())
    h.update(repr(added).encode())
    return h.hexdigest()


def dataset_fingerprint(dataset: datasets.Dataset) -> str:
    """The dataset's own content fingerprint (``datasets`` computes it deterministically)."""
    return str(dataset._fingerprint)


def _cache_key(task: str, dataset: datasets.Dataset, tokenizer: Any, options: dict) -> str:
    blob = json.dumps(
        {
            "version": FEATURES_VERSION,
            "task": task,
            "dataset": dataset_fingerprint(dataset),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            **options,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- encoders


def _encode_pair(batch: dict, tokenizer: Any, max_length: int) -> dict:
    enc = tokenizer(batch["premise"], batch["hypothesis"], truncation=True, max_length=max_length)
    out = dict(enc)
    out["labels"] = list(batch["label"])
    return out


def _encode_single(batch: dict, tokenizer: Any, max_length: int) -> dict:
    enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
    out = dict(enc)
    out["labels"] = list(batch["label"])
    return out


def _continuation_ids(names: Sequence[str]) -> list[int]:
    """For each tag id, the id a continuation sub-token gets (``B-X`` → ``I-X``)."""
    index = {n: i for i, n in enumerate(names)}
    return [index.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)]


def _encode_ner(
    batch: dict, tokenizer: Any, max_length: int, label_all_subtokens: bool, cont: list[int]
) -> dict:
    enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
    labels, word_index = [], []
    for i, tags in enumerate(batch["ner_tags"]):
        lab, widx, previous = [], [], None
        for w in enc.word_ids(i):
            if w is None:
                lab.append(-100)
                widx.append(-1)
            elif w != previous:
                lab.append(tags[w])
                widx.append(w)
            else:
                lab.append(cont[tags[w]] if label_all_subtokens else -100)
                widx.append(-1)
            previous = w
        labels.append(lab)
        word_index.append(widx)
    out = dict(enc)
    out["labels"] = labels
    out["word_index"] = word_index
    return out


def _cls_index(input_ids: Sequence[int], tokenizer: Any) -> int:
    cls = tokenizer.cls_token_id
    return input_ids.index(cls) if cls is not None and cls in input_ids else 0


def _check_question_room(
    questions: list[str], ids: list[str], tokenizer: Any, max_length: int, doc_stride: int
) -> None:
    """Fail clearly (not with a tokenizer panic) when a question leaves no room for windows."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - doc_stride
    lengths = [len(x) for x in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for qid, n in zip(ids, lengths):
        if n >= room:
            raise ValueError(
                f"question id={qid!r} has {n} tokens: max_length={max_length} must exceed question + "
                f"doc_stride={doc_stride} + special tokens; raise max_length or lower doc_stride"
            )


def _encode_qa(batch: dict, tokenizer: Any, max_length: int, doc_stride: int, train: bool) -> dict:
    questions = [q.lstrip() for q in batch["question"]]
    _check_question_room(questions, batch["id"], tokenizer, max_length, doc_stride)
    enc = tokenizer(
        questions,
        batch["context"],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    out: dict[str, list] = {k: list(v) for k, v in enc.items()}
    if train:
        out["start_positions"], out["end_positions"] = [], []
    else:
        out["example_id"], out["offset_mapping"] = [], []
    for i, offsets in enumerate(offsets_all):
        seq_ids = enc.sequence_ids(i)
        sample = sample_map[i]
        if not train:
            out["example_id"].append(batch["id"][sample])
            out["offset_mapping"].append(
                [list(o) if seq_ids[k] == 1 else _NO_OFFSET for k, o in enumerate(offsets)]
            )
            continue
        cls = _cls_index(out["input_ids"][i], tokenizer)
        start, end = cls, cls
        answers = batch["answers"][sample]
        context_tokens = [k for k, s in enumerate(seq_ids) if s == 1]
        if answers["answer_start"] and context_tokens:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            first, last = context_tokens[0], context_tokens[-1]
            if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                k = first
                while k <= last and offsets[k][0] <= start_char:
                    k += 1
                start = k - 1
                k = last
                while k >= first and offsets[k][1] >= end_char:
                    k -= 1
                end = k + 1
        out["start_positions"].append(start)
        out["end_positions"].append(end)
    return out


_REQUIRED = {name: task.columns for name, task in tasks_lib.TASKS.items()}


def _ner_label_names(dataset: datasets.Dataset) -> list[str]:
    feature = dataset.features.get("ner_tags")
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names)
    return ner_labels(with_date=True)  # ids agree with and without DATE


def featurize(
    task: str,
    dataset: datasets.Dataset,
    tokenizer: Any,
    max_length: int,
    *,
    train: bool,
    label_all_subtokens: bool = False,
    doc_stride: int = 128,
) -> datasets.Dataset:
    """Tokenize ``dataset`` for ``task`` (unpadded; cached on disk, see the module docstring).

    Columns: ``input_ids, attention_mask`` (and ``token_type_ids`` when the tokenizer makes
    them) plus ``labels`` (nli, sib, sentiment, ner), ``word_index`` (ner),
    ``start_positions, end_positions`` (qa, ``train=True``) or ``example_id,
    offset_mapping`` (qa, ``train=False``).
    """
    if task not in FEATURE_TASKS:
        raise ValueError(f"task={task!r} is unknown; available: {', '.join(FEATURE_TASKS)}")
    missing = [c for c in _REQUIRED[task] if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset lacks columns {missing} needed for task={task!r} (has {dataset.column_names})"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("featurize needs a fast (Rust-backed) tokenizer: word_ids() and offsets")
    if max_length < 8:
        raise ValueError(f"max_length={max_length} is too small")
    options: dict[str, Any] = {"max_length": max_length}
    if task == "ner":
        options["label_all_subtokens"] = bool(label_all_subtokens)
        cont = _continuation_ids(_ner_label_names(dataset))
        fn, kwargs = _encode_ner, {"label_all_subtokens": bool(label_all_subtokens), "cont": cont}
    elif task == "qa":
        if not 0 <= doc_stride < max_length:
            raise ValueError(f"doc_stride={doc_stride} must be in [0, max_length={max_length})")
        options.update(train=bool(train), doc_stride=doc_stride)
        fn, kwargs = _encode_qa, {"doc_stride": doc_stride, "train": bool(train)}
    elif task == "nli":
        fn, kwargs = _encode_pair, {}
    else:
        fn, kwargs = _encode_single, {}
    key = _cache_key(task, dataset, tokenizer, options)
    path = cache_dir("features") / f"{task}-{key}.arrow"

    def run(load_from_cache: bool) -> datasets.Dataset:
        return dataset.map(
            fn,
            batched=True,
            batch_size=1000,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, **kwargs},
            remove_columns=dataset.column_names,
            cache_file_name=str(path),
            load_from_cache_file=load_from_cache,
            new_fingerprint=key,
            desc=f"featurize {task}",
        )

    cached = path.is_file()
    try:
        return run(True)
    except (OSError, ValueError) as exc:  # pyarrow: a truncated or damaged cache file (ArrowInvalid is a ValueError)
        if not cached:
            raise
        print(f"features cache {path} is unreadable ({type(exc).__name__}: {exc}); rebuilding it")
        path.unlink(missing_ok=True)
        return run(False)


# --------------------------------------------------------------------------- QA post-processing


def _valid_offset(offset: Any) -> bool:
    return offset is not None and len(offset) == 2 and offset[0] is not None and offset[0] >= 0


def qa_postprocess(
    examples: Any,
    features: Any,
    start_logits: Any,
    end_logits: Any,
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Best answer text per example id from the logits of all its windows (SQuAD v1.1).

    ``examples`` has ``id, context``; ``features`` has ``example_id, offset_mapping`` (rows
    aligned with the logits; logits may be padded longer than a feature). Among the
    ``n_best`` start and end candidates of every window, the valid span (both ends in the
    context, start ≤ end, at most ``max_answer_length`` tokens) with the highest
    start + end logit wins. The text is stripped of surrounding whitespace (sentencepiece
    offsets may include the leading space); no valid span gives ``""``.
    """
    contexts = {str(ex["id"]): ex["context"] for ex in _rows(examples, ("id", "context"))}
    best: dict[str, tuple[float, str]] = {}
    feat_rows = _rows(features, ("example_id", "offset_mapping"))
    if len(feat_rows) != len(start_logits) or len(feat_rows) != len(end_logits):
        raise ValueError(
            f"{len(feat_rows)} features but {len(start_logits)} start / {len(end_logits)} end logit rows"
        )
    for i, feat in enumerate(feat_rows):
        ex_id = str(feat["example_id"])
        context = contexts[ex_id]
        offsets = feat["offset_mapping"]
        n = len(offsets)
        s_log = np.asarray(_to_numpy(start_logits[i]), dtype=np.float64)[:n]
        e_log = np.asarray(_to_numpy(end_logits[i]), dtype=np.float64)[:n]
        starts = np.argsort(-s_log, kind="stable")[:n_best]
        ends = np.argsort(-e_log, kind="stable")[:n_best]
        for s in starts:
            if not _valid_offset(offsets[s]):
                continue
            for e in ends:
                if e < s or e - s + 1 > max_answer_length or not _valid_offset(offsets[e]):
                    continue
                score = float(s_log[s] + e_log[e])
                if ex_id not in best or score > best[ex_id][0]:
                    best[ex_id] = (score, context[offsets[s][0] : offsets[e][1]].strip())
    return {ex_id: best[ex_id][1] if ex_id in best else "" for ex_id in contexts}


def _rows(table: Any, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a Dataset (only ``columns``, fast) or of a list of dicts."""
    if isinstance(table, datasets.Dataset):
        cols = {c: table[c] for c in columns}
        return [{c: cols[c][i] for c in columns} for i in range(len(table))]
    return list(table)


def _to_numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


# --------------------------------------------------------------------------- batching


def _as_list(x: Any) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def collate(features: list[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of feature rows to the longest one (right padding) as ``torch.long`` tensors.

    ``input_ids`` get ``pad_token_id``, ``attention_mask`` and ``token_type_ids`` 0, token-level
    ``labels`` -100; sequence ``labels`` and ``start_positions`` / ``end_positions`` become
    1-d tensors. Every other column (``word_index``, ``offset_mapping``, ...) is dropped.
    """
    if not features:
        raise ValueError("collate needs at least one feature row")
    ids = [_as_list(f["input_ids"]) for f in features]
    width = max(len(x) for x in ids)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    first = features[0]
    batch = {"input_ids": pad(ids, pad_token_id)}
    if "attention_mask" in first:
        batch["attention_mask"] = pad([_as_list(f["attention_mask"]) for f in features], 0)
    else:
        batch["attention_mask"] = pad([[1] * len(x) for x in ids], 0)
    if "token_type_ids" in first:
        batch["token_type_ids"] = pad([_as_list(f["token_type_ids"]) for f in features], 0)
    if "labels" in first:
        labels = [f["labels"] for f in features]
        if isinstance(first["labels"], (int, np.integer)) or np.ndim(first["labels"]) == 0:
            batch["labels"] = torch.tensor([int(x) for x in labels], dtype=torch.long)
        else:
            batch["labels"] = pad([_as_list(x) for x in labels], -100)
    for key in ("start_positions", "end_positions"):
        if key in first:
            batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
    return batch


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of ``batch_size``, longest first (ties keep index order).

    Concatenated, the batches are a permutation of ``range(len(lengths))``; outputs computed
    in this order go back to the original order with ``restore_order``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, mega: int = 8) -> list[list[int]]:
    """One epoch of training batches whose rows have similar lengths, so little of each padded batch is padding.

    As Hugging Face's ``group_by_length``: a seeded shuffle, cut into mega-batches of ``mega × batch_size``
    rows, each sorted by length (longest first) and cut into batches; then the batches are shuffled, so
    neither the epoch nor a snapshot interval runs from long to short. Why ``mega = 8`` (HF: 50): at CPU
    scale a data set is a few hundred rows, and 50 batches would sort all of it, giving every epoch and
    every seed the same batches; 8 keep them random (SIB-200's 701 sentences, batch 16: padded tokens
    1.13× the real ones, against 1.61× for random batches and 1.02× with 50). Same ``seed``, same batches (a
    resumed run replays its epoch). Concatenated, the batches are a permutation of ``range(len(lengths))``,
    and only the epoch's last batch can be short.
    """
    if batch_size < 1 or mega < 1:
        raise ValueError(f"batch_size={batch_size} and mega={mega} must be >= 1")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)).tolist()
    size = mega * batch_size
    batches: list[list[int]] = []
    for k in range(0, len(order), size):
        chunk = sorted(order[k : k + size], key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    # every mega-batch but the last is whole batches, so at most one batch is short: it goes last
    full = [batches[i] for i in rng.permutation(len(batches)).tolist() if len(batches[i]) == batch_size]
    return full + [b for b in batches if len(b) < batch_size]


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Token slots ``batches`` compute with dynamic padding: each batch padded to its longest row."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches if b)


def restore_order(batches: Sequence[Sequence[int]], outputs: Sequence[Any]) -> list[Any]:
    """Put ``outputs`` (one per row, in batch order) back into the original row order."""
    flat = [i for b in batches for i in b]
    if len(flat) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {len(flat)} batched rows")
    result: list[Any] = [None] * len(flat)
    for i, out in zip(flat, outputs):
        result[i] = out
    return result
