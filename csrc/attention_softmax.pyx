# cython: language_level=3
"""Causal scaled softmax for attention scores, forward and backward.

R = batch * heads independent (T, T) score matrices. Forward: P[r, i, j] =
softmax_j(scale * S[r, i, j]) over j <= i, and 0 for j > i (the causal mask).
Backward gives dS (with respect to the raw, unscaled scores) from P and dP.
The output may be the same buffer as the input: each row is read before it is written.
Packed rows pass `starts` (B, T) and num_heads (R = B * H): row i of matrix r then runs over
j in [starts[r // H, i], i], its own record, and is zero elsewhere (the backward is unchanged:
its gradients are multiples of those probabilities).
Small jobs run a plain loop (num_threads == 1): entering an OpenMP region costs more.
"""
from cython cimport floating
from cython.parallel cimport prange


include "fastmath.pxi"
include "reduce.pxi"
include "softmax_rows.pxi"


cdef inline void _forward_row(floating[:, :, ::1] probs, const floating[:, :, ::1] scores,
                              floating s, Py_ssize_t row, const int* starts, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t T = scores.shape[1], r = row // T, i = row % T
    cdef Py_ssize_t lo = starts[(r // H) * T + i] if starts != NULL else 0
    _softmax_row_from(&probs[r, i, 0], &scores[r, i, 0], lo, i + 1, T, s)


def causal_softmax_forward(floating[:, :, ::1] probs,          # (R, T, T)
                           const floating[:, :, ::1] scores,   # (R, T, T) raw q @ k^T
                           double scale,
                           int num_threads=1,
                           const int[:, ::1] starts=None,      # (R / num_heads, T) record starts, or None
                           int num_heads=1):
    cdef Py_ssize_t rows = scores.shape[0] * scores.shape[1], row, H = num_heads
    cdef floating s = <floating>scale
    cdef const int* st = NULL
    if starts is not None and starts.shape[0] * starts.shape[1] > 0:
        st = &starts[0, 0]
    if num_threads > 1:
        for row in prange(rows, nogil=True, schedule="static", num_threads=num_threads):
            _forward_row(probs, scores, s, row, st, H)
    else:
        with nogil:
            for row in range(rows):
                _forward_row(probs, scores, s, row, st, H)


cdef inline void _backward_row(floating[:, :, ::1] dscores, const floating[:, :, ::1] probs,
                               const floating[:, :, ::1] dprobs, floating s,
                               Py_ssize_t row) noexcept nogil:
    cdef Py_ssize_t T = probs.shape[1], r = row // T, i = row % T
    _softmax_row_backward(&dscores[r, i, 0], &probs[r, i, 0], &dprobs[r, i, 0], i + 1, T, s)


def causal_softmax_backward(floating[:, :, ::1] dscores,        # (R, T, T) written
                            const floating[:, :, ::1] probs,    # (R, T, T) from forward
                            const floating[:, :, ::1] dprobs,   # (R, T, T)
                            double scale,
                            int num_threads=1):
    cdef Py_ssize_t rows = probs.shape[0] * probs.shape[1], row
    cdef floating s = <floating>scale
    if num_threads > 1:
        for row in prange(rows, nogil=True, schedule="static", num_threads=num_threads):
            _backward_row(dscores, probs, dprobs, s, row)
    else:
        with nogil:
            for row in range(rows):
                _backward_row(dscores, probs, dprobs, s, row)
