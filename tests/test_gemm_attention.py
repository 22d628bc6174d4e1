"""The BLAS-calling kernels against their NumPy twins: the OpenMP-split GEMM (csrc/gemm.pyx)
and the fused causal attention (csrc/attention.pyx), on both code paths (fused and NumPy's)."""
import numpy as np
import pytest

from conftest import assert_close
from fastlora import kernels, reference
from fastlora._runtime import attention as _attention, blas as _blas, gemm as _gemm

DTYPES = [np.float32, np.float64]
needs_fused = pytest.mark.skipif(not _gemm.fused_available(),
                                 reason="NumPy's BLAS is not an OpenBLAS fastlora can call directly")


# --- GEMM ------------------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (3, 5, 7), (33, 17, 65), (300, 70, 40), (64, 600, 90), (700, 129, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_matches_numpy(rng, path, threads, dtype, m, n, k, trans_a, trans_b):
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    got = _gemm.matmul(a, b, trans_a, trans_b)
    assert got.shape == (m, n) and got.dtype == dtype
    assert_close(got, want, scale=max(k, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_writes_a_column_block_of_a_wider_array(rng, path, threads, dtype):
    a, b = rng.standard_normal((200, 48)).astype(dtype), rng.standard_normal((30, 48)).astype(dtype)
    wide = np.full((200, 100), 7.0, dtype=dtype)
    _gemm.matmul(a, b, trans_b=True, out=wide[:, 40:70])
    assert_close(wide[:, 40:70], a.astype(np.float64) @ b.T.astype(np.float64), scale=48)
    assert np.all(wide[:, :40] == 7.0) and np.all(wide[:, 70:] == 7.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_accumulates_into_out(rng, path, threads, dtype):
    a, b = rng.standard_normal((150, 40)).astype(dtype), rng.standard_normal((40, 70)).astype(dtype)
    start = rng.standard_normal((150, 70)).astype(dtype)
    out = start.copy()
    assert _gemm.matmul(a, b, out=out, accumulate=True) is out
    assert_close(out, start.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64), scale=40)
    with pytest.raises(ValueError, match="accumulate=True needs the array to add to as out"):
        _gemm.matmul(a, b, accumulate=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (70, 33, 9), (40, 300, 20), (5, 3, 0)])
def test_gemm_adds_a_bias_to_every_row(rng, path, threads, dtype, m, n, k):
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((n, k)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    want = a.astype(np.float64) @ b.T.astype(np.float64) + bias
    assert_close(_gemm.matmul(a, b, trans_b=True, bias=bias), want, scale=max(k, 1))
    wide = np.full((m, n + 10), 7.0, dtype=dtype)
    _gemm.matmul(a, b, trans_b=True, bias=bias, out=wide[:, 5:5 + n])
    assert_close(wide[:, 5:5 + n], want, scale=max(k, 1))
    assert np.all(wide[:, :5] == 7.0) and np.all(wide[:, 5 + n:] == 7.0)


def test_gemm_refuses_a_bias_of_the_wrong_shape_or_with_accumulate(path):
    a = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"bias must be \(4,\) float32"):
        _gemm.matmul(a, a, trans_b=True, bias=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="not combined with accumulate"):
        _gemm.matmul(a, a, trans_b=True, bias=np.ones(4, np.float32), out=np.zeros((4, 4), np.float32),
                     accumulate=True)


def test_gemm_with_nothing_to_sum_writes_zeros_or_adds_nothing(path):
    a, b = np.ones((5, 0), np.float32), np.ones((0, 3), np.float32)
    out = np.full((5, 3), 7.0, np.float32)
    assert np.all(_gemm.matmul(a, b, out=out, accumulate=True) == 7.0)
    assert np.all(_gemm.matmul(a, b, out=out) == 0.0)


def test_gemm_refuses_mismatched_shapes(path):
    with pytest.raises(ValueError, match=r"op\(a\) is \(3, 4\) but op\(b\) is \(5, 2\)"):
        _gemm.matmul(np.ones((3, 4), np.float32), np.ones((5, 2), np.float32))
    with pytest.raises(ValueError, match=r"out must be \(3, 2\)"):
        _gemm.matmul(np.ones((3, 4), np.float32), np.ones((4, 2), np.float32), out=np.empty((2, 3), np.float32))


def test_gemm_accepts_noncontiguous_operands(rng, path):
    big = rng.standard_normal((40, 60)).astype(np.float32)
    a, b = big[::2, ::3], big[1::2, 1::3].T  # strided views; copied once, then one GEMM
    assert_close(_gemm.matmul(a, b), a.astype(np.float64) @ b.astype(np.float64), scale=20)


# --- fused causal attention ------------------------------------------------------------------

# (B, T, D, H): T around the kernel's 32-row blocks (1, 31, 32, 33, 100), one head, many heads;
# head sizes 4, 8, 12, 20 and 66 cover small_gemm.h's column blocks of 16, of 8 and the rest
ATTENTION_SHAPES = [(1, 1, 4, 1), (2, 31, 12, 3), (1, 32, 8, 2), (3, 33, 16, 4), (2, 100, 24, 6), (4, 64, 32, 4),
                    (2, 50, 36, 3), (1, 37, 40, 2), (2, 40, 66, 1)]


@pytest.fixture(params=["own loops", "blas"])
def forward_products(request, monkeypatch):
    """The fused forward's two ways of multiplying (fastlora._runtime.attention.blas_products)."""
    monkeypatch.setattr(_attention, "blas_products", lambda head_dim: request.param == "blas")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D,H", ATTENTION_SHAPES)
def test_attention_matches_reference(rng, path, threads, forward_products, dtype, B, T, D, H):
    q, k, v, dout = ((rng.standard_normal((B, T, D)) * 2).astype(dtype) for _ in range(4))
    out, probs = kernels.causal_attention_forward(q, k, v, H)
    ref_out, ref_probs = reference.causal_attention_forward(q, k, v, H)
    assert out.dtype == dtype and probs.shape == (B * H, T, T)
    assert_close(out, ref_out, scale=10)
    assert_close(probs, ref_probs, scale=10)
    above = np.triu_indices(T, 1)
    assert np.all(probs[:, above[0], above[1]] == 0)  # written whole: zeros above the diagonal
    got = kernels.causal_attention_backward(dout, probs, q, k, v, H)
    want = reference.causal_attention_backward(dout, ref_probs, q, k, v, H)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, scale=100, err_msg=f"d{name}")


