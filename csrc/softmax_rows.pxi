# One row of the scaled causal softmax and of its backward, on raw pointers (included by the
# softmax and fused-attention kernels, after fastmath.pxi and reduce.pxi). A row has n_valid
# entries that take part (positions j <= i) and is written up to n_total, the rest as zeros.
# Input and output may be the same row: every entry is read before it is written.

cdef inline void _softmax_row(floating* p, const floating* s, Py_ssize_t n_valid,
                              Py_ssize_t n_total, floating scale) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating mx
    cdef double inv
    if scale >= 0:  # the largest scaled score is then the scaled largest score
        mx = _max(s, n_valid) * scale
    else:  # only through the drop-in kernel: attention's scale is 1/sqrt(head_dim)
        mx = s[0] * scale
        for j in range(1, n_valid):
            mx = s[j] * scale if s[j] * scale > mx else mx
    for j in range(n_valid):  # an exp loop without the sum in it vectorises
        p[j] = _exp(s[j] * scale - mx)
    inv = 1.0 / _sum(p, n_valid)
    for j in range(n_valid):
        p[j] = <floating>(p[j] * inv)
    for j in range(n_valid, n_total):
        p[j] = 0


cdef inline void _softmax_row_from(floating* p, const floating* s, Py_ssize_t lo, Py_ssize_t n_valid,
                                   Py_ssize_t n_total, floating scale) noexcept nogil:
    """The row's softmax over entries [lo, n_valid) (a packed row: the query's own record), zeros
    before lo and from n_valid to n_total."""
    cdef Py_ssize_t j
    _softmax_row(p + lo, s + lo, n_valid - lo, n_total - lo, scale)
    for j in range(lo):
        p[j] = 0


cdef inline void _softmax_row_backward(floating* ds, const floating* p, const floating* dp,
                                       Py_ssize_t n_valid, Py_ssize_t n_total,
                                       floating scale) noexcept nogil:
    """ds = scale * p * (dp - <p, dp>): the gradient w.r.t. the raw (unscaled) scores."""
    cdef Py_ssize_t j
    cdef floating fdot = <floating>_dot(p, dp, n_valid)
    for j in range(n_valid):
        ds[j] = scale * p[j] * (dp[j] - fdot)
    for j in range(n_valid, n_total):
        ds[j] = 0
