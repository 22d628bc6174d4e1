"""The model's kernels against their NumPy twins, at the shapes of a docs/DESIGN.md workload.

    python -m pytest bench/test_bench_kernels.py -s --benchmark-columns=median,ops

LayerNorm, GELU (tanh and exact), the causal softmax and the masked cross-entropy (forward + backward each),
the fused causal attention (forward + backward: csrc/attention.pyx) and the embedding
backward against the same math in NumPy; the Llama-family kernels (RMSNorm, the SiLU gate,
RoPE, grouped-query attention) on each workload's shape and on SmolLM2-135M's; the OpenMP-split GEMM (csrc/gemm.pyx) against
np.matmul on OpenBLAS's own threads, and the attention forward's own products
(csrc/small_gemm.h) against BLAS's. Each test first checks the kernel against the twin, then times the kernel with
pytest-benchmark and the twin with a median of perf_counter runs in the same process, and
prints the ratio (kept in the JSON report under extra_info).
"""
import numpy as np
import pytest

from fastlora import kernels, reference
from fastlora._runtime import blas as _blas, gemm as _gemm
from fastlora._runtime.threads import get_num_threads
from timing import benchmark_median, median_seconds
from workloads import WORKLOADS

WORKLOAD_NAMES = list(WORKLOADS)


def _dims(workload):
    w = WORKLOADS[workload]
    return w["batch_size"], w["max_seq_len"], w["embed_dim"], w["num_heads"], w["vocab_size"]


def _report(benchmark, what, fast_s, slow_s, slow_name):
    ratio = slow_s / fast_s
    benchmark.extra_info.update({"twin_median_s": slow_s, "fast_median_s": fast_s, "speedup_vs_twin": ratio})
    print(f"\n{what}: fastlora {fast_s * 1e3:.3f} ms, {slow_name} {slow_s * 1e3:.3f} ms -> {ratio:.2f}x")


def _race(benchmark, what, fast, slow, check, slow_name="NumPy twin"):
    check(fast(), slow())
    fast_s = benchmark_median(benchmark, fast)
    _report(benchmark, what, fast_s, median_seconds(slow, repeats=3), slow_name)


def _allclose(rtol=1e-4, atol=1e-5):
    def check(got, want):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    return check


@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_layernorm(benchmark, workload):
    B, T, D, _, _ = _dims(workload)
    rng = np.random.default_rng(0)
    x, dout = (rng.standard_normal((B * T, D)).astype(np.float32) for _ in range(2))
    w, b = np.ones(D, np.float32), np.zeros(D, np.float32)

    def run(lib):
        out, mean, rstd = lib.layernorm_forward(x, w, b)
        return (out,) + tuple(lib.layernorm_backward(dout, x, mean, rstd, w))

    _race(benchmark, f"layernorm {workload}", lambda: run(kernels), lambda: run(reference), _allclose(atol=1e-3))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_gelu(benchmark, workload, approximate):
    """The MLP's GELU: tanh (GPT-2's) and exact (erf; its twin calls math.erf per element, NumPy
    having no erf, so that ratio is against Python-speed erf)."""
    B, T, D, _, _ = _dims(workload)
    rng = np.random.default_rng(0)
    x, dout = (rng.standard_normal((B * T, 4 * D)).astype(np.float32) for _ in range(2))

    def run(lib):
        return lib.gelu_forward(x, approximate), lib.gelu_backward(dout, x, approximate)

    name = "gelu" if approximate == "tanh" else "gelu erf"
    _race(benchmark, f"{name} {workload}", lambda: run(kernels), lambda: run(reference), _allclose())


@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_causal_softmax(benchmark, workload):
    B, T, _, H, _ = _dims(workload)
    rng = np.random.default_rng(0)
    scores, dprobs = (rng.standard_normal((B * H, T, T)).astype(np.float32) for _ in range(2))

    def run(lib):
        probs = lib.causal_softmax_forward(scores, 0.125)
        return probs, lib.causal_softmax_backward(probs, dprobs, 0.125)

    _race(benchmark, f"causal softmax {workload}", lambda: run(kernels), lambda: run(reference), _allclose())


@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_cross_entropy(benchmark, workload):
    B, T, _, _, V = _dims(workload)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((B, T, V)).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    labels[:, : T // 3] = -100

    def run(lib):
        loss, count, dlogits = lib.cross_entropy_forward(logits, labels)
        return np.float32(loss), dlogits

    _race(benchmark, f"cross-entropy {workload}", lambda: run(kernels), lambda: run(reference), _allclose())


@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_fused_attention(benchmark, workload):
    B, T, D, H, _ = _dims(workload)
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(4))

    def run(lib):
        out, probs = lib.causal_attention_forward(q, k, v, H)
        return (out, probs) + tuple(lib.causal_attention_backward(dout, probs, q, k, v, H))

    _race(benchmark, f"causal attention {workload}", lambda: run(kernels), lambda: run(reference),
          _allclose(rtol=1e-3, atol=1e-4))