# (B, T, H, Hkv, hd): grouped-query (GQA) and multi-query (MQA, Hkv = 1) attention; head sizes
# that the projections' widths do not give (Llama's head_dim is its own), T around the blocks
GQA_SHAPES = [(1, 1, 2, 1, 4), (2, 31, 6, 2, 12), (1, 33, 4, 1, 8), (3, 40, 9, 3, 20), (2, 70, 8, 4, 66)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,Hkv,hd", GQA_SHAPES)
def test_grouped_query_attention_matches_reference(rng, path, threads, forward_products, dtype, B, T, H, Hkv, hd):
    """The reference repeats each key/value head for its query heads; the kernels read it in place."""
    q, dout = ((rng.standard_normal((B, T, H * hd)) * 2).astype(dtype) for _ in range(2))
    k, v = ((rng.standard_normal((B, T, Hkv * hd)) * 2).astype(dtype) for _ in range(2))
    out, probs = kernels.causal_attention_forward(q, k, v, H, Hkv)
    ref_out, ref_probs = reference.causal_attention_forward(q, k, v, H, Hkv)
    assert out.shape == q.shape and probs.shape == (B * H, T, T)
    assert_close(out, ref_out, scale=10)
    assert_close(probs, ref_probs, scale=10)
    got = kernels.causal_attention_backward(dout, probs, q, k, v, H, Hkv)
    want = reference.causal_attention_backward(dout, ref_probs, q, k, v, H, Hkv)
    for name, g, w, like in zip("qkv", got, want, (q, k, v)):
        assert g.shape == like.shape and g.dtype == dtype
        assert_close(g, w, scale=100, err_msg=f"d{name}")


def test_as_many_kv_heads_as_heads_is_plain_attention(rng, path):
    q, k, v, dout = (rng.standard_normal((2, 20, 12)) for _ in range(4))
    plain = kernels.causal_attention_forward(q, k, v, 3)
    same = kernels.causal_attention_forward(q, k, v, 3, 3)
    for a, b in zip(plain + kernels.causal_attention_backward(dout, plain[1], q, k, v, 3),
                    same + kernels.causal_attention_backward(dout, same[1], q, k, v, 3, 3)):
        np.testing.assert_array_equal(a, b)


@needs_fused
@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_fused_gqa_is_the_same_for_any_row_block(rng, monkeypatch, threads, block):
    q, dout = (rng.standard_normal((2, 70, 24)) for _ in range(2))
    k, v = (rng.standard_normal((2, 70, 8)) for _ in range(2))
    monkeypatch.setattr(_attention, "row_block", lambda T: block)
    out, probs = _attention.forward(q, k, v, 6, 2, fused=True)
    ref_out, ref_probs = reference.causal_attention_forward(q, k, v, 6, 2)
    assert_close(out, ref_out, scale=10)
    for got, want in zip(_attention.backward(dout, probs, q, k, v, 6, 2, fused=True),
                         reference.causal_attention_backward(dout, ref_probs, q, k, v, 6, 2)):
        assert_close(got, want, scale=100)


@needs_fused
@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_fused_attention_is_the_same_for_any_row_block(rng, monkeypatch, threads, block):
    q, k, v, dout = (rng.standard_normal((2, 70, 12)).astype(np.float64) for _ in range(4))
    monkeypatch.setattr(_attention, "row_block", lambda T: block)
    out, probs = _attention.forward(q, k, v, 3, fused=True)
    ref_out, ref_probs = reference.causal_attention_forward(q, k, v, 3)
    assert_close(out, ref_out, scale=10)
    assert_close(probs, ref_probs, scale=10)
    for got, want in zip(_attention.backward(dout, probs, q, k, v, 3, fused=True),
                         reference.causal_attention_backward(dout, ref_probs, q, k, v, 3)):
        assert_close(got, want, scale=100)


def test_fused_attention_refuses_a_row_block_below_one():
    from fastlora._ext import attention as fused
    q = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="block must be >= 1, got 0"):
        fused.attention_forward(np.empty_like(q), np.empty((1, 4, 4), np.float32), np.empty((1, 4, 4), np.float32),
                                q, q, q, 1, 1.0, 1, 0)


