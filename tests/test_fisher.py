"""tr(F) (Algorithm 2) against hand computations on tiny models; the model passed in stays untouched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification

from ofa_lib import fisher


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
