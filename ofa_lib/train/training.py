"""One fine-tuning run: the published recipe, snapshots and online variants, resumable output.

``run_training(cfg)`` trains with AdamW (weight decay 0.01, none on bias/LayerNorm), gradient
clipping, 10% linear warm-up then linear decay and dynamic padding; takes ``num_snapshots``
snapshots evenly over the steps; scores each snapshot on English dev and every target dev when
it is taken and keeps online variants instead of all snapshots: LAST, SRC-DEV (best English
dev), CA (fp32 running mean of the snapshots), TRG-DEV (best mean target dev) and optionally
the top-k snapshots by English dev. At the end every kept variant is read back from its stored
checkpoint and scored on every target test set (CA also on the dev sets; the other variants
keep the dev scores their snapshot had when it was taken).

Output, all written atomically, under ``<output_root>/<run_id>/``: ``manifest.json``,
``checkpoints/{last,src_dev,ca,trg_dev}.safetensors`` (+ ``topk_<i>``), ``metrics.parquet``
(tidy), ``train_log.parquet``, ``head.safetensors`` for head-tuning runs and, while running,
``resume/`` (model, optimizer, scheduler and RNG state at the last snapshot).

The end of a run is a sequence every step of which a re-run finishes: once training is over, LAST, CA
(and the head) are written, then ``resume/final.json`` records the state of the finished training; from
then on a re-run skips training and only redoes the scoring (``snap_<k>`` → ``topk_<r>`` renames that
have not happened yet, the test scores, the tables). The manifest says ``done`` last but one; removing
``resume/`` comes after it. Before ``final.json`` a re-run resumes from the last resume state and
replays the last steps bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import platform
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import datasets
import pandas as pd
import torch
from tqdm.auto import tqdm

from ofa_lib import io, locks, models
from ofa_lib.data import catalog, features, loading, locate
from ofa_lib.io import write_json, write_parquet
from ofa_lib.models import adapters as adapters_lib
from ofa_lib.models import ckpt_io
from ofa_lib.models.running_mean import RunningMean
from ofa_lib.paths import REPO_ROOT, outputs_dir
from ofa_lib.progress import beat
from ofa_lib.train import evaluation, metrics, optim, unfreezing
from ofa_lib.train import measures as measures_lib
from ofa_lib.train.config import (
    ConfigError,
    TrainConfig,
    check_device,
    check_model_available,
    validate,
)

VARIANTS = ("last", "src_dev", "ca", "trg_dev")
RESUME_FILE = "state.safetensors"  # resume/<this>: the whole resume state, one file
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- helpers
def runs_root(output_root: str | Path | None = None) -> Path:
    """Where runs live: ``output_root`` or ``outputs/runs``."""
    return Path(output_root) if output_root else outputs_dir() / "runs"


def run_dir(cfg: TrainConfig, output_root: str | Path | None = None) -> Path:
    return runs_root(output_root) / cfg.run_id


def read_manifest(path: Path) -> dict[str, Any] | None:
    file = path / "manifest.json"
    return json.loads(file.read_text()) if file.is_file() else None


def is_done(cfg: TrainConfig, output_root: str | Path | None = None) -> bool:
    """True when the run finished and its outputs are all there."""
    path = run_dir(cfg, output_root)
    manifest = read_manifest(path)
    if not manifest or manifest.get("status") != "done":
        return False
    needed = ["metrics.parquet"] + [f"checkpoints/{v}.safetensors" for v in manifest.get("variants", VARIANTS)]
    return all((path / name).is_file() for name in needed)


class DeviceError(RuntimeError):
    """The asked-for device or precision is not available here; the message names the node and torch build."""


def torch_build() -> str:
    """``torch 2.13.0+cpu (CUDA none)`` / ``torch 2.13.0+cu128 (CUDA 12.8, archs sm_80 …)``: what this torch can run on."""
    cuda = torch.version.cuda
    archs = ""
    if cuda:
        try:
            archs = ", kernels for " + " ".join(torch.cuda.get_arch_list())
        except Exception:  # noqa: BLE001 -- a broken driver must not hide the build in the message
            archs = ""
    return f"torch {torch.__version__} (CUDA {cuda or 'none'}{archs})"


def resolve_device(device: str | None, preset: str = "cpu") -> torch.device:
    """The device a run trains on, never a silent fallback.

    ``None``/``"auto"`` is ``cuda`` for the ``paper`` preset (xlm-roberta-large on a CPU takes days: a GPU job
    on a node without a working CUDA build must fail, not crawl) and otherwise ``cuda`` when available, else
    ``cpu``. An explicit ``cuda`` (or ``cuda:N``) without a usable CUDA device raises :class:`DeviceError`
    naming the node and the torch build; so does an unknown device string.
    """
    name = "cuda" if (device in (None, "auto") and preset == "paper") else device
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"parameter device={device!r} is invalid: expected 'auto', 'cpu', 'cuda' or 'cuda:N' ({exc})") from None
    if dev.type == "cuda":
        where = f"on node {platform.node()} with {torch_build()}"
        if not torch.cuda.is_available():
            why = ("this torch has no CUDA support: install a CUDA wheel (README: 'Torch on GPUs')" if not torch.version.cuda
                   else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES or the job's --gres)")
            asked = f"device={device!r}" if device not in (None, "auto") else f"preset {preset!r} (device auto means cuda)"
            raise DeviceError(f"{asked} needs CUDA, but torch.cuda.is_available() is False {where}: {why}; "
                              "pass device='cpu' to train on the CPU on purpose")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) {where}")
        cc = torch.cuda.get_device_capability(dev)
        if not cuda_arch_supported(cc, torch.cuda.get_arch_list()):
            raise DeviceError(f"device={device!r}: {torch.cuda.get_device_name(dev)} is sm_{cc[0]}{cc[1]}, and {torch_build()} "
                              f"has no kernels for it {where}; install a wheel built for it (README: 'Torch on GPUs')")
    elif dev.type != "cpu":
        raise DeviceError(f"parameter device={device!r} is invalid: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def cuda_arch_supported(cc: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build with kernels for ``arch_list`` (``["sm_80", "sm_90", "compute_90"]``) runs on a GPU of
    compute capability ``cc``: a binary for the same major and a minor ≤ the GPU's, or PTX (``compute_XY``) for an
    older-or-equal architecture that the driver compiles. A GPU older than every build target is not supported."""
    have = cc[0] * 10 + cc[1]
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        n = int(num)
        if kind == "sm" and n // 10 == cc[0] and n <= have:
            return True
        if kind == "compute" and n <= have:
            return True
    return False