def test_fused_attention_refuses_a_short_scratch():
    from fastlora._ext import attention as fused
    q = np.zeros((1, 4, 8), np.float32)  # one head of 8: forward needs (threads, 16, 4), backward (threads, 4, 4)
    with pytest.raises(ValueError, match=r"scratch must be at least \(2, 16, 4\), got \(1, 8, 4\)"):
        fused.attention_forward(np.empty_like(q), np.empty((1, 4, 4), np.float32), np.empty((1, 8, 4), np.float32),
                                q, q, q, 1, 1.0, 2, 4)
    with pytest.raises(ValueError, match=r"scratch must be at least \(1, 4, 4\), got \(1, 3, 4\)"):
        fused.attention_backward(q.copy(), q.copy(), q.copy(), np.empty((1, 3, 4), np.float32), q,
                                 np.empty((1, 4, 4), np.float32), q, q, q, 1, 1.0, 1, 4)


@needs_fused
def test_fused_and_numpy_paths_agree_on_a_model_sized_case(rng):
    q, k, v, dout = (rng.standard_normal((8, 128, 128)).astype(np.float32) for _ in range(4))
    results = []
    for fused in (True, False):
        out, probs = _attention.forward(q, k, v, 4, fused=fused)
        results.append((out, probs) + _attention.backward(dout, probs, q, k, v, 4, fused=fused))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_attention_inputs_are_checked():
    q = np.zeros((2, 4, 6), np.float32)
    with pytest.raises(ValueError, match="num_heads=4 must divide D=6"):
        kernels.causal_attention_forward(q, q, q, 4)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        kernels.causal_attention_forward(q, q, q, 0)
    with pytest.raises(ValueError, match=r"k must have shape \(2, 4, 6\)"):
        kernels.causal_attention_forward(q, np.zeros((2, 5, 6), np.float32), q, 2)
    with pytest.raises(TypeError, match="v must have dtype float32"):
        kernels.causal_attention_forward(q, q, q.astype(np.float64), 2)
    with pytest.raises(ValueError, match=r"probs must have shape \(4, 4, 4\)"):
        kernels.causal_attention_backward(q, np.zeros((2, 4, 4), np.float32), q, q, q, 2)


