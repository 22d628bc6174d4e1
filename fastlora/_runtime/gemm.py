"""Matrix products of the hot paths: one OpenMP pool for every core, OpenBLAS on one thread.

`matmul(a, b, trans_a, trans_b)` is op(a) @ op(b) for 2-D float arrays. Where NumPy's
OpenBLAS is reachable (fastlora._runtime.blas.gemm_pointers), the product is split over OpenMP
threads that each call a single-threaded GEMM (csrc/gemm.pyx says why); otherwise it is
np.matmul with the per-call BLAS thread count of fastlora._runtime.blas. Both are one BLAS GEMM per
block, so they give the same numbers up to the order of float sums.
"""
import numpy as np

from fastlora._ext import blas as _blas_ext
from fastlora._ext import gemm as _gemm_ext
from fastlora._runtime import blas

# one place holds the BLAS pointers (csrc/blas.pyx); every kernel that calls BLAS cimports it
_pointers = blas.gemm_pointers()
if _pointers is not None:
    _blas_ext.set_gemm(*_pointers)

_enabled = _pointers is not None

GEMV_MIN_ELEMENTS = 1 << 20  # a one-row product splits over threads from this many weights up


def fused_available():
    """True when the kernels call BLAS themselves (from their own OpenMP threads)."""
    return _enabled


def set_enabled(flag):
    """Turn the OpenMP-split products and the fused attention off (NumPy's path) or back on;
    for tests and A/B timing. Returns the previous setting."""
    global _enabled
    previous = _enabled
    _enabled = bool(flag) and _pointers is not None
    return previous


def matmul(a, b, trans_a=False, trans_b=False, out=None, accumulate=False, bias=None):
    """op(a) @ op(b), plus `bias` (n,) on every row when given; a, b 2-D of one float dtype.
    Written into `out` when given (an (m, n) array of that dtype whose columns are adjacent,
    e.g. a column block of a wider array), or added to it with accumulate=True (no temporary:
    the GEMM's beta = 1), else returned as a new C-contiguous array."""
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k2:
        raise ValueError(f"matmul: op(a) is ({m}, {k}) but op(b) is ({k2}, {n})")
    if out is not None and (out.shape != (m, n) or out.dtype != a.dtype):
        raise ValueError(f"matmul: out must be ({m}, {n}) {a.dtype}, got {out.shape} {out.dtype}")
    if accumulate and out is None:
        raise ValueError("matmul: accumulate=True needs the array to add to as out")
    if bias is not None and (accumulate or bias.shape != (n,) or bias.dtype != a.dtype):
        raise ValueError(f"matmul: bias must be ({n},) {a.dtype} and not combined with accumulate, "
                         f"got {bias.shape} {bias.dtype}")
    threads = blas.threads_for_gemm(m, n, k)
    if m == 1:
        # one row (a decode step of generation): NumPy calls BLAS's matrix-vector product, which
        # streams the weight once (a GEMM per thread first packs its block of the weight: an
        # lm_head's 154 MB took 3-4x longer). It is bound by memory: a second thread reads
        # faster on an idle machine but waits for a core on a busy one, so big weights run on the
        # cores the machine leaves free (blas.threads_for_gemm) and those under 4 MB on one
        # thread (a second one sped such a weight up alone but no whole generation measurably:
        # bench/README.md, "Real model sizes")
        threads = 1 if n * k < GEMV_MIN_ELEMENTS else threads
    if m == 1 or not _enabled or a.dtype != b.dtype or a.dtype not in (np.float32, np.float64) or \
            (out is not None and n > 1 and out.strides[1] != out.itemsize):
        blas.use(threads)
        product = np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=None if accumulate else out)
        if accumulate:
            out += product
        result = product if out is None else out
        if bias is not None:
            result += bias
        return result
    if out is None:
        out = np.empty((m, n), dtype=a.dtype)
    if m == 0 or n == 0 or k == 0:  # nothing for BLAS to do, and its argument checks refuse it
        if bias is not None:
            out[...] = bias
        elif not accumulate:
            out[...] = 0
        return out
    blas.use(1, force=True)
    _gemm_ext.gemm(out, np.ascontiguousarray(a), np.ascontiguousarray(b), trans_a, trans_b,
                   1.0 if accumulate else 0.0, threads, None if bias is None else np.ascontiguousarray(bias))
    return out
