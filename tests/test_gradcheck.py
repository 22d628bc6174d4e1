"""Every differentiable op, and a whole tiny GPT, against float64 central finite differences."""
import numpy as np
import pytest

import fastlora as fl
from conftest import kernel_path, numerical_grad
from fastlora.autograd import ops
from fastlora.nn import Parameter


def _check(build_loss, tensors, rtol=1e-6, atol=1e-8):
    """build_loss() -> scalar Tensor; compare analytic grads of each tensor with finite differences."""
    for t in tensors:
        t.grad = None
    build_loss().backward()
    for i, t in enumerate(tensors):
        expected = numerical_grad(lambda: float(build_loss().data), t.data)
        np.testing.assert_allclose(t.grad, expected, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i} (shape {t.shape})")


def _param(rng, *shape, scale=1.0):
    return Parameter(rng.standard_normal(shape) * scale, dtype=np.float64)


def _weighted(out, rng):
    """A scalar that depends on every output element with a distinct weight."""
    w = rng.standard_normal(out.shape)
    return (out * w).sum()


def test_add_broadcasts_back_to_shape(rng):
    a, b = _param(rng, 3, 4), _param(rng, 4)
    c = _param(rng, 3, 1)
    w = rng.standard_normal((3, 4))
    _check(lambda: ((a + b + c) * w).sum(), [a, b, c])


def test_sub_mul_neg(rng):
    a, b = _param(rng, 2, 3), _param(rng, 1, 3)
    w = rng.standard_normal((2, 3))
    _check(lambda: ((a - b) * a * w - (-b)).sum(), [a, b])


def test_matmul_batched_and_broadcast(rng):
    a, b = _param(rng, 2, 3, 4), _param(rng, 4, 5)
    w = rng.standard_normal((2, 3, 5))
    _check(lambda: ((a @ b) * w).sum(), [a, b])


def test_sum_mean_reshape_transpose(rng):
    a = _param(rng, 2, 3, 4)
    w = rng.standard_normal((4, 3))
    _check(lambda: ((a.transpose(0, 2, 1).reshape(8, 3).mean(axis=0, keepdims=True) * w[:1]).sum()
                    + a.sum(axis=1).mean()), [a])


def test_embedding(rng):
    weight = _param(rng, 7, 3)
    ids = np.array([[0, 3, 3], [6, 0, 1]])
    _check(lambda: _weighted(ops.embedding(ids, weight), np.random.default_rng(0)), [weight])


def test_linear(rng):
    x, w, b = _param(rng, 2, 3, 4), _param(rng, 5, 4), _param(rng, 5)
    _check(lambda: _weighted(ops.linear(x, w, b), np.random.default_rng(0)), [x, w, b])


def test_layer_norm(rng):
    x, w, b = _param(rng, 2, 3, 6, scale=2.0), _param(rng, 6), _param(rng, 6)
    _check(lambda: _weighted(ops.layer_norm(x, w, b), np.random.default_rng(0)), [x, w, b], rtol=1e-5)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu(rng, approximate):
    x = _param(rng, 3, 5, scale=2.0)
    x.data[0, :3] = (-6.0, 0.0, 6.5)  # 0 and the tails, where erf and tanh are near +-1
    _check(lambda: _weighted(ops.gelu(x, approximate=approximate), np.random.default_rng(0)), [x])


def test_causal_attention(rng):
    q, k, v = _param(rng, 2, 5, 6), _param(rng, 2, 5, 6), _param(rng, 2, 5, 6)
    _check(lambda: _weighted(ops.causal_attention(q, k, v, num_heads=3), np.random.default_rng(0)), [q, k, v],
           rtol=1e-5)


def test_rms_norm(rng):
    x, w = _param(rng, 2, 3, 6, scale=2.0), _param(rng, 6)
    _check(lambda: _weighted(ops.rms_norm(x, w, 1e-6), np.random.default_rng(0)), [x, w], rtol=1e-5)


def test_rms_norm_with_a_frozen_weight_gives_it_no_gradient(rng):
    x, w = _param(rng, 4, 6, scale=2.0), Parameter(rng.standard_normal(6), requires_grad=False)
    _check(lambda: _weighted(ops.rms_norm(x, w, 1e-5), np.random.default_rng(0)), [x], rtol=1e-5)
    assert w.grad is None


def test_silu_mul(rng):
    gate, up = _param(rng, 3, 5, scale=3.0), _param(rng, 3, 5)
    gate.data[0, :3] = (-30.0, 0.0, 30.0)  # 0 and the tails, where the sigmoid is near 0 and 1
    _check(lambda: _weighted(ops.silu_mul(gate, up), np.random.default_rng(0)), [gate, up])


