"""NF4 kernels against their NumPy twins, and the tiled NF4 product against a dense matmul.

    python -m pytest bench/test_bench_nf4.py -s --benchmark-columns=median,ops

Each test first checks the fast result against the reference (bit for bit, or to float
tolerance for the products), then times the fast path with pytest-benchmark and the slow path
with a median of a few perf_counter runs in the same process, and prints the ratio (also kept
in the JSON report under extra_info). Weights: the base workload's mlp.fc1 (4D x D, D = 384)
and a 2048 x 2048 matrix.
"""

import numpy as np
import pytest

from fastlora.lora import nf4
from fastlora.lora.nf4_matmul import nf4_matmul, nf4_matmul_backward
from fastlora.reference import nf4 as ref
from workloads import WORKLOADS
from timing import benchmark_median, median_seconds

_D = WORKLOADS["base"]["embed_dim"]
SHAPES = {"base_fc1": (4 * _D, _D), "2048x2048": (2048, 2048)}
_M = WORKLOADS["base"]["batch_size"] * WORKLOADS["base"]["max_seq_len"]   # tokens per base batch


def _weight(name, dtype=np.float32):
    return (np.random.default_rng(0).standard_normal(SHAPES[name]) * 0.02).astype(dtype)


def _report(benchmark, what, fast_s, slow_s, slow_name="numpy"):
    ratio = slow_s / fast_s
    benchmark.extra_info.update({f"{slow_name}_median_s": slow_s, "fast_median_s": fast_s,
                                 f"speedup_vs_{slow_name}": ratio})
    print(f"\n{what}: fast {fast_s * 1e3:.2f} ms, {slow_name} {slow_s * 1e3:.2f} ms -> {ratio:.1f}x")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_quantize_kernel_vs_numpy(benchmark, shape):
    x = _weight(shape).reshape(-1)
    fast = lambda: nf4.quantize_blocks(x, 64)         # noqa: E731
    slow = lambda: ref.quantize_blocks(x, 64)         # noqa: E731
    for got, want in zip(fast(), slow()):
        np.testing.assert_array_equal(got, want)
    _report(benchmark, f"quantize {shape}", benchmark_median(benchmark, fast), median_seconds(slow))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_dequantize_kernel_vs_numpy(benchmark, shape):
    q = nf4.quantize_nf4(_weight(shape))              # double-quantized scales
    fast = q.dequantize

    def slow():
        scales = ref.dequantize_absmax(q.absmax_q, q.absmax_step, q.absmax_mean)
        return ref.dequantize_blocks(q.packed, scales, q.size, q.block_size, np.float32)

    np.testing.assert_array_equal(fast().reshape(-1), slow())
    _report(benchmark, f"dequantize {shape}", benchmark_median(benchmark, fast), median_seconds(slow))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tiled_nf4_matmul_vs_dense(benchmark, shape):
    """x @ W.T for a base batch of tokens: the price of dequantizing W on the fly, tile by tile."""
    q = nf4.quantize_nf4(_weight(shape))
    W = q.dequantize()
    x = np.random.default_rng(1).standard_normal((_M, W.shape[1])).astype(np.float32)
    out = np.empty((_M, W.shape[0]), np.float32)
    np.testing.assert_allclose(nf4_matmul(x, q), x @ W.T, rtol=1e-4, atol=1e-4)
    fast = lambda: nf4_matmul(x, q, out=out)      # noqa: E731
    dense = lambda: np.matmul(x, W.T, out=out)        # noqa: E731
    # here "fast" is the NF4 path and the ratio is dense time / NF4 time (< 1: NF4 costs more)
    _report(benchmark, f"nf4_matmul {shape}, M={_M}", benchmark_median(benchmark, fast),
            median_seconds(dense), slow_name="dense")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tiled_nf4_matmul_backward_vs_dense(benchmark, shape):
    q = nf4.quantize_nf4(_weight(shape))
    W = q.dequantize()
    g = np.random.default_rng(2).standard_normal((_M, W.shape[0])).astype(np.float32)
    out = np.empty((_M, W.shape[1]), np.float32)
    np.testing.assert_allclose(nf4_matmul_backward(g, q), g @ W, rtol=1e-4, atol=1e-4)
    fast = lambda: nf4_matmul_backward(g, q, out=out)   # noqa: E731
    dense = lambda: np.matmul(g, W, out=out)                # noqa: E731
    _report(benchmark, f"nf4_matmul_backward {shape}, M={_M}", benchmark_median(benchmark, fast),
            median_seconds(dense), slow_name="dense")