def cpu_precision_support() -> dict[str, Any]:
    """What this CPU offers for reduced precision: torch's kernel capability, AVX512-BF16, AMX (bf16 tiles,
    fp16 tiles), and whether oneDNN runs bf16 at all (it emulates it with AVX512 core)."""
    def probe(name: str) -> bool:
        fn = getattr(torch.cpu, name, None)
        try:
            return bool(fn()) if fn else False
        except Exception:  # noqa: BLE001 -- a probe that cannot run means "not supported"
            return False

    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001
        mkldnn_bf16 = False
    return {"capability": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": probe("_is_avx512_bf16_supported"),
            "amx_tile": probe("_is_amx_tile_supported"), "amx_fp16": probe("_is_amx_fp16_supported"),
            "mkldnn_bf16": mkldnn_bf16}


def resolve_precision(requested: str, device: torch.device, optimizer: str = "adamw") -> tuple[str, str]:
    """The precision a run uses on ``device`` → ``(precision, why)``.

    ``auto``: bf16 on CUDA devices of compute capability ≥ 8.0 and on CPUs with native bf16 (AVX512-BF16 or
    AMX); fp16 with a GradScaler on older CUDA devices (fp32 for SAM and the Fisher penalty, whose extra
    gradients the scaler does not cover); else fp32. An explicit ``bf16``/``fp16`` the hardware does not run
    natively raises :class:`DeviceError` (emulated half precision is slower than fp32, not faster).
    """
    from ofa_lib.train.config import PRECISIONS

    if requested not in PRECISIONS:
        raise DeviceError(f"parameter precision={requested!r} is invalid: expected one of {PRECISIONS}")
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} (compute capability {cc[0]}.{cc[1]})"
        bf16 = cc >= (8, 0)
        fp16 = True
        hw = gpu
    else:
        support = cpu_precision_support()
        bf16 = support["avx512_bf16"] or support["amx_tile"]
        fp16 = support["amx_fp16"]
        hw = (f"CPU {support['capability']}, AVX512-BF16 {'yes' if support['avx512_bf16'] else 'no'}, "
              f"AMX {'yes' if support['amx_tile'] else 'no'}")
    if requested == "auto":
        if bf16:
            return "bf16", f"auto: {hw} has native bf16"
        if device.type == "cuda":
            if optimizer != "adamw":
                return "fp32", f"auto: {hw} has no bf16, and fp16's GradScaler does not cover optimizer={optimizer!r}"
            return "fp16", f"auto: {hw} has no bf16: fp16 autocast with a GradScaler"
        return "fp32", f"auto: {hw} has no native bf16"
    if requested == "bf16" and not bf16:
        raise DeviceError(f"precision='bf16' on {hw} on node {platform.node()}: no native bf16 here (it would be "
                          "emulated, slower than fp32); use precision='auto' or 'fp32'" +
                          ("" if device.type == "cpu" else " or 'fp16'"))
    if requested == "fp16":
        if not fp16:
            raise DeviceError(f"precision='fp16' on {hw} on node {platform.node()}: no native fp16 here; "
                              "use precision='auto' or 'fp32'")
        if optimizer != "adamw":
            raise DeviceError(f"precision='fp16' trains with a GradScaler, which covers optimizer='adamw' only, "
                              f"not optimizer={optimizer!r}; use precision='bf16' (compute capability ≥ 8.0) or 'fp32'")
    return requested, f"{requested} as asked, on {hw}"


