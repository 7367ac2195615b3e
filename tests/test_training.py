"""One fine-tuning run: parameters, online variants, head alignment, resume, reproducibility."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ofa_lib import io
from ofa_lib.merge import averaging, pool
from ofa_lib.models import ckpt_io
from ofa_lib.train import config, hardware, optim, setup, stopping, training
from ofa_lib.train.config import ConfigError


def smoke(**params) -> config.TrainConfig:
    base = dict(storage_dtype="fp32", top_k=3, target_langs={"xnli": ["de", "sw"]})
    base.update(params)
    return config.make_config("nli", "smoke", **base)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = smoke()
    return cfg, training.run_training(cfg, root, progress=False), root


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("params, name", [
    (dict(lr=-1e-5), "lr"),
    (dict(batch_size=0), "batch_size"),
    (dict(target_langs={"xnli": ["xx"]}), "target_langs['xnli']"),
    (dict(head="/no/such/head.safetensors"), "head"),
    (dict(precision="fp8"), "precision"),
    (dict(target_datasets=["wikiann"]), "target_datasets[0]"),
    (dict(num_snapshots=99), "num_snapshots"),
    # refused, not guessed (issue 13): strict types, booleans true/false only
    (dict(top_k="two"), "top_k"),
    (dict(freeze_embeddings="no"), "freeze_embeddings"),
    (dict(trim_vocab="False"), "trim_vocab"),
    (dict(group_by_length="yes"), "group_by_length"),
    (dict(source_dev_subsample=0), "source_dev_subsample"),
    (dict(lr="1e-4"), "lr"),
    (dict(epochs=1.5), "epochs"),
    (dict(target_langs={"xnli": []}), "target_langs"),
    (dict(train_subsample=0), "train_subsample"),
    (dict(model_name="/no/such/model"), "model_name"),
    (dict(model_name="./models/e5"), "model_name"),
    (dict(max_length=4), "max_length"),
])
def test_invalid_parameters_are_named(params, name):
    with pytest.raises(ConfigError, match=rf"parameter {re.escape(name)}=") as info:
        config.make_config("nli", "smoke", **params)
    assert "expected" in str(info.value)


def test_qa_parameters_that_cannot_work_are_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"parameter max_length=4 .*at least"):
        config.make_config("qa", "smoke", max_length=4)
    cfg = config.make_config("qa", "smoke", num_snapshots=1000, top_k=0)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"parameter num_snapshots=1000 .*training steps"):
        training.run_training(cfg, tmp_path, progress=False)  # after featurizing (windows), before the first step
    assert not (tmp_path / cfg.run_id / "train_log.parquet").exists()
    print(f"num_snapshots=1000 (QA) refused after {time.perf_counter() - start:.1f} s")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_loading(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"parameter device='cuda' .*a GPU this machine has"):
        training.run_training(smoke(), tmp_path, progress=False, device="cuda")
    assert time.perf_counter() - start < 5 and not any(tmp_path.iterdir())


def test_unknown_task_preset_and_parameter():
    with pytest.raises(ConfigError, match="task='pos'"):
        config.make_config("pos")
    with pytest.raises(ConfigError, match="preset='gpu'"):
        config.make_config("nli", "gpu")
    with pytest.raises(ConfigError, match="unknown parameter.*learning_rate"):
        config.make_config("nli", "smoke", learning_rate=1e-5)


def test_run_id_is_a_stable_hash_of_the_parameters():
    a, b = config.make_config("nli", "cpu", lr=1e-5), config.make_config("nli", "cpu", lr=1e-5)
    assert a.run_id == b.run_id and a.run_id.startswith("nli-")
    assert config.make_config("nli", "cpu", lr=2e-5).run_id != a.run_id
    assert config.make_config("nli", "paper").model_name == "xlm-roberta-large"
    assert config.make_config("qa", "paper").max_length == 384


def test_a_head_file_is_identified_by_its_bytes_or_its_run(tmp_path):
    a, b = tmp_path / "a" / "h.safetensors", tmp_path / "b" / "h.safetensors"
    for path, value in ((a, 1.0), (b, 1.0)):
        path.parent.mkdir()
        save_file({"w": torch.full((2,), value)}, str(path))
    ids = {config.make_config("sib", "smoke", head=str(p)).run_id for p in (a, b)}
    assert len(ids) == 1  # same bytes, different places
    save_file({"w": torch.full((2,), 2.0)}, str(b))
    assert config.make_config("sib", "smoke", head=str(b)).run_id not in ids
    assert config.head_identity(tmp_path / "sib-0123456789ab" / "head.safetensors", "sib") == "run:sib-0123456789ab"


def test_snapshot_schedule_and_decay_groups():
    assert training.snapshot_steps(100, 10) == list(range(10, 101, 10))
    assert training.snapshot_steps(7, 3) == [2, 5, 7]
    model = torch.nn.ModuleDict({"dense": torch.nn.Linear(2, 2), "LayerNorm": torch.nn.LayerNorm(2)})
    decay, no_decay = optim.decay_groups(model, 0.01)
    assert [p.shape for p in decay["params"]] == [torch.Size([2, 2])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- online variants
def load(path: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load_checkpoint(path, dtype=torch.float32)


def test_output_contract(finished):
    cfg, out, _ = finished
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["run_id"] == cfg.run_id == out.name
    assert manifest["params"]["lr"] == cfg.lr and manifest["environment"]["torch"].startswith("2.13")
    assert len(manifest["head_fingerprint"]) == 64
    # where every data set came from: here the mirror, with each file's hash
    src = manifest["data"]["mnli15k/en/train"]
    assert src["source"] == "mirror" and len(src["files"][0]["sha256"]) == 64
    assert set(manifest["data"]) == {"mnli15k/en/train", "xnli/en/validation", "xnli/de/validation",
                                     "xnli/sw/validation", "xnli/de/test", "xnli/sw/test"}
    assert manifest["data_summary"].startswith("mirror ") and "(6 files)" in manifest["data_summary"]
    for name in ("last", "src_dev", "ca", "trg_dev", "topk_0", "topk_1", "topk_2"):
        meta = ckpt_io.read_metadata(out / "checkpoints" / f"{name}.safetensors")
        assert meta["ofa_head_fingerprint"] == manifest["head_fingerprint"]
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert set(metrics.kind) == {"snapshot", "variant"}
    assert {"run_id", "dataset", "split", "lang", "metric", "value", "step", "epoch"} <= set(metrics.columns)
    tests = metrics[(metrics.kind == "variant") & (metrics.split == "test")]
    assert set(tests.lang) == {"de", "sw"} and set(tests.name) >= {"last", "src_dev", "ca", "trg_dev"}
    assert not (out / "resume").exists()
    log = pd.read_parquet(out / "train_log.parquet")
    assert len(log) == manifest["total_steps"] and log.loss.notna().all()


def test_ca_is_the_mean_of_the_snapshots(finished):
    _, out, _ = finished
    snapshots = [load(out / "checkpoints" / f"topk_{i}.safetensors") for i in range(3)]  # top_k = all 3
    ca = load(out / "checkpoints" / "ca.safetensors")
    for key, value in ca.items():
        torch.testing.assert_close(value, sum(s[key] for s in snapshots) / 3, rtol=1e-5, atol=1e-6)


def test_src_dev_and_trg_dev_are_the_argmax_snapshots(finished):
    cfg, out, _ = finished
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = pd.read_parquet(out / "metrics.parquet")
    snaps = metrics[(metrics.kind == "snapshot") & (metrics.metric == "accuracy")].copy()
    snaps["snapshot"] = snaps.name.astype(int)
    src = snaps[snaps.lang == "en"].sort_values("snapshot")
    trg = snaps[snaps.lang != "en"].groupby("snapshot").value.mean()
    assert manifest["src_dev_snapshot"] == int(src.snapshot.iloc[src.value.values.argmax()])  # first max
    assert manifest["trg_dev_snapshot"] == int(trg.index[trg.values.argmax()])
    rank = manifest["topk_snapshots"]
    for variant, snapshot in (("src_dev", manifest["src_dev_snapshot"]), ("trg_dev", manifest["trg_dev_snapshot"])):
        stored = load(out / "checkpoints" / f"{variant}.safetensors")
        same = load(out / "checkpoints" / f"topk_{rank.index(snapshot)}.safetensors")
        assert all(torch.equal(stored[k], same[k]) for k in stored)
    last = load(out / "checkpoints" / "last.safetensors")
    final = load(out / "checkpoints" / f"topk_{rank.index(3)}.safetensors")
    assert all(torch.equal(last[k], final[k]) for k in last)


def test_finished_run_is_not_repeated(finished, capsys):
    cfg, out, root = finished
    before = (out / "metrics.parquet").stat().st_mtime_ns
    assert training.run_training(cfg, root, progress=False) == out
    assert "already done" in capsys.readouterr().out
    assert (out / "metrics.parquet").stat().st_mtime_ns == before


def test_litter_of_a_killed_run_is_cleaned_on_its_next_run(finished):
    """Temp files of interrupted atomic writes (a kill mid-write) and a done run's resume/ (a kill between
    `done` and its removal) go when the run is next run."""
    cfg, out, root = finished
    litter = [out / "checkpoints" / ".snap_2.safetensors.k3j1x0.tmp", out / ".manifest.json.a8sd7f.tmp",
              out / "resume" / "state.json"]
    for path in litter:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    keep = out / "checkpoints" / "notes.tmp"  # not a temp name of ofa_lib.io: left alone
    keep.write_text("mine")
    training.run_training(cfg, root, progress=False)
    assert not any(p.exists() for p in litter) and not (out / "resume").exists() and keep.exists()
    keep.unlink()
    assert training.is_done(cfg, root)


def values(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "metrics.parquet")
    return df.sort_values(["kind", "name", "dataset", "lang", "split", "metric"]).reset_index(drop=True)[
        ["kind", "name", "dataset", "lang", "split", "metric", "value", "step"]]


def test_interrupted_run_resumes_to_identical_metrics(finished, tmp_path):
    cfg, out, _ = finished
    with pytest.raises(KeyboardInterrupt):
        training.run_training(cfg, tmp_path, progress=False, stop_after_step=4)
    partial = tmp_path / cfg.run_id
    assert json.loads((partial / "manifest.json").read_text())["status"] == "failed"
    assert (partial / "resume" / "state.safetensors").is_file() and not (partial / "resume" / "state.json").exists()
    assert not training.is_done(cfg, tmp_path)
    training.run_training(cfg, tmp_path, progress=False)
    pd.testing.assert_frame_equal(values(partial), values(out))  # resumed == uninterrupted, bit for bit


def test_the_english_dev_set_can_have_its_own_subsample():
    """SRC-DEV selects on English dev: a grid can score it on more sentences than each of many target dev sets."""
    prep = setup.prepare(smoke(source_dev_subsample=12, dev_subsample=4))
    assert [len(s) for s in prep.dev_sets] == [12, 4, 4] and prep.dev_sets[0].lang == "en"


def test_length_grouped_batches_train_and_keep_old_run_ids(finished, tmp_path):
    """The batches are a pure function of (seed, epoch) (tests/test_features.py), so a resumed run replays them
    as it does random ones (test_interrupted_run_resumes_to_identical_metrics); here: a run trains on them."""
    cfg, out, _ = finished
    grouped = smoke(group_by_length=True)
    assert smoke(group_by_length=False).run_id == cfg.run_id != grouped.run_id
    path = training.run_training(grouped, tmp_path, progress=False)
    assert json.loads((path / "manifest.json").read_text())["params"]["group_by_length"] is True
    assert not values(path)["value"].equals(values(out)["value"])  # other batches, other weights


# ----------------------------------------------------------------------------- heads
@pytest.mark.parametrize("sig, at_step", [(signal.SIGUSR1, 3), (signal.SIGTERM, 5)])
def test_a_signal_writes_one_resume_file_between_snapshots_and_the_rerun_resumes_exactly(finished, tmp_path, monkeypatch,
                                                                                          sig, at_step):
    """SLURM's notice (SIGUSR1) or a preemption / ``scontrol requeue`` (SIGTERM) during a step between snapshots
    (the run has 6 steps, snapshots after 2, 4, 6): the run stops after that step with its resume state in one
    file, marked interrupted, not failed; the re-run resumes there and ends bit for bit as the uninterrupted
    run: every metric and every tensor of every checkpoint (file bytes are not compared: safetensors writes its
    metadata in a per-process order). Both runs use this process's thread count (exact only at equal counts)."""

    cfg, out, _ = finished
    real, calls = optim.train_step, []

    def signalling(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(optim, "train_step", signalling)
    name = signal.Signals(sig).name
    with pytest.raises(stopping.RunInterrupted, match=f"after step {at_step} of 6 by {name}; resume state written"):
        training.run_training(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    partial = tmp_path / cfg.run_id
    manifest = json.loads((partial / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["resume_writes"] == 2  # snapshot 1, then the signal
    assert sorted(p.name for p in (partial / "resume").iterdir()) == ["state.safetensors"]
    meta = json.loads(ckpt_io.read_metadata(partial / "resume" / "state.safetensors")["ofa_resume"])
    assert meta["state"]["step"] == at_step and meta["state"]["threads"] == torch.get_num_threads()
    training.run_training(cfg, tmp_path, progress=False)
    pd.testing.assert_frame_equal(values(partial), values(out))
    done = json.loads((partial / "manifest.json").read_text())
    assert done["variants"] == json.loads((out / "manifest.json").read_text())["variants"]
    for variant in done["variants"]:
        a = ckpt_io.load_checkpoint(partial / "checkpoints" / f"{variant}.safetensors")
        b = ckpt_io.load_checkpoint(out / "checkpoints" / f"{variant}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), variant
    assert pd.read_parquet(partial / "train_log.parquet")[["step", "loss", "grad_norm", "lr"]].equals(
        pd.read_parquet(out / "train_log.parquet")[["step", "loss", "grad_norm", "lr"]])


def test_head_training_then_frozen_aligned_heads(tmp_path):
    head_run = training.run_training(smoke(head="train", top_k=0), tmp_path, progress=False)
    head_file = head_run / "head.safetensors"
    head = load(head_file)
    assert set(head) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    fingerprints = []
    for lr in (1e-5, 3e-5):
        out = training.run_training(smoke(head=str(head_file), top_k=0, lr=lr), tmp_path, progress=False)
        last = load(out / "checkpoints" / "last.safetensors")
        assert all(torch.equal(last[k], head[k]) for k in head)  # frozen head: bit-identical
        fingerprints.append(json.loads((out / "manifest.json").read_text())["head_fingerprint"])
    assert fingerprints[0] == fingerprints[1]
    other = training.run_training(smoke(head="init:7", top_k=0), tmp_path, progress=False)
    assert json.loads((other / "manifest.json").read_text())["head_fingerprint"] != fingerprints[0]
    with pytest.raises(ckpt_io.CheckpointMismatchError):
        averaging.average_checkpoints([out / "checkpoints" / "last.safetensors", other / "checkpoints" / "last.safetensors"])


def test_head_file_that_does_not_fit_is_refused(tmp_path):
    bad = tmp_path / "head.safetensors"
    ckpt_io.save_checkpoint({"classifier.weight": torch.zeros(5, 384)}, bad)
    with pytest.raises(ValueError, match="head=.*does not fit"):
        training.run_training(smoke(head=str(bad), top_k=0), tmp_path / "runs", progress=False)


@pytest.mark.reliability
# ----------------------------------------------------------------------------- killed runs
def test_sigkill_leaves_no_corrupt_checkpoint(tmp_path):
    """Kill a training process at random points; every checkpoint left must load whole."""
    code = (
        "from ofa_lib.train import config, training\n"
        f"cfg = config.make_config('nli', 'smoke', storage_dtype='fp32', top_k=3, epochs=3, target_langs={{'xnli': ['de']}})\n"
        f"training.run_training(cfg, {str(tmp_path)!r}, progress=False)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for delay in (9.0, 14.0):
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for file in tmp_path.rglob("*.safetensors"):
            with safe_open(file, framework="pt") as fh:
                for key in fh.keys():
                    fh.get_tensor(key)
        assert not list(tmp_path.rglob("*.tmp")) or all(p.name.startswith(".") for p in tmp_path.rglob("*.tmp"))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((run / "manifest.json").read_text())["status"] == "done"


def _final_phase_start(cfg: config.TrainConfig, root: Path) -> Path:
    """A run stopped right after its last-but-one snapshot (its resume state saved): the final phase is next."""
    with pytest.raises(KeyboardInterrupt):
        training.run_training(cfg, root, progress=False,
                              stop_after_step=training.snapshot_steps(6, cfg.num_snapshots)[-2])
    return root / cfg.run_id


def _train_in_subprocess(cfg: config.TrainConfig, root: Path, **env: str) -> subprocess.CompletedProcess:
    code = ("import sys; from ofa_lib.train import config, training\n"
            f"cfg = config.TrainConfig(**{cfg.canonical()!r})\n"
            f"assert cfg.run_id == {cfg.run_id!r}\n"
            f"training.run_training(cfg, {str(root)!r}, progress=False)\n")
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True)


@pytest.mark.reliability
@pytest.mark.slow
@pytest.mark.timeout(3600)  # 12 kill points × (a killed run + its re-run), each a model load and the final scoring
def test_kill_at_every_write_of_the_final_phase_resumes_to_identical_metrics(finished, tmp_path, monkeypatch):
    """Kill-point sweep: SIGKILL a run after each file-system event (write, rename, removal) of its last
    snapshot and finish (ofa_lib.io's OFA_IO_KILL_AT hook), re-run it: it must end `done`, with metrics
    identical to the uninterrupted run's and no litter. Trained once to just before the final phase; each
    kill point starts from a copy of that."""
    import shutil

    cfg, reference, _ = finished
    assert len(pd.read_parquet(reference / "train_log.parquet")) == 6  # the step count _final_phase_start assumes
    start = _final_phase_start(cfg, tmp_path / "start")
    trace = tmp_path / "trace.txt"
    shutil.copytree(start.parent, tmp_path / "traced")
    monkeypatch.setenv("OFA_IO_TRACE", str(trace))
    training.run_training(cfg, tmp_path / "traced", progress=False)
    monkeypatch.delenv("OFA_IO_TRACE")
    pd.testing.assert_frame_equal(values(tmp_path / "traced" / cfg.run_id), values(reference))
    events = trace.read_text().splitlines()
    first = next(i for i, e in enumerate(events) if not e.endswith("manifest.json"))  # the re-run's own start: not final
    kinds = [e.split(" ", 1)[0] for e in events]
    assert kinds.count("rename") == 3 and kinds[-1] == "remove" and events[-2].endswith("manifest.json"), events
    outcomes = {}
    for n in range(first + 1, len(events) + 1):
        root = tmp_path / f"kill{n}"
        shutil.copytree(start.parent, root)
        killed = _train_in_subprocess(cfg, root, OFA_IO_KILL_AT=str(n))
        assert killed.returncode == -signal.SIGKILL, (n, events[n - 1], killed.stderr[-2000:])
        training.run_training(cfg, root, progress=False)
        run = root / cfg.run_id
        assert json.loads((run / "manifest.json").read_text())["status"] == "done", events[n - 1]
        pd.testing.assert_frame_equal(values(run), values(reference))
        assert not (run / "resume").exists() and not list(run.rglob("*.tmp")), events[n - 1]
        outcomes[events[n - 1].replace(str(tmp_path / "traced"), "")] = "done, identical metrics"
        shutil.rmtree(root)
    assert len(outcomes) >= 10
    print(f"{len(outcomes)} kill points:", *[f"after {e}: {o}" for e, o in outcomes.items()], sep="\n  ")


# ----------------------------------------------------------------------------- corrupt checkpoints
def test_checkpoints_carry_their_hash_and_a_changed_one_is_refused_naming_run_and_file(finished, tmp_path):
    """Every kept checkpoint's sha256 is recorded as it is written; find_runs (the way every averaging,
    measure and report step finds runs) refuses a run whose file changed, even by a finite amount."""
    import shutil

    from ofa_lib.models import ckpt_io

    cfg, out, _ = finished
    recorded = json.loads((out / "manifest.json").read_text())["checkpoint_sha256"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(recorded) == {f"checkpoints/{v}.safetensors" for v in manifest["variants"]}
    for name, digest in recorded.items():
        assert io.file_sha256(out / name) == digest
    shutil.copytree(out, tmp_path / cfg.run_id)
    assert len(pool.find_runs(tmp_path, "nli")) == 1
    last = tmp_path / cfg.run_id / "checkpoints" / "last.safetensors"
    state = ckpt_io.load_checkpoint(last)
    key = next(k for k in state if k.endswith("classifier.weight"))
    state[key] = state[key] + 1e-3  # finite, plausible, silent
    save_file(state, str(last), metadata=ckpt_io.read_metadata(last))
    with pytest.raises(ckpt_io.CorruptCheckpointError, match=rf"run {cfg.run_id}: .*last.safetensors is not the file the run wrote"):
        pool.find_runs(tmp_path, "nli")


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_checkpoint_is_named(finished, tmp_path, damage):
    _, out, _ = finished
    data = (out / "checkpoints" / "ca.safetensors").read_bytes()
    bad = tmp_path / "ca.safetensors"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    from ofa_lib.models import ckpt_io

    for read in (ckpt_io.checkpoint_info, ckpt_io.load_checkpoint, ckpt_io.TensorReader):
        with pytest.raises(ckpt_io.CorruptCheckpointError, match=re.escape(str(bad))):
            read(bad)


# ----------------------------------------------------------------------------- precision and device from the hardware
def _fake_cuda(monkeypatch, cc, name="Tesla V100-SXM2-32GB"):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_auto_precision_follows_the_cuda_compute_capability(monkeypatch):
    cuda = torch.device("cuda")
    _fake_cuda(monkeypatch, (7, 0))
    assert hardware.resolve_precision("auto", cuda)[0] == "fp16"           # V100: fp16 with a GradScaler
    assert hardware.resolve_precision("auto", cuda, "sam")[0] == "fp32"    # the scaler does not cover SAM
    assert hardware.resolve_precision("fp16", cuda)[0] == "fp16"
    with pytest.raises(hardware.DeviceError, match=r"precision='bf16'.*V100.*compute capability 7\.0"):
        hardware.resolve_precision("bf16", cuda)
    with pytest.raises(hardware.DeviceError, match="GradScaler.*sam"):
        hardware.resolve_precision("fp16", cuda, "sam")
    _fake_cuda(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    assert hardware.resolve_precision("auto", cuda) == ("bf16", "auto: NVIDIA A100-SXM4-80GB (compute capability 8.0) has native bf16")
    assert hardware.resolve_precision("fp32", cuda)[0] == "fp32"


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_on_a_cpu_is_bf16_only_where_it_is_native(monkeypatch, native):
    support = dict(hardware.cpu_precision_support(), avx512_bf16=native, amx_tile=False, amx_fp16=False)
    monkeypatch.setattr(hardware, "cpu_precision_support", lambda: support)
    cpu = torch.device("cpu")
    assert hardware.resolve_precision("auto", cpu)[0] == ("bf16" if native else "fp32")
    if native:
        assert hardware.resolve_precision("bf16", cpu)[0] == "bf16"
    else:  # refused, not emulated
        with pytest.raises(hardware.DeviceError, match="precision='bf16'.*no native bf16"):
            hardware.resolve_precision("bf16", cpu)
    with pytest.raises(hardware.DeviceError, match="precision='fp16'.*no native fp16"):
        hardware.resolve_precision("fp16", cpu)


def test_this_cpus_auto_precision_is_what_it_reports():
    support = hardware.cpu_precision_support()
    picked, why = hardware.resolve_precision("auto", torch.device("cpu"))
    assert picked == ("bf16" if support["avx512_bf16"] or support["amx_tile"] else "fp32"), (support, why)


def test_explicit_precisions_keep_their_run_ids_and_auto_is_the_default():
    # ids computed by the code before precision 'auto' existed: explicit settings must not move
    assert config.make_config("nli", "smoke", precision="fp32").run_id == "nli-cd6cbe0b36ca"
    assert config.make_config("nli", "cpu", precision="bf16").run_id == "nli-bab4accd8de9"
    assert {config.make_config("nli", p).precision for p in config.PRESETS} == {"auto"}
    assert config.make_config("nli", "smoke").run_id != "nli-cd6cbe0b36ca"


def test_no_silent_cpu_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, preset in (("cuda", "smoke"), (None, "paper"), ("auto", "paper")):
        with pytest.raises(hardware.DeviceError, match=rf"needs CUDA.*node {re.escape(os.uname().nodename)}.*torch 2\.13"):
            hardware.resolve_device(device, preset)
    assert hardware.resolve_device(None, "smoke") == torch.device("cpu")
    assert hardware.resolve_device("cpu", "paper") == torch.device("cpu")  # on purpose
    with pytest.raises(hardware.DeviceError, match="device='tpu'"):
        hardware.resolve_device("tpu")


def test_cuda_arch_support_of_a_torch_build():
    built = ["sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    assert not hardware.cuda_arch_supported((7, 0), built)      # V100 on a wheel without sm_70
    assert hardware.cuda_arch_supported((8, 9), built)          # L4/4090: sm_86 binaries run on 8.9
    assert hardware.cuda_arch_supported((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75"])
    assert hardware.cuda_arch_supported((9, 0), ["sm_80", "compute_80"])  # PTX JIT


def test_a_run_records_the_precision_it_used(finished):
    _, out, _ = finished
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["precision"] == "auto"
    assert manifest["precision"] == hardware.resolve_precision("auto", torch.device("cpu"))[0]
    assert manifest["precision_reason"].startswith("auto: CPU")


def test_grad_accum_steps_keeps_the_effective_batch_and_new_knobs_keep_old_ids():
    base = config.make_config("nli", "smoke", precision="fp32")
    assert config.make_config("nli", "smoke", precision="fp32", log_every=7, resume_every_minutes=5).run_id == base.run_id
    assert config.make_config("nli", "smoke", precision="fp32", grad_accum_steps=2).run_id != base.run_id
    assert config.make_config("nli", "smoke", precision="fp32", source_dev_subsample=None).run_id == base.run_id
    own = config.make_config("nli", "smoke", precision="fp32", source_dev_subsample=40)
    assert own.run_id != base.run_id and [own.dev_subsample_of(i) for i in range(3)] == [40, own.dev_subsample, own.dev_subsample]
    with pytest.raises(ConfigError, match=r"parameter grad_accum_steps=3.*divisor of batch_size=8"):
        config.make_config("nli", "smoke", grad_accum_steps=3)
    with pytest.raises(ConfigError, match=r"parameter grad_accum_steps=2.*optimizer='sam'"):
        config.make_config("nli", "smoke", grad_accum_steps=2, optimizer="sam")
    with pytest.raises(ConfigError, match="parameter resume_every_minutes"):
        config.make_config("nli", "smoke", resume_every_minutes=0)


def test_the_cost_model_counts_the_bytes_a_run_keeps(finished):
    """ofa_lib.grid.cost's kept bytes for a run (variants in their storage dtype, CA in fp32, top-k) against the
    checkpoint files the run left."""
    from ofa_lib.grid import cost

    cfg, out, _ = finished
    manifest = json.loads((out / "manifest.json").read_text())
    kept, written, before = cost.run_bytes(cfg, manifest["vocab_size"], cfg.num_snapshots - 1, 1)
    actual = io.unique_bytes(list((out / "checkpoints").glob("*.safetensors")))  # a hard link counts once
    # top_k = num_snapshots = 3: every snapshot is kept, so the cost model's most is what the run keeps
    assert cost.stored_snapshots(cfg) == (3, 3) and abs(kept - actual) / actual < 0.05, (kept, actual)
    assert before > written > kept  # resume states add to what is written, not to what is kept


def test_variants_of_one_snapshot_are_one_file(finished):
    """LAST, SRC-DEV, TRG-DEV and the top-k that are the same snapshot share one file (hard links): the bytes
    are kept once, every name reads as a checkpoint and its manifest hash is its content's."""

    cfg, out, root = finished
    manifest = json.loads((out / "manifest.json").read_text())
    files = {f"checkpoints/{v}.safetensors": out / "checkpoints" / f"{v}.safetensors" for v in manifest["variants"]}
    snapshot = {"last": cfg.num_snapshots, "src_dev": manifest["src_dev_snapshot"], "trg_dev": manifest["trg_dev_snapshot"]}
    snapshot |= {f"topk_{i}": s for i, s in enumerate(manifest["topk_snapshots"])}
    inodes: dict[int, set[int]] = {}
    for name, s in snapshot.items():
        inodes.setdefault(s, set()).add((out / "checkpoints" / f"{name}.safetensors").stat().st_ino)
    assert all(len(v) == 1 for v in inodes.values()), inodes  # one file per snapshot
    assert snapshot["topk_0"] == snapshot["src_dev"]  # always shared: both rank by English dev
    kept = io.unique_bytes(list(files.values()))
    assert kept < sum(p.stat().st_size for p in files.values())
    for rel, path in files.items():
        assert manifest["checkpoint_sha256"][rel] == io.file_sha256(path), rel
    assert cfg.run_id in set(pool.find_runs(root, check=False).run_id)  # it verifies every hash first


def test_io_link_shares_a_file_and_copies_where_links_are_impossible(tmp_path, monkeypatch):
    """ofa_lib.io.link: a hard link replaced onto the target (one inode, counted once); where the file system
    refuses links (EXDEV across file systems, EPERM) an atomic copy, same bytes; no temp file either way."""
    import errno

    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    src.write_bytes(b"x" * 1000)
    dst.write_bytes(b"old")
    assert io.link(src, dst) and dst.stat().st_ino == src.stat().st_ino
    assert io.unique_bytes([src, dst]) == 1000
    assert io.link(src, dst)  # already the same file: stays so

    def refuse(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(io.os, "link", refuse)
    other = tmp_path / "c.safetensors"
    assert not io.link(src, other)
    assert other.read_bytes() == src.read_bytes() and other.stat().st_ino != src.stat().st_ino
    assert io.unique_bytes([src, dst, other]) == 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
