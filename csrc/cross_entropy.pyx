# cython: language_level=3
"""Masked next-token cross-entropy: log-softmax, NLL and the gradient in one pass over the logits.

logits (B, T, V), labels (B, T). Position t is scored against labels[b, t + 1] (the shift
happens here, so no shifted copy of the logits is ever made); labels equal to ignore_index
are skipped, and the last position of each row has no target. When compute_grad is set the
gradient of the mean loss, (softmax - onehot) * inv_count, is written to dlogits in the
same pass; skipped positions get zeros. Per-position losses go to row_loss (0 if skipped);
the wrapper sums them. Small jobs run a plain loop (num_threads == 1).
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport log
from libc.stdint cimport int64_t


include "fastmath.pxi"
include "reduce.pxi"


cdef inline void _row(floating[:, :, ::1] dlogits, floating[:, ::1] row_loss,
                      const floating[:, :, ::1] logits, const int64_t[:, ::1] labels,
                      int64_t ignore_index, double inv_count, bint compute_grad,
                      Py_ssize_t row) noexcept nogil:
    cdef Py_ssize_t T = logits.shape[1], V = logits.shape[2], b = row // T, t = row % T, v
    cdef int64_t target = ignore_index
    cdef floating mx
    cdef double total = 0.0, lse, scale
    if t + 1 < T:
        target = labels[b, t + 1]
    if target == ignore_index:
        row_loss[b, t] = 0
        if compute_grad:
            for v in range(V):
                dlogits[b, t, v] = 0
        return
    mx = _max(&logits[b, t, 0], V)
    if compute_grad:
        # exponentials go straight into dlogits and are rescaled once the sum is known; the
        # exp loop has no reduction in it, so it vectorises (the sum is reduce.pxi's)
        for v in range(V):
            dlogits[b, t, v] = _exp(logits[b, t, v] - mx)
        total = _sum(&dlogits[b, t, 0], V)
        scale = inv_count / total
        for v in range(V):
            dlogits[b, t, v] = <floating>(dlogits[b, t, v] * scale)
        dlogits[b, t, target] = <floating>(dlogits[b, t, target] - inv_count)
    else:
        for v in range(V):
            total += _exp(logits[b, t, v] - mx)
    lse = mx + log(total)
    row_loss[b, t] = <floating>(lse - logits[b, t, target])


def cross_entropy_forward(floating[:, :, ::1] dlogits,        # (B, T, V), or (0, 0, 0) without grad
                          floating[:, ::1] row_loss,          # (B, T) per-position loss, 0 if skipped
                          const floating[:, :, ::1] logits,   # (B, T, V)
                          const int64_t[:, ::1] labels,       # (B, T)
                          int64_t ignore_index,
                          double inv_count,
                          bint compute_grad,
                          int num_threads=1):
    cdef Py_ssize_t rows = logits.shape[0] * logits.shape[1], row
    if num_threads > 1:
        for row in prange(rows, nogil=True, schedule="static", num_threads=num_threads):
            _row(dlogits, row_loss, logits, labels, ignore_index, inv_count, compute_grad, row)
    else:
        with nogil:
            for row in range(rows):
                _row(dlogits, row_loss, logits, labels, ignore_index, inv_count, compute_grad, row)
