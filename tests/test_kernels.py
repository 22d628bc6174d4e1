"""Every model kernel against its NumPy twin: float32/float64, odd shapes, non-contiguous inputs."""
import numpy as np
import pytest

from conftest import assert_close
from fastlora import kernels, reference

DTYPES = [np.float32, np.float64]
ROW_SHAPES = [(1, 1), (3, 7), (17, 33), (64, 96)]


def _noncontig(a):
    """The same values as `a`, as a strided view of a bigger array."""
    big = np.zeros(a.shape[:-1] + (a.shape[-1] * 2,), dtype=a.dtype)
    big[..., ::2] = a
    view = big[..., ::2]
    assert not view.flags.c_contiguous or a.shape[-1] == 1
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_layernorm_matches_reference(rng, dtype, shape, contiguous):
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    w, b = rng.standard_normal(shape[1]).astype(dtype), rng.standard_normal(shape[1]).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    xin = x if contiguous else _noncontig(x)
    out, mean, rstd = kernels.layernorm_forward(xin, w, b)
    ref_out, ref_mean, ref_rstd = reference.layernorm_forward(x, w, b)
    assert out.dtype == dtype
    for got, want in [(out, ref_out), (mean, ref_mean), (rstd, ref_rstd)]:
        assert_close(got, want, scale=10)
    fast = kernels.layernorm_backward(dout if contiguous else _noncontig(dout), xin, mean, rstd, w)
    slow = reference.layernorm_backward(dout, x, mean, rstd, w)
    for got, want in zip(fast, slow):
        assert_close(got, want, scale=100)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 5), (3, 4, 129)])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_matches_reference(rng, dtype, shape, approximate):
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    want = reference.gelu_forward(x, approximate)
    assert_close(kernels.gelu_forward(x, approximate), want, scale=10)
    assert_close(kernels.gelu_forward(_noncontig(x), approximate), want, scale=10)
    assert_close(kernels.gelu_backward(_noncontig(dout), x, approximate),
                 reference.gelu_backward(dout, x, approximate), scale=10)


def test_gelu_default_is_tanh(rng):
    x = rng.standard_normal(33)
    np.testing.assert_array_equal(kernels.gelu_forward(x), kernels.gelu_forward(x, "tanh"))
    np.testing.assert_array_equal(kernels.gelu_backward(x, x), kernels.gelu_backward(x, x, "tanh"))
    assert not np.allclose(kernels.gelu_forward(x), kernels.gelu_forward(x, "none"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_saturates_for_large_inputs(dtype, approximate):
    """Where erf/tanh round to +-1: gelu(x) = x, gelu(-x) = 0, gradients 1 and 0, nothing NaN."""
    big = np.array([10.0, 37.5, 1e4, 3e4], dtype=dtype)
    x = np.concatenate([big, -big])
    out, dx = kernels.gelu_forward(x, approximate), kernels.gelu_backward(np.ones_like(x), x, approximate)
    np.testing.assert_array_equal(out, np.concatenate([big, np.zeros_like(big)]))
    np.testing.assert_allclose(dx, np.concatenate([np.ones_like(big), np.zeros_like(big)]), rtol=0, atol=1e-20)
    assert_close(out, reference.gelu_forward(x, approximate))
    assert_close(dx, reference.gelu_backward(np.ones_like(x), x, approximate), dtype=dtype)


def test_exact_gelu_float32_is_accurate():
    """The float32 erf fit, on a dense sweep, against the float64 GELU: errors within 4 float32
    epsilons of max(1, |x|) (an exhaustive sweep finds about 2). Relative to the output that is
    a few ulp for x > 0; for x < 0 it is absolute, as 1 + erf cancels (in torch's float32 too)."""
    x = np.concatenate([np.linspace(-12, 12, 240_001), [-1e4, -1e-30, 0.0, 1e-30, 1e4]]).astype(np.float32)
    x64 = x.astype(np.float64)
    bound = 4 * np.finfo(np.float32).eps * np.maximum(1.0, np.abs(x64))
    for got, want in [(kernels.gelu_forward(x, "none"), reference.gelu_forward(x64, "none")),
                      (kernels.gelu_backward(np.ones_like(x), x, "none"),
                       reference.gelu_backward(np.ones_like(x64), x64, "none"))]:
        err = np.abs(got - want)
        assert np.all(err <= bound), f"{err.max():.3g} at x = {x[np.argmax(err / bound)]}"


@pytest.mark.parametrize("lib", [kernels, reference])
@pytest.mark.parametrize("bad", ["erf", "exact", "None", None, True])
def test_gelu_rejects_unknown_approximation(lib, bad):
    x = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"approximate must be 'none' \(exact, erf\) or 'tanh', got"):
        lib.gelu_forward(x, bad)
    with pytest.raises(ValueError, match="approximate must be"):
        lib.gelu_backward(x, x, bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5, 5), (4, 17, 17)])
