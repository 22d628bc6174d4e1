# cython: language_level=3
"""The dense LoRA linear, forward and backward, each one OpenMP region over row blocks.

    forward   out = x W^T + b + u B^T,   u = s x A^T               (N, O), u (N, R) kept
    backward  v = s g B;  dx = g W + v A;  dA = v^T x;  dB = g^T u

(s = scaling; the twin is fastlora/reference/lora.py, without dropout, which stays on the
unfused path.) Each thread takes a contiguous block of the N rows: the big product (x W^T, or
g W) is one single-threaded BLAS GEMM on the block, as in csrc/gemm.pyx, and the rank-R
products (R = 4 ... 64 against I, O of hundreds) run right after it on chunks of CHUNK rows
with csrc/small_gemm.h, while the chunk of x, g and dx is in L1. As separate BLAS calls those
skinny products ran at 27-46 GFLOP/s and each streamed x or g from memory again (2.7 ms of
a 40 ms small-workload LoRA step).

dA and dB sum over all N rows: each thread adds its chunks into its own slice of dA_parts /
dB_parts, and the caller adds the slices (R x I and O x R, a few KB), so no two threads
write the same memory and the order of the sums depends only on the thread count.
Kernels trust their inputs; fastlora/lora/ops.py checks and allocates.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.string cimport memset

include "blas_gemm.pxi"
include "small_gemm.pxi"

cdef enum:
    CHUNK = 32  # rows per rank-R step: a chunk of x or g (32 x 384 floats at most here) stays in L1

CHUNK_ROWS = CHUNK  # for the caller, which allocates the backward's scratch


cdef void _forward_block(floating[:, ::1] out, floating[:, ::1] u, const floating[:, ::1] x,
                         const floating[:, ::1] W, const floating[::1] bias,
                         const floating[:, ::1] sAT, const floating[:, ::1] BT,
                         Py_ssize_t n0, Py_ssize_t n1) noexcept nogil:
    cdef Py_ssize_t N = n1 - n0, O = W.shape[0], I = W.shape[1], R = sAT.shape[1], n, o
    cdef floating beta = 0
    if N <= 0:
        return
    if bias.shape[0] > 0:
        for n in range(n0, n1):
            for o in range(O):
                out[n, o] = bias[o]
        beta = 1
    _gemm(False, True, N, O, I, &x[n0, 0], I, &W[0, 0], I, beta, &out[n0, 0], O)  # x W^T (+ b)
    _mm(N, R, I, &x[n0, 0], I, 1, &sAT[0, 0], R, 0, &u[n0, 0], R)                # u = s x A^T
    _mm(N, O, R, &u[n0, 0], R, 1, &BT[0, 0], O, 1, &out[n0, 0], O)               # out += u B^T


def lora_linear_forward(floating[:, ::1] out,        # (N, O) written
                        floating[:, ::1] u,          # (N, R) written: s x A^T, for the backward
                        const floating[:, ::1] x,    # (N, I)
                        const floating[:, ::1] W,    # (O, I)
                        const floating[::1] bias,    # (O,), or (0,) for none
                        const floating[:, ::1] sAT,  # (I, R): s A^T
                        const floating[:, ::1] BT,   # (R, O): B^T
                        int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], t, n0, n1
    if not has_gemm():
        raise RuntimeError("lora_linear_forward needs set_gemm first")
    if num_threads > 1:
        for t in prange(num_threads, nogil=True, schedule="static", num_threads=num_threads):
            n0 = t * N // num_threads  # thread t's block of rows (assigned here: private)
            n1 = (t + 1) * N // num_threads
            _forward_block(out, u, x, W, bias, sAT, BT, n0, n1)
    else:
        with nogil:
            _forward_block(out, u, x, W, bias, sAT, BT, 0, N)


cdef void _backward_block(floating[:, ::1] dx, floating* dA, floating* dB, floating* v,
                          const floating[:, ::1] g, const floating[:, ::1] x,
                          const floating[:, ::1] u, const floating[:, ::1] W,
                          const floating[:, ::1] A, const floating[:, ::1] sB,
                          Py_ssize_t n0, Py_ssize_t n1) noexcept nogil:
    """Rows [n0, n1): dx written (when dx has rows), dA (R, I) and dB (O, R) added to; v is
    (CHUNK, R) scratch."""
    cdef Py_ssize_t O = W.shape[0], I = W.shape[1], R = A.shape[0], c0, c
    cdef bint want_dx = dx.shape[0] > 0
    if n1 <= n0:
        return
    if want_dx:
        _gemm(False, False, n1 - n0, I, O, &g[n0, 0], O, &W[0, 0], I, 0, &dx[n0, 0], I)  # g W
    c0 = n0
    while c0 < n1:
        c = CHUNK if c0 + CHUNK <= n1 else n1 - c0
        _mm(c, R, O, &g[c0, 0], O, 1, &sB[0, 0], R, 0, v, R)                    # v = s g B
        if want_dx:
            _mm(c, I, R, v, R, 1, &A[0, 0], I, 1, &dx[c0, 0], I)                # dx += v A
        _mm(R, I, c, v, 1, R, &x[c0, 0], I, 1, dA, I)                           # dA += v^T x
        _mm(O, R, c, &g[c0, 0], 1, O, &u[c0, 0], R, 1, dB, R)                   # dB += g^T u
        c0 += c


def lora_linear_backward(floating[:, ::1] dx,              # (N, I) written, or (0, I): not wanted
                         floating[:, :, ::1] dA_parts,     # (threads, R, I) written: sum -> dA
                         floating[:, :, ::1] dB_parts,     # (threads, O, R) written: sum -> dB
                         floating[:, :, ::1] scratch,      # (threads, CHUNK, R)
                         const floating[:, ::1] g,         # (N, O)
                         const floating[:, ::1] x,         # (N, I)
                         const floating[:, ::1] u,         # (N, R) from the forward
                         const floating[:, ::1] W,         # (O, I)
                         const floating[:, ::1] A,         # (R, I)
                         const floating[:, ::1] sB,        # (O, R): s B
                         int num_threads=1):
    cdef Py_ssize_t N = g.shape[0], threads = max(num_threads, 1), t, n0, n1
    if not has_gemm():
        raise RuntimeError("lora_linear_backward needs set_gemm first")
    if dA_parts.shape[0] < threads or dB_parts.shape[0] < threads or scratch.shape[0] < threads \
            or scratch.shape[1] < CHUNK or scratch.shape[2] != A.shape[0]:
        raise ValueError(f"dA_parts, dB_parts and scratch need {threads} slices, scratch "
                         f"({CHUNK}, {A.shape[0]}) each")
    with nogil:
        memset(&dA_parts[0, 0, 0], 0, dA_parts.shape[0] * dA_parts.shape[1] * dA_parts.shape[2] * sizeof(floating))
        memset(&dB_parts[0, 0, 0], 0, dB_parts.shape[0] * dB_parts.shape[1] * dB_parts.shape[2] * sizeof(floating))
    if threads > 1:
        with nogil, parallel(num_threads=threads):
            for t in prange(threads, schedule="static"):
                n0 = t * N // threads
                n1 = (t + 1) * N // threads
                _backward_block(dx, &dA_parts[t, 0, 0], &dB_parts[t, 0, 0], &scratch[t, 0, 0],
                                g, x, u, W, A, sB, n0, n1)
    else:
        with nogil:
            _backward_block(dx, &dA_parts[0, 0, 0], &dB_parts[0, 0, 0], &scratch[0, 0, 0],
                            g, x, u, W, A, sB, 0, N)
