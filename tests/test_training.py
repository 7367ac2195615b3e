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

from ofa_lib import averaging, config, training
from ofa_lib.config import ConfigError


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
])
def test_invalid_parameters_are_named(params, name):
    with pytest.raises(ConfigError, match=rf"parameter {re.escape(name)}="):
        config.make_config("nli", "smoke", **params)


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
    decay, no_decay = training.decay_groups(model, 0.01)
    assert [p.shape for p in decay["params"]] == [torch.Size([2, 2])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- online variants
def load(path: Path) -> dict[str, torch.Tensor]:
    return averaging.load_checkpoint(path, dtype=torch.float32)


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
        meta = averaging.read_metadata(out / "checkpoints" / f"{name}.safetensors")
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
    assert (partial / "resume" / "state.json").is_file()
    assert not training.is_done(cfg, tmp_path)
    training.run_training(cfg, tmp_path, progress=False)
    pd.testing.assert_frame_equal(values(partial), values(out))  # resumed == uninterrupted, bit for bit


# ----------------------------------------------------------------------------- heads
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
    with pytest.raises(averaging.CheckpointMismatchError):
        averaging.average_checkpoints([out / "checkpoints" / "last.safetensors", other / "checkpoints" / "last.safetensors"])


def test_head_file_that_does_not_fit_is_refused(tmp_path):
    bad = tmp_path / "head.safetensors"
    averaging.save_checkpoint({"classifier.weight": torch.zeros(5, 384)}, bad)
    with pytest.raises(ValueError, match="head=.*does not fit"):
        training.run_training(smoke(head=str(bad), top_k=0), tmp_path / "runs", progress=False)


# ----------------------------------------------------------------------------- killed runs
def test_sigkill_leaves_no_corrupt_checkpoint(tmp_path):
    """Kill a training process at random points; every checkpoint left must load whole."""
    code = (
        "from ofa_lib import config, training\n"
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