@pytest.mark.parametrize("scale", [0.37, 0.0, -0.8])  # the kernel takes the row maximum unscaled when scale >= 0
def test_causal_softmax_matches_reference(rng, dtype, shape, scale):
    scores = (rng.standard_normal(shape) * 5).astype(dtype)
    probs = kernels.causal_softmax_forward(scores, scale)
    assert_close(probs, reference.causal_softmax_forward(scores, scale), scale=10)
    T = shape[-1]
    assert np.all(probs[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    dprobs = rng.standard_normal(shape).astype(dtype)
    assert_close(kernels.causal_softmax_backward(probs, dprobs, scale),
                 reference.causal_softmax_backward(probs, dprobs, scale), scale=10)


def test_causal_softmax_many_threads_matches_one(rng):
    """The prange path (big input) and the plain loop agree exactly."""
    from fastlora._ext import attention_softmax
    s = rng.standard_normal((8, 64, 64)).astype(np.float32)
    one, two = np.empty_like(s), np.empty_like(s)
    attention_softmax.causal_softmax_forward(one, s, 0.5, 1)
    attention_softmax.causal_softmax_forward(two, s, 0.5, 2)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 3), (2, 5, 11), (3, 9, 257)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_cross_entropy_matches_reference(rng, dtype, shape, contiguous):
    B, T, V = shape
    logits = (rng.standard_normal(shape) * 3).astype(dtype)
    labels = rng.integers(0, V, size=(B, T))
    labels[rng.random((B, T)) < 0.3] = -100
    labels[0, 1] = 3 % V  # at least one scored position
    loss, count, dlogits = kernels.cross_entropy_forward(logits if contiguous else _noncontig(logits), labels)
    ref_loss, ref_count, ref_d = reference.cross_entropy_forward(logits, labels)
    assert count == ref_count
    assert_close(loss, ref_loss, dtype=dtype, scale=10)
    assert_close(dlogits, ref_d, scale=10)
    no_grad_loss, _, none = kernels.cross_entropy_forward(logits, labels, compute_grad=False)
    assert none is None and no_grad_loss == pytest.approx(loss, rel=1e-6)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]]], dtype=np.float32)
    loss, _, d = kernels.cross_entropy_forward(logits, np.array([[0, 1]]))
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    assert loss == pytest.approx(1e4, rel=1e-6)


@pytest.mark.parametrize("bad_label", [7, -1, -101])
def test_cross_entropy_rejects_out_of_range_labels(bad_label):
    logits = np.zeros((1, 3, 7), dtype=np.float32)
    with pytest.raises(ValueError, match=r"labels\[0, 2\] = .* outside \[0, 7\)"):
        kernels.cross_entropy_forward(logits, np.array([[0, 1, bad_label]]))


