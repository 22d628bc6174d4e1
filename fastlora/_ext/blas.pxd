# What the kernels that call BLAS cimport (csrc/blas.pyx is the module; scikit-learn cimports its
# BLAS the same way): row-major C = op(A) op(B) + beta C through NumPy's own OpenBLAS.
from cython cimport floating

cdef bint gemm_ready() noexcept nogil

cdef void sgemm(bint ta, bint tb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                const float* A, Py_ssize_t lda, const float* B, Py_ssize_t ldb,
                float beta, float* C, Py_ssize_t ldc) noexcept nogil

cdef void dgemm(bint ta, bint tb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                const double* A, Py_ssize_t lda, const double* B, Py_ssize_t ldb,
                double beta, double* C, Py_ssize_t ldc) noexcept nogil


cdef inline void gemm(bint ta, bint tb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                      const floating* A, Py_ssize_t lda, const floating* B, Py_ssize_t ldb,
                      floating beta, floating* C, Py_ssize_t ldc) noexcept nogil:
    """C = op(A) op(B) + beta C, row-major (CBLAS), in A's precision."""
    if floating is float:
        sgemm(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc)
    else:
        dgemm(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc)
