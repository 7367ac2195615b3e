"""tr(F) (Algorithm 2) against hand computations on tiny models; the model passed in stays untouched."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)

from ofa_lib import io
from ofa_lib.train import fisher


class Tiny(torch.nn.Module):
    """Frozen embeddings → (mean-pooled | per-token) features → one linear layer: gradients by hand."""

    def __init__(self, vocab=20, dim=5, classes=3, token=False, qa=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.emb.weight.requires_grad_(False)
        self.lin = torch.nn.Linear(dim, 2 if qa else classes)
        with torch.no_grad():
            self.lin.weight.mul_(8)  # confident enough that sampled and argmax labels differ in their traces
        self.token, self.qa = token, qa

    def features(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        if self.token or self.qa:
            return h
        m = attention_mask[..., None].float()
        return (h * m).sum(1) / m.sum(1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        logits = self.lin(self.features(input_ids, attention_mask))
        if self.qa:
            return SimpleNamespace(start_logits=logits[..., 0], end_logits=logits[..., 1])
        return SimpleNamespace(logits=logits)


def batches(n=3, size=4, length=6, vocab=20, seed=1, token_labels=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (size, length), generator=gen)
        mask = torch.ones(size, length, dtype=torch.long)
        mask[0, length - 2:] = 0  # one padded row
        b = {"input_ids": ids, "attention_mask": mask}
        if token_labels:
            labels = torch.randint(0, 3, (size, length), generator=gen)
            labels[:, 0] = -100
            labels[mask == 0] = -100
            b["labels"] = labels
        out.append(b)
    return out


def hand_trace(model: Tiny, bs, mode: str, seed: int, per_example: bool = False) -> float:
    """tr(F) of ``lin`` by the closed form ∇_W log softmax(Wh+b)_y = (e_y − p) hᵀ, ∇_b = e_y − p."""
    gen = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in bs:
            h = model.features(b["input_ids"], b["attention_mask"])          # [B, D] or [B, T, D]
            lp = torch.log_softmax(model.lin(h).float(), -1)
            flat = lp.reshape(-1, lp.shape[-1])
            if mode == "argmax":
                y = flat.argmax(-1)
            else:  # the documented draw: inverse CDF of one uniform (float64) per row
                u = torch.rand(flat.shape[0], generator=gen, dtype=torch.float64)
                cdf = flat.double().exp().cumsum(-1)
                y = torch.tensor([int((c / c[-1] < ui).sum()) for c, ui in zip(cdf, u)])
            r = (torch.nn.functional.one_hot(y, lp.shape[-1]).double() - flat.exp().double()).reshape(lp.shape)
            hd = h.double()
            if model.token:  # sum over labelled tokens of each sequence
                keep = b["labels"].ne(-100)[..., None].double()
                r, hd = r * keep, hd * keep
                gw = torch.einsum("btc,btd->bcd", r, hd)
                gb = r.sum(1)
            else:
                gw = torch.einsum("bc,bd->bcd", r, hd)
                gb = r
            if per_example:
                total += float((gw.pow(2).sum((1, 2)) + gb.pow(2).sum(1)).sum())
            else:
                total += float(gw.sum(0).pow(2).sum() + gb.sum(0).pow(2).sum())
            n += h.shape[0]
    return total / n


BLOCKS = {"lin": ["lin.weight", "lin.bias"]}


@pytest.mark.parametrize("mode", ["sample", "argmax"])
@pytest.mark.parametrize("token", [False, True])
def test_batch_estimator_matches_hand_computation(mode, token):
    model = Tiny(token=token)
    bs = batches(token_labels=token)
    got = fisher.fisher_trace(model, bs, label_mode=mode, seed=7, blocks=BLOCKS)
    assert got["lin"] == pytest.approx(hand_trace(model, bs, mode, seed=7), rel=1e-5)
    assert got["total"] == pytest.approx(got["lin"])


def test_example_estimator_matches_hand_computation():
    model = Tiny()
    bs = batches()
    got = fisher.fisher_trace(model, bs, label_mode="argmax", blocks=BLOCKS, estimator="example")["lin"]
    assert got == pytest.approx(hand_trace(model, bs, "argmax", seed=0, per_example=True), rel=1e-5)
    # argmax labels: the cross terms of the batch estimator do not vanish, so the two estimators differ
    batch = fisher.fisher_trace(model, bs, label_mode="argmax", blocks=BLOCKS)["lin"]
    assert abs(batch - got) > 1e-3 * got


def test_sampled_batch_estimate_is_unbiased_for_the_exact_trace():
    """E_y ||(e_y − p) hᵀ||² + ||e_y − p||² = (1 − ||p||²)(||h||² + 1): the sampled batch estimate converges to it."""
    model = Tiny()
    bs = batches(n=1, size=8)
    with torch.no_grad():
        h = model.features(bs[0]["input_ids"], bs[0]["attention_mask"]).double()
        p = torch.softmax(model.lin(h.float()).double(), -1)
        exact = float(((1 - p.pow(2).sum(-1)) * (h.pow(2).sum(-1) + 1)).mean())
    estimate = fisher.fisher_trace(model, bs * 400, seed=3, blocks=BLOCKS)["lin"]
    assert estimate == pytest.approx(exact, rel=0.08)


def test_qa_padding_does_not_change_the_estimate():
    model = Tiny(qa=True)
    (b,) = batches(n=1)
    padded = {"input_ids": torch.cat([b["input_ids"], torch.zeros(4, 5, dtype=torch.long)], 1),
              "attention_mask": torch.cat([b["attention_mask"], torch.zeros(4, 5, dtype=torch.long)], 1)}
    a = fisher.fisher_trace(model, [b], seed=2, blocks=BLOCKS)["lin"]
    assert a > 0
    assert fisher.fisher_trace(model, [padded], seed=2, blocks=BLOCKS)["lin"] == pytest.approx(a, rel=1e-6)


TINY_BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=32)


@pytest.mark.parametrize("cls, labels", [(BertForSequenceClassification, 3), (BertForTokenClassification, 3),
                                         (BertForQuestionAnswering, 2)])
def test_bert_heads_and_the_model_is_left_untouched(cls, labels):
    torch.manual_seed(0)
    model = cls(BertConfig(num_labels=labels, **TINY_BERT)).train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    out = fisher.fisher_trace(model, batches(token_labels=cls is BertForTokenClassification, vocab=40), seed=1)
    assert {"embeddings", "layer.0", "layer.1", "head", "total"} == set(out)
    assert all(v > 0 for v in out.values())
    assert out["total"] == pytest.approx(sum(v for k, v in out.items() if k != "total"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(p.grad is None for p in model.parameters())
    again = fisher.fisher_trace(model, batches(token_labels=cls is BertForTokenClassification, vocab=40), seed=1)
    assert again == out  # seeded: the same labels, the same numbers


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="label_mode='true'"):
        fisher.fisher_trace(Tiny(), batches(), label_mode="true")
    with pytest.raises(ValueError, match="block 'x'"):
        fisher.fisher_trace(Tiny(), batches(), blocks={"x": ["nope.weight"]})


def hand_diagonal(model: Tiny, bs, mode: str, seed: int) -> dict[str, torch.Tensor]:
    """Per-example squared gradients of ``lin`` by the closed form, averaged (sequence classification)."""
    gen = torch.Generator().manual_seed(seed)
    gw_sq, gb_sq, n = 0.0, 0.0, 0
    with torch.no_grad():
        for b in bs:
            h = model.features(b["input_ids"], b["attention_mask"]).double()
            lp = torch.log_softmax(model.lin(h.float()).float(), -1)
            if mode == "argmax":
                y = lp.argmax(-1)
            else:  # the documented draw, one uniform per example (an example is its own pass)
                u = torch.rand(lp.shape[0], generator=gen, dtype=torch.float64)
                cdf = lp.double().exp().cumsum(-1)
                y = torch.tensor([int((c / c[-1] < ui).sum()) for c, ui in zip(cdf, u)])
            r = torch.nn.functional.one_hot(y, lp.shape[-1]).double() - lp.exp().double()
            gw_sq = gw_sq + torch.einsum("bc,bd->bcd", r, h).pow(2).sum(0)
            gb_sq = gb_sq + r.pow(2).sum(0)
            n += h.shape[0]
    return {"lin.weight": gw_sq / n, "lin.bias": gb_sq / n}


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_diagonal_matches_hand_computation_and_sums_to_the_trace(mode):
    model = Tiny()
    bs = batches()
    diag, n = fisher.fisher_diagonal(model, bs, label_mode=mode, seed=5)
    assert n == 12 and set(diag) == {"emb.weight", "lin.weight", "lin.bias"}
    want = hand_diagonal(model, bs, mode, seed=5)
    for key in want:
        torch.testing.assert_close(diag[key].double(), want[key], rtol=1e-5, atol=1e-9)
    # the same loop as tr(F): its per-example trace is the sum of the diagonal
    trace = fisher.fisher_trace(model, bs, label_mode=mode, seed=5, blocks=BLOCKS, estimator="example")["lin"]
    assert trace == pytest.approx(float(diag["lin.weight"].sum() + diag["lin.bias"].sum()), rel=1e-5)
    assert float(diag["emb.weight"].abs().sum()) > 0  # frozen parameters get their Fisher too
    assert not model.emb.weight.requires_grad and all(p.grad is None for p in model.parameters())


def test_cached_diagonal_is_computed_once_and_recomputed_for_other_bytes(tmp_path):
    from ofa_lib.models import ckpt_io

    ckpt = tmp_path / "m.safetensors"
    ckpt_io.save_checkpoint({"w": torch.ones(3)}, ckpt)
    opts = fisher.diagonal_options({"examples": 8, "split": "train", "labels": "sample", "seed": 0})
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.full((3,), float(len(calls)))}, 8

    path, computed = fisher.cached_diagonal(ckpt, opts, tmp_path / "cache", compute)
    assert computed and len(calls) == 1 and path.parent == tmp_path / "cache"
    meta = ckpt_io.read_metadata(path)
    assert meta[fisher.CHECKPOINT_SHA_KEY] == io.file_sha256(ckpt) and meta[fisher.EXAMPLES_KEY] == "8"
    assert fisher.cached_diagonal(ckpt, opts, tmp_path / "cache", compute) == (path, False) and len(calls) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temp litter
    # other options: another file
    other, computed = fisher.cached_diagonal(ckpt, dict(opts, examples=16), tmp_path / "cache", compute)
    assert computed and other != path and len(calls) == 2
    # a file at that name that records another checkpoint's hash is not trusted: computed again
    ckpt_io.save_checkpoint({"w": torch.zeros(3)}, path, metadata={fisher.CHECKPOINT_SHA_KEY: "0" * 64,
                                                                 fisher.OPTIONS_KEY: json.dumps(opts)})
    with pytest.warns(UserWarning, match="does not belong"):
        again, computed = fisher.cached_diagonal(ckpt, opts, tmp_path / "cache", compute)
    assert again == path and computed and len(calls) == 3
    assert ckpt_io.read_metadata(path)[fisher.CHECKPOINT_SHA_KEY] == io.file_sha256(ckpt)
    # the checkpoint's bytes change: its hash names another file, computed afresh
    ckpt_io.save_checkpoint({"w": torch.full((3,), 2.0)}, ckpt)
    changed, computed = fisher.cached_diagonal(ckpt, opts, tmp_path / "cache", compute)
    assert computed and changed not in (path, other) and len(calls) == 4
