# The row-block bodies of the dense LoRA linear (csrc/lora_linear.pyx), shared with DoRA
# (csrc/dora.pyx), which runs the same products on its own epilogue and prologue. Included after
# blas_gemm.pxi and small_gemm.pxi; see lora_linear.pyx for what each product is and why blocks.

cdef enum:
    CHUNK = 32  # rows per rank-R step: a chunk of x or g (32 x 384 floats at most here) stays in L1

cdef void _forward_block(floating[:, ::1] out, floating[:, ::1] u, const floating[:, ::1] x,
                         const floating[:, ::1] W, const floating[::1] bias,
                         const floating[:, ::1] sAT, const floating[:, ::1] BT,
                         Py_ssize_t n0, Py_ssize_t n1) noexcept nogil:
    cdef Py_ssize_t N = n1 - n0, O = W.shape[0], I = W.shape[1], R = sAT.shape[1], n, o
    cdef floating beta = 0
    if N <= 0:
        return
    if bias.shape[0] > 0:
        for n in range(n0, n1):
            for o in range(O):
                out[n, o] = bias[o]
        beta = 1
    _gemm(False, True, N, O, I, &x[n0, 0], I, &W[0, 0], I, beta, &out[n0, 0], O)  # x W^T (+ b)
    _mm(N, R, I, &x[n0, 0], I, 1, &sAT[0, 0], R, 0, &u[n0, 0], R)                # u = s x A^T
    _mm(N, O, R, &u[n0, 0], R, 1, &BT[0, 0], O, 1, &out[n0, 0], O)               # out += u B^T


cdef void _backward_block(floating[:, ::1] dx, floating* dA, floating* dB, floating* v,
                          const floating[:, ::1] g, const floating[:, ::1] x,
                          const floating[:, ::1] u, const floating[:, ::1] W,
                          const floating[:, ::1] A, const floating[:, ::1] sB,
                          Py_ssize_t n0, Py_ssize_t n1) noexcept nogil:
    """Rows [n0, n1): dx written (when dx has rows), dA (R, I) and dB (O, R) added to; v is
    (CHUNK, R) scratch."""
    cdef Py_ssize_t O = W.shape[0], I = W.shape[1], R = A.shape[0], c0, c
    cdef bint want_dx = dx.shape[0] > 0
    if n1 <= n0:
        return
    if want_dx:
        _gemm(False, False, n1 - n0, I, O, &g[n0, 0], O, &W[0, 0], I, 0, &dx[n0, 0], I)  # g W
    c0 = n0
    while c0 < n1:
        c = CHUNK if c0 + CHUNK <= n1 else n1 - c0
        _mm(c, R, O, &g[c0, 0], O, 1, &sB[0, 0], R, 0, v, R)                    # v = s g B
        if want_dx:
            _mm(c, I, R, v, R, 1, &A[0, 0], I, 1, &dx[c0, 0], I)                # dx += v A
        _mm(R, I, c, v, 1, R, &x[c0, 0], I, 1, dA, I)                           # dA += v^T x
        _mm(O, R, c, &g[c0, 0], 1, O, &u[c0, 0], R, 1, dB, R)                   # dB += g^T u
        c0 += c
