# Branch-free float32 exp for the kernels' softmax loops (included, not a module of its own),
# and _exp: that one for float32, libm's exp for float64.
#
# libm's expf is an opaque call, so a loop that calls it never vectorises; this one is plain
# arithmetic (Cephes' expf polynomial after a range reduction by ln 2), within 2 ulp of expf
# on [-87.3, 88.7], and inputs are clamped to that range (exp of anything below is 0 in the
# softmax sums anyway). The power of two is built in the float's exponent bits.
from cython cimport floating
from libc.math cimport exp
from libc.stdint cimport int32_t
from libc.string cimport memcpy


cdef inline float fast_expf(float x) noexcept nogil:
    cdef float hi = <float>88.3762626647949, lo = <float>-87.3365447505531
    cdef float log2e = <float>1.44269504088896341
    cdef float c1 = <float>0.693359375, c2 = <float>-2.12194440e-4
    cdef float r, p, scale
    cdef int32_t n, bits
    x = x if x < hi else hi
    x = x if x > lo else lo
    # n = round(x / ln 2): shifted positive so truncation is floor, then shifted back
    n = <int32_t>(x * log2e + <float>128.5) - 128
    r = x - <float>n * c1 - <float>n * c2
    p = <float>1.9875691500e-4
    p = p * r + <float>1.3981999507e-3
    p = p * r + <float>8.3334519073e-3
    p = p * r + <float>4.1665795894e-2
    p = p * r + <float>1.6666665459e-1
    p = p * r + <float>5.0000001201e-1
    p = p * r * r + r + <float>1.0
    bits = (n + 127) << 23
    memcpy(&scale, &bits, 4)
    return p * scale


cdef inline floating _exp(floating v) noexcept nogil:
    if floating is float:
        return fast_expf(v)
    else:
        return exp(v)
