# cython: language_level=3
"""Fused causal multi-head attention, forward and backward, on per-head BLAS calls.

q, k, v, out and their gradients are C-contiguous (B, T, D) arrays with the H heads side
by side in D (head h is columns h*hd ... h*hd + hd - 1). Each head's products are GEMMs on
strided views of those arrays (leading dimension D): no head is ever copied or transposed.
The (B*H) heads are shared among OpenMP threads, and each thread calls a single-threaded
BLAS GEMM, so the small per-head products run on every core instead of one, with no
Python between them; the scaled causal softmax runs right after the product that made the
scores, while they are still in cache.

Causality is used to skip work: rows are taken in blocks of `block` rows, and a block of rows
[r0, r1) only ever needs key/value positions [0, r1). For T = 128 and blocks of 32 that is
5/8 of the multiply-adds of the dense products. Smaller blocks skip more but make smaller,
less efficient GEMMs; fastlora._attention picks the size.

The GEMM is NumPy's own BLAS (OpenBLAS), reached through a function pointer that
`set_gemm` receives from fastlora._blas; the caller sets that BLAS to one thread first.
"""
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid


include "fastmath.pxi"
include "reduce.pxi"
include "softmax_rows.pxi"

include "blas_gemm.pxi"


cdef inline void _head_forward(floating* out, floating* P, const floating* q, const floating* k,
                               const floating* v, Py_ssize_t T, Py_ssize_t D, Py_ssize_t hd,
                               floating scale, Py_ssize_t block) noexcept nogil:
    """One head: P = causal softmax(scale q k^T) (T, T), out = P v; q, k, v, out strided by D."""
    cdef Py_ssize_t r0 = 0, r1, i
    while r0 < T:
        r1 = r0 + block if r0 + block < T else T
        _gemm(False, True, r1 - r0, r1, hd, q + r0 * D, D, k, D, 0, P + r0 * T, T)
        for i in range(r0, r1):
            _softmax_row(P + i * T, P + i * T, i + 1, T, scale)  # zeros to T: P is whole
        _gemm(False, False, r1 - r0, hd, r1, P + r0 * T, T, v, D, 0, out + r0 * D, D)
        r0 = r1


cdef inline void _head_backward(floating* dq, floating* dk, floating* dv, floating* dS,
                                const floating* g, const floating* P, const floating* q,
                                const floating* k, const floating* v, Py_ssize_t T, Py_ssize_t D,
                                Py_ssize_t hd, floating scale, Py_ssize_t block) noexcept nogil:
    """One head's dq, dk, dv from g = d out; dS is a (T, T) scratch."""
    cdef Py_ssize_t r1, i, last = ((T - 1) // block) * block, r0 = last
    cdef floating beta
    # blocks last to first: the last covers every key row [0, T) and writes dk, dv with beta 0,
    # the earlier ones (fewer key rows) add to them
    while r0 >= 0:
        r1 = r0 + block if r0 + block < T else T
        beta = 0 if r0 == last else 1
        _gemm(False, True, r1 - r0, r1, hd, g + r0 * D, D, v, D, 0, dS + r0 * T, T)  # dP = g v^T
        _gemm(True, False, r1, hd, r1 - r0, P + r0 * T, T, g + r0 * D, D, beta, dv, D)  # dv += P^T g
        for i in range(r0, r1):
            _softmax_row_backward(dS + i * T, P + i * T, dS + i * T, i + 1, r1, scale)
        _gemm(False, False, r1 - r0, hd, r1, dS + r0 * T, T, k, D, 0, dq + r0 * D, D)  # dq = dS k
        _gemm(True, False, r1, hd, r1 - r0, dS + r0 * T, T, q + r0 * D, D, beta, dk, D)  # dk += dS^T q
        r0 -= block


def attention_forward(floating[:, :, ::1] out,        # (B, T, D) written
                      floating[:, :, ::1] probs,      # (B*H, T, T) written: the causal softmax
                      const floating[:, :, ::1] q,    # (B, T, D)
                      const floating[:, :, ::1] k,
                      const floating[:, :, ::1] v,
                      int num_heads, double scale, int num_threads=1, int block=32):
    cdef Py_ssize_t B = q.shape[0], T = q.shape[1], D = q.shape[2], H = num_heads
    cdef Py_ssize_t hd = D // H, n, b, h
    cdef floating s = <floating>scale
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if num_threads > 1:
        for n in prange(B * H, nogil=True, schedule="static", num_threads=num_threads):
            b = n // H
            h = n % H
            _head_forward(&out[b, 0, h * hd], &probs[n, 0, 0], &q[b, 0, h * hd], &k[b, 0, h * hd],
                          &v[b, 0, h * hd], T, D, hd, s, block)
    else:
        with nogil:
            for n in range(B * H):
                b = n // H
                h = n % H
                _head_forward(&out[b, 0, h * hd], &probs[n, 0, 0], &q[b, 0, h * hd], &k[b, 0, h * hd],
                              &v[b, 0, h * hd], T, D, hd, s, block)


def attention_backward(floating[:, :, ::1] dq,        # (B, T, D) written
                       floating[:, :, ::1] dk,
                       floating[:, :, ::1] dv,
                       floating[:, :, ::1] scratch,   # (num_threads, T, T)
                       const floating[:, :, ::1] g,   # (B, T, D) gradient of out
                       const floating[:, :, ::1] probs,
                       const floating[:, :, ::1] q,
                       const floating[:, :, ::1] k,
                       const floating[:, :, ::1] v,
                       int num_heads, double scale, int num_threads=1, int block=32):
    cdef Py_ssize_t B = q.shape[0], T = q.shape[1], D = q.shape[2], H = num_heads
    cdef Py_ssize_t hd = D // H, n, b, h, o
    cdef floating s = <floating>scale
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if num_threads > 1:
        with nogil, parallel(num_threads=num_threads):
            for n in prange(B * H, schedule="static"):
                b = n // H
                h = n % H
                o = h * hd
                _head_backward(&dq[b, 0, o], &dk[b, 0, o], &dv[b, 0, o], &scratch[threadid(), 0, 0],
                               &g[b, 0, o], &probs[n, 0, 0], &q[b, 0, o], &k[b, 0, o], &v[b, 0, o],
                               T, D, hd, s, block)
    else:
        with nogil:
            for n in range(B * H):
                b = n // H
                h = n % H
                o = h * hd
                _head_backward(&dq[b, 0, o], &dk[b, 0, o], &dv[b, 0, o], &scratch[0, 0, 0],
                               &g[b, 0, o], &probs[n, 0, 0], &q[b, 0, o], &k[b, 0, o], &v[b, 0, o],
                               T, D, hd, s, block)
