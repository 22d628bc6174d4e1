# cython: language_level=3
"""Dropout of the LoRA branch input, with its mask drawn from a counter-based hash.

keep(i) = (splitmix64(seed, i) >> 11) >= threshold, i the flat element index: the same
(seed, i) always gives the same decision, so backward recomputes the mask instead of the
forward storing it (no (N, I) mask or dropped-out copy is kept between the passes), and
drawing, masking and scaling are one pass instead of NumPy's four. The wrappers in
fastlora/lora/kernels.py check and allocate; the NumPy twin is fastlora/reference/lora.py.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport uint64_t

cdef uint64_t GOLDEN = 0x9E3779B97F4A7C15
cdef uint64_t MIX1 = 0xBF58476D1CE4E5B9
cdef uint64_t MIX2 = 0x94D049BB133111EB


cdef inline uint64_t _hash(uint64_t seed, uint64_t i) noexcept nogil:
    """splitmix64 of the (i + 1)-th step from seed (unsigned arithmetic wraps, as intended)."""
    cdef uint64_t z = seed + (i + 1) * GOLDEN
    z = (z ^ (z >> 30)) * MIX1
    z = (z ^ (z >> 27)) * MIX2
    return z ^ (z >> 31)


def lora_dropout_forward(floating[::1] out,        # (N * I,)  written
                         const floating[::1] x,    # (N * I,)
                         uint64_t threshold,       # keep iff (hash >> 11) >= threshold
                         double scale,             # 1 / (1 - p)
                         uint64_t seed,
                         int num_threads=1):
    cdef Py_ssize_t n = x.shape[0], i
    cdef floating s = <floating>scale
    if num_threads > 1:
        for i in prange(n, nogil=True, schedule="static", num_threads=num_threads):
            out[i] = x[i] * s if (_hash(seed, i) >> 11) >= threshold else 0
    else:
        with nogil:
            for i in range(n):
                out[i] = x[i] * s if (_hash(seed, i) >> 11) >= threshold else 0


def lora_dropout_backward(floating[::1] dx,         # (N * I,)  accumulated: dx += mask * scale * t
                          const floating[::1] t,    # (N * I,)  gradient at the dropout output
                          uint64_t threshold,
                          double scale,
                          uint64_t seed,
                          int num_threads=1):
    cdef Py_ssize_t n = t.shape[0], i
    cdef floating s = <floating>scale
    if num_threads > 1:
        for i in prange(n, nogil=True, schedule="static", num_threads=num_threads):
            if (_hash(seed, i) >> 11) >= threshold:
                dx[i] += t[i] * s
    else:
        with nogil:
            for i in range(n):
                if (_hash(seed, i) >> 11) >= threshold:
                    dx[i] += t[i] * s
