# cython: language_level=3
"""Fused causal multi-head attention, forward and backward, head by head in one OpenMP loop.

q, out and dq are C-contiguous (B, T, D) arrays with the H heads side by side in D (head h is
columns h*hd ... h*hd + hd - 1); k, v, dk and dv are (B, T, Dkv) with Hkv = Dkv / hd heads,
Hkv dividing H (Hkv < H: grouped-query attention, GQA; Hkv = 1: multi-query). Query head h
reads key/value head h // (H / Hkv) in place: k and v are never repeated in memory. The
(B*H) heads of the forward, and the (B*Hkv) key/value heads of the backward (each with its
group of query heads, one after the other, so that dk and dv add up without a race), are
shared among OpenMP threads, with no Python between them; the scaled causal softmax runs
right after the product that made the scores, while they are still in cache.

Each head's products are either single-threaded BLAS GEMMs on strided views of those arrays
(leading dimension D: no copy, no transpose; BLAS packs the operands itself), or, in the
forward for small heads, csrc/small_gemm.h's register-blocked loops on the head's k
transposed and v packed (one short copy each), which skip BLAS's per-call packing and
dispatch; fastlora._runtime.attention picks (blas_products), from measurements.

Packed rows (several records in one row) pass `starts` (B, T): token i of row b attends to
positions [starts[b, i], i] only, the start of its own record, so attention never crosses
records; no (T, T) mask is made: each row's softmax runs over its own range and the
probabilities before it are zero, so the backward's gradients are zero across records too
(each is a multiple of those probabilities). Both skip the key columns before a row block's
first start (starts never decrease along a row), so packed rows cost what their records do.

Causality is used to skip work: rows are taken in blocks of `block` rows, and a block of rows
[r0, r1) only ever needs key/value positions [0, r1). For T = 128 and blocks of 32 that is
5/8 of the multiply-adds of the dense products. Smaller blocks skip more but make smaller,
less efficient GEMMs; fastlora._runtime.attention picks the size.

The BLAS is NumPy's own (OpenBLAS), reached through a function pointer that `set_gemm`
receives from fastlora._runtime.blas; the caller sets that BLAS to one thread first.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memcpy


include "fastmath.pxi"
include "reduce.pxi"
include "softmax_rows.pxi"

from fastlora._ext.blas cimport gemm as _gemm, gemm_ready
include "small_gemm.pxi"


cdef inline void _transpose(floating* out, const floating* a, Py_ssize_t rows, Py_ssize_t cols,
                            Py_ssize_t lda) noexcept nogil:
    """out (cols, rows), contiguous = a (rows, cols) with rows strided by lda, transposed.
    Sixteen columns (one 64-byte line) at a time: each line of a is read once, whole, even
    when a's rows are 1 KB apart and evict each other from L1, and the sixteen rows of out it
    feeds are each written in order."""
    cdef Py_ssize_t r, c, c0, c1
    for c0 in range(0, cols, 16):
        c1 = c0 + 16 if c0 + 16 < cols else cols
        for r in range(rows):
            for c in range(c0, c1):
                out[c * rows + r] = a[r * lda + c]


cdef inline void _pack(floating* out, const floating* a, Py_ssize_t T, Py_ssize_t D,
                       Py_ssize_t hd) noexcept nogil:
    """out (T, hd), contiguous = the head's block of a (rows strided by D)."""
    cdef Py_ssize_t t
    for t in range(T):
        memcpy(out + t * hd, a + t * D, hd * sizeof(floating))


cdef inline void _head_forward(floating* out, floating* P, const floating* q, const floating* k,
                               const floating* v, floating* work, Py_ssize_t T, Py_ssize_t D,
                               Py_ssize_t Dkv, Py_ssize_t hd, floating scale, Py_ssize_t block,
                               bint blas, const int* starts) noexcept nogil:
    """One head: P = causal softmax(scale q k^T) (T, T), out = P v; q, out strided by D, k, v by Dkv.
    starts: the row's (T,) record starts (row i's softmax over [starts[i], i]), or NULL (over [0, i]).
    blas: BLAS GEMMs on the strided operands (BLAS packs them itself). Otherwise small_gemm.h
    on k transposed and v packed into work, (2 hd, T) scratch, so the products read them from
    adjacent lines (a head's rows D apart fall in a few L1 sets and evict each other)."""
    cdef Py_ssize_t r0 = 0, r1, i, lo, k0
    cdef floating* kT = work
    cdef floating* vp = work + hd * T
    if not blas:
        _transpose(kT, k, T, hd, Dkv)
        _pack(vp, v, T, Dkv, hd)
    while r0 < T:
        r1 = r0 + block if r0 + block < T else T
        # the block's rows attend to key positions [k0, r1): starts never decrease along a row, so
        # k0 is its first row's start (0 without starts); the products skip the columns before it
        k0 = starts[r0] if starts != NULL else 0
        if blas:  # scores = q k^T
            _gemm(False, True, r1 - r0, r1 - k0, hd, q + r0 * D, D, k + k0 * Dkv, Dkv, 0, P + r0 * T + k0, T)
        else:
            _mm(r1 - r0, r1 - k0, hd, q + r0 * D, D, 1, kT + k0, T, 0, P + r0 * T + k0, T)
        for i in range(r0, r1):
            lo = starts[i] if starts != NULL else 0
            _softmax_row_from(P + i * T, P + i * T, lo, i + 1, T, scale)  # zeros to T: P is whole
        if blas:  # out = P v
            _gemm(False, False, r1 - r0, hd, r1 - k0, P + r0 * T + k0, T, v + k0 * Dkv, Dkv, 0, out + r0 * D, D)
        else:
            _mm(r1 - r0, hd, r1 - k0, P + r0 * T + k0, T, 1, vp + k0 * hd, hd, 0, out + r0 * D, D)
        r0 = r1


