# cython: language_level=3
"""LayerNorm over the last axis, forward and backward side by side.

Shapes: N rows of D features. Forward caches mean and rstd (1/std) per row for the
backward; x-hat is recomputed from them rather than stored (it is cheap).
Kernels take preallocated C-contiguous outputs and never validate: fastlora.kernels does.
Each row is one inline function, run by a plain loop when num_threads == 1 (entering an
OpenMP region costs more than a small job) and by prange otherwise.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

include "reduce.pxi"


cdef inline void _forward_row(floating[:, ::1] out, floating[::1] mean, floating[::1] rstd,
                              const floating[:, ::1] x, const floating[::1] weight,
                              const floating[::1] bias, double eps, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t D = x.shape[1], d
    cdef double m = _sum(&x[n, 0], D) / D
    cdef double r = 1.0 / sqrt(_sum_squared_deviations(&x[n, 0], D, m) / D + eps)
    mean[n] = <floating>m
    rstd[n] = <floating>r
    for d in range(D):
        out[n, d] = <floating>((x[n, d] - m) * r) * weight[d] + bias[d]


def layernorm_forward(floating[:, ::1] out,        # (N, D)
                      floating[::1] mean,          # (N,)   cached for backward
                      floating[::1] rstd,          # (N,)   cached for backward
                      const floating[:, ::1] x,    # (N, D)
                      const floating[::1] weight,  # (D,)
                      const floating[::1] bias,    # (D,)
                      double eps,
                      int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], n
    if num_threads > 1:
        for n in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            _forward_row(out, mean, rstd, x, weight, bias, eps, n)
    else:
        with nogil:
            for n in range(N):
                _forward_row(out, mean, rstd, x, weight, bias, eps, n)


cdef inline void _backward_row(floating[:, ::1] dx, const floating[:, ::1] dout,
                               const floating[:, ::1] x, const floating[::1] mean,
                               const floating[::1] rstd, const floating[::1] weight,
                               Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t D = x.shape[1], d, i = 0, j
    cdef double m = mean[n], r = rstd[n], g, xhat, sum_g, sum_g_xhat
    cdef double acc_g[8]
    cdef double acc_gx[8]
    # the two row sums, each in eight independent partial sums (reduce.pxi says why)
    for j in range(8):
        acc_g[j] = 0.0
        acc_gx[j] = 0.0
    while i + 8 <= D:
        for j in range(8):
            g = <double>dout[n, i + j] * weight[i + j]
            acc_g[j] += g
            acc_gx[j] += g * (x[n, i + j] - m)
        i += 8
    while i < D:
        g = <double>dout[n, i] * weight[i]
        acc_g[0] += g
        acc_gx[0] += g * (x[n, i] - m)
        i += 1
    sum_g = _combine8(acc_g) / D
    sum_g_xhat = _combine8(acc_gx) * r / D
    for d in range(D):
        g = dout[n, d] * weight[d]
        xhat = (x[n, d] - m) * r
        dx[n, d] = <floating>(r * (g - sum_g - xhat * sum_g_xhat))


def layernorm_backward(floating[:, ::1] dx,          # (N, D)  written (not accumulated)
                       floating[::1] dweight,        # (D,)    accumulated (+=); both (0,) to skip
                       floating[::1] dbias,          # (D,)    accumulated (+=)   them (frozen affine)
                       const floating[:, ::1] dout,  # (N, D)
                       const floating[:, ::1] x,     # (N, D)
                       const floating[::1] mean,     # (N,)
                       const floating[::1] rstd,     # (N,)
                       const floating[::1] weight,   # (D,)
                       int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], D = x.shape[1], n, d
    cdef floating m, r
    if num_threads > 1:
        for n in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            _backward_row(dx, dout, x, mean, rstd, weight, n)
    else:
        with nogil:
            for n in range(N):
                _backward_row(dx, dout, x, mean, rstd, weight, n)
    if dweight.shape[0] == 0:
        return
    # dweight/dbias reduce over rows: serial over rows, vectorisable over D, no races.
    with nogil:
        for n in range(N):
            m = mean[n]
            r = rstd[n]
            for d in range(D):
                dweight[d] += (x[n, d] - m) * r * dout[n, d]
                dbias[d] += dout[n, d]
