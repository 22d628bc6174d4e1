# cython: language_level=3
"""GELU forward and backward: exact (erf, torch's approximate='none') and the tanh
approximation (GPT-2's, torch's approximate='tanh'), side by side.

    exact:  gelu(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))   gelu'(x) = Phi(x) + x phi(x)
    tanh:   gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

Arrays are flattened to 1-D by the wrapper; nothing is cached, backward recomputes erf/tanh.
float32 runs branch-free rational fits of erf and tanh, a few ulp from libm's erff/tanhf,
because an opaque libm call keeps the loop from vectorising (the erf GELU's backward takes
fastmath.pxi's exp for the same reason); float64 calls libm.
Small arrays run a plain loop (num_threads == 1): entering an OpenMP region costs more.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport erf, tanh

include "fastmath.pxi"

cdef double SQRT_2_OVER_PI = 0.7978845608028654
cdef double COEF = 0.044715
cdef double SQRT_HALF = 0.7071067811865476
cdef double INV_SQRT_2PI = 0.3989422804014327
# from here on erf(x) rounds to 1 in float32 (erfc(x) = 2^-25): scripts/fit_erf.py
cdef float ERF_CLAMP = <float>3.919206


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


cdef inline floating _gelu_tanh(floating v) noexcept nogil:
    cdef floating t = _tanh(<floating>SQRT_2_OVER_PI * (v + <floating>COEF * v * v * v))
    return <floating>0.5 * v * (<floating>1.0 + t)


cdef inline floating _gelu_tanh_grad(floating v) noexcept nogil:
    cdef floating c = <floating>SQRT_2_OVER_PI, k = <floating>COEF
    cdef floating t = _tanh(c * (v + k * v * v * v))
    return (<floating>0.5 * (<floating>1.0 + t)
            + <floating>0.5 * v * (<floating>1.0 - t * t) * c * (<floating>1.0 + <floating>3.0 * k * v * v))


cdef inline float _erf_rational(float x) noexcept nogil:
    # x P(x^2) / Q(x^2) of degrees 9 and 12 (the shape of Eigen's float erf), fitted by
    # scripts/fit_erf.py for the least relative error on [0, ERF_CLAMP]; branch-free like
    # _tanh_rational, so the loop vectorises. Clamping x keeps x^2 finite for huge inputs.
    cdef float x2, p, q, r
    cdef float one = 1.0
    cdef float xc = x if x < ERF_CLAMP else ERF_CLAMP
    xc = xc if xc > -ERF_CLAMP else -ERF_CLAMP
    x2 = xc * xc
    p = <float>0.00023036577
    p = p * x2 + <float>0.0035795397
    p = p * x2 + <float>0.051493537
    p = p * x2 + <float>0.18967795
    p = p * x2 + <float>1.1283791
    q = <float>-1.12258434e-07
    q = q * x2 + <float>2.3162615e-05
    q = q * x2 + <float>0.0010534775
    q = q * x2 + <float>0.014423338
    q = q * x2 + <float>0.1127831
    q = q * x2 + <float>0.50143015
    q = q * x2 + one
    r = xc * p / q
    # near the clamp the fit lands a few ulp either side of 1: from the clamp on erf is exactly
    # +-1 (so gelu(x) = x and gelu(-x) = 0 for large x), and below it never beyond +-1
    r = r if x < ERF_CLAMP else one
    r = r if x > -ERF_CLAMP else -one
    r = r if r < one else one
    return r if r > -one else -one


cdef inline floating _erf(floating v) noexcept nogil:
    if floating is float:
        return _erf_rational(v)
    else:
        return erf(v)


cdef inline floating _gelu_erf(floating v) noexcept nogil:
    return <floating>0.5 * v * (<floating>1.0 + _erf(v * <floating>SQRT_HALF))


cdef inline floating _gelu_erf_grad(floating v) noexcept nogil:
    # Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    return (<floating>0.5 * (<floating>1.0 + _erf(v * <floating>SQRT_HALF))
            + v * <floating>INV_SQRT_2PI * _exp(<floating>-0.5 * v * v))


def gelu_forward(floating[::1] out,        # (N,)
                 const floating[::1] x,    # (N,)
                 int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], i
    if num_threads > 1:
        for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            out[i] = _gelu_tanh(x[i])
    else:
        with nogil:
            for i in range(N):
                out[i] = _gelu_tanh(x[i])


def gelu_backward(floating[::1] dx,          # (N,)  written (not accumulated)
                  const floating[::1] dout,  # (N,)
                  const floating[::1] x,     # (N,)
                  int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], i
    if num_threads > 1:
        for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            dx[i] = dout[i] * _gelu_tanh_grad(x[i])
    else:
        with nogil:
            for i in range(N):
                dx[i] = dout[i] * _gelu_tanh_grad(x[i])


# The exact GELU has kernels of its own, not a flag: with a flag in the loop GCC computed both
# variants and blended them rather than split the loop.

def gelu_erf_forward(floating[::1] out,        # (N,)
                     const floating[::1] x,    # (N,)
                     int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], i
    if num_threads > 1:
        for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            out[i] = _gelu_erf(x[i])
    else:
        with nogil:
            for i in range(N):
                out[i] = _gelu_erf(x[i])


def gelu_erf_backward(floating[::1] dx,          # (N,)  written (not accumulated)
                      const floating[::1] dout,  # (N,)
                      const floating[::1] x,     # (N,)
                      int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], i
    if num_threads > 1:
        for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            dx[i] = dout[i] * _gelu_erf_grad(x[i])
    else:
        with nogil:
            for i in range(N):
                dx[i] = dout[i] * _gelu_erf_grad(x[i])