def test_rope(rng):
    x = _param(rng, 2, 5, 3 * 6)
    angles = np.arange(5)[:, None] * 10000.0 ** (-np.arange(0, 6, 2) / 6)
    cos, sin = np.cos(angles), np.sin(angles)
    _check(lambda: _weighted(ops.rope(x, cos, sin, 3), np.random.default_rng(0)), [x])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "numpy"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (3, 1), (2, 2)])
def test_grouped_query_attention(rng, fused, num_heads, num_kv_heads):
    """GQA (4 heads on 2), MQA (3 on 1) and num_kv_heads = num_heads; head size 5, on both paths."""
    q = _param(rng, 2, 6, num_heads * 5)
    k, v = _param(rng, 2, 6, num_kv_heads * 5), _param(rng, 2, 6, num_kv_heads * 5)
    with kernel_path(fused):
        _check(lambda: _weighted(ops.causal_attention(q, k, v, num_heads, num_kv_heads), np.random.default_rng(0)),
               [q, k, v], rtol=1e-5)


def test_cross_entropy(rng):
    logits = _param(rng, 2, 5, 7, scale=2.0)
    labels = np.array([[-100, 1, 2, -100, 6], [0, -100, 3, 3, 4]])
    _check(lambda: ops.cross_entropy(logits, labels) * 1.7, [logits])


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_linear_cross_entropy(rng, chunk_rows):
    """The fused head + loss with respect to the hidden states and the head weight (a loss scaled
    by 1.7, so the backward's scaling is checked too)."""
    hidden, weight = _param(rng, 2, 5, 4, scale=1.5), _param(rng, 7, 4)
    labels = np.array([[-100, 1, 2, -100, 6], [0, -100, 3, 3, 4]])
    _check(lambda: ops.linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows) * 1.7, [hidden, weight])


def test_dropout_backward_uses_the_same_mask(rng):
    x = _param(rng, 4, 5)
    gen = np.random.default_rng(7)
    state = gen.bit_generator.state

    def loss():
        gen.bit_generator.state = state  # same mask every call, so finite differences are defined
        return _weighted(ops.dropout(x, 0.3, True, gen), np.random.default_rng(0))

    _check(loss, [x])


@pytest.mark.parametrize("tied", [True, False])
def test_whole_tiny_model_gradcheck_through_the_fused_loss(tied):
    """model.loss (the head fused into the loss) of a whole GPT and a whole Llama, untied and
    tied, with respect to every parameter, in float64."""
    rng = np.random.default_rng(6)
    gpt = fl.GPT(vocab_size=11, embed_dim=8, num_heads=2, num_layers=1, max_seq_len=6, seed=3, dtype=np.float64,
                 tie_word_embeddings=tied)
    llama = fl.Llama(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=1, num_heads=2, num_kv_heads=1,
                     max_seq_len=6, tie_word_embeddings=tied, dtype=np.float64)
    ids = rng.integers(0, 11, size=(2, 6))
    labels = ids.copy()
    labels[0, :2] = -100
    for model in (gpt, llama):
        for p in model.parameters():
            p.data[...] = rng.standard_normal(p.shape) * 0.5
        model.zero_grad()
        model.loss(ids, labels).backward()
        for name, p in model.named_parameters():
            expected = numerical_grad(lambda: float(model.loss(ids, labels).data), p.data)
            np.testing.assert_allclose(p.grad, expected, rtol=1e-5, atol=1e-8, err_msg=name)


def test_whole_tiny_gpt_gradcheck():
    """The loss of a whole GPT with respect to every parameter, in float64."""
    model = fl.GPT(vocab_size=11, embed_dim=8, num_heads=2, num_layers=2, max_seq_len=6, seed=3,
                   dtype=np.float64)
    rng = np.random.default_rng(5)
    for p in model.parameters():  # spread the weights so every path carries signal
        p.data[...] = rng.standard_normal(p.shape) * 0.5
    ids = rng.integers(0, 11, size=(2, 6))
    labels = ids.copy()
    labels[0, :2] = -100
    model.zero_grad()
    fl.cross_entropy(model(ids), labels).backward()
    for name, p in model.named_parameters():
        expected = numerical_grad(lambda: float(fl.cross_entropy(model(ids), labels).data), p.data)
        np.testing.assert_allclose(p.grad, expected, rtol=1e-5, atol=1e-8, err_msg=name)
