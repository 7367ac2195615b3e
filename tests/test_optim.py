"""ofa_lib.train.optim: the AdamW step is the published recipe's, SAM's update is the hand-computed one,
the Fisher penalty differentiates the squared norm of the sampled log-likelihood's gradient."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from ofa_lib.train import config, optim


class Regression(torch.nn.Module):
    """y ≈ x·w with the mean squared error as ``.loss`` (an HF-style output)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x, y):
        return SimpleNamespace(loss=((x @ self.w - y) ** 2).mean())


class Softmax(torch.nn.Module):
    """A linear classifier with cross-entropy ``.loss`` and ``.logits``."""

    def __init__(self, d=3, c=4, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(c, d, generator=gen, dtype=torch.float64))

    def forward(self, x, labels):
        logits = x @ self.W.T
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)


def _data(n=5, d=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)


def _grad(w, x, y):  # d/dw mean((x w - y)^2)
    return 2 * x.T @ (x @ w - y) / len(y)


@pytest.mark.parametrize("max_grad_norm", [1e6, 0.05])
def test_sam_update_equals_hand_computed_sgd(max_grad_norm):
    x, y = _data()
    w0 = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    model = Regression(w0.tolist())
    lr, rho = 0.1, 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss, norm = optim.train_step(model, {"x": x, "y": y}, opt, method="sam", sam_rho=rho, max_grad_norm=max_grad_norm)
    g = _grad(w0, x, y)
    g_adv = _grad(w0 + rho * g / g.norm(), x, y)  # the gradient at the ascended point
    clip = min(1.0, max_grad_norm / (float(g_adv.norm()) + 1e-6))
    expected = w0 - lr * clip * g_adv
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(float(loss.detach()), float(((x @ w0 - y) ** 2).mean()))  # the loss at w
    torch.testing.assert_close(float(norm), float(g_adv.norm()))  # before clipping
    assert max_grad_norm > 1 or clip < 1  # the small limit did clip


def test_sam_update_equals_hand_computed_adamw():
    x, y = _data(seed=3)
    w0 = torch.tensor([1.0, 0.5, -0.25], dtype=torch.float64)
    model = Regression(w0.tolist())
    lr, rho, wd, eps = 0.01, 0.1, 0.01, 1e-8
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, eps=eps)
    optim.train_step(model, {"x": x, "y": y}, opt, method="sam", sam_rho=rho, max_grad_norm=1e6)
    g = _grad(w0, x, y)
    g_adv = _grad(w0 + rho * g / g.norm(), x, y)
    # AdamW's first step: m̂ = g, v̂ = g², update = lr·g/(|g| + eps), decoupled decay first
    expected = w0 * (1 - lr * wd) - lr * g_adv / (g_adv.abs() + eps)
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-10, atol=1e-12)


def test_adamw_step_is_the_recipe():
    """method='adamw' does exactly forward, backward, clip, step (bit for bit)."""
    x, y = _data(n=8)
    a, b = Regression([0.1, 0.2, 0.3]), Regression([0.1, 0.2, 0.3])
    oa, ob = torch.optim.AdamW(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)
    for _ in range(3):
        optim.train_step(a, {"x": x, "y": y}, oa, method="adamw", max_grad_norm=0.5)
        oa.zero_grad(set_to_none=True)
        loss = b(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.5)
        ob.step()
        ob.zero_grad(set_to_none=True)
    assert torch.equal(a.w, b.w)


def test_sam_restores_weights_before_the_base_step():
    """With lr = 0 the base step changes nothing, so SAM must leave w bit for bit as it was."""
    x, y = _data()
    model = Regression([0.3, -1.2, 0.7])
    before = model.w.detach().clone()
    optim.train_step(model, {"x": x, "y": y}, torch.optim.SGD(model.parameters(), lr=0.0), method="sam", sam_rho=0.5)
    assert torch.equal(model.w.detach(), before)


def test_fisher_penalty_gradient_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (6,), generator=gen)
    model = Softmax()
    W0 = model.W.detach().clone()
    lam, lr, seed, step = 0.3, 0.5, 7, 11
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    optim.train_step(model, {"x": x, "labels": labels}, opt, method="fisher_penalty", fisher_penalty_weight=lam,
                     max_grad_norm=1e6, seed=seed, step=step)
    # the same labels the step drew: its generator, on the model's probabilities at W0
    probs = torch.softmax(x @ W0.T, -1)
    yhat = torch.multinomial(probs.float().cpu(), 1, generator=torch.Generator().manual_seed(seed * 1_000_003 + step)).squeeze(-1)

    def objective(W):  # L + λ‖∇_W mean log p(ŷ|x)‖², the inner gradient in closed form
        logits = x @ W.T
        p = torch.softmax(logits, -1)
        inner = ((torch.nn.functional.one_hot(yhat, 4).double() - p).T @ x) / len(x)
        return torch.nn.functional.cross_entropy(logits, labels) + lam * inner.pow(2).sum()

    W = W0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(W), W)
    torch.testing.assert_close(model.W.detach(), W0 - lr * g, rtol=1e-10, atol=1e-12)