def resolve_runtime(cfg: TrainConfig, device: str | None = None) -> tuple[torch.device, str, str]:
    """``(device, precision, why)`` for a run here: :func:`resolve_device` then :func:`resolve_precision`.
    Called by 02_train's first cell, so a run that cannot get what it asks for fails before any work."""
    dev = resolve_device(device, cfg.preset)
    precision, why = resolve_precision(cfg.precision, dev, cfg.optimizer)
    return dev, precision, why


def environment_info() -> dict[str, Any]:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "git_commit": commit, "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "host": platform.node(), "slurm_job_id": locks.job_id(),
    }
    return info


def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def snapshot_steps(total_steps: int, num_snapshots: int) -> list[int]:
    """Steps after which snapshot k = 1..num_snapshots is taken (every 1/num_snapshots)."""
    if num_snapshots > total_steps:
        raise ValueError(f"num_snapshots={num_snapshots} exceeds the {total_steps} training steps")
    return [round(total_steps * k / num_snapshots) for k in range(1, num_snapshots + 1)]


# --------------------------------------------------------------------------- head alignment
def head_keys(model: torch.nn.Module, model_name: str) -> list[str]:
    """Parameters the pretrained checkpoint does not hold: the task head (e.g. pooler + classifier)."""
    pretrained = models.pretrained_keys(model_name)
    prefix = getattr(model, "base_model_prefix", "") + "."

    def stored(name: str) -> bool:  # checkpoints hold "bert.x" or "x" (base model saved alone)
        return name in pretrained or (name.startswith(prefix) and name[len(prefix):] in pretrained) or prefix + name in pretrained

    keys = sorted(k for k, _ in model.named_parameters() if not stored(k))
    if len(keys) * 4 > len(list(model.parameters())):
        raise RuntimeError(f"{len(keys)} parameters look new relative to {model_name}: the checkpoint's names do not match")
    return keys


