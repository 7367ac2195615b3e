"""Scheduled unfreezing: blocks, adapters, the schedules (GU top-down every k, FUN's argmax), frozen
weights that stay put until their step, and a real smoke run that resumes bit-identically."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from ofa_lib.analysis import unfreezing_report
from ofa_lib.models import adapters, ckpt_io
from ofa_lib.train import config, optim, setup, training, unfreezing
from ofa_lib.train.config import ConfigError

TINY = dict(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=3)


def tiny_model(with_adapters: bool = False) -> BertForSequenceClassification:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY))
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # like the cpu/smoke presets
    if with_adapters:
        adapters.add_adapters(model, 4)
    return model


def rows(n=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 40, (int(torch.randint(4, 9, (1,), generator=gen)),), generator=gen).tolist(),
             "labels": int(torch.randint(0, 3, (1,), generator=gen))} for _ in range(n)]


def train_tiny(schedule: str, k: int, steps: int, with_adapters: bool = False, fisher_every: int = 0):
    """A minimal copy of the training loop: Unfreezer hook, forward/backward, fused AdamW with weight decay."""
    from ofa_lib.data.features import collate

    model = tiny_model(with_adapters)
    cfg = SimpleNamespace(unfreeze=schedule, unfreeze_every=k, fisher_every=fisher_every, fisher_batches=2,
                          fisher_labels="sample", seed=1, batch_size=4)
    data = rows()
    opt = torch.optim.AdamW(optim.decay_groups(model, 0.01), lr=1e-2, fused=True)
    unf = unfreezing.Unfreezer.create(cfg, model, data, 1, torch.device("cpu"), None)
    state: dict = {}
    unf.start(state)
    history = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    model.train()
    for step in range(steps):
        unf.before_step(step, state, step / 8)
        batch = collate(data[(step * 4) % 32:(step * 4) % 32 + 4], 1)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return model, unf, state, history


def changed(history, names, a, b) -> bool:
    return any(not torch.equal(history[a][n], history[b][n]) for n in names)


# ----------------------------------------------------------------------------- blocks and adapters
def test_blocks_bottom_to_top_and_adapters():
    model = tiny_model()
    assert list(unfreezing.model_blocks(model)) == ["embeddings", "layer.0", "layer.1", "layer.2"]
    assert "bert.embeddings.word_embeddings.weight" not in unfreezing.model_blocks(model)["embeddings"]  # frozen
    assert list(unfreezing.model_blocks(model, include_head=True))[-1] == "head"
    ada = tiny_model(with_adapters=True)
    assert list(unfreezing.model_blocks(ada, include_head=True)) == ["adapter.0", "adapter.1", "adapter.2", "head"]
    assert unfreezing.model_blocks(ada)["adapter.1"] == [f"bert.encoder.layer.1.output.adapter.{m}.{p}"
                                                         for m in ("down", "up") for p in ("weight", "bias")]
    assert ada.bert.encoder.layer[0].output.adapter.down.out_features == 16 // 4
    with pytest.raises(ValueError, match="already has adapters"):
        adapters.add_adapters(ada, 4)


def test_adapter_checkpoint_round_trip(tmp_path):
    model = tiny_model(with_adapters=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ckpt_io.save_checkpoint(model.state_dict(), tmp_path / "a.safetensors")
    fresh = tiny_model(with_adapters=True).eval()
    fresh.load_state_dict(ckpt_io.load_checkpoint(tmp_path / "a.safetensors"), strict=True)
    ids = torch.tensor([[2, 5, 7, 9]])
    assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    plain = tiny_model().eval()
    assert not torch.allclose(plain(input_ids=ids).logits, tiny_model(with_adapters=True).eval()(input_ids=ids).logits)


# ----------------------------------------------------------------------------- schedules
def test_schedule_orders():
    blocks = ["embeddings", "layer.0", "layer.1", "layer.2"]
    assert unfreezing.schedule_order("gu", blocks, 1) == ["layer.2", "layer.1", "layer.0", "embeddings"]
    assert unfreezing.schedule_order("gu_reverse", blocks, 1) == blocks
    rnd = unfreezing.schedule_order("random", blocks, 1)
    assert sorted(rnd) == sorted(blocks) and rnd == unfreezing.schedule_order("random", blocks, 1)
    assert {tuple(unfreezing.schedule_order("random", blocks, s)) for s in range(8)} != {tuple(rnd)}
    assert [unfreezing.n_unfrozen("lpft", 3, 4, s) for s in range(5)] == [0, 0, 0, 4, 4]
    assert [unfreezing.n_unfrozen("gu", 3, 4, s) for s in (0, 2, 3, 6, 9, 30)] == [1, 1, 2, 3, 4, 4]
    assert unfreezing.select_fun({"a": 1.0, "b": 3.0, "c": 3.0, "d": 9.0}, ["a", "b", "c"]) == "b"


def test_gu_unfreezes_top_down_every_k_and_frozen_weights_stay_put():
    k = 2
    model, unf, state, history = train_tiny("gu", k, steps=9)
    assert state["unfreeze_events"] == [{"step": 0, "block": "layer.2"}, {"step": 2, "block": "layer.1"},
                                        {"step": 4, "block": "layer.0"}, {"step": 6, "block": "embeddings"}]
    for event in state["unfreeze_events"]:
        names = unf.blocks[event["block"]]
        s = event["step"]
        assert not changed(history, names, 0, s), f"{event['block']} changed before step {s}"
        assert changed(history, names, s, s + 1), f"{event['block']} did not change after step {s}"
    head = unf.head
    assert changed(history, head, 0, 1)  # the head trains from the first step
    word = "bert.embeddings.word_embeddings.weight"
    assert not changed(history, [word], 0, 9)  # frozen by the preset: never unfrozen
    assert all(p.requires_grad for n, p in model.named_parameters() if n != word)


def test_lpft_and_adapters_schedule():
    _, unf, state, history = train_tiny("lpft", 3, steps=5, with_adapters=True)
    assert [e["step"] for e in state["unfreeze_events"]] == [3, 3, 3]
    assert [e["block"] for e in state["unfreeze_events"]] == ["adapter.2", "adapter.1", "adapter.0"]
    adapter_names = [n for b in unf.blocks.values() for n in b]
    assert not changed(history, adapter_names, 0, 3) and changed(history, adapter_names, 3, 4)
    base = [n for n in history[0] if n not in adapter_names and n not in unf.head]
    assert not changed(history, base, 0, 5)  # the base model never trains with adapters


def test_fun_picks_the_frozen_block_with_the_largest_trace():
    _, unf, state, _ = train_tiny("fun", 2, steps=7, fisher_every=1)
    events = state["unfreeze_events"]
    assert events[0] == {"step": 0, "block": "layer.2"} and [e["step"] for e in events] == [0, 2, 4, 6]
    fisher = pd.DataFrame(state["fisher_rows"])
    for event in events[1:]:
        at = fisher[fisher.step == event["step"]]
        frozen = at[~at.trainable & (at.block != "head")]
        assert event["block"] == frozen.loc[frozen.trace.idxmax(), "block"]
        assert not at[at.block == event["block"]].trainable.item()  # measured before it was unfrozen
    assert sorted(e["block"] for e in events) == sorted(unf.blocks)
    curve = unfreezing_report.fisher_curve(fisher)
    assert len(curve) == 7 and curve.mean_trainable.isna().tolist() == [True] + [False] * 6  # nothing trainable at 0
    assert (curve.total >= curve.mean_trainable).iloc[1:].all()


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("params, name", [
    (dict(unfreeze="gradual"), "unfreeze"), (dict(unfreeze_every=0), "unfreeze_every"),
    (dict(adapters=-16), "adapters"), (dict(fisher_every=-1), "fisher_every"),
    (dict(fisher_batches=0), "fisher_batches"), (dict(fisher_labels="true"), "fisher_labels"),
])
def test_invalid_parameters_are_named(params, name):
    with pytest.raises(ConfigError, match=rf"parameter {re.escape(name)}="):
        config.make_config("sib", "smoke", **params)


# ----------------------------------------------------------------------------- a real run
def smoke(**params):
    base = dict(unfreeze="gu", unfreeze_every=2, fisher_every=3, fisher_batches=1, storage_dtype="fp32",
                target_langs={"sib200": ["deu_Latn"]})
    return config.make_config("sib", "smoke", **dict(base, **params))


def test_real_run_with_adapters_records_schedule_and_fisher_and_resumes_identically(tmp_path):
    cfg = smoke(adapters=16)
    full = training.run_training(cfg, tmp_path / "a", progress=False)
    manifest = json.loads((full / "manifest.json").read_text())
    unf = manifest["unfreezing"]
    steps = manifest["total_steps"]
    top_down = list(reversed(unf["blocks"]))
    assert unf["events"] == [{"step": 2 * i, "block": top_down[i]} for i in range(-(-steps // 2))]
    fisher = pd.read_parquet(full / "fisher.parquet")
    assert sorted(fisher.step.unique()) == list(range(0, steps + 1, 3))
    assert set(fisher.block) == set(unf["blocks"]) | {"head"} and (fisher.trace > 0).all()
    assert unf["blocks"] == [f"adapter.{i}" for i in range(12)]
    # the base model and the never-unfrozen adapters are exactly as they started; the top adapter trained
    prep = setup.prepare(cfg)
    start = prep.model.state_dict()
    last = ckpt_io.load_checkpoint(full / "checkpoints" / "last.safetensors", dtype=torch.float32)
    assert set(last) == set(start)  # adapter checkpoints load into prepare()'s model (crossrun averages them)
    never = [b for b in unf["blocks"] if b not in {e["block"] for e in unf["events"]}]
    adapter_names = {n for b in unfreezing.model_blocks(prep.model).values() for n in b}
    fixed = [n for n in start if n not in adapter_names and n not in prep.head_keys]
    fixed += [n for b in never for n in unfreezing.model_blocks(prep.model)[b]]
    assert never and all(torch.equal(last[n], start[n]) for n in fixed)
    top = "bert.encoder.layer.11.output.adapter.up.weight"
    assert not torch.equal(last[top], start[top])

    with pytest.raises(KeyboardInterrupt):
        training.run_training(cfg, tmp_path / "b", progress=False, stop_after_step=3)
    resumed = training.run_training(cfg, tmp_path / "b", progress=False)
    assert json.loads((resumed / "manifest.json").read_text())["unfreezing"] == unf
    pd.testing.assert_frame_equal(pd.read_parquet(resumed / "fisher.parquet"), fisher)
    cols = ["kind", "name", "dataset", "lang", "split", "metric", "value"]
    pd.testing.assert_frame_equal(pd.read_parquet(resumed / "metrics.parquet")[cols], pd.read_parquet(full / "metrics.parquet")[cols])


def test_averaging_answer_compares_settings_at_their_largest_common_r():
    rows = [(s, r, sel, m) for s, base in (("none", 70.0), ("gu", 72.0)) for r in (1, 2)
            for sel, m in (("max_src_dev", base), ("acc_avg", base + r))]
    t1 = pd.DataFrame(rows, columns=["setting", "r", "selection", "mean"]).assign(variant="last", std=0.5, n=3)
    text = unfreezing_report.averaging_answer(t1, "last")
    assert "**none** at r = 2: averaging 72.0 ± 0.5 vs Max SRC-DEV 70.0 ± 0.5" in text
    assert "Averaging gu runs beats averaging none runs at r = 2 (+2.0 points)." in text
    assert "No setting" in unfreezing_report.averaging_answer(t1, "ca")