def test_kernels_reject_bad_input():
    x = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        kernels.layernorm_forward(x.astype(np.int32), np.ones(3, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        kernels.layernorm_forward(x, np.ones(4, np.float32), np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="weight must have dtype float32"):
        kernels.layernorm_forward(x, np.ones(3), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="square"):
        kernels.causal_softmax_forward(np.zeros((2, 3, 4)), 1.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(1, 3\)"):
        kernels.cross_entropy_forward(np.zeros((1, 3, 5)), np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="labels must be an integer array"):
        kernels.cross_entropy_forward(np.zeros((1, 3, 5)), np.zeros((1, 3)))


# --- the fused linear + cross-entropy (the LM head and its loss) ---------------------------------

def _head_case(rng, dtype, B, T, D, V, masked=0.3):
    hidden = rng.standard_normal((B, T, D)).astype(dtype)
    weight = (rng.standard_normal((V, D)) * 0.5).astype(dtype)
    labels = rng.integers(0, V, size=(B, T))
    labels[rng.random((B, T)) < masked] = -100
    labels[0, 1] = V - 1  # at least one scored position, and the last class
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 1, 3), (2, 5, 7, 11), (3, 9, 16, 257)])
@pytest.mark.parametrize("chunk_rows", [None, 1, 4])
@pytest.mark.parametrize("contiguous", [True, False])
def test_linear_cross_entropy_matches_reference(rng, dtype, shape, chunk_rows, contiguous):
    hidden, weight, labels = _head_case(rng, dtype, *shape)
    h_in, w_in = (hidden, weight) if contiguous else (_noncontig(hidden), _noncontig(weight))
    loss, count, dh, dw = kernels.linear_cross_entropy_forward(h_in, w_in, labels, chunk_rows=chunk_rows)
    ref_loss, ref_count, ref_dh, ref_dw = reference.linear_cross_entropy_forward(hidden, weight, labels)
    assert count == ref_count
    assert dh.dtype == dw.dtype == dtype and dh.shape == hidden.shape and dw.shape == weight.shape
    assert_close(loss, ref_loss, dtype=dtype, scale=10)
    assert_close(dh, ref_dh, scale=10)
    assert_close(dw, ref_dw, scale=10)
    no_grad_loss, no_grad_count, none_h, none_w = kernels.linear_cross_entropy_forward(
        hidden, weight, labels, compute_grad=False, chunk_rows=chunk_rows)
    assert none_h is None and none_w is None and no_grad_count == count
    assert no_grad_loss == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_is_cross_entropy_of_the_logits(rng, dtype):
    """The fused head gives what the unfused path gives: cross-entropy of hidden @ W^T, and the
    gradient of the logits carried back through the product."""
    hidden, weight, labels = _head_case(rng, dtype, 2, 13, 10, 37)
    loss, count, dh, dw = kernels.linear_cross_entropy_forward(hidden, weight, labels, chunk_rows=5)
    want_loss, want_count, dlogits = kernels.cross_entropy_forward(hidden @ weight.T, labels)
    assert count == want_count
    assert_close(loss, want_loss, dtype=dtype, scale=10)
    assert_close(dh, dlogits @ weight, scale=10)
    assert_close(dw, np.einsum("btv,btd->vd", dlogits, hidden), scale=10)


def test_linear_cross_entropy_multiplies_only_the_rows_that_score(rng, monkeypatch):
    """A position whose next label is -100 (and the last of each row) gets no logits at all:
    every product sees only the scored rows, a chunk at a time, and never (B, T, V)."""
    from fastlora import _linear_ce
    hidden, weight, labels = _head_case(rng, np.float32, 2, 16, 8, 50, masked=0.0)
    labels[:, :10] = -100  # 2 rows x 6 scored positions (t = 9..14)
    seen = []
    original = _linear_ce.gemm.matmul

    def spy(a, b, **kw):
        seen.append((a.shape, b.shape))
        return original(a, b, **kw)

    monkeypatch.setattr(_linear_ce.gemm, "matmul", spy)
    _, count, dh, _ = kernels.linear_cross_entropy_forward(hidden, weight, labels, chunk_rows=5)
    assert count == 12
    logits_products = [a for a, b in seen if b == weight.shape and a[1] == 8]
    assert [a[0] for a in logits_products] == [5, 5, 2]  # the 12 rows in chunks of 5
    assert max(a[0] * a[1] for a, _ in seen) <= 5 * 50
    scored = np.zeros((2, 16), bool)
    scored[:, 9:15] = True
    assert np.all(dh[~scored] == 0) and np.all(np.abs(dh[scored]).sum(-1) > 0)


def test_linear_cross_entropy_argmax_is_numpys(rng):
    from fastlora import _linear_ce
    h = rng.standard_normal((9, 6)).astype(np.float32)
    w = rng.standard_normal((13, 6)).astype(np.float32)
    w[5] = w[2]  # a tie: the first index wins, as np.argmax
    h[0] = w[2]
    targets = rng.integers(0, 13, 9)
    argmax = np.empty(9, np.int64)
    _linear_ce.forward(h, w, targets, 1.0, False, False, chunk_rows=4, argmax=argmax)
    np.testing.assert_array_equal(argmax, np.argmax(h @ w.T, axis=-1))


