"""The whole GPT against the same architecture in PyTorch: logits, loss and every gradient;
the GELU kernels against torch's F.gelu; and the Llama-family ops (RMSNorm, the SiLU gate,
RoPE, grouped-query attention) against Hugging Face's formulas written out in PyTorch."""
import numpy as np
import pytest

import fastlora as fl
from fastlora import kernels
from fastlora.autograd import Tensor, ops

torch = pytest.importorskip("torch")
from fastlora.testing.torch_reference import torch_gpt_from, torch_loss  # noqa: E402


@pytest.mark.parametrize("fused_loss", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-9, 1e-11), (np.float32, 2e-4, 2e-5)])
def test_gpt_matches_torch(model_path, dtype, rtol, atol, fused_loss):
    model = fl.GPT(vocab_size=53, embed_dim=24, num_heads=3, num_layers=2, max_seq_len=16, seed=1, dtype=dtype)
    rng = np.random.default_rng(2)
    for p in model.parameters():  # bigger than init so every path matters
        p.data[...] = (rng.standard_normal(p.shape) * 0.3).astype(dtype)
    ids = rng.integers(0, 53, size=(3, 16))
    labels = ids.copy()
    labels[:, :5] = -100
    labels[2, 10:] = -100

    logits = model(ids)
    loss = model.loss(ids, labels) if fused_loss else fl.cross_entropy(logits, labels)
    model.zero_grad()
    loss.backward()

    peer = torch_gpt_from(model)
    t_logits = peer(torch.from_numpy(ids))
    t_loss = torch_loss(t_logits, torch.from_numpy(labels))
    t_loss.backward()

    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), rtol=rtol, atol=atol)
    assert loss.item() == pytest.approx(t_loss.item(), rel=rtol, abs=atol)
    t_grads = dict(peer.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names == list(t_grads)  # same names, same order
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, t_grads[name].grad.numpy(), rtol=rtol * 10, atol=atol,
                                   err_msg=name)



@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-12, 1e-14), (np.float32, 1e-5, 1e-7)])
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_linear_cross_entropy_matches_torch(dtype, rtol, atol, chunk_rows):
    """The fused head + loss (kernel and op) against torch's F.cross_entropy of h @ W^T and its
    autograd in float64: loss, d(hidden) and d(weight), masked rows and the shift included."""
    rng = np.random.default_rng(4)
    hidden = rng.standard_normal((3, 16, 24)).astype(dtype)
    weight = (rng.standard_normal((53, 24)) * 0.3).astype(dtype)
    labels = rng.integers(0, 53, size=(3, 16))
    labels[:, :5] = -100
    labels[2, 10:] = -100
    th, tw = (torch.from_numpy(a.astype(np.float64)).requires_grad_(True) for a in (hidden, weight))
    t_loss = torch_loss(th @ tw.T, torch.from_numpy(labels))
    t_loss.backward()

    loss, _, dh, dw = kernels.linear_cross_entropy_forward(hidden, weight, labels, chunk_rows=chunk_rows)
    assert loss == pytest.approx(t_loss.item(), rel=rtol)
    np.testing.assert_allclose(dh, th.grad.numpy(), rtol=rtol * 10, atol=atol)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=rtol * 10, atol=atol)
    h, w = Tensor(hidden, requires_grad=True), Tensor(weight, requires_grad=True)
    out = ops.linear_cross_entropy(h, w, labels, chunk_rows=chunk_rows)
    out.backward()
    assert out.item() == pytest.approx(t_loss.item(), rel=rtol)
    np.testing.assert_allclose(h.grad, th.grad.numpy(), rtol=rtol * 10, atol=atol)
    np.testing.assert_allclose(w.grad, tw.grad.numpy(), rtol=rtol * 10, atol=atol)


# float32 against torch's float64: the tanh backward's 1 - tanh^2 cancels in float32 as tanh
# nears +-1 (torch's float32 too), which costs it a few 1e-6 around |x| = 5..7
GELU_TOLERANCES = {(np.float64, "none"): (1e-12, 1e-14), (np.float64, "tanh"): (1e-12, 1e-14),
                   (np.float32, "none"): (1e-5, 2e-6), (np.float32, "tanh"): (1e-5, 1e-5)}


