# cython: language_level=3
"""GELU, tanh approximation (as GPT-2 and torch's approximate='tanh'), forward and backward.

Arrays are flattened to 1-D by the wrapper; nothing is cached, backward recomputes tanh.
Small arrays run a plain loop (num_threads == 1): entering an OpenMP region costs more.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport tanh, tanhf

cdef double SQRT_2_OVER_PI = 0.7978845608028654
cdef double COEF = 0.044715


cdef inline floating _tanh(floating v) noexcept nogil:
    if floating is float:
        return tanhf(v)
    else:
        return tanh(v)


cdef inline floating _gelu(floating v) noexcept nogil:
    cdef floating t = _tanh(<floating>SQRT_2_OVER_PI * (v + <floating>COEF * v * v * v))
    return <floating>0.5 * v * (<floating>1.0 + t)


cdef inline floating _gelu_grad(floating v) noexcept nogil:
    cdef floating c = <floating>SQRT_2_OVER_PI, k = <floating>COEF
    cdef floating t = _tanh(c * (v + k * v * v * v))
    return (<floating>0.5 * (<floating>1.0 + t)
            + <floating>0.5 * v * (<floating>1.0 - t * t) * c * (<floating>1.0 + <floating>3.0 * k * v * v))


def gelu_forward(floating[::1] out,        # (N,)
                 const floating[::1] x,    # (N,)
                 int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], i
    if num_threads > 1:
        for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            out[i] = _gelu(x[i])
    else:
        with nogil:
            for i in range(N):
                out[i] = _gelu(x[i])


def gelu_backward(floating[::1] dx,          # (N,)  written (not accumulated)
                  const floating[::1] dout,  # (N,)
                  const floating[::1] x,     # (N,)
                  int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], i
    if num_threads > 1:
        for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            dx[i] = dout[i] * _gelu_grad(x[i])
    else:
        with nogil:
            for i in range(N):
                dx[i] = dout[i] * _gelu_grad(x[i])