def test_fisher_penalty_weight_zero_is_plain_step():
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randint(0, 4, (6,), generator=gen)
    a, b = Softmax(), Softmax()
    optim.train_step(a, {"x": x, "labels": labels}, torch.optim.SGD(a.parameters(), lr=0.5), method="fisher_penalty",
                     fisher_penalty_weight=0.0)
    optim.train_step(b, {"x": x, "labels": labels}, torch.optim.SGD(b.parameters(), lr=0.5), method="adamw")
    torch.testing.assert_close(a.W, b.W)


def _tiny_bert(task, attn="eager"):
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
    )

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2 if task == "qa" else 3,
                     attn_implementation=attn)
    cls = {"seq": BertForSequenceClassification, "tok": BertForTokenClassification, "qa": BertForQuestionAnswering}[task]
    return cls(cfg)


def _bert_batch(task):
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, 50, (4, 10), generator=gen), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    batch["attention_mask"][0, 7:] = 0
    if task == "seq":
        batch["labels"] = torch.tensor([0, 1, 2, 1])
    elif task == "tok":
        labels = torch.randint(0, 3, (4, 10), generator=gen)
        labels[:, 0] = -100
        batch["labels"] = labels
    else:
        batch["start_positions"], batch["end_positions"] = torch.tensor([1, 2, 3, 0]), torch.tensor([2, 4, 3, 0])
    return batch


@pytest.mark.parametrize("task", ["seq", "tok", "qa"])
@pytest.mark.parametrize("method", ["sam", "fisher_penalty"])
def test_methods_on_tiny_bert_with_bf16_autocast(task, method):
    """Both methods run through a real transformer (eager attention, bf16 autocast on CPU),
    produce finite losses and move the weights."""
    model = _tiny_bert(task)
    model.train()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, norm = optim.train_step(model, _bert_batch(task), opt, method=method, autocast_dtype=torch.bfloat16,
                                  max_grad_norm=1.0, fisher_penalty_weight=0.1)
    assert torch.isfinite(loss) and torch.isfinite(norm)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_config_fields_and_validation():
    cfg = config.make_config("sib", "smoke")
    assert (cfg.optimizer, cfg.sam_rho, cfg.measures) == ("adamw", 0.05, [])
    assert config.make_config("sib", "smoke", optimizer="sam").run_id != cfg.run_id
    with pytest.raises(config.ConfigError, match="optimizer"):
        config.make_config("sib", "smoke", optimizer="lion")
    with pytest.raises(config.ConfigError, match="sam_rho"):
        config.make_config("sib", "smoke", optimizer="sam", sam_rho=0)
    with pytest.raises(config.ConfigError, match="fisher_penalty_weight"):
        config.make_config("sib", "smoke", fisher_penalty_weight=-1.0)
    with pytest.raises(config.ConfigError, match="measures"):
        config.make_config("sib", "smoke", measures=["flatness"])
    with pytest.raises(config.ConfigError, match="margin_src"):
        config.make_config("qa", "smoke", measures=["margin_src"])
    assert optim.attn_implementation("fisher_penalty") == "eager" and optim.attn_implementation("sam") is None


def test_fp16_grad_scaler_steps_and_skips_overflowing_steps():
    """fp16 autocast with a GradScaler: a normal step moves the weights and clips the unscaled gradient; a
    step whose scaled gradients overflow is skipped (weights unchanged) and the scale halves."""
    model = _tiny_bert("seq", attn=None)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = copy.deepcopy(model.state_dict())
    loss, norm = optim.train_step(model, _bert_batch("seq"), opt, autocast_dtype=torch.float16, scaler=scaler)
    assert torch.isfinite(loss) and torch.isfinite(norm) and scaler.get_scale() == 2.0 ** 8
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    opt.zero_grad(set_to_none=True)
    huge = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # scaled fp16 gradients overflow
    before = copy.deepcopy(model.state_dict())
    optim.train_step(model, _bert_batch("seq"), opt, autocast_dtype=torch.float16, scaler=huge)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert huge.get_scale() == 2.0 ** 119
    with pytest.raises(ValueError, match="'adamw' only"):
        optim.train_step(model, _bert_batch("seq"), opt, method="sam", scaler=scaler)


def test_gradient_accumulation_takes_the_step_of_the_whole_batch():
    """Two micro-batches of 2 examples make the same AdamW step as the batch of 4 (sequence classification: the
    batch loss is the mean over examples), and the reported loss is the batch's."""
    batch = _bert_batch("seq")
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    results = []
    for b in (batch, halves):
        model = _tiny_bert("seq")
        model.train()
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss, norm = optim.train_step(model, b, opt, max_grad_norm=10.0)
        results.append((loss, norm, model.state_dict()))
    (l1, n1, w1), (l2, n2, w2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n1, n2, rtol=1e-4, atol=1e-6)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="micro-batches"):
        optim.train_step(_tiny_bert("seq"), halves, opt, method="sam")