@pytest.mark.parametrize("lib", [kernels, reference])
def test_grouped_query_attention_refuses_kv_heads_that_do_not_divide_heads(lib):
    q, kv = np.zeros((2, 4, 12), np.float32), np.zeros((2, 4, 6), np.float32)
    with pytest.raises(ValueError, match="num_kv_heads=4 must divide num_heads=6"):
        lib.causal_attention_forward(q, np.zeros((2, 4, 8), np.float32), np.zeros((2, 4, 8), np.float32), 6, 4)
    with pytest.raises(ValueError, match="num_kv_heads=4 must divide num_heads=6"):
        lib.causal_attention_backward(q, np.zeros((12, 4, 4), np.float32), q, kv, kv, 6, 4)


def test_grouped_query_attention_inputs_are_checked():
    q = np.zeros((2, 4, 12), np.float32)
    with pytest.raises(ValueError, match=r"k must have shape \(2, 4, 4\)"):  # 2 kv heads of 12 / 6
        kernels.causal_attention_forward(q, q, q, 6, 2)
    with pytest.raises(ValueError, match=r"v must have shape \(2, 4, 6\)"):
        kernels.causal_attention_backward(q, np.zeros((8, 4, 4), np.float32), q, q[..., :6], q[..., :4], 4, 2)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int, got 0"):
        kernels.causal_attention_forward(q, q, q, 6, 0)


@needs_fused
def test_split_gemm_resets_blas_to_one_thread_after_threadpoolctl_changed_it(rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    a = rng.standard_normal((256, 256)).astype(np.float32)
    _gemm.matmul(a, a)
    threadpoolctl.threadpool_limits(2, user_api="blas")  # behind fastlora._runtime.blas's back
    _gemm.matmul(a, a)
    counts = {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["internal_api"] == "openblas"}
    assert counts == {1}  # else each OpenMP thread would start BLAS threads of its own
    _blas.reset()


def _openblas_threads(threadpoolctl):
    return {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["internal_api"] == "openblas"}


@needs_fused
@pytest.mark.parametrize("count", [2, 3])
def test_drop_in_attention_and_trainer_give_numpy_blas_its_thread_count_back(rng, count):
    # a NumPy user's own products after a drop-in kernel or a training run get the threads they
    # had, not the single thread the kernels switch OpenBLAS to while they run
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import fastlora as fl
    from fastlora.optim import SGD
    from fastlora.train import Trainer
    q = rng.standard_normal((2, 64, 128)).astype(np.float32)
    threadpoolctl.threadpool_limits(count, user_api="blas")
    try:
        out, probs = kernels.causal_attention_forward(q, q, q, 4)
        assert _openblas_threads(threadpoolctl) == {count}
        kernels.causal_attention_backward(out, probs, q, q, q, 4)
        assert _openblas_threads(threadpoolctl) == {count}
        model = fl.GPT(vocab_size=50, embed_dim=64, num_heads=2, num_layers=1, max_seq_len=64)
        ids = rng.integers(0, 50, (8, 64)).tolist()
        data = [{"input_ids": row, "labels": row} for row in ids]
        Trainer(model, SGD(model.parameters(), lr=0.01), data, batch_size=4, max_steps=2, progress=False).train()
        assert _openblas_threads(threadpoolctl) == {count}
    finally:
        threadpoolctl.threadpool_limits(1, user_api="blas")
        _blas.reset()