@pytest.mark.parametrize("dtype,approximate", list(GELU_TOLERANCES))
@pytest.mark.parametrize("shape", [(1,), (5, 7), (3, 4, 129)])
def test_gelu_matches_torch(dtype, approximate, shape):
    """kernels.gelu_forward/backward and ops.gelu against F.gelu(approximate=...) and its autograd
    in float64, over the body and the tails: +-10 and +-1e4, where erf and tanh round to +-1."""
    rtol, atol = GELU_TOLERANCES[dtype, approximate]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    x.flat[:4] = (-1e4, -10.0, 10.0, 1e4)[:x.size]
    g = rng.standard_normal(shape).astype(dtype)
    tx = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    t_out = torch.nn.functional.gelu(tx, approximate=approximate)
    t_out.backward(torch.from_numpy(g.astype(np.float64)))
    want, want_dx = t_out.detach().numpy(), tx.grad.numpy()

    np.testing.assert_allclose(kernels.gelu_forward(x, approximate), want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(kernels.gelu_backward(g, x, approximate), want_dx, rtol=rtol, atol=atol)
    xt = Tensor(x, requires_grad=True)
    out = ops.gelu(xt, approximate=approximate)
    out.backward(g)
    assert out.data.dtype == xt.grad.dtype == dtype
    np.testing.assert_allclose(out.data, want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(xt.grad, want_dx, rtol=rtol, atol=atol)


# --- Llama-family ops against Hugging Face's modeling_llama formulas, in torch float64 --------

# float32 against torch's float64 (the truth); float64 against it to rounding
LLAMA_TOLERANCES = {np.float64: (1e-10, 1e-12), np.float32: (2e-5, 2e-6)}


def _hf_rms_norm(x, weight, eps):  # LlamaRMSNorm.forward
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _hf_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _hf_rope_tables(T, hd, theta=10000.0):  # LlamaRotaryEmbedding (default rope): full tables (T, hd)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _hf_apply_rope(x, cos, sin):  # x (B, H, T, hd); apply_rotary_pos_emb with unsqueeze_dim=1
    return x * cos[None, None] + _hf_rotate_half(x) * sin[None, None]


def _hf_repeat_kv(x, n_rep):  # (B, Hkv, T, hd) -> (B, Hkv * n_rep, T, hd)
    B, Hkv, T, hd = x.shape
    return x[:, :, None, :, :].expand(B, Hkv, n_rep, T, hd).reshape(B, Hkv * n_rep, T, hd)


def _hf_attention(q, k, v, n_rep):  # eager_attention_forward, causal, no dropout; (B, H, T, hd)
    k, v = _hf_repeat_kv(k, n_rep), _hf_repeat_kv(v, n_rep)
    T = q.shape[2]
    scores = q @ k.transpose(2, 3) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _split(x, heads):  # torch (B, T, H * hd) -> (B, H, T, hd)
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads).transpose(1, 2)


def _join(x):  # torch (B, H, T, hd) -> (B, T, H * hd)
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)


def _leaves(rng, dtype, *shapes, scale=1.0):
    """The same values as fastlora Tensors (dtype) and torch float64 leaves, both requiring grad."""
    arrays = [(rng.standard_normal(s) * scale).astype(dtype) for s in shapes]
    return ([Tensor(a, requires_grad=True) for a in arrays],
            [torch.from_numpy(a.astype(np.float64)).requires_grad_(True) for a in arrays])


def _assert_matches(out, t_out, ours, theirs, dtype, g):
    """Forward values, then every gradient of sum(out * g)."""
    rtol, atol = LLAMA_TOLERANCES[dtype]
    out.backward(g)
    t_out.backward(torch.from_numpy(g.astype(np.float64)))
    assert out.data.dtype == dtype
    np.testing.assert_allclose(out.data, t_out.detach().numpy(), rtol=rtol, atol=atol)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.grad.dtype == dtype
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=rtol, atol=atol, err_msg=f"gradient {i}")


