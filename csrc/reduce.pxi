# Row reductions for the kernels (included, not a module of its own), each accumulated in
# double by eight independent partial sums combined in a fixed order.
#
# Why eight: a single running sum is one chain of dependent adds, so a row of D entries
# costs D add latencies (about 4 cycles each) and never vectorises, because the compiler
# may not reorder float additions. Eight chains overlap in the pipeline and are packed into
# SIMD registers; the result is still deterministic (the order depends only on n).
from cython cimport floating


cdef inline double _combine8(double* acc) noexcept nogil:
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


cdef inline double _sum(const floating* x, Py_ssize_t n) noexcept nogil:
    """sum_i x[i]"""
    cdef double acc[8]
    cdef Py_ssize_t i = 0, j
    for j in range(8):
        acc[j] = 0.0
    while i + 8 <= n:
        for j in range(8):
            acc[j] += <double>x[i + j]
        i += 8
    while i < n:
        acc[0] += <double>x[i]
        i += 1
    return _combine8(acc)


cdef inline double _dot(const floating* a, const floating* b, Py_ssize_t n) noexcept nogil:
    """sum_i a[i] * b[i]"""
    cdef double acc[8]
    cdef Py_ssize_t i = 0, j
    for j in range(8):
        acc[j] = 0.0
    while i + 8 <= n:
        for j in range(8):
            acc[j] += <double>a[i + j] * <double>b[i + j]
        i += 8
    while i < n:
        acc[0] += <double>a[i] * <double>b[i]
        i += 1
    return _combine8(acc)


cdef inline double _sum_squares(const floating* x, Py_ssize_t n) noexcept nogil:
    """sum_i x[i]^2"""
    return _dot(x, x, n)


cdef inline double _sum_squared_deviations(const floating* x, Py_ssize_t n, double m) noexcept nogil:
    """sum_i (x[i] - m)^2, the two-pass variance's numerator (no cancellation)"""
    cdef double acc[8]
    cdef double diff
    cdef Py_ssize_t i = 0, j
    for j in range(8):
        acc[j] = 0.0
    while i + 8 <= n:
        for j in range(8):
            diff = <double>x[i + j] - m
            acc[j] += diff * diff
        i += 8
    while i < n:
        diff = <double>x[i] - m
        acc[0] += diff * diff
        i += 1
    return _combine8(acc)


cdef inline floating _max(const floating* x, Py_ssize_t n) noexcept nogil:
    """max_i x[i], n >= 1 (eight running maxima: the compare chain is as serial as a sum's)"""
    cdef floating acc[8]
    cdef Py_ssize_t i = 8, j
    if n < 8:
        acc[0] = x[0]
        for i in range(1, n):
            acc[0] = x[i] if x[i] > acc[0] else acc[0]
        return acc[0]
    for j in range(8):
        acc[j] = x[j]
    while i + 8 <= n:
        for j in range(8):
            acc[j] = x[i + j] if x[i + j] > acc[j] else acc[j]
        i += 8
    while i < n:
        acc[0] = x[i] if x[i] > acc[0] else acc[0]
        i += 1
    for j in range(1, 8):
        acc[0] = acc[j] if acc[j] > acc[0] else acc[0]
    return acc[0]