def test_linear_cross_entropy_is_stable_for_huge_logits():
    hidden = np.array([[[1.0], [0.0]]], dtype=np.float32)
    weight = np.array([[1e4], [0.0], [-1e4]], dtype=np.float32)
    loss, _, dh, dw = kernels.linear_cross_entropy_forward(hidden, weight, np.array([[0, 1]]))
    assert loss == pytest.approx(1e4, rel=1e-6)
    assert np.all(np.isfinite(dh)) and np.all(np.isfinite(dw))


@pytest.mark.parametrize("lib", [kernels, reference])
def test_linear_cross_entropy_rejects_the_same_bad_input(lib):
    hidden, weight = np.zeros((1, 3, 4), np.float32), np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match=r"weight must be \(V, 4\)"):
        lib.linear_cross_entropy_forward(hidden, np.zeros((5, 3), np.float32), np.zeros((1, 3), np.int64))
    with pytest.raises(ValueError, match=r"labels must have shape \(1, 3\)"):
        lib.linear_cross_entropy_forward(hidden, weight, np.zeros((1, 4), np.int64))
    with pytest.raises(ValueError, match="outside"):
        lib.linear_cross_entropy_forward(hidden, weight, np.array([[0, 5, 1]]))


def test_linear_cross_entropy_wrapper_rejects_bad_dtypes():
    hidden, weight, labels = np.zeros((1, 3, 4), np.float32), np.zeros((5, 4), np.float32), np.zeros((1, 3), np.int64)
    with pytest.raises(TypeError, match="weight must have dtype float32"):
        kernels.linear_cross_entropy_forward(hidden, weight.astype(np.float64), labels)
    with pytest.raises(ValueError, match="hidden must be 3-D"):
        kernels.linear_cross_entropy_forward(hidden[0], weight, labels)
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        kernels.linear_cross_entropy_forward(hidden, weight, labels, chunk_rows=0)
    loss, count, _, _ = kernels.linear_cross_entropy_forward(hidden, weight, np.full((1, 3), -100))
    assert count == 0 and np.isnan(loss)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids_shape,V,D", [((1,), 1, 1), ((3, 5), 4, 7), ((2, 64), 100, 33)])
def test_embedding_backward_matches_reference(rng, dtype, ids_shape, V, D):
    ids = rng.integers(0, V, size=ids_shape)
    ids.flat[0] = ids.flat[-1]  # a repeated id adds into one row
    g = rng.standard_normal(ids_shape + (D,)).astype(dtype)
    got = kernels.embedding_backward(g, ids, V)
    assert got.dtype == dtype and got.shape == (V, D)
    assert_close(got, reference.embedding_backward(g, ids, V), scale=10)


def test_embedding_backward_rejects_bad_input():
    g = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"ids holds 9, outside \[0, 5\)"):
        kernels.embedding_backward(g, np.array([[0, 1, 9], [1, 2, 3]]), 5)
    with pytest.raises(ValueError, match=r"g must have shape"):
        kernels.embedding_backward(g, np.zeros((2, 2), np.int64), 5)
    with pytest.raises(TypeError, match="ids must be an integer array"):
        kernels.embedding_backward(g, np.zeros((2, 3)), 5)


# --- Llama-family kernels: RMSNorm, the SiLU gate, RoPE ----------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_rmsnorm_matches_reference(rng, dtype, shape, contiguous):
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    w = rng.standard_normal(shape[1]).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    xin = x if contiguous else _noncontig(x)
    out, rstd = kernels.rmsnorm_forward(xin, w, 1e-5)
    ref_out, ref_rstd = reference.rmsnorm_forward(x, w, 1e-5)
    assert out.dtype == rstd.dtype == dtype and rstd.shape == (shape[0],)
    assert_close(out, ref_out, scale=10)
    assert_close(rstd, ref_rstd, scale=10)
    fast = kernels.rmsnorm_backward(dout if contiguous else _noncontig(dout), xin, rstd, w)
    slow = reference.rmsnorm_backward(dout, x, rstd, w)
    for name, got, want in zip(["dx", "dweight"], fast, slow):
        assert_close(got, want, scale=100, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 5), (3, 4, 129)])
