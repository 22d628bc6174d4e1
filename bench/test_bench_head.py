"""The LM head and its loss: the fused linear + cross-entropy (fastlora._linear_ce) against making
the whole logits array and scoring it, at the shapes of the workloads' heads.

    python -m pytest bench/test_bench_head.py -s --benchmark-columns=median,ops

Each test first checks the fused head against the unfused one (loss, d(hidden), d(weight)),
then times both in one process (pytest-benchmark for the fused one, a median of perf_counter
runs for the other) and prints the ratio, the fused head's GFLOP/s (its products only: the
scored rows' logits, d(hidden) and, with weight_grad, d(weight)) and the memory each allocates
(tracemalloc peak). test_chunk_rows prints the same rate for several chunk sizes.
"""
import tracemalloc

import numpy as np
import pytest

from fastlora import _linear_ce, kernels
from timing import benchmark_median, median_seconds
from workloads import ALL_WORKLOADS, batch

HEADS = ["base", "gpt2", "smollm2"]


def _case(workload):
    w = ALL_WORKLOADS[workload]
    D = w.get("hidden_size") or w["embed_dim"]
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((w["batch_size"], w["max_seq_len"], D)).astype(np.float32)
    weight = (rng.standard_normal((w["vocab_size"], D)) * 0.02).astype(np.float32)
    _, labels = batch(workload)
    return hidden, weight, labels


def _unfused(hidden, weight, labels, weight_grad):
    """The whole logits (B, T, V), scored by the cross-entropy kernel, the gradient carried back."""
    from fastlora._runtime import gemm as _gemm
    B, T, D = hidden.shape
    h2 = hidden.reshape(B * T, D)
    logits = _gemm.matmul(h2, weight, trans_b=True).reshape(B, T, -1)
    loss, _, dlogits = kernels.cross_entropy_forward(logits, labels)
    d2 = dlogits.reshape(B * T, -1)
    dh = _gemm.matmul(d2, weight)
    dw = _gemm.matmul(d2, h2, trans_a=True) if weight_grad else None
    return loss, dh.reshape(hidden.shape), dw


def _fused(hidden, weight, labels, weight_grad, chunk_rows=None):
    loss, _, dh, dw = kernels.linear_cross_entropy_forward(hidden, weight, labels, chunk_rows=chunk_rows)
    return loss, dh, (dw if weight_grad else None)


def _peak_mb(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


def _flops(hidden, weight, labels, weight_grad):
    scored = int((labels[:, 1:] != -100).sum())
    return 2 * scored * weight.shape[0] * weight.shape[1] * (3 if weight_grad else 2)


@pytest.mark.parametrize("weight_grad", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("workload", HEADS)
def test_fused_head_vs_logits(benchmark, workload, weight_grad):
    hidden, weight, labels = _case(workload)
    fused, unfused = _fused(hidden, weight, labels, weight_grad), _unfused(hidden, weight, labels, weight_grad)
    assert fused[0] == pytest.approx(unfused[0], rel=1e-5)
    np.testing.assert_allclose(fused[1], unfused[1], rtol=1e-3, atol=1e-7)
    if weight_grad:
        np.testing.assert_allclose(fused[2], unfused[2], rtol=1e-3, atol=1e-7)
    fast_s = benchmark_median(benchmark, lambda: _fused(hidden, weight, labels, weight_grad))
    slow_s = median_seconds(lambda: _unfused(hidden, weight, labels, weight_grad), repeats=3)
    rate = _flops(hidden, weight, labels, weight_grad) / fast_s / 1e9
    fused_mb = _peak_mb(lambda: _fused(hidden, weight, labels, weight_grad))
    unfused_mb = _peak_mb(lambda: _unfused(hidden, weight, labels, weight_grad))
    benchmark.extra_info.update({"unfused_median_s": slow_s, "speedup": slow_s / fast_s, "gflops": rate,
                                 "fused_mb": fused_mb, "unfused_mb": unfused_mb})
    print(f"\nhead {workload} {'full' if weight_grad else 'lora'}: fused {fast_s * 1e3:.1f} ms "
          f"({rate:.0f} GFLOP/s, {fused_mb:.0f} MB), logits {slow_s * 1e3:.1f} ms ({unfused_mb:.0f} MB) "
          f"-> {slow_s / fast_s:.2f}x")


@pytest.mark.parametrize("workload", ["gpt2"])
def test_chunk_rows(workload):
    """The products' rate against the chunk size (rows of logits made at once), interleaved,
    best of 3 each: what _linear_ce.CHUNK_ELEMENTS is chosen from."""
    hidden, weight, labels = _case(workload)
    sizes = [32, 64, _linear_ce.chunk_rows_for(weight.shape[0], 10 ** 9), 128, 256, 512]
    best = dict.fromkeys(sizes, float("inf"))
    for _ in range(3):
        for rows in sizes:
            best[rows] = min(best[rows], median_seconds(lambda: _fused(hidden, weight, labels, False, rows),
                                                        repeats=1, warmup=False))
    flops = _flops(hidden, weight, labels, False)
    print("\n" + ", ".join(f"{rows} rows: {flops / s / 1e9:.0f} GFLOP/s" for rows, s in best.items()))
