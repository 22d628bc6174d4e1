# cython: language_level=3
"""Rotary position embedding (RoPE) in Hugging Face's rotate_half convention, forward and
backward side by side.

x is (B, T, H * hd) with the heads side by side on the last axis, as the q/k projections make
it; cos and sin are the half-tables (T, hd / 2) (Hugging Face's cos is cat(freqs, freqs).cos(),
so its two halves are equal). Per head, with x1 = x[:hd/2] and x2 = x[hd/2:]:

    out1 = x1 cos - x2 sin,   out2 = x2 cos + x1 sin

The backward is the inverse rotation, the same loop with sin negated. Nothing is cached.
Small jobs run a plain loop (num_threads == 1): entering an OpenMP region costs more.
"""
from cython cimport floating
from cython.parallel cimport prange


cdef inline void _rotate_row(floating* out, const floating* x, const floating* c, const floating* s,
                             Py_ssize_t H, Py_ssize_t half, floating sign) noexcept nogil:
    """One position's H heads; sign -1 rotates back (the backward)."""
    cdef Py_ssize_t h, i, o
    cdef floating x1, x2, si
    for h in range(H):
        o = 2 * half * h
        for i in range(half):
            x1 = x[o + i]
            x2 = x[o + half + i]
            si = sign * s[i]
            out[o + i] = x1 * c[i] - x2 * si
            out[o + half + i] = x2 * c[i] + x1 * si


cdef inline void _rotate(floating[:, :, ::1] out, const floating[:, :, ::1] x,
                         const floating[:, ::1] cos, const floating[:, ::1] sin, Py_ssize_t H,
                         floating sign, int num_threads) noexcept nogil:
    cdef Py_ssize_t T = x.shape[1], half = cos.shape[1], n, b, t
    if num_threads > 1:
        for n in prange(x.shape[0] * T, schedule="static", num_threads=num_threads):
            b = n // T
            t = n % T
            _rotate_row(&out[b, t, 0], &x[b, t, 0], &cos[t, 0], &sin[t, 0], H, half, sign)
    else:
        for n in range(x.shape[0] * T):
            b = n // T
            t = n % T
            _rotate_row(&out[b, t, 0], &x[b, t, 0], &cos[t, 0], &sin[t, 0], H, half, sign)


def rope_forward(floating[:, :, ::1] out,        # (B, T, H * hd)
                 const floating[:, :, ::1] x,    # (B, T, H * hd)
                 const floating[:, ::1] cos,     # (T, hd / 2)
                 const floating[:, ::1] sin,     # (T, hd / 2)
                 int num_heads,
                 int num_threads=1):
    with nogil:
        _rotate(out, x, cos, sin, num_heads, 1, num_threads)


def rope_backward(floating[:, :, ::1] dx,         # (B, T, H * hd)  written (not accumulated)
                  const floating[:, :, ::1] dout, # (B, T, H * hd)
                  const floating[:, ::1] cos,     # (T, hd / 2)
                  const floating[:, ::1] sin,     # (T, hd / 2)
                  int num_heads,
                  int num_threads=1):
    with nogil:
        _rotate(dx, dout, cos, sin, num_heads, -1, num_threads)
