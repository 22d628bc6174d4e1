# cython: language_level=3
"""Global L2 norm of many gradients in one pass, and scaling them in place (gradient clipping).

The gradients of all parameters arrive as one table: the address of each C-contiguous array
(`ptrs`, P entries, all of one dtype chosen by `is_double`) and its length. The work is cut
into fixed chunks of CHUNK elements that never straddle two arrays; chunk c of array t is
numbered chunk_offsets[t] + c. Each chunk's sum of squares is accumulated in double into its
own slot and the slots are added in order afterwards, so the norm is bitwise the same for any
thread count (an OpenMP reduction would add in an unspecified order).

fill_table builds that table from a list of arrays. The caller (fastlora.optim.kernels) keeps the arrays alive and contiguous while this runs and
never passes an address it does not own; this module trusts its inputs.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t, intptr_t

include "reduce.pxi"

cnp.import_array()

cdef Py_ssize_t _CHUNK = 16384
CHUNK = _CHUNK  # the wrapper numbers the chunks with it


cdef inline Py_ssize_t _owner(const int64_t* chunk_offsets, Py_ssize_t P,
                              Py_ssize_t c) noexcept nogil:
    """The array that chunk c belongs to: the last t < P with chunk_offsets[t] <= c."""
    cdef Py_ssize_t lo = 0, hi = P, mid
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if chunk_offsets[mid] <= c:
            lo = mid
        else:
            hi = mid
    return lo


cdef inline void _scale(floating* x, Py_ssize_t n, floating coef) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        x[i] = x[i] * coef


cdef double _sum_squares_chunk(intptr_t base, Py_ssize_t start, Py_ssize_t n,
                               bint is_double) noexcept nogil:
    if is_double:
        return _sum_squares((<const double*>base) + start, n)
    return _sum_squares((<const float*>base) + start, n)


cdef void _scale_chunk(intptr_t base, Py_ssize_t start, Py_ssize_t n, double coef,
                       bint is_double) noexcept nogil:
    if is_double:
        _scale((<double*>base) + start, n, coef)
    else:
        _scale((<float*>base) + start, n, <float>coef)


def fill_table(intptr_t[::1] ptrs,             # (P,) written: address of each array's data
               int64_t[::1] sizes,             # (P,) written: elements in each array
               int64_t[::1] chunk_offsets,     # (P + 1,) written: first chunk of each array
               list arrays):                   # P C-contiguous ndarrays of one dtype (checked)
    """Describe `arrays` for sum_squares/scale. Runs with the GIL (it reads Python objects),
    but costs tens of nanoseconds per array where numpy's .ctypes.data costs microseconds."""
    cdef Py_ssize_t t, P = len(arrays)
    cdef cnp.ndarray a
    chunk_offsets[0] = 0
    for t in range(P):
        a = <cnp.ndarray>arrays[t]
        ptrs[t] = <intptr_t>cnp.PyArray_DATA(a)
        sizes[t] = cnp.PyArray_SIZE(a)
        chunk_offsets[t + 1] = chunk_offsets[t] + (sizes[t] + _CHUNK - 1) // _CHUNK


def sum_squares(double[::1] partial,                 # (C,) scratch: one slot per chunk
                const intptr_t[::1] ptrs,            # (P,) address of each array's first element
                const int64_t[::1] sizes,            # (P,) elements in each array
                const int64_t[::1] chunk_offsets,    # (P + 1,) first chunk of each array; [P] == C
                bint is_double,                      # float64 arrays (else float32)
                int num_threads=1):
    """Sum of squares of every element of every array, accumulated in double."""
    cdef Py_ssize_t C = partial.shape[0], P = ptrs.shape[0], c, t, start, n
    cdef const int64_t* offs = &chunk_offsets[0]
    cdef double total = 0.0
    # t, start and n are assigned in the loop body, so prange makes them thread-private
    if num_threads > 1:
        for c in prange(C, nogil=True, schedule="static", num_threads=num_threads):
            t = _owner(offs, P, c)
            start = (c - offs[t]) * _CHUNK
            n = min(_CHUNK, <Py_ssize_t>sizes[t] - start)
            partial[c] = _sum_squares_chunk(ptrs[t], start, n, is_double)
    else:
        with nogil:
            for c in range(C):
                t = _owner(offs, P, c)
                start = (c - offs[t]) * _CHUNK
                n = min(_CHUNK, <Py_ssize_t>sizes[t] - start)
                partial[c] = _sum_squares_chunk(ptrs[t], start, n, is_double)
    with nogil:
        for c in range(C):
            total += partial[c]
    return total


def scale(const intptr_t[::1] ptrs,            # (P,) address of each array's first element
          const int64_t[::1] sizes,            # (P,)
          const int64_t[::1] chunk_offsets,    # (P + 1,) as for sum_squares
          double coef,                         # rounded to the arrays' dtype, as torch's mul_
          bint is_double,
          int num_threads=1):
    """Multiply every element of every array by coef, in place."""
    cdef Py_ssize_t P = ptrs.shape[0], C = chunk_offsets[P], c, t, start, n
    cdef const int64_t* offs = &chunk_offsets[0]
    if num_threads > 1:
        for c in prange(C, nogil=True, schedule="static", num_threads=num_threads):
            t = _owner(offs, P, c)
            start = (c - offs[t]) * _CHUNK
            n = min(_CHUNK, <Py_ssize_t>sizes[t] - start)
            _scale_chunk(ptrs[t], start, n, coef, is_double)
    else:
        with nogil:
            for c in range(C):
                t = _owner(offs, P, c)
                start = (c - offs[t]) * _CHUNK
                n = min(_CHUNK, <Py_ssize_t>sizes[t] - start)
                _scale_chunk(ptrs[t], start, n, coef, is_double)