@pytest.mark.parametrize("dtype", list(LLAMA_TOLERANCES))
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 64), (2, 7, 576)])
def test_rms_norm_matches_hugging_face(dtype, shape):
    rng = np.random.default_rng(4)
    (x, w), (tx, tw) = _leaves(rng, dtype, shape, shape[-1:], scale=2.0)
    g = rng.standard_normal(shape).astype(dtype)
    _assert_matches(ops.rms_norm(x, w, 1e-6), _hf_rms_norm(tx, tw, 1e-6), [x, w], [tx, tw], dtype, g)


@pytest.mark.parametrize("dtype", list(LLAMA_TOLERANCES))
@pytest.mark.parametrize("shape", [(1,), (4, 9), (2, 5, 1536)])
def test_silu_mul_matches_hugging_face(dtype, shape):
    """act_fn(gate) * up with Llama's hidden_act "silu" (torch's F.silu); gates to +-40 and beyond."""
    rng = np.random.default_rng(5)
    (gate, up), (t_gate, t_up) = _leaves(rng, dtype, shape, shape, scale=4.0)
    gate.data.flat[:4] = (-100.0, -40.0, 40.0, 100.0)[: gate.size]
    t_gate.data.view(-1)[:4] = torch.tensor((-100.0, -40.0, 40.0, 100.0)[: gate.size], dtype=torch.float64)
    g = rng.standard_normal(shape).astype(dtype)
    _assert_matches(ops.silu_mul(gate, up), torch.nn.functional.silu(t_gate) * t_up, [gate, up], [t_gate, t_up],
                    dtype, g)


@pytest.mark.parametrize("dtype", list(LLAMA_TOLERANCES))
@pytest.mark.parametrize("B,T,H,hd", [(1, 1, 1, 2), (2, 9, 3, 64), (2, 40, 4, 6)])
def test_rope_matches_hugging_face(dtype, B, T, H, hd):
    """ops.rope on the half-tables against apply_rotary_pos_emb on Hugging Face's full ones."""
    rng = np.random.default_rng(6)
    (x,), (tx,) = _leaves(rng, dtype, (B, T, H * hd))
    cos, sin = _hf_rope_tables(T, hd)
    half_cos, half_sin = (t[:, : hd // 2].numpy().astype(dtype) for t in (cos, sin))
    g = rng.standard_normal(x.shape).astype(dtype)
    _assert_matches(ops.rope(x, half_cos, half_sin, H), _join(_hf_apply_rope(_split(tx, H), cos, sin)), [x], [tx],
                    dtype, g)


@pytest.mark.parametrize("dtype", list(LLAMA_TOLERANCES))
@pytest.mark.parametrize("B,T,H,Hkv,hd", [(2, 17, 4, 2, 8), (1, 33, 3, 1, 16), (2, 40, 9, 3, 64), (2, 12, 2, 2, 10)])
def test_grouped_query_attention_matches_hugging_face(model_path, dtype, B, T, H, Hkv, hd):
    """RoPE on q and k, then causal attention with k and v shared by groups of query heads: Llama's
    attention core (repeat_kv + eager attention in torch), on the fused and the NumPy paths."""
    rng = np.random.default_rng(7)
    (q, k, v), tensors = _leaves(rng, dtype, (B, T, H * hd), (B, T, Hkv * hd), (B, T, Hkv * hd))
    tq, tk, tv = tensors
    cos, sin = _hf_rope_tables(T, hd)
    half_cos, half_sin = (t[:, : hd // 2].numpy().astype(dtype) for t in (cos, sin))
    out = ops.causal_attention(ops.rope(q, half_cos, half_sin, H), ops.rope(k, half_cos, half_sin, Hkv), v, H, Hkv)
    t_out = _join(_hf_attention(_hf_apply_rope(_split(tq, H), cos, sin), _hf_apply_rope(_split(tk, Hkv), cos, sin),
                                _split(tv, Hkv), H // Hkv))
    g = rng.standard_normal(out.shape).astype(dtype)
    _assert_matches(out, t_out, [q, k, v], tensors, dtype, g)
