# cython: language_level=3
"""CBLAS sgemm/dgemm through function pointers, for the kernels that call BLAS from their own
OpenMP threads (they cimport fastlora._ext.blas: its .pxd declares what they may call).

The pointers are NumPy's own OpenBLAS's, found by fastlora._runtime.blas.gemm_pointers() and
installed once, by fastlora._runtime.gemm, through set_gemm; the caller sets that BLAS to one
thread before a kernel's threads call it, so every core runs its own single-threaded GEMM.
"""
from libc.stdint cimport int32_t, int64_t, uintptr_t

cdef enum:
    ROW_MAJOR = 101
    NO_TRANS = 111
    TRANS = 112

ctypedef void (*sgemm64_t)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                           const float*, int64_t, float, float*, int64_t) noexcept nogil
ctypedef void (*dgemm64_t)(int, int, int, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t) noexcept nogil
ctypedef void (*sgemm32_t)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t,
                           const float*, int32_t, float, float*, int32_t) noexcept nogil
ctypedef void (*dgemm32_t)(int, int, int, int32_t, int32_t, int32_t, double, const double*, int32_t,
                           const double*, int32_t, double, double*, int32_t) noexcept nogil

cdef uintptr_t _sgemm = 0
cdef uintptr_t _dgemm = 0
cdef bint _int64 = True


def set_gemm(uintptr_t sgemm, uintptr_t dgemm, bint int64):
    """Install CBLAS sgemm/dgemm (row-major CBLAS signatures; int64 says the integer width)."""
    global _sgemm, _dgemm, _int64
    _sgemm, _dgemm, _int64 = sgemm, dgemm, int64


def has_gemm():
    return gemm_ready()


cdef bint gemm_ready() noexcept nogil:
    return _sgemm != 0 and _dgemm != 0


cdef void sgemm(bint ta, bint tb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                const float* A, Py_ssize_t lda, const float* B, Py_ssize_t ldb,
                float beta, float* C, Py_ssize_t ldc) noexcept nogil:
    cdef int a = TRANS if ta else NO_TRANS, b = TRANS if tb else NO_TRANS
    if _int64:
        (<sgemm64_t>_sgemm)(ROW_MAJOR, a, b, M, N, K, 1.0, A, lda, B, ldb, beta, C, ldc)
    else:
        (<sgemm32_t>_sgemm)(ROW_MAJOR, a, b, <int32_t>M, <int32_t>N, <int32_t>K, 1.0, A, <int32_t>lda,
                            B, <int32_t>ldb, beta, C, <int32_t>ldc)


cdef void dgemm(bint ta, bint tb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                const double* A, Py_ssize_t lda, const double* B, Py_ssize_t ldb,
                double beta, double* C, Py_ssize_t ldc) noexcept nogil:
    cdef int a = TRANS if ta else NO_TRANS, b = TRANS if tb else NO_TRANS
    if _int64:
        (<dgemm64_t>_dgemm)(ROW_MAJOR, a, b, M, N, K, 1.0, A, lda, B, ldb, beta, C, ldc)
    else:
        (<dgemm32_t>_dgemm)(ROW_MAJOR, a, b, <int32_t>M, <int32_t>N, <int32_t>K, 1.0, A, <int32_t>lda,
                            B, <int32_t>ldb, beta, C, <int32_t>ldc)
