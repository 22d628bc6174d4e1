# csrc/small_gemm.h's register-blocked products for Cython's fused float type (included by
# the kernels that multiply small, cache-resident blocks themselves rather than through BLAS).
from cython cimport floating


cdef extern from "small_gemm.h" nogil:
    void fl_small_gemm_f(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* A, Py_ssize_t ars,
                         Py_ssize_t acs, const float* B, Py_ssize_t ldb, float beta, float* C,
                         Py_ssize_t ldc)
    void fl_small_gemm_d(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const double* A, Py_ssize_t ars,
                         Py_ssize_t acs, const double* B, Py_ssize_t ldb, double beta, double* C,
                         Py_ssize_t ldc)


cdef inline void _mm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating* A, Py_ssize_t ars,
                     Py_ssize_t acs, const floating* B, Py_ssize_t ldb, floating beta, floating* C,
                     Py_ssize_t ldc) noexcept nogil:
    """C (m, n) = beta C + A B: A[i, p] at A[i * ars + p * acs], B and C row-major (small_gemm.h)."""
    if floating is float:
        fl_small_gemm_f(m, n, k, A, ars, acs, B, ldb, beta, C, ldc)
    else:
        fl_small_gemm_d(m, n, k, A, ars, acs, B, ldb, beta, C, ldc)