def init_head(model: torch.nn.Module, keys: list[str], seed: int) -> None:
    """Deterministic head initialisation shared by every run with the same seed."""
    gen = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in keys:
            param = params[key]
            if key.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def load_head(model: torch.nn.Module, keys: list[str], path: str | Path) -> None:
    """Load a trained head file; refuse one that does not fit this model (names the parameter)."""
    state = ckpt_io.load_checkpoint(path)
    params = dict(model.named_parameters())
    missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
    if missing or extra:
        raise ValueError(f"parameter head={str(path)!r} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key in keys:
        if tuple(state[key].shape) != tuple(params[key].shape):
            raise ValueError(f"parameter head={str(path)!r} does not fit the model: {key} has shape "
                             f"{tuple(state[key].shape)}, the model expects {tuple(params[key].shape)}")
    with torch.no_grad():
        for key in keys:
            params[key].copy_(state[key].to(params[key].dtype))


def setup_head(model: torch.nn.Module, cfg: TrainConfig) -> tuple[list[str], str]:
    """Apply ``cfg.head`` (``train`` | ``init:<seed>`` | path: frozen) → (head keys, fingerprint)."""
    keys = head_keys(model, cfg.model_name)
    if cfg.head_file:
        load_head(model, keys, cfg.head_file)
        for name, param in model.named_parameters():
            if name in keys:
                param.requires_grad_(False)
    else:  # "init:<seed>" shares one initialisation across runs; "train" seeds it with the run
        init_head(model, keys, int(cfg.head[5:]) if cfg.head.startswith("init:") else cfg.seed)
    state = model.state_dict()
    return keys, ckpt_io.head_fingerprint({k: state[k] for k in keys}, keys)


# --------------------------------------------------------------------------- data
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


# --------------------------------------------------------------------------- resume state
def save_resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any], ca: RunningMean,
                scaler: "torch.amp.GradScaler | None" = None) -> None:
    """Model, optimizer moments, CA mean, RNG (CPU and CUDA) and the loop's state, in ONE safetensors file
    (``state.safetensors``; the JSON-able part in its metadata) replaced atomically: a kill leaves the previous
    state or the new one, never new weights paired with an old step."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().float() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            tensors[f"optim.{pid}.{k}"] = v.detach().reshape(-1) if v.dim() == 0 else v.detach()
    if ca.mean is not None:
        tensors.update({f"ca.{k}": v for k, v in ca.mean.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on the GPU draws from its generator
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(), "ca_count": ca.count,
            "state": state, "scaler": scaler.state_dict() if scaler is not None else None, "optim_shapes": {f"{pid}.{k}": list(v.shape) for pid, s in opt["state"].items() for k, v in s.items()}}
    path.mkdir(parents=True, exist_ok=True)
    ckpt_io.save_checkpoint(tensors, path / RESUME_FILE, metadata={"ofa_resume": json.dumps(meta)})
    (path / "state.json").unlink(missing_ok=True)  # the two-file format of older versions: never pair with it


def load_resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ca: RunningMean,
                scaler: "torch.amp.GradScaler | None" = None) -> dict[str, Any] | None:
    """Restore what :func:`save_resume` wrote; ``None`` when there is nothing (complete) to resume."""
    if not (path / RESUME_FILE).is_file():
        return None
    meta_text = ckpt_io.read_metadata(path / RESUME_FILE).get("ofa_resume")
    if meta_text is None:  # written by an older version: its state.json beside it, or nothing complete
        if not (path / "state.json").is_file():
            return None
        meta_text = (path / "state.json").read_text()
    meta = json.loads(meta_text)
    tensors = ckpt_io.load_checkpoint(path / RESUME_FILE)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, shape in meta["optim_shapes"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = tensors[f"optim.{key}"].reshape(shape)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    ca_state = {k[3:]: v for k, v in tensors.items() if k.startswith("ca.")}
    if ca_state:
        ca.mean, ca.count = ca_state, meta["ca_count"]
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda_states = [tensors[k].to(torch.uint8) for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                                              key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    return meta["state"]


def clean_litter(out: Path, *, done: bool) -> list[Path]:
    """Remove what a killed run left in its folder: the temp files of interrupted atomic writes and, in a
    run that is done, the resume state (a kill between the manifest's ``done`` and its removal)."""
    removed = [p for p in out.rglob(".*.tmp") if io.is_temp(p)] if out.is_dir() else []
    for path in removed:
        io.remove(path)
    if done and (out / "resume").exists():
        removed.append(out / "resume")
        io.remove_tree(out / "resume")
    return removed


def checkpoint_hashes(state: dict[str, Any], variants: list[str], with_head: bool) -> dict[str, str]:
    """sha256 of every checkpoint the finished run keeps, by path in the run folder (``topk_<r>`` is the
    ``snap_<k>`` file it was renamed from)."""
    written = state.get("sha256", {})
    snap_of = {f"topk_{r}": f"snap_{k}" for r, (_, k) in enumerate(state["topk"])}
    out = {f"checkpoints/{v}.safetensors": written.get(f"checkpoints/{snap_of.get(v, v)}.safetensors") for v in variants}
    if with_head:
        out["head.safetensors"] = written.get("head.safetensors")
    return {k: v for k, v in out.items() if v}  # a resume state from before hashes: those files go unrecorded


def read_final(out: Path) -> dict[str, Any] | None:
    """The state of a run whose training finished (``resume/final.json``), ``None`` before that."""
    file = out / "resume" / "final.json"
    return json.loads(file.read_text()) if file.is_file() else None


# --------------------------------------------------------------------------- the run
def tidy_rows(cfg: TrainConfig, kind: str, name: str, scores: dict[tuple[str, str, str], dict[str, float]],
              step: int, epoch: float) -> list[dict[str, Any]]:
    """Tidy rows (results schema) for one model's scores on several (dataset, lang, split)."""
    base = dict(run_id=cfg.run_id, task=cfg.task, model=cfg.model_name, lr=float(cfg.lr), batch_size=cfg.batch_size,
                seed=cfg.seed, kind=kind, name=name, step=step, epoch=float(epoch), members=None)
    return [dict(base, dataset=d, lang=lang, split=split, metric=m, value=float(v))
            for (d, lang, split), values in scores.items() for m, v in values.items()]


def dev_summary(cfg: TrainConfig, scores: dict[tuple[str, str, str], dict[str, float]]) -> tuple[float, float, dict[str, float]]:
    """(English dev score, mean target dev score, per-target-language dev score) on the primary metric."""
    primary = metrics.PRIMARY_METRIC[cfg.task]
    src = cfg.dev_sets()[0]
    per_lang = {f"{d}/{lang}": v[primary] for (d, lang, s), v in scores.items() if (d, lang, s) != src}
    target_mean = sum(per_lang.values()) / len(per_lang)
    return scores[src][primary], target_mean, per_lang


class RunInterrupted(Exception):
    """A run stopped on SIGUSR1/SIGTERM (a scheduler's notice or the grid runner stopping): its resume state is
    written; running it again resumes it. Not a failure."""


@dataclass
class StopRequest:
    """Set by the signal handlers of :func:`stop_signals`; the training loop checks it after every step."""

    signal: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals() -> Iterator["StopRequest"]:
    """While training: SIGUSR1 (SLURM's ``--signal`` notice) and SIGTERM (preemption, the grid runner) ask the run
    to stop after its current step with its resume state written, instead of killing it mid-write. Only in the
    main thread (where Python delivers signals); elsewhere nothing is installed."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):  # noqa: ARG001
        stop.signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_training(cfg: TrainConfig, output_root: str | Path | None = None, *, device: str | None = None,
                 progress: bool = True, stop_after_step: int | None = None) -> Path:
    """Train one run (or resume it, or do nothing if it is done); return its directory.

    ``stop_after_step`` interrupts the run after that step (to test resuming).
    """
    validate(cfg)
    check_device(device)
    check_model_available(cfg.model_name)
    out = run_dir(cfg, output_root)
    clean_litter(out, done=is_done(cfg, output_root))
    if is_done(cfg, output_root):
        print(f"run {cfg.run_id} is already done: {out} (nothing to do)")
        return out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    manifest = {"run_id": cfg.run_id, "params": cfg.canonical(), "status": "running", "started": started,
                "environment": environment_info()}
    write_json(out / "manifest.json", manifest)
    try:
        with stop_signals() as stop:
            result = _train(cfg, out, manifest, device, progress, stop_after_step, stop)
    except BaseException as exc:
        manifest.update(status="interrupted" if isinstance(exc, RunInterrupted) else "failed",
                        error=f"{type(exc).__name__}: {exc}", ended=time.time())
        write_json(out / "manifest.json", manifest)
        raise
    return result


def _train(cfg: TrainConfig, out: Path, manifest: dict[str, Any], device_name: str | None, progress: bool,
           stop_after_step: int | None, stop: "StopRequest | None" = None) -> Path:
    device, precision, precision_why = resolve_runtime(cfg, device_name)
    beat(what="loading data and model")
    prep = prepare(cfg)
    model = prep.model.to(device)
    manifest.update(head_fingerprint=prep.head_fingerprint, head_keys=prep.head_keys, device=str(device),
                    precision=precision, precision_reason=precision_why,
                    n_train_features=len(prep.train), vocab_size=model.config.vocab_size,
                    parameters=models.count_parameters(model), trainable=models.count_parameters(model, True),
                    data=prep.data_sources, data_summary=loading.describe_sources(prep.data_sources))
    if cfg.head_file:
        manifest["head_file"] = str(cfg.head_file.resolve())
    write_json(out / "manifest.json", manifest)
    frozen_head = {k: v.detach().clone() for k, v in model.state_dict().items() if k in prep.head_keys} \
        if cfg.head_file else None

    steps_per_epoch = math.ceil(len(prep.train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.num_snapshots > total_steps:  # known only now for QA (windows per question); before the first step
        raise ConfigError(f"parameter num_snapshots={cfg.num_snapshots} is invalid: expected at most the {total_steps} "
                          f"training steps ({len(prep.train)} training features / batch_size={cfg.batch_size} × epochs={cfg.epochs})")
    snaps = snapshot_steps(total_steps, cfg.num_snapshots)
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  fused=device.type in ("cpu", "cuda"))  # one fused kernel per step
    warmup = int(round(cfg.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    ca = RunningMean()
    storage = STORAGE[cfg.storage_dtype]
    autocast = AUTOCAST.get(precision)  # mixed precision on CUDA, and on CPUs with bf16 units
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None  # fp16 gradients underflow without it
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    meta = {"ofa_head_fingerprint": prep.head_fingerprint, "ofa_run_id": cfg.run_id}

    state: dict[str, Any] = {"step": 0, "snapshot": 0, "best_src": None, "best_trg": None, "best_lang": {},
                             "topk": [], "rows": [], "log": []}
    final = read_final(out)  # training finished before: only the scoring is left (module docstring)
    if final is not None:
        state = final["state"]
        manifest.update(final["manifest"])
        print(f"run {cfg.run_id}: training finished before; scoring its stored variants")
    else:
        resumed = load_resume(out / "resume", model, optimizer, scheduler, ca, scaler)
        if resumed is not None:
            state = resumed
            print(f"resuming run {cfg.run_id} at step {state['step']} (snapshot {state['snapshot']})")
        if resumed is not None and state.get("precision", precision) != precision:  # auto on other hardware
            print(f"note: steps 1..{state['step']} ran in {state['precision']}, the rest runs in {precision}")
            manifest.setdefault("precision_history", []).append({"until_step": state["step"], "precision": state["precision"]})
        threads = torch.get_num_threads()
        if resumed is not None and device.type == "cpu" and state.get("threads", threads) != threads:
            # CPU kernels split their sums by thread: the same steps round differently (a requeued SLURM task on
            # another cpus_per_task), so the run is no longer bit for bit the uninterrupted one
            print(f"note: steps 1..{state['step']} ran on {state['threads']} CPU thread(s), the rest runs on {threads}: "
                  "results are exact only at an equal thread count")
            manifest.setdefault("threads_history", []).append({"until_step": state["step"], "threads": state["threads"]})
    state["precision"] = precision
    state["threads"] = torch.get_num_threads()

    stored_from: dict[str, int] = {}  # variant file → the snapshot whose weights this process stored in it

    def save_variant(name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype, snapshot: int | None = None) -> None:
        """Store a variant; one that is the same snapshot as a file already stored (LAST = SRC-DEV = TRG-DEV =
        topk_0 is common) becomes a hard link to it (a copy where links are impossible): its bytes once."""
        hashes = state.setdefault("sha256", {})
        path = ckpt_dir / f"{name}.safetensors"
        # only files this process wrote from that snapshot: a resumed state may predate the files on disk
        same = next((other for other, k in stored_from.items() if snapshot is not None and k == snapshot and other != name
                     and (ckpt_dir / f"{other}.safetensors").is_file() and f"checkpoints/{other}.safetensors" in hashes), None)
        if same is not None:
            io.link(ckpt_dir / f"{same}.safetensors", path)
            hashes[f"checkpoints/{name}.safetensors"] = hashes[f"checkpoints/{same}.safetensors"]
        else:
            # a snapshot's files carry its number, not a variant name, so that its variants can share the bytes
            tag = {"ofa_snapshot": str(snapshot)} if snapshot is not None else {"ofa_variant": name}
            ckpt_io.save_checkpoint(tensors, path, dtype=dtype, metadata=dict(meta, **tag))
            # the file's content hash, recorded as it is written: readers verify it (ofa_lib.merge.pool.find_runs)
            hashes[f"checkpoints/{name}.safetensors"] = io.file_sha256(path)
        if snapshot is None:
            stored_from.pop(name, None)
        else:
            stored_from[name] = snapshot

    def evaluate_all(sets: list[evaluation.EvalSet], what: str) -> dict[tuple[str, str, str], dict[str, float]]:
        sets = list({s.key: s for s in sets}.values())  # QA: a target's dev split is its test split: score it once
        return {s.key: evaluation.score(model, s, cfg.task, batch_size=cfg.eval_batch_size, device=device,
                                        autocast_dtype=autocast) for s in tqdm(sets, desc=what, leave=False, disable=not progress)}

    train_rows = prep.train.select_columns(
        [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")
         if c in prep.train.column_names]).to_list()
    measure_data = measures_lib.MeasureData.from_prepared(  # the same batches (seed 0) for every snapshot and run
        prep, cfg.model_name, n_examples=cfg.measure_examples) if cfg.measures else None

    def record_measures(kind: str, name: str, at_step: int) -> None:
        """Generalization measures of the current weights (fp32; the model comes back exactly as it was)."""
        state.setdefault("measures", []).extend(measures_lib.rows(
            measures_lib.compute(model, cfg.measures, measure_data, device=device), run_id=cfg.run_id,
            kind=kind, name=name, step=at_step, epoch=at_step / steps_per_epoch))

    unfreezer = unfreezing.Unfreezer.create(cfg, model, train_rows, prep.tokenizer.pad_token_id, device, autocast)
    if unfreezer and final is None:  # freeze the scheduled blocks (all in the optimizer already); re-apply events
        unfreezer.start(state)
    model.train()
    t_train = time.perf_counter()
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {cfg.run_id}", disable=not progress)
    step = start_step = state["step"]
    step_seconds = 0.0
    last_resume: float | None = None
    pending: list[tuple] = []  # (step, epoch, loss, grad norm, lr, step seconds): loss and norm still on the device

    def flush_log() -> None:
        """Copy the pending losses and norms to the host in one transfer (one sync per log_every steps)."""
        if pending:
            values = torch.stack([torch.stack([lo.detach().float().reshape(()), gn.detach().float().reshape(())])
                                  for _, _, lo, gn, _, _ in pending]).tolist()
            state["log"] += [{"step": s_, "epoch": e_, "loss": lo, "grad_norm": gn, "lr": lr_, "step_seconds": ss}
                             for (s_, e_, _, _, lr_, ss), (lo, gn) in zip(pending, values)]
            pending.clear()

    micro = cfg.batch_size // cfg.grad_accum_steps
    train_lengths = [len(r["input_ids"]) for r in train_rows]
    pad_id = prep.tokenizer.pad_token_id

    def make_batch(idx: list[int]):
        """Collated (micro-)batches on the device; on CUDA from pinned memory with non-blocking copies."""
        rows = [train_rows[i] for i in idx]
        out = []
        for j in range(0, len(rows), micro):
            t = features.collate(rows[j:j + micro], pad_id)
            out.append({k: (v.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else v.to(device))
                        for k, v in t.items()})
        return out[0] if cfg.grad_accum_steps == 1 else out

    # on CUDA the next batch is collated and copied by a thread while this step runs; on a CPU that would only
    # compete with the step for the same cores
    prefetch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batches") if device.type == "cuda" else None
    while step < total_steps:
        epoch = step // steps_per_epoch
        if cfg.group_by_length:  # similar lengths per batch: on a CPU the padding is compute spent for nothing
            slices = features.length_grouped_batches(train_lengths, cfg.batch_size, seed=cfg.seed * 1000 + epoch)
        else:
            order = torch.randperm(len(prep.train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
            slices = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(steps_per_epoch)]
        first = step - epoch * steps_per_epoch
        ahead = prefetch.submit(make_batch, slices[first]) if prefetch else None
        for b in range(first, steps_per_epoch):
            if unfreezer:  # tr(F) when due, then the unfreezing events of this step (not timed as a step)
                unfreezer.before_step(step, state, step / steps_per_epoch)
            t_step = time.perf_counter()
            if ahead is not None:
                batch = ahead.result()
                ahead = prefetch.submit(make_batch, slices[b + 1]) if b + 1 < steps_per_epoch else None
            else:
                batch = make_batch(slices[b])
            loss, grad_norm = optim.train_step(  # adamw: forward, backward, clip, step; or SAM / Fisher penalty
                model, batch, optimizer, method=cfg.optimizer, max_grad_norm=cfg.max_grad_norm, autocast_dtype=autocast,
                sam_rho=cfg.sam_rho, fisher_penalty_weight=cfg.fisher_penalty_weight, seed=cfg.seed, step=step,
                scaler=scaler)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append((step, step / steps_per_epoch, loss.detach(), grad_norm.detach() if torch.is_tensor(grad_norm)
                            else torch.tensor(float(grad_norm)), scheduler.get_last_lr()[0], 0.0))
            if len(pending) >= cfg.log_every or step in snaps or step >= total_steps or \
                    (stop is not None and stop.signal is not None):
                flush_log()
            step_seconds += time.perf_counter() - t_step
            if pending:
                pending[-1] = pending[-1][:5] + (step_seconds,)
            else:
                state["log"][-1]["step_seconds"] = step_seconds
            beat(step=step, what="training", total=total_steps)
            bar.update(1)
            if step in snaps:
                _take_snapshot(cfg, model, state, step, step / steps_per_epoch, snaps, ca, evaluate_all, prep, save_variant, storage,
                               ckpt_dir)
                if cfg.measures:
                    record_measures("snapshot", str(snaps.index(step) + 1), step)
                model.train()
            # the resume state (~9 GB for XLM-R large) at the first snapshot, then every resume_every_minutes of
            # training (at whatever step), not at every snapshot; SIGUSR1/SIGTERM write it too (below)
            if cfg.save_resume_state and step < total_steps and (
                    (last_resume is None and step in snaps) or
                    (last_resume is not None and time.monotonic() - last_resume >= 60 * cfg.resume_every_minutes)):
                flush_log()
                state["step"] = step
                save_resume(out / "resume", model, optimizer, scheduler, state, ca, scaler)
                last_resume = time.monotonic()
                manifest["resume_writes"] = manifest.get("resume_writes", 0) + 1
            if stop is not None and stop.signal is not None and step < total_steps:  # SIGUSR1/SIGTERM: state, then exit
                bar.close()
                if cfg.save_resume_state:
                    state["step"] = step
                    save_resume(out / "resume", model, optimizer, scheduler, state, ca, scaler)
                    manifest["resume_writes"] = manifest.get("resume_writes", 0) + 1
                raise RunInterrupted(f"stopped after step {step} of {total_steps} by {stop.name}"
                                     + ("; resume state written" if cfg.save_resume_state else ""))
            if stop_after_step is not None and step >= stop_after_step:
                bar.close()
                raise KeyboardInterrupt(f"stopped after step {step} (stop_after_step)")
            if step >= total_steps:
                break
    bar.close()
    if prefetch:
        prefetch.shutdown()
    if final is None:
        before = set(manifest)
        if unfreezer:  # final tr(F), fisher.parquet, the schedule applied → manifest
            unfreezer.finish(step, state, step / steps_per_epoch, out, cfg.run_id, manifest)
        # LAST and CA (and the head); then the commit point: final.json says training is complete
        state_now = model.state_dict()
        # LAST is the last snapshot's weights when that snapshot ends the training (a file of it may exist)
        save_variant("last", state_now, storage, snapshot=len(snaps) if snaps[-1] == step else None)
        save_variant("ca", ca.mean, torch.float32)
        if frozen_head is not None:
            assert all(torch.equal(state_now[k], v) for k, v in frozen_head.items()), "frozen head changed"
        if cfg.head == "train":
            ckpt_io.save_checkpoint({k: state_now[k] for k in prep.head_keys}, out / "head.safetensors",
                                      metadata=dict(meta, ofa_variant="head"))
            state.setdefault("sha256", {})["head.safetensors"] = io.file_sha256(out / "head.safetensors")
        state["step"] = step
        final = {"state": state, "manifest": {k: v for k, v in manifest.items() if k not in before},
                 "train_s": time.perf_counter() - t_train, "train_step_s": step_seconds, "trained_steps": step - start_step}
        write_json(out / "resume" / "final.json", final)
    train_seconds, step_seconds = final["train_s"], final["train_step_s"]

    # score every kept variant from its stored checkpoint
    for rank, (_, snap) in enumerate(state["topk"]):  # snap_<k> → topk_<rank>, rank 0 = best; done once
        src, dst = ckpt_dir / f"snap_{snap}.safetensors", ckpt_dir / f"topk_{rank}.safetensors"
        if src.is_file():
            io.replace(src, dst)
        elif not dst.is_file():
            raise FileNotFoundError(f"run {cfg.run_id}: the top-{rank + 1} snapshot {snap} is neither at {src} nor at {dst}")
    variants = list(VARIANTS) + [f"topk_{i}" for i in range(len(state["topk"]))]
    t_eval = time.perf_counter()
    rows = list(state["rows"])
    # the snapshot behind each variant (CA has none): its dev scores were measured when it was taken
    source_snapshot = {"last": cfg.num_snapshots, "src_dev": state["best_src"][1], "trg_dev": state["best_trg"][1]}
    source_snapshot.update({f"topk_{i}": snap for i, (_, snap) in enumerate(state["topk"])})
    snapshot_rows = pd.DataFrame(state["rows"])
    test_by_snapshot: dict[int, dict] = {}  # variants stored from the same snapshot hold identical weights
    beat(what="scoring the variants")
    for name in tqdm(variants, desc="score variants", disable=not progress):
        if name in source_snapshot:
            snap = source_snapshot[name]
            dev = snapshot_rows[snapshot_rows.name == str(snap)].assign(kind="variant", name=name)
            rows += dev.to_dict("records")
            if name.startswith("topk_") and snap not in test_by_snapshot:
                continue  # soup ingredients: their dev scores rank them; their test scores are not needed
            if snap not in test_by_snapshot:
                model.load_state_dict(ckpt_io.load_checkpoint(ckpt_dir / f"{name}.safetensors", dtype=torch.float32))
                test_by_snapshot[snap] = evaluate_all(prep.test_sets, name)
            scores = test_by_snapshot[snap]
        else:
            model.load_state_dict(ckpt_io.load_checkpoint(ckpt_dir / f"{name}.safetensors", dtype=torch.float32))
            scores = evaluate_all(prep.dev_sets + prep.test_sets, name)
            if cfg.measures:  # CA is no snapshot: measure its weights here
                record_measures("variant", name, step)
        rows += tidy_rows(cfg, "variant", name, scores, step, step / steps_per_epoch)
    if cfg.measures:
        write_parquet(out / "measures.parquet", measures_lib.with_variant_rows(state["measures"], source_snapshot))
    write_parquet(out / "metrics.parquet", pd.DataFrame(rows))
    write_parquet(out / "train_log.parquet", pd.DataFrame(state["log"]))
    manifest.update(
        status="done", ended=time.time(), variants=variants, total_steps=total_steps, snapshot_steps=snaps,
        src_dev_snapshot=state["best_src"][1] if state["best_src"] else None,
        trg_dev_snapshot=state["best_trg"][1] if state["best_trg"] else None,
        trg_dev_per_language={k: v[1] for k, v in state["best_lang"].items()},
        topk_snapshots=[s for _, s in state["topk"]],
        checkpoint_sha256=checkpoint_hashes(state, variants, cfg.head == "train"),
        timings=dict(prep.timings, train_s=train_seconds, final_eval_s=time.perf_counter() - t_eval,
                     train_step_s=step_seconds,
                     train_examples_per_s=final["trained_steps"] * cfg.batch_size / max(step_seconds, 1e-9)),
    )
    write_json(out / "manifest.json", manifest)
    io.remove_tree(out / "resume")  # after `done`: a kill before this leaves litter that the next run removes
    return out


def _take_snapshot(cfg, model, state, step, epoch, snaps, ca, evaluate_all, prep, save_variant, storage, ckpt_dir) -> None:
    """Score the current weights on all dev sets and update the online variants."""
    k = snaps.index(step) + 1
    beat(what=f"scoring snapshot {k}/{len(snaps)}")
    scores = evaluate_all(prep.dev_sets, f"snapshot {k}")
    state["rows"] += tidy_rows(cfg, "snapshot", str(k), scores, step, epoch)
    src, trg, per_lang = dev_summary(cfg, scores)
    weights = model.state_dict()
    ca.update(weights)
    if state["best_src"] is None or src > state["best_src"][0]:  # strict: ties keep the earlier snapshot
        state["best_src"] = [src, k]
        save_variant("src_dev", weights, storage, snapshot=k)
    if state["best_trg"] is None or trg > state["best_trg"][0]:
        state["best_trg"] = [trg, k]
        save_variant("trg_dev", weights, storage, snapshot=k)
    for lang, value in per_lang.items():
        if lang not in state["best_lang"] or value > state["best_lang"][lang][0]:
            state["best_lang"][lang] = [value, k]
    if cfg.top_k:  # keep the k best snapshots by English dev as snap_<k> files; ranked at the end
        ranked = sorted(state["topk"] + [[src, k]], key=lambda t: (-t[0], t[1]))[: cfg.top_k]
        kept = {s for _, s in ranked}
        if k in kept:
            save_variant(f"snap_{k}", weights, storage, snapshot=k)
        for _, s in state["topk"]:
            if s not in kept:
                io.remove(ckpt_dir / f"snap_{s}.safetensors")
        state["topk"] = ranked
