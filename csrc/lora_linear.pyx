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

from fastlora._ext.blas cimport gemm as _gemm, gemm_ready
include "small_gemm.pxi"

include "lora_blocks.pxi"

CHUNK_ROWS = CHUNK  # for the caller, which allocates the backward's scratch


def lora_linear_forward(floating[:, ::1] out,        # (N, O) written
                        floating[:, ::1] u,          # (N, R) written: s x A^T, for the backward
                        const floating[:, ::1] x,    # (N, I)
                        const floating[:, ::1] W,    # (O, I)
                        const floating[::1] bias,    # (O,), or (0,) for none
                        const floating[:, ::1] sAT,  # (I, R): s A^T
                        const floating[:, ::1] BT,   # (R, O): B^T
                        int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], t, n0, n1
    if not gemm_ready():
        raise RuntimeError("lora_linear_forward needs fastlora._ext.blas.set_gemm first")
    if num_threads > 1:
        for t in prange(num_threads, nogil=True, schedule="static", num_threads=num_threads):
            n0 = t * N // num_threads  # thread t's block of rows (assigned here: private)
            n1 = (t + 1) * N // num_threads
            _forward_block(out, u, x, W, bias, sAT, BT, n0, n1)
    else:
        with nogil:
            _forward_block(out, u, x, W, bias, sAT, BT, 0, N)


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
    if not gemm_ready():
        raise RuntimeError("lora_linear_backward needs fastlora._ext.blas.set_gemm first")
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
