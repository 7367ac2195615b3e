"""Everything a run needs before its first step: the data (the same training subsample for every run), the
model (trimmed to the run's corpus when asked), the head, and the featurized training and evaluation sets."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch

from ofa_lib import models
from ofa_lib.data import catalog, features, loading, locate
from ofa_lib.models import adapters as adapters_lib
from ofa_lib.progress import beat
from ofa_lib.train import evaluation, optim
from ofa_lib.train.config import TrainConfig
from ofa_lib.train.heads import setup_head


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Prepared:
    """Everything a run needs before the first step."""

    model: torch.nn.Module
    tokenizer: Any
    train: Any
    dev_sets: list[evaluation.EvalSet]
    test_sets: list[evaluation.EvalSet]
    head_keys: list[str]
    head_fingerprint: str
    label_names: list[str] | None
    timings: dict[str, float] = field(default_factory=dict)
    data_sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # "dataset/lang/split" -> loading.source_of


def prepare(cfg: TrainConfig) -> Prepared:
    """Load data and model (trimmed to the run's corpus when asked), featurize, set up the head."""
    t0 = time.perf_counter()
    datasets.disable_progress_bars()
    set_seed(cfg.seed)
    load = dict(map_date_to_o=cfg.map_date_to_o)
    sets = [(cfg.train_dataset, cfg.source_lang(), "train")] + cfg.dev_sets() + cfg.test_sets()
    locate.require(sets)  # every set readable (mirror or hub) before anything is loaded, else one error naming the fix
    # the same training subsample for every run (data seed 0): runs differ by lr, batch and seed only,
    # and share one trimmed vocabulary, so their weights can be averaged
    train_raw = loading.load_split(cfg.train_dataset, cfg.source_lang(), "train", subsample=cfg.train_subsample, seed=0, **load)
    dev_raw = [(s, loading.load_split(*s, subsample=cfg.dev_subsample_of(i), seed=0, **load)) for i, s in enumerate(cfg.dev_sets())]
    test_raw = [(s, loading.load_split(*s, subsample=cfg.test_subsample, seed=0, **load)) for s in cfg.test_sets()]
    sources = {"/".join(key): loading.source_of(*key, **load) for key in dict.fromkeys(sets)}
    label_names = None if cfg.task == "qa" else catalog.label_names(cfg.train_dataset) if cfg.task != "ner" else catalog.ner_labels(not cfg.map_date_to_o)
    trim = None
    if cfg.trim_vocab:
        trim = [t for _, ds in [(None, train_raw)] + dev_raw + test_raw for t in evaluation.texts_of(cfg.task, ds)]
    t1 = time.perf_counter()
    beat(what="loading the model")
    model, tokenizer = models.load_pretrained(
        cfg.model_name, cfg.task, label_names=label_names, freeze_embeddings=cfg.freeze_embeddings, trim_corpus=trim,
        attn_implementation=optim.attn_implementation(cfg.optimizer))  # Fisher penalty: eager (double backward)
    keys, fingerprint = setup_head(model, cfg)
    if cfg.adapters:  # task adapters after the head is set up: they are no head keys; the base model freezes
        adapters_lib.add_adapters(model, cfg.adapters)
    t2 = time.perf_counter()
    beat(what="featurizing")
    feat = dict(max_length=cfg.max_length, doc_stride=cfg.doc_stride, label_all_subtokens=cfg.label_all_subtokens)
    train = features.featurize(cfg.task, train_raw, tokenizer, train=True, **feat)
    dev_sets = [evaluation.make_eval_set(cfg.task, s, ds, tokenizer, batch_size=cfg.eval_batch_size, **feat) for s, ds in dev_raw]
    test_sets = [evaluation.make_eval_set(cfg.task, s, ds, tokenizer, batch_size=cfg.eval_batch_size, **feat) for s, ds in test_raw]
    t3 = time.perf_counter()
    return Prepared(model, tokenizer, train, dev_sets, test_sets, keys, fingerprint, label_names,
                    {"load_data_s": t1 - t0, "load_model_s": t2 - t1, "featurize_s": t3 - t2}, sources)