def test_silu_mul_matches_reference(rng, dtype, shape):
    gate = (rng.standard_normal(shape) * 4).astype(dtype)
    up, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    want = reference.silu_mul_forward(gate, up)
    assert_close(kernels.silu_mul_forward(gate, up), want, scale=10)
    assert_close(kernels.silu_mul_forward(_noncontig(gate), _noncontig(up)), want, scale=10)
    fast = kernels.silu_mul_backward(_noncontig(dout), gate, up)
    for name, got, want in zip(["dgate", "dup"], fast, reference.silu_mul_backward(dout, gate, up)):
        assert got.dtype == dtype
        assert_close(got, want, scale=10, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_saturates_for_large_gates(dtype):
    """Where sigmoid rounds to 1 (g >= 40) silu(g) = g and dgate = up exactly; for -g it tends
    to 0 (past exp's range too: 1e4, 1e30), never NaN."""
    big = np.array([40.0, 100.0, 1e4, 1e30], dtype=dtype)
    gate, up = np.concatenate([big, -big]), np.full(8, 1.5, dtype)
    out = kernels.silu_mul_forward(gate, up)
    dgate, dup = kernels.silu_mul_backward(np.ones_like(gate), gate, up)
    np.testing.assert_array_equal(out[:4], 1.5 * big)
    np.testing.assert_array_equal(dgate[:4], 1.5)
    np.testing.assert_array_equal(dup[:4], big)
    for got in (out[4:], dgate[4:], dup[4:]):
        np.testing.assert_allclose(got, 0.0, rtol=0, atol=1e-15)
    assert_close(out, reference.silu_mul_forward(gate, up))
    for got, want in zip((dgate, dup), reference.silu_mul_backward(np.ones_like(gate), gate, up)):
        assert_close(got, want, dtype=dtype)


def _rope_tables(T, hd, dtype, theta=10000.0):
    """Hugging Face's half-tables: angle[t, i] = t / theta^(2i / hd)."""
    angles = np.arange(T)[:, None] / theta ** (np.arange(0, hd, 2) / hd)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,hd", [(1, 1, 1, 2), (2, 5, 3, 8), (3, 17, 4, 14), (1, 33, 9, 64)])
def test_rope_matches_reference(rng, dtype, B, T, H, hd):
    x, dout = (rng.standard_normal((B, T, H * hd)).astype(dtype) for _ in range(2))
    cos, sin = _rope_tables(T, hd, dtype)
    want = reference.rope_forward(x, cos, sin, H)
    assert_close(kernels.rope_forward(x, cos, sin, H), want, scale=10)
    assert_close(kernels.rope_forward(_noncontig(x), _noncontig(cos), sin, H), want, scale=10)
    dx = kernels.rope_backward(_noncontig(dout), cos, _noncontig(sin), H)
    assert dx.dtype == dtype
    assert_close(dx, reference.rope_backward(dout, cos, sin, H), scale=10)
    # a rotation: its gradient is the inverse rotation, so backward undoes forward
    assert_close(kernels.rope_backward(kernels.rope_forward(x, cos, sin, H), cos, sin, H), x, scale=10)


@pytest.mark.parametrize("run", [
    lambda ext, x, y, z, n: ext.rmsnorm.rmsnorm_forward(y, np.empty(x.shape[0], x.dtype), x, z[0], 1e-6, n),
    lambda ext, x, y, z, n: ext.rmsnorm.rmsnorm_backward(y, np.zeros_like(z[0]), z, x, np.abs(z[:, 0]) + 1,
                                                         z[0], n),
    lambda ext, x, y, z, n: ext.swiglu.silu_mul_backward(y.reshape(-1), np.empty(x.size), x.reshape(-1),
                                                         z.reshape(-1), x.reshape(-1), n),
    lambda ext, x, y, z, n: ext.rope.rope_backward(y.reshape(4, 50, 96), x.reshape(4, 50, 96),
                                                   np.ascontiguousarray(z[:50, :8]), z[50:100, :8].copy(), 6, n),
], ids=["rmsnorm_forward", "rmsnorm_backward", "silu_mul_backward", "rope_backward"])
def test_llama_kernels_on_many_threads_match_one(rng, run):
    """The prange paths (num_threads > 1) give the plain loop's numbers exactly."""
    import fastlora._ext as ext
    x, z = rng.standard_normal((200, 96)), rng.standard_normal((200, 96))
    one, two = np.empty_like(x), np.empty_like(x)
    run(ext, x, one, z, 1)
    run(ext, x, two, z, 2)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("lib", [kernels, reference])
def test_llama_kernels_reject_the_same_bad_input(lib):
    x = np.zeros((2, 3, 12), np.float32)
    cos, sin = np.ones((3, 2), np.float32), np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="num_heads=5 must divide D=12"):
        lib.rope_forward(x, cos, sin, 5)
    with pytest.raises(ValueError, match="the head size 3 .*must be even"):
        lib.rope_forward(x, np.ones((3, 1), np.float32), np.ones((3, 1), np.float32), 4)
    with pytest.raises(ValueError, match=r"cos must have shape \(3, 2\)"):
        lib.rope_backward(x, np.ones((4, 2), np.float32), sin, 3)
    with pytest.raises(ValueError, match=r"sin must have shape \(3, 2\)"):
        lib.rope_forward(x, cos, np.ones((3, 3), np.float32), 3)
    with pytest.raises(ValueError, match=r"up must have shape \(2, 3, 12\)"):
        lib.silu_mul_forward(x, x[:, :2])
    with pytest.raises(ValueError, match=r"up must have shape \(2, 3, 12\)"):
        lib.silu_mul_backward(x, x, x[..., :6])
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        lib.rmsnorm_forward(x[0], np.ones(12, np.float32), 0)


