# cython: language_level=3
"""GELU, tanh approximation (as GPT-2 and torch's approximate='tanh'), forward and backward.

Arrays are flattened to 1-D by the wrapper; nothing is cached, backward recomputes tanh.
Small arrays run a plain loop (num_threads == 1): entering an OpenMP region costs more.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport tanh

cdef double SQRT_2_OVER_PI = 0.7978845608028654
cdef double COEF = 0.044715


cdef inline float _tanh_rational(float x) noexcept nogil:
    # Eigen's float tanh: a 13/6 rational fit on [-7.9053, 7.9053] (beyond it tanh rounds to +-1
    # in float32), a few ulp from libm's tanhf but branch-free, so the loop vectorises; libm's
    # tanhf made GELU a third of a base-workload step.
    cdef float x2, p, q
    cdef float clamp = <float>7.90531110763549805
    # float literals (the casts) keep the arithmetic in float32; plain literals would be double
    # conditional expressions (not if-statements or min/max) become minss/maxss: no branch, vectorises
    x = x if x < clamp else clamp
    x = x if x > -clamp else -clamp
    x2 = x * x
    p = <float>-2.76076847742355e-16
    p = p * x2 + <float>2.00018790482477e-13
    p = p * x2 + <float>-8.60467152213735e-11
    p = p * x2 + <float>5.12229709037114e-08
    p = p * x2 + <float>1.48572235717979e-05
    p = p * x2 + <float>6.37261928875436e-04
    p = p * x2 + <float>4.89352455891786e-03
    q = <float>1.19825839466702e-06
    q = q * x2 + <float>1.18534705686654e-04
    q = q * x2 + <float>2.26843463243900e-03
    q = q * x2 + <float>4.89352518554385e-03
    return x * p / q


cdef inline floating _tanh(floating v) noexcept nogil:
    if floating is float:
        return _tanh_rational(v)
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
