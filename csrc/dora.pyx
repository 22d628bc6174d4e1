# cython: language_level=3
"""DoRA's dense linear (no dropout), forward and backward, each one OpenMP region over row blocks,
and the row norm DoRA divides by.

    norm      n = ||W + s B A|| per output row (O,)              (detached: a constant below)
    forward   y = x W^T + u B^T,  u = s x A^T;   out = f * y + b,   f = m / n  (per output column)
    backward  gs = g * f;  dm = sum_n g * y / n;  then LoRA's backward on gs:
              v = s gs B;  dx = gs W + v A;  dA = v^T x;  dB = gs^T u

(as PEFT's DoRA: the magnitude m rescales each output row of W + s B A to norm m, and the norm
gets no gradient). Each thread takes a contiguous block of rows and runs csrc/lora_blocks.pxi's
products on it (the base GEMM on BLAS, the rank-R products with small_gemm.h), with DoRA's
per-column epilogue (out = f y + b) and prologue (gs and dm's partial sum) on the same block
while it is in cache. The forward keeps y (N, O) and u (N, R) for the backward; dm needs y.
dA, dB and dm are summed per thread into slices the caller adds, as in lora_linear.pyx.
The norm runs on chunks of W's rows: a copy of the chunk plus s B A in scratch, then each row's
sum of squares, so W + s B A is never formed whole. The twin is fastlora/reference/dora.py;
fastlora/lora/dora.py checks and allocates.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport sqrt
from libc.string cimport memcpy, memset

from fastlora._ext.blas cimport gemm as _gemm, gemm_ready
include "small_gemm.pxi"
include "reduce.pxi"
include "lora_blocks.pxi"

CHUNK_ROWS = CHUNK  # for the caller, which allocates the backward's and the norm's scratch


cdef void _norm_rows(floating* norm, floating* tmp, const floating[:, ::1] W, const floating[:, ::1] A,
                     const floating[:, ::1] sB, Py_ssize_t o0, Py_ssize_t o1) noexcept nogil:
    """norm[o] = ||W[o] + sB[o] A|| for rows [o0, o1), CHUNK rows at a time in tmp (CHUNK, I)."""
    cdef Py_ssize_t I = W.shape[1], R = A.shape[0], c0 = o0, c, o
    while c0 < o1:
        c = CHUNK if c0 + CHUNK <= o1 else o1 - c0
        memcpy(tmp, &W[c0, 0], c * I * sizeof(floating))
        _mm(c, I, R, &sB[c0, 0], R, 1, &A[0, 0], I, 1, tmp, I)                    # tmp += s B A
        for o in range(c):
            norm[c0 + o] = <floating>sqrt(_sum_squares(tmp + o * I, I))
        c0 += c


def dora_weight_norm(floating[::1] norm,            # (O,) written: ||W + s B A|| per row
                     floating[:, :, ::1] scratch,   # (threads, CHUNK, I)
                     const floating[:, ::1] W,      # (O, I)
                     const floating[:, ::1] A,      # (R, I)
                     const floating[:, ::1] sB,     # (O, R): s B
                     int num_threads=1):
    cdef Py_ssize_t O = W.shape[0], threads = max(num_threads, 1), t, o0, o1
    if scratch.shape[0] < threads or scratch.shape[1] < CHUNK or scratch.shape[2] != W.shape[1]:
        raise ValueError(f"scratch needs {threads} slices of ({CHUNK}, {W.shape[1]})")
    if threads > 1:
        for t in prange(threads, nogil=True, schedule="static", num_threads=threads):
            o0 = t * O // threads
            o1 = (t + 1) * O // threads
            _norm_rows(&norm[0], &scratch[t, 0, 0], W, A, sB, o0, o1)
    else:
        with nogil:
            _norm_rows(&norm[0], &scratch[0, 0, 0], W, A, sB, 0, O)


cdef void _forward_epilogue(floating[:, ::1] out, const floating[:, ::1] y, const floating[::1] f,
                            const floating[::1] bias, Py_ssize_t n0, Py_ssize_t n1) noexcept nogil:
    cdef Py_ssize_t O = y.shape[1], n, o
    if bias.shape[0] > 0:
        for n in range(n0, n1):
            for o in range(O):
                out[n, o] = f[o] * y[n, o] + bias[o]
    else:
        for n in range(n0, n1):
            for o in range(O):
                out[n, o] = f[o] * y[n, o]


def dora_forward(floating[:, ::1] out,        # (N, O) written: f * y + b
                 floating[:, ::1] y,          # (N, O) written: x W^T + u B^T, for the backward
                 floating[:, ::1] u,          # (N, R) written: s x A^T, for the backward
                 const floating[:, ::1] x,    # (N, I)
                 const floating[:, ::1] W,    # (O, I)
                 const floating[::1] bias,    # (O,), or (0,) for none
                 const floating[::1] f,       # (O,): m / n
                 const floating[:, ::1] sAT,  # (I, R): s A^T
                 const floating[:, ::1] BT,   # (R, O): B^T
                 int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], t, n0, n1
    cdef const floating[::1] no_bias = bias[:0]
    if not gemm_ready():
        raise RuntimeError("dora_forward needs fastlora._ext.blas.set_gemm first")
    if num_threads > 1:
        for t in prange(num_threads, nogil=True, schedule="static", num_threads=num_threads):
            n0 = t * N // num_threads
            n1 = (t + 1) * N // num_threads
            _forward_block(y, u, x, W, no_bias, sAT, BT, n0, n1)
            _forward_epilogue(out, y, f, bias, n0, n1)
    else:
        with nogil:
            _forward_block(y, u, x, W, no_bias, sAT, BT, 0, N)
            _forward_epilogue(out, y, f, bias, 0, N)


cdef void _backward_prologue(floating[:, ::1] gs, floating* dm, const floating[:, ::1] g,
                             const floating[:, ::1] y, const floating[::1] f,
                             const floating[::1] rnorm, Py_ssize_t n0, Py_ssize_t n1) noexcept nogil:
    """gs = g * f on rows [n0, n1), and dm (O,) += sum over those rows of g * y / n."""
    cdef Py_ssize_t O = g.shape[1], n, o
    for n in range(n0, n1):
        for o in range(O):
            gs[n, o] = g[n, o] * f[o]
            dm[o] += g[n, o] * y[n, o] * rnorm[o]


def dora_backward(floating[:, ::1] dx,              # (N, I) written, or (0, I): not wanted
                  floating[:, :, ::1] dA_parts,     # (threads, R, I) written: sum -> dA
                  floating[:, :, ::1] dB_parts,     # (threads, O, R) written: sum -> dB
                  floating[:, ::1] dm_parts,        # (threads, O) written: sum -> dm
                  floating[:, ::1] gs,              # (N, O) scratch: g * f
                  floating[:, :, ::1] scratch,      # (threads, CHUNK, R)
                  const floating[:, ::1] g,         # (N, O)
                  const floating[:, ::1] x,         # (N, I)
                  const floating[:, ::1] u,         # (N, R) from the forward
                  const floating[:, ::1] y,         # (N, O) from the forward
                  const floating[:, ::1] W,         # (O, I)
                  const floating[:, ::1] A,         # (R, I)
                  const floating[:, ::1] sB,        # (O, R): s B
                  const floating[::1] f,            # (O,): m / n
                  const floating[::1] rnorm,        # (O,): 1 / n
                  int num_threads=1):
    cdef Py_ssize_t N = g.shape[0], threads = max(num_threads, 1), t, n0, n1
    if not gemm_ready():
        raise RuntimeError("dora_backward needs fastlora._ext.blas.set_gemm first")
    if dA_parts.shape[0] < threads or dB_parts.shape[0] < threads or dm_parts.shape[0] < threads \
            or scratch.shape[0] < threads or scratch.shape[1] < CHUNK or scratch.shape[2] != A.shape[0]:
        raise ValueError(f"dA_parts, dB_parts, dm_parts and scratch need {threads} slices, scratch "
                         f"({CHUNK}, {A.shape[0]}) each")
    with nogil:
        memset(&dA_parts[0, 0, 0], 0, dA_parts.shape[0] * dA_parts.shape[1] * dA_parts.shape[2] * sizeof(floating))
        memset(&dB_parts[0, 0, 0], 0, dB_parts.shape[0] * dB_parts.shape[1] * dB_parts.shape[2] * sizeof(floating))
        memset(&dm_parts[0, 0], 0, dm_parts.shape[0] * dm_parts.shape[1] * sizeof(floating))
    if threads > 1:
        with nogil, parallel(num_threads=threads):
            for t in prange(threads, schedule="static"):
                n0 = t * N // threads
                n1 = (t + 1) * N // threads
                _backward_prologue(gs, &dm_parts[t, 0], g, y, f, rnorm, n0, n1)
                _backward_block(dx, &dA_parts[t, 0, 0], &dB_parts[t, 0, 0], &scratch[t, 0, 0],
                                gs, x, u, W, A, sB, n0, n1)
    else:
        with nogil:
            _backward_prologue(gs, &dm_parts[0, 0], g, y, f, rnorm, 0, N)
            _backward_block(dx, &dA_parts[0, 0, 0], &dB_parts[0, 0, 0], &scratch[0, 0, 0],
                            gs, x, u, W, A, sB, 0, N)
