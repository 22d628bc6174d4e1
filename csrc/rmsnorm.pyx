# cython: language_level=3
"""RMSNorm over the last axis (Llama's, Hugging Face's LlamaRMSNorm), forward and backward.

    y = x * rstd * weight,   rstd = 1 / sqrt(mean(x^2) + eps)

Shapes: N rows of D features. Forward caches rstd per row for the backward; x-hat = x * rstd
is recomputed from it rather than stored. Row sums run in double (reduce.pxi); the result is
rounded to the input's dtype before the weight multiplies it, as Hugging Face does.
Kernels take preallocated C-contiguous outputs and never validate: fastlora.kernels does.
Small jobs run a plain loop (num_threads == 1): entering an OpenMP region costs more.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

include "reduce.pxi"


cdef inline void _forward_row(floating[:, ::1] out, floating[::1] rstd, const floating[:, ::1] x,
                              const floating[::1] weight, double eps, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t D = x.shape[1], d
    cdef double r = 1.0 / sqrt(_sum_squares(&x[n, 0], D) / D + eps)
    rstd[n] = <floating>r
    for d in range(D):
        out[n, d] = <floating>(x[n, d] * r) * weight[d]


def rmsnorm_forward(floating[:, ::1] out,        # (N, D)
                    floating[::1] rstd,          # (N,)   cached for backward
                    const floating[:, ::1] x,    # (N, D)
                    const floating[::1] weight,  # (D,)
                    double eps,
                    int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], n
    if num_threads > 1:
        for n in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            _forward_row(out, rstd, x, weight, eps, n)
    else:
        with nogil:
            for n in range(N):
                _forward_row(out, rstd, x, weight, eps, n)


cdef inline void _backward_row(floating[:, ::1] dx, const floating[:, ::1] dout,
                               const floating[:, ::1] x, const floating[::1] rstd,
                               const floating[::1] weight, Py_ssize_t n) noexcept nogil:
    # dx = r (g - xhat mean(g xhat)), g = dout * weight, xhat = x r
    cdef Py_ssize_t D = x.shape[1], d, i = 0, j
    cdef double r = rstd[n], c
    cdef double acc[8]
    for j in range(8):  # sum(g x) in eight partial sums (reduce.pxi says why)
        acc[j] = 0.0
    while i + 8 <= D:
        for j in range(8):
            acc[j] += <double>dout[n, i + j] * weight[i + j] * x[n, i + j]
        i += 8
    while i < D:
        acc[0] += <double>dout[n, i] * weight[i] * x[n, i]
        i += 1
    c = _combine8(acc) * r * r / D  # mean(g xhat) r, so that dx = r (g - c x)
    for d in range(D):
        dx[n, d] = <floating>(r * (<double>dout[n, d] * weight[d] - c * x[n, d]))


def rmsnorm_backward(floating[:, ::1] dx,          # (N, D)  written (not accumulated)
                     floating[::1] dweight,        # (D,)    accumulated (+=); (0,) to skip it (frozen)
                     const floating[:, ::1] dout,  # (N, D)
                     const floating[:, ::1] x,     # (N, D)
                     const floating[::1] rstd,     # (N,)    from forward
                     const floating[::1] weight,   # (D,)
                     int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], D = x.shape[1], n, d
    cdef floating r
    if num_threads > 1:
        for n in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            _backward_row(dx, dout, x, rstd, weight, n)
    else:
        with nogil:
            for n in range(N):
                _backward_row(dx, dout, x, rstd, weight, n)
    if dweight.shape[0] == 0:
        return
    # dweight reduces over rows: serial over rows, vectorisable over D, no races
    with nogil:
        for n in range(N):
            r = rstd[n]
            for d in range(D):
                dweight[d] += x[n, d] * r * dout[n, d]