def test_llama_ops_reject_mismatched_operands():
    from fastlora.autograd import Tensor, ops
    x, cos = Tensor(np.zeros((2, 3, 12), np.float32)), np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \(12,\)"):
        ops.rms_norm(x, Tensor(np.ones(6, np.float32)), 1e-6)
    with pytest.raises(ValueError, match=r"silu_mul: up must have gate's shape \(2, 3, 12\)"):
        ops.silu_mul(x, Tensor(np.zeros((2, 3, 6), np.float32)))
    with pytest.raises(ValueError, match=r"rope: x must be \(B, T, H \* hd\)"):
        ops.rope(Tensor(np.zeros((3, 12), np.float32)), cos, cos, 3)
    with pytest.raises(ValueError, match=r"cos must have shape \(3, 2\)"):
        ops.rope(x, cos[:2], cos, 3)
    with pytest.raises(ValueError, match=r"k must have shape \(2, 3, 4\)"):
        ops.causal_attention(x, x, x, 3, 1)
    with pytest.raises(ValueError, match="num_kv_heads=2 must divide num_heads=3"):
        ops.causal_attention(x, x, x, 3, 2)


def test_llama_kernel_wrappers_reject_bad_dtypes_and_shapes():
    x = np.zeros((2, 3, 12), np.float32)
    cos = np.ones((3, 2), np.float32)
    with pytest.raises(TypeError, match="cos must have dtype float32"):
        kernels.rope_forward(x, cos.astype(np.float64), cos, 3)
    with pytest.raises(ValueError, match=r"x must be 3-D"):
        kernels.rope_forward(x[0], cos, cos, 3)
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 2.0"):
        kernels.rope_forward(x, cos, cos, 2.0)
    with pytest.raises(TypeError, match="up must have dtype float32"):
        kernels.silu_mul_forward(x, x.astype(np.float64))
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 3, 12\)"):
        kernels.silu_mul_backward(x[:1], x, x)
    with pytest.raises(ValueError, match=r"weight must have shape \(12,\)"):
        kernels.rmsnorm_forward(x[0], np.ones(11, np.float32))
    with pytest.raises(ValueError, match="x must be 2-D"):
        kernels.rmsnorm_forward(x, np.ones(12, np.float32))
    with pytest.raises(ValueError, match=r"rstd must have shape \(3,\)"):
        kernels.rmsnorm_backward(x[0], x[0], np.ones(2, np.float32), np.ones(12, np.float32))