cdef inline void _head_backward(floating* dq, floating* dk, floating* dv, floating* dS,
                                const floating* g, const floating* P, const floating* q,
                                const floating* k, const floating* v, Py_ssize_t T, Py_ssize_t D,
                                Py_ssize_t Dkv, Py_ssize_t hd, floating scale, Py_ssize_t block,
                                bint accumulate, const int* starts) noexcept nogil:
    """One head's dq, and its share of dk, dv, from g = d out, by BLAS GEMMs on the strided
    operands (q, g, dq strided by D; k, v, dk, dv by Dkv); dS is a (T, T) scratch. accumulate:
    add to dk, dv (a later query head of a GQA group) rather than write them. (small_gemm.h's
    loops were measured here too, and lost at every workload: the transposed products and
    their packing cost more than BLAS's calls.) starts: the row's record starts or NULL, as in
    _head_forward; a block then works on key columns [k0, r1) only, k0 its first row's start."""
    cdef Py_ssize_t r1, i, t, c, last = ((T - 1) // block) * block, r0 = last, k0 = 0
    cdef floating beta
    if starts != NULL and not accumulate:  # blocks may skip key rows: none is left unwritten
        for t in range(T):
            for c in range(hd):
                dk[t * Dkv + c] = 0
                dv[t * Dkv + c] = 0
    # blocks last to first: the last covers every key row [0, T) and writes dk, dv with beta 0
    # (unless accumulating, or zeroed above), the earlier ones (fewer key rows) add to them
    while r0 >= 0:
        r1 = r0 + block if r0 + block < T else T
        beta = 0 if r0 == last and not accumulate and starts == NULL else 1
        if starts != NULL:
            k0 = starts[r0]
        _gemm(False, True, r1 - r0, r1 - k0, hd, g + r0 * D, D, v + k0 * Dkv, Dkv, 0, dS + r0 * T + k0, T)  # dP = g v^T
        _gemm(True, False, r1 - k0, hd, r1 - r0, P + r0 * T + k0, T, g + r0 * D, D, beta, dv + k0 * Dkv, Dkv)  # dv += P^T g
        for i in range(r0, r1):
            _softmax_row_backward(dS + i * T + k0, P + i * T + k0, dS + i * T + k0, i + 1 - k0, r1 - k0, scale)
        _gemm(False, False, r1 - r0, hd, r1 - k0, dS + r0 * T + k0, T, k + k0 * Dkv, Dkv, 0, dq + r0 * D, D)  # dq = dS k
        _gemm(True, False, r1 - k0, hd, r1 - r0, dS + r0 * T + k0, T, q + r0 * D, D, beta, dk + k0 * Dkv, Dkv)  # dk += dS^T q
        r0 -= block


def _check_args(int block, bint blas, floating[:, :, ::1] scratch, Py_ssize_t threads,
                Py_ssize_t rows, Py_ssize_t T):
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if blas and not gemm_ready():
        raise RuntimeError("blas=True needs fastlora._ext.blas.set_gemm first")
    # scratch is the one argument the kernels write through raw pointers without a shape of its own
    if scratch.shape[0] < threads or scratch.shape[1] < rows or scratch.shape[2] != T:
        raise ValueError(f"scratch must be at least ({threads}, {rows}, {T}), got "
                         f"({scratch.shape[0]}, {scratch.shape[1]}, {scratch.shape[2]})")


cdef inline Py_ssize_t _group(const floating[:, :, ::1] q, const floating[:, :, ::1] k) noexcept nogil:
    """G, query heads per key/value head: D / Dkv = H / Hkv (1 for heads of size 0)."""
    return q.shape[2] // k.shape[2] if k.shape[2] > 0 else 1


cdef inline void _forward_head_n(Py_ssize_t n, bint blas, floating[:, :, ::1] out,
                                 floating[:, :, ::1] probs, floating* work,
                                 const floating[:, :, ::1] q, const floating[:, :, ::1] k,
                                 const floating[:, :, ::1] v, Py_ssize_t H, Py_ssize_t G,
                                 floating scale, Py_ssize_t block, const int* starts) noexcept nogil:
    """Head n of the B * H; it reads key/value head (n % H) // G. starts: (B, T) or NULL."""
    cdef Py_ssize_t T = q.shape[1], D = q.shape[2], hd = D // H, o = (n % H) * hd, b = n // H
    cdef Py_ssize_t Dkv = k.shape[2], okv = ((n % H) // G) * hd
    _head_forward(&out[b, 0, o], &probs[n, 0, 0], &q[b, 0, o], &k[b, 0, okv], &v[b, 0, okv],
                  work, T, D, Dkv, hd, scale, block, blas, starts + b * T if starts != NULL else NULL)


def attention_forward(floating[:, :, ::1] out,        # (B, T, D) written
                      floating[:, :, ::1] probs,      # (B*H, T, T) written: the causal softmax
                      floating[:, :, ::1] scratch,    # (num_threads, 2 hd, T); unused with blas
                      const floating[:, :, ::1] q,    # (B, T, D)
                      const floating[:, :, ::1] k,    # (B, T, Dkv)
                      const floating[:, :, ::1] v,    # (B, T, Dkv)
                      int num_heads, double scale, int num_threads=1, int block=32, bint blas=False,
                      const int[:, ::1] starts=None):  # (B, T) record starts, 0 <= starts[b, i] <= i, never
                                                       # decreasing along a row; None: 0
    """blas: the products by NumPy's BLAS (set_gemm) instead of small_gemm.h."""
    cdef Py_ssize_t H = num_heads, G = _group(q, k), hd = q.shape[2] // num_heads, T = q.shape[1], n
    cdef floating s = <floating>scale
    cdef const int* st = NULL
    _check_args(block, blas, scratch, max(num_threads, 1), 0 if blas else 2 * hd, T)
    if starts is not None and starts.shape[0] * starts.shape[1] > 0:
        st = &starts[0, 0]
    if num_threads > 1:
        for n in prange(q.shape[0] * H, nogil=True, schedule="static", num_threads=num_threads):
            _forward_head_n(n, blas, out, probs, &scratch[threadid(), 0, 0], q, k, v, H, G, s, block, st)
    else:
        with nogil:
            for n in range(q.shape[0] * H):
                _forward_head_n(n, blas, out, probs, &scratch[0, 0, 0], q, k, v, H, G, s, block, st)


cdef inline void _backward_kv_head_n(Py_ssize_t n, floating[:, :, ::1] dq, floating[:, :, ::1] dk,
                                     floating[:, :, ::1] dv, floating* dS, const floating[:, :, ::1] g,
                                     const floating[:, :, ::1] probs, const floating[:, :, ::1] q,
                                     const floating[:, :, ::1] k, const floating[:, :, ::1] v,
                                     Py_ssize_t H, Py_ssize_t G, floating scale,
                                     Py_ssize_t block, const int* starts) noexcept nogil:
    """Key/value head n of the B * Hkv, with its G query heads one after the other. starts: (B, T) or NULL."""
    cdef Py_ssize_t T = q.shape[1], D = q.shape[2], hd = D // H, Dkv = k.shape[2]
    cdef Py_ssize_t b = n // (H // G), first = (n % (H // G)) * G, okv = (n % (H // G)) * hd, h, o
    for h in range(first, first + G):
        o = h * hd
        _head_backward(&dq[b, 0, o], &dk[b, 0, okv], &dv[b, 0, okv], dS, &g[b, 0, o],
                       &probs[b * H + h, 0, 0], &q[b, 0, o], &k[b, 0, okv], &v[b, 0, okv],
                       T, D, Dkv, hd, scale, block, h > first, starts + b * T if starts != NULL else NULL)


def attention_backward(floating[:, :, ::1] dq,        # (B, T, D) written
                       floating[:, :, ::1] dk,        # (B, T, Dkv) written
                       floating[:, :, ::1] dv,        # (B, T, Dkv) written
                       floating[:, :, ::1] scratch,   # (num_threads, T, T)
                       const floating[:, :, ::1] g,   # (B, T, D) gradient of out
                       const floating[:, :, ::1] probs,
                       const floating[:, :, ::1] q,
                       const floating[:, :, ::1] k,
                       const floating[:, :, ::1] v,
                       int num_heads, double scale, int num_threads=1, int block=32,
                       const int[:, ::1] starts=None):  # the forward's (B, T) record starts, or None
    """num_threads share the B * Hkv key/value heads (B * H without GQA). starts only saves work:
    the probabilities are already zero across records."""
    cdef Py_ssize_t H = num_heads, G = _group(q, k), n
    cdef floating s = <floating>scale
    cdef const int* st = NULL
    _check_args(block, True, scratch, max(num_threads, 1), q.shape[1], q.shape[1])
    if starts is not None and starts.shape[0] * starts.shape[1] > 0:
        st = &starts[0, 0]
    if num_threads > 1:
        for n in prange(q.shape[0] * (H // G), nogil=True, schedule="static", num_threads=num_threads):
            _backward_kv_head_n(n, dq, dk, dv, &scratch[threadid(), 0, 0], g, probs, q, k, v, H, G, s, block, st)
    else:
        with nogil:
            for n in range(q.shape[0] * (H // G)):
                _backward_kv_head_n(n, dq, dk, dv, &scratch[0, 0, 0], g, probs, q, k, v, H, G, s, block, st)
