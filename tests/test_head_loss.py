"""model.loss and fl.causal_lm_loss: the LM head fused into the cross-entropy (fastlora._linear_ce)
gives what cross_entropy(model(ids), labels) gives, on every model and head, without the logits."""
import tracemalloc

import numpy as np
import pytest

import fastlora as fl
from fastlora import _linear_ce
from fastlora.nn import Module


def _models(tied, dtype=np.float32):
    gpt = fl.GPT(vocab_size=97, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=12, seed=1, dtype=dtype,
                 tie_word_embeddings=tied)
    llama = fl.Llama(vocab_size=97, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_seq_len=12, tie_word_embeddings=tied, dtype=dtype)
    return [gpt, llama]


def _batch(seed=0, V=97, shape=(3, 12)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=shape)
    labels = ids.copy()
    labels[:, :4] = -100
    labels[1, 8:] = -100
    return ids, labels


def _loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return float(loss.data), {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
def test_loss_is_cross_entropy_of_the_logits(tied):
    ids, labels = _batch()
    for model in _models(tied):
        fused, fused_grads = _loss_and_grads(model, lambda: model.loss(ids, labels))
        plain, plain_grads = _loss_and_grads(model, lambda: fl.cross_entropy(model(ids), labels))
        assert fused == pytest.approx(plain, rel=1e-6)
        assert fused_grads.keys() == plain_grads.keys() == {n for n, _ in model.named_parameters()}
        for name, g in plain_grads.items():
            np.testing.assert_allclose(fused_grads[name], g, rtol=1e-4, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_lora_models_train_through_the_loss(targets):
    """A LoRAModel passes loss through to its base; LoRA on lm_head itself makes the loss go
    through the adapted head's logits (nothing fused), with the same numbers."""
    ids, labels = _batch(1)
    model = fl.GPT(vocab_size=97, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=12, seed=1,
                   tie_word_embeddings=False)
    lm = fl.LoRAModel(model, target_modules=targets, rank=4, alpha=8)
    lm.inject_lora()
    for p in lm.lora_parameters():  # B is zero at init: give the adapters a say
        p.data[...] = np.random.default_rng(2).standard_normal(p.shape) * 0.1
    assert (model.fused_head_weight() is None) == ("lm_head" in targets)
    fused, fused_grads = _loss_and_grads(model, lambda: fl.causal_lm_loss(lm, ids, labels))
    plain, plain_grads = _loss_and_grads(model, lambda: fl.cross_entropy(lm(ids), labels))
    assert fused == pytest.approx(plain, rel=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name, g in plain_grads.items():
        np.testing.assert_allclose(fused_grads[name], g, rtol=1e-4, atol=1e-7, err_msg=name)


def test_causal_lm_loss_of_a_users_module_scores_its_logits():
    class Bigram(Module):
        def __init__(self):
            super().__init__()
            self.table = fl.nn.Parameter(np.random.default_rng(0).standard_normal((97, 97)))

        def forward(self, ids):
            from fastlora.autograd import ops
            return ops.embedding(ids, self.table)

    ids, labels = _batch(2)
    model = Bigram()
    assert fl.causal_lm_loss(model, ids, labels).item() == pytest.approx(
        fl.cross_entropy(model(ids), labels).item(), rel=1e-12)


def test_loss_never_holds_the_logits(monkeypatch):
    """With the chunk at 32 rows, the loss and its gradients allocate far less than one (B, T, V)
    logits array: the head's rows are made a chunk at a time, and only those that score."""
    V = 20_000
    model = fl.GPT(vocab_size=V, embed_dim=16, num_heads=2, num_layers=1, max_seq_len=32, seed=0)
    ids, labels = _batch(3, V=V, shape=(4, 32))
    logits_bytes = 4 * 32 * V * 4
    monkeypatch.setattr(_linear_ce, "CHUNK_ELEMENTS", 32 * V)
    model.loss(ids, labels).backward()  # warm: imports, first allocations
    model.zero_grad()
    tracemalloc.start()
    try:
        model.loss(ids, labels).backward()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grads = 2 * V * 16 * 4  # d(embedding) from the head and from the lookup, summed
    assert peak < grads + logits_bytes / 3, (peak, logits_bytes)


def test_loss_with_nothing_to_score_is_an_error():
    model = _models(True)[0]
    ids, _ = _batch()
    with pytest.raises(ValueError, match="no position to score"):
        model.loss(ids, np.full(ids.shape, -100))


def test_loss_under_no_grad_makes_no_gradient():
    model = _models(True)[1]
    ids, labels = _batch()
    with fl.no_grad():
        loss = model.loss(ids, labels)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(fl.cross_entropy(model(ids), labels).item(), rel=1e-6)
