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
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ofa_lib import io, locks, models
from ofa_lib.data import features, loading
from ofa_lib.io import write_json, write_parquet
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
from ofa_lib.train.hardware import AUTOCAST, resolve_runtime
from ofa_lib.train.resume import clean_litter, load_resume, read_final, save_resume
from ofa_lib.train.runs import read_manifest
from ofa_lib.train.setup import prepare
from ofa_lib.train.stopping import RunInterrupted, StopRequest, stop_signals

VARIANTS = ("last", "src_dev", "ca", "trg_dev")
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- helpers
def runs_root(output_root: str | Path | None = None) -> Path:
    """Where runs live: ``output_root`` or ``outputs/runs``."""
    return Path(output_root) if output_root else outputs_dir() / "runs"


def run_dir(cfg: TrainConfig, output_root: str | Path | None = None) -> Path:
    return runs_root(output_root) / cfg.run_id


def is_done(cfg: TrainConfig, output_root: str | Path | None = None) -> bool:
    """True when the run finished and its outputs are all there."""
    path = run_dir(cfg, output_root)
    manifest = read_manifest(path, missing_ok=True)
    if not manifest or manifest.get("status") != "done":
        return False
    needed = ["metrics.parquet"] + [f"checkpoints/{v}.safetensors" for v in manifest.get("variants", VARIANTS)]
    return all((path / name).is_file() for name in needed)


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


def snapshot_steps(total_steps: int, num_snapshots: int) -> list[int]:
    """Steps after which snapshot k = 1..num_snapshots is taken (every 1/num_snapshots)."""
    if num_snapshots > total_steps:
        raise ValueError(f"num_snapshots={num_snapshots} exceeds the {total_steps} training steps")
    return [round(total_steps * k / num_snapshots) for k in range(1, num_snapshots + 1)]


def checkpoint_hashes(state: dict[str, Any], variants: list[str], with_head: bool) -> dict[str, str]:
    """sha256 of every checkpoint the finished run keeps, by path in the run folder (``topk_<r>`` is the
    ``snap_<k>`` file it was renamed from)."""
    written = state.get("sha256", {})
    snap_of = {f"topk_{r}": f"snap_{k}" for r, (_, k) in enumerate(state["topk"])}
    out = {f"checkpoints/{v}.safetensors": written.get(f"checkpoints/{snap_of.get(v, v)}.safetensors") for v in variants}
    if with_head:
        out["head.safetensors"] = written.get("head.safetensors")
    return {k: v for k, v in out.items() if v}  # a resume state from before hashes: those files go unrecorded


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
           stop_after_step: int | None, stop: StopRequest | None = None) -> Path:
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
    optimizer = torch.optim.AdamW(optim.decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
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
