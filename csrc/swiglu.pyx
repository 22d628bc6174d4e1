# cython: language_level=3
"""SwiGLU's elementwise part, silu(gate) * up (Llama's act_fn(gate_proj(x)) * up_proj(x)),
forward and backward side by side.

    silu(g) = g s(g),  s(g) = 1 / (1 + exp(-g)),  silu'(g) = s(g) (1 + g (1 - s(g)))

Arrays are flattened to 1-D by the wrapper; nothing is cached, backward recomputes s(g).
float32 takes fastmath.pxi's branch-free exp, because libm's expf is an opaque call that keeps
the loop from vectorising; float64 calls libm. Past exp's range (g below about -88 in float32)
s(g) is 1 / inf = 0, so silu and both gradients go to 0 with the true values, never NaN.
Small arrays run a plain loop (num_threads == 1): entering an OpenMP region costs more.
"""
from cython cimport floating
from cython.parallel cimport prange

include "fastmath.pxi"


cdef inline floating _sigmoid(floating g) noexcept nogil:
    return <floating>1.0 / (<floating>1.0 + _exp(-g))


cdef inline void _backward_one(floating* dgate, floating* dup, floating dout, floating gate,
                               floating up) noexcept nogil:
    cdef floating s = _sigmoid(gate)
    dgate[0] = dout * up * s * (<floating>1.0 + gate * (<floating>1.0 - s))
    dup[0] = dout * gate * s


def silu_mul_forward(floating[::1] out,          # (N,)
                     const floating[::1] gate,   # (N,)
                     const floating[::1] up,     # (N,)
                     int num_threads=1):
    cdef Py_ssize_t N = gate.shape[0], i
    if num_threads > 1:
        for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            out[i] = gate[i] * _sigmoid(gate[i]) * up[i]
    else:
        with nogil:
            for i in range(N):
                out[i] = gate[i] * _sigmoid(gate[i]) * up[i]


def silu_mul_backward(floating[::1] dgate,        # (N,)  written (not accumulated)
                      floating[::1] dup,          # (N,)  written (not accumulated)
                      const floating[::1] dout,   # (N,)
                      const floating[::1] gate,   # (N,)
                      const floating[::1] up,     # (N,)
                      int num_threads=1):
    cdef Py_ssize_t N = gate.shape[0], i
    if num_threads > 1:
        for i in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            _backward_one(&dgate[i], &dup[i], dout[i], gate[i], up[i])
    else:
        with nogil:
            for i in range(N):
                _backward_one(&dgate[i], &dup[i], dout[i], gate[i], up[i])
