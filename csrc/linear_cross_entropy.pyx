# cython: language_level=3
"""The softmax / cross-entropy half of the fused head + loss (fastlora.nn.head, fastlora.kernels):
rows of logits already paired with their targets, turned into their losses and, in place, into
their gradients.

The fused linear + cross-entropy never holds (B, T, V): it gathers the rows that score, and
for each chunk of them computes logits = hidden @ W^T with one BLAS product, calls this kernel,
then multiplies the gradient rows back into d(hidden) and d(W). This kernel is the part between
the products: per row r, lse = log sum exp(logits[r]), row_loss[r] = lse - logits[r, target[r]],
and, with compute_grad, logits[r] becomes scale * (softmax(logits[r]) - onehot(target[r])), the
gradient of scale * the loss (scale = 1 / scored rows: the mean). When asked, argmax[r] is the
first index of the row's largest logit (NumPy's argmax; evaluation's accuracy). Rows run in
parallel.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport log
from libc.stdint cimport int64_t


include "fastmath.pxi"
include "reduce.pxi"


cdef inline void _row(floating* z, floating* row_loss, int64_t* argmax, int64_t target, Py_ssize_t V,
                      double scale, bint compute_grad) noexcept nogil:
    cdef Py_ssize_t v
    cdef floating mx = _max(z, V), picked = z[target]
    cdef double total = 0.0, ratio
    if argmax != NULL:
        for v in range(V):
            if z[v] == mx:
                argmax[0] = v
                break
    if compute_grad:
        # exponentials overwrite the logits and are rescaled once their sum is known; the exp
        # loop has no reduction in it, so it vectorises (the sum is reduce.pxi's)
        for v in range(V):
            z[v] = _exp(z[v] - mx)
        total = _sum(z, V)
        ratio = scale / total
        for v in range(V):
            z[v] = <floating>(z[v] * ratio)
        z[target] = <floating>(z[target] - scale)
    else:
        for v in range(V):
            total += _exp(z[v] - mx)
    row_loss[0] = <floating>(mx + log(total) - picked)


def cross_entropy_rows(floating[:, ::1] logits,       # (N, V) in: logits; out: their gradient (compute_grad)
                       floating[::1] row_loss,        # (N,) out: each row's loss
                       int64_t[::1] argmax,           # (N,) out: each row's argmax, or (0,): not wanted
                       const int64_t[::1] targets,    # (N,) the class of each row, in [0, V)
                       double scale,                  # the gradient is of scale * sum of the losses
                       bint compute_grad,
                       int num_threads=1):
    cdef Py_ssize_t N = logits.shape[0], V = logits.shape[1], r
    cdef bint want_argmax = argmax.shape[0] > 0
    if N == 0:
        return
    if num_threads > 1:
        for r in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            _row(&logits[r, 0], &row_loss[r], &argmax[r] if want_argmax else NULL, targets[r], V, scale,
                 compute_grad)
    else:
        with nogil:
            for r in range(N):
                _row(&logits[r, 0], &row_loss[r], &argmax[r] if want_argmax else NULL, targets[r], V, scale,
                     compute_grad)