# Llama-shaped dims (B, T, D, H, Hkv, intermediate): each workload with half as many key/value
# heads as heads and a 4 D gate, and SmolLM2-135M's layer (issue 14's bench shape).
def _llama_dims(workload):
    B, T, D, H, _ = _dims(workload)
    return B, T, D, H, max(H // 2, 1), 4 * D


LLAMA_DIMS = {name: _llama_dims(name) for name in WORKLOAD_NAMES}
LLAMA_DIMS["smollm2-135m"] = (4, 256, 576, 9, 3, 1536)


@pytest.mark.parametrize("workload", list(LLAMA_DIMS))
def test_rmsnorm(benchmark, workload):
    B, T, D, _, _, _ = LLAMA_DIMS[workload]
    rng = np.random.default_rng(0)
    x, dout = (rng.standard_normal((B * T, D)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal(D).astype(np.float32)

    def run(lib):
        out, rstd = lib.rmsnorm_forward(x, w)
        return (out,) + tuple(lib.rmsnorm_backward(dout, x, rstd, w))

    _race(benchmark, f"rmsnorm {workload}", lambda: run(kernels), lambda: run(reference), _allclose(atol=1e-3))


@pytest.mark.parametrize("workload", list(LLAMA_DIMS))
def test_silu_mul(benchmark, workload):
    B, T, _, _, _, inner = LLAMA_DIMS[workload]
    rng = np.random.default_rng(0)
    gate, up, dout = (rng.standard_normal((B * T, inner)).astype(np.float32) for _ in range(3))

    def run(lib):
        return (lib.silu_mul_forward(gate, up),) + tuple(lib.silu_mul_backward(dout, gate, up))

    _race(benchmark, f"silu gate {workload}", lambda: run(kernels), lambda: run(reference), _allclose())


@pytest.mark.parametrize("workload", list(LLAMA_DIMS))
def test_rope(benchmark, workload):
    """RoPE on q (all heads) forward and backward."""
    B, T, D, H, _, _ = LLAMA_DIMS[workload]
    hd = D // H
    rng = np.random.default_rng(0)
    x, dout = (rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(2))
    angles = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def run(lib):
        return lib.rope_forward(x, cos, sin, H), lib.rope_backward(dout, cos, sin, H)

    _race(benchmark, f"rope {workload}", lambda: run(kernels), lambda: run(reference), _allclose())


@pytest.mark.parametrize("workload", list(LLAMA_DIMS))
def test_grouped_query_attention(benchmark, workload):
    """Forward + backward with Hkv key/value heads; the twin repeats them per query head."""
    B, T, D, H, Hkv, _ = LLAMA_DIMS[workload]
    rng = np.random.default_rng(0)
    q, dout = (rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, T, D // H * Hkv)).astype(np.float32) for _ in range(2))

    def run(lib):
        out, probs = lib.causal_attention_forward(q, k, v, H, Hkv)
        return (out, probs) + tuple(lib.causal_attention_backward(dout, probs, q, k, v, H, Hkv))

    _race(benchmark, f"gqa attention {workload} ({H} heads on {Hkv})", lambda: run(kernels),
          lambda: run(reference), _allclose(rtol=1e-3, atol=1e-4))


@pytest.mark.skipif(not _gemm.fused_available(), reason="NumPy's BLAS is not an OpenBLAS fastlora can call")
@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_split_gemm_vs_openblas_threads(benchmark, workload):
    """An MLP's fc1 forward (N, D) x (4D, D)^T: OpenMP-split vs OpenBLAS threading it itself."""
    B, T, D, _, _ = _dims(workload)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((B * T, D)).astype(np.float32), rng.standard_normal((4 * D, D)).astype(np.float32)

    def openblas():
        _blas.use(_blas.threads_for_gemm(B * T, 4 * D, D))
        return (np.matmul(x, w.T),)

    _race(benchmark, f"gemm {workload} ({get_num_threads()} threads)", lambda: (_gemm.matmul(x, w, trans_b=True),),
          openblas, _allclose(rtol=1e-4, atol=1e-3), slow_name="OpenBLAS threads")


@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_embedding_backward(benchmark, workload):
    B, T, D, _, V = _dims(workload)
    rng = np.random.default_rng(0)
    ids, g = rng.integers(0, V, size=(B, T)), rng.standard_normal((B, T, D)).astype(np.float32)
    _race(benchmark, f"embedding backward {workload}", lambda: (kernels.embedding_backward(g, ids, V),),
          lambda: (reference.embedding_backward(g, ids, V),), _allclose())


@pytest.mark.skipif(not _gemm.fused_available(), reason="NumPy's BLAS is not an OpenBLAS fastlora can call")
@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_attention_forward_own_products_vs_blas(benchmark, monkeypatch, workload):
    """What fastlora._runtime.attention.blas_products decides from: the fused forward on small_gemm.h's
    loops (timed by pytest-benchmark) against the same kernel on BLAS GEMMs."""
    from fastlora._runtime import attention as _attention
    B, T, D, H, _ = _dims(workload)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(3))

    def run(blas):
        monkeypatch.setattr(_attention, "blas_products", lambda head_dim: blas)
        return _attention.forward(q, k, v, H, fused=True)

    _race(benchmark, f"attention forward {workload}", lambda: run(False), lambda: run(True),
          _allclose(rtol=1e-4, atol=1e-5), slow_name="on BLAS products")
