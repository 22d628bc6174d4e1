# cython: language_level=3
"""Matrix products split over OpenMP threads, each calling a single-threaded BLAS GEMM.

C = op(A) op(B) + beta C for C-contiguous 2-D arrays, op = transpose or not. The output is
cut into as many blocks as there are threads, along its longer side, in multiples of 16
(whole SIMD panels), and each thread runs one block's GEMM alone.

Why not let OpenBLAS thread its own products: its worker threads keep spinning for a while
after every call, and on a 2-core machine they then fight the OpenMP threads of the
elementwise and attention kernels that run in between (each ran about 2x slower inside a
training step than alone). With every product and kernel in one OpenMP pool, OpenBLAS stays
on one thread and nothing spins against anything.
"""
from cython cimport floating
from cython.parallel cimport prange

from fastlora._ext.blas cimport gemm as _gemm, gemm_ready


cdef inline void _fill_bias(floating* C, Py_ssize_t ldc, const floating* bias, Py_ssize_t r0,
                           Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """C[r0:r1, c0:c1] = bias[c0:c1] on every row: the GEMM then adds the product (beta 1)."""
    cdef Py_ssize_t i, j
    for i in range(r0, r1):
        for j in range(c0, c1):
            C[i * ldc + j] = bias[j]


cdef inline void _block(bint ta, bint tb, bint split_m, Py_ssize_t lo, Py_ssize_t hi,
                        Py_ssize_t N, Py_ssize_t M, Py_ssize_t K,
                        const floating* A, Py_ssize_t lda, const floating* B, Py_ssize_t ldb,
                        floating beta, floating* C, Py_ssize_t ldc, const floating* bias) noexcept nogil:
    """Rows (split_m) or columns [lo, hi) of C; with a bias, C's block starts as the bias."""
    if hi <= lo:
        return
    if bias != NULL:
        if split_m:
            _fill_bias(C, ldc, bias, lo, hi, 0, N)
        else:
            _fill_bias(C, ldc, bias, 0, M, lo, hi)
        beta = 1
    if split_m:  # op(A) rows lo..hi: A's rows, or A's columns when transposed
        _gemm(ta, tb, hi - lo, N, K, A + (lo if ta else lo * lda), lda, B, ldb, beta, C + lo * ldc, ldc)
    else:  # op(B) columns lo..hi: B's columns, or B's rows when transposed
        _gemm(ta, tb, M, hi - lo, K, A, lda, B + (lo * ldb if tb else lo), ldb, beta, C + lo, ldc)


def gemm(floating[:, :] C, const floating[:, ::1] A, const floating[:, ::1] B,
         bint trans_a, bint trans_b, double beta=0.0, int num_threads=1,
         const floating[::1] bias=None):
    """C (M, N) = op(A) op(B) + beta C, or op(A) op(B) + bias (N,) on every row when a bias is
    given (each thread writes its block's bias and the GEMM adds to it, no extra pass). C may
    be a column block of a wider array (its rows one stride apart, its columns adjacent);
    shapes are checked by the caller (fastlora._runtime.gemm)."""
    cdef Py_ssize_t M = C.shape[0], N = C.shape[1]
    cdef Py_ssize_t K = A.shape[0] if trans_a else A.shape[1]
    cdef Py_ssize_t lda = A.shape[1], ldb = B.shape[1], ldc = C.strides[0] // sizeof(floating)
    if N > 1 and C.strides[1] != sizeof(floating):
        raise ValueError("C's columns must be adjacent in memory")
    cdef bint split_m = M >= N
    cdef Py_ssize_t extent = M if split_m else N, chunk, t, lo, hi
    cdef floating b = <floating>beta
    if M == 0 or N == 0 or K == 0:
        raise ValueError("empty products are the caller's (fastlora._runtime.gemm) to handle")
    # BLAS wants every leading dimension >= its row length, also where only one row exists
    # and NumPy may report any stride for that axis
    lda = max(lda, 1)
    ldb = max(ldb, 1)
    ldc = max(ldc, N)
    cdef const floating* bias_ptr = NULL
    if bias is not None:
        if bias.shape[0] != N or beta != 0.0:
            raise ValueError("bias must be (N,) and comes with beta = 0")
        bias_ptr = &bias[0]
    if num_threads <= 1 or extent < 32:
        with nogil:
            _block(trans_a, trans_b, True, 0, M, N, M, K, &A[0, 0], lda, &B[0, 0], ldb, b,
                   &C[0, 0], ldc, bias_ptr)
        return
    chunk = (extent + num_threads - 1) // num_threads
    chunk = (chunk + 15) // 16 * 16
    for t in prange(num_threads, nogil=True, schedule="static", num_threads=num_threads):
        lo = t * chunk
        hi = lo + chunk if lo + chunk < extent else extent
        _block(trans_a, trans_b, split_m, lo, hi, N, M, K, &A[0, 0], lda, &B[0, 0], ldb, b,
               &C[0, 0], ldc, bias_ptr)
