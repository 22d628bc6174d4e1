# cython: language_level=3
"""NF4 4-bit block quantization (QLoRA), both directions, plus the int8 double quantization
of the per-block absmax values. The format is described in fastlora/reference/nf4.py.

The weight is seen flattened: N elements, NB = ceil(N / block_size) blocks, block_size a power
of two passed as its log2 (`block_shift`) so that element i's block is i >> block_shift.
The 16-entry code table and its 15 decision thresholds are arguments, not constants here, so
the one table in fastlora.reference.nf4 is the only copy.

Kernels: nf4_quantize (weight -> codes + float32 absmax), nf4_dequantize (a contiguous range
of the flattened weight: the whole of it, or whole rows), nf4_dequantize_cols (a strip of
columns of a 2-D weight), absmax_quantize / absmax_dequantize (the double quantization).

Threads: prange over blocks, chunks of CHUNK elements, or rows; every output byte or element
is written by exactly one iteration, so no two threads touch the same memory. Small jobs
(num_threads == 1) run a plain loop: starting an OpenMP team costs more than them.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport fabs, fabsf, rint

cdef enum:
    ZERO_CODE = 7          # the code of 0.0: all-zero blocks and the padding nibble
    DQ_SHIFT = 8           # 256 absmax values per double-quantization block
    DQ_MAX_CODE = 127
    CHUNK = 4096           # elements per quantizing work item: even, and 4 KiB of codes on the stack


cdef inline floating _abs(floating v) noexcept nogil:
    if floating is float:
        return fabsf(v)
    else:
        return fabs(v)


cdef inline unsigned char _nearest_code(floating v, const floating* t) noexcept nogil:
    # How many of the 15 sorted midpoints v exceeds = the index of the nearest code. Fifteen
    # compares and no branch: a binary search's data-dependent branches mispredict on random
    # weights and made quantizing ~4x slower.
    return <unsigned char>((v > t[0]) + (v > t[1]) + (v > t[2]) + (v > t[3]) + (v > t[4])
                           + (v > t[5]) + (v > t[6]) + (v > t[7]) + (v > t[8]) + (v > t[9])
                           + (v > t[10]) + (v > t[11]) + (v > t[12]) + (v > t[13]) + (v > t[14]))


cdef inline void _absmax_block(float* absmax, floating* amax, const floating* x,
                               Py_ssize_t b, Py_ssize_t N, int block_shift) noexcept nogil:
    cdef Py_ssize_t i, k, lo = b << block_shift, hi = (b + 1) << block_shift
    cdef floating lane[8]
    cdef floating m = 0, a
    if hi > N:
        hi = N
    # Eight running maxima, one per lane, so the compiler can use vector max instructions; a
    # single running max is a serial dependency it will not reorder without -ffast-math.
    for k in range(8):
        lane[k] = 0
    i = lo
    while i + 8 <= hi:
        for k in range(8):
            a = _abs(x[i + k])
            lane[k] = a if a > lane[k] else lane[k]
        i = i + 8
    for k in range(8):
        if lane[k] > m:
            m = lane[k]
    for i in range(i, hi):
        a = _abs(x[i])
        if a > m:
            m = a
    absmax[b] = <float>m
    amax[b] = m


cdef inline void _quantize_chunk(unsigned char* packed, const floating* x, const floating* amax,
                                 const floating* thresholds, Py_ssize_t lo, Py_ssize_t hi,
                                 int block_shift) noexcept nogil:
    """Codes of elements [lo, hi), lo even, into bytes lo / 2 ... (hi - 1) / 2."""
    cdef unsigned char codes[CHUNK]
    cdef floating t[15]
    cdef floating m
    cdef Py_ssize_t i = lo, e, k, j, n = hi - lo
    # A local copy: writes to `codes` (char, which may alias anything) would otherwise force
    # the compiler to reload the thresholds on every element.
    for k in range(15):
        t[k] = thresholds[k]
    while i < hi:
        e = ((i >> block_shift) + 1) << block_shift
        if e > hi:
            e = hi
        m = amax[i >> block_shift]
        if m > 0:
            # Divide rather than multiply by 1/m as bitsandbytes does: 1/m overflows for a
            # subnormal absmax.
            for k in range(i, e):
                codes[k - lo] = _nearest_code(x[k] / m, t)
        else:
            for k in range(i, e):
                codes[k - lo] = ZERO_CODE
        i = e
    for j in range(n >> 1):
        packed[(lo >> 1) + j] = <unsigned char>((codes[2 * j] << 4) | codes[2 * j + 1])
    if n & 1:
        packed[(lo >> 1) + (n >> 1)] = <unsigned char>((codes[n - 1] << 4) | ZERO_CODE)


def nf4_quantize(unsigned char[::1] packed,        # (ceil(N / 2),)  written
                 float[::1] absmax,                # (NB,)           written
                 floating[::1] amax,               # (NB,)           scratch: absmax in x's precision
                 const floating[::1] x,            # (N,)
                 const floating[::1] thresholds,   # (15,) sorted midpoints between the codes
                 int block_shift,
                 int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], NB = absmax.shape[0], NC = (N + CHUNK - 1) // CHUNK, b, c
    cdef const floating* xp = &x[0]
    cdef const floating* tp = &thresholds[0]
    cdef floating* mp = &amax[0]
    cdef float* ap = &absmax[0]
    cdef unsigned char* pp = &packed[0]
    # Two passes: block absmax first, then codes in chunks of CHUNK elements. CHUNK is even, so
    # no byte is shared between two chunks (threads), whatever the block size.
    if num_threads > 1:
        for b in prange(NB, nogil=True, schedule="static", num_threads=num_threads):
            _absmax_block(ap, mp, xp, b, N, block_shift)
        for c in prange(NC, nogil=True, schedule="static", num_threads=num_threads):
            _quantize_chunk(pp, xp, mp, tp, c * CHUNK, N if (c + 1) * CHUNK > N else (c + 1) * CHUNK,
                            block_shift)
    else:
        with nogil:
            for b in range(NB):
                _absmax_block(ap, mp, xp, b, N, block_shift)
            for c in range(NC):
                _quantize_chunk(pp, xp, mp, tp, c * CHUNK, N if (c + 1) * CHUNK > N else (c + 1) * CHUNK,
                                block_shift)


cdef inline void _dequant_block(floating* out, const unsigned char* packed, const float* code,
                                float scale, Py_ssize_t lo, Py_ssize_t hi,
                                Py_ssize_t start) noexcept nogil:
    """out[i - start] = code[c_i] * scale for i in [lo, hi), in the output's precision."""
    cdef Py_ssize_t i = lo
    cdef unsigned char byte
    cdef floating s = <floating>scale
    if i < hi and (i & 1):
        out[i - start] = <floating>code[packed[i >> 1] & 15] * s
        i = i + 1
    while i + 1 < hi:
        byte = packed[i >> 1]
        out[i - start] = <floating>code[byte >> 4] * s
        out[i + 1 - start] = <floating>code[byte & 15] * s
        i = i + 2
    if i < hi:
        out[i - start] = <floating>code[packed[i >> 1] >> 4] * s


cdef inline float _block_scale(const float* absmax, const signed char* absmax_q,
                               const float* absmax_step, double mean, bint double_quant,
                               Py_ssize_t b) noexcept nogil:
    # q * step is exact in double (8-bit times 24-bit), so FMA or not, one rounding to float.
    if double_quant:
        return <float>(<double>absmax_q[b] * <double>absmax_step[b >> DQ_SHIFT] + mean)
    return absmax[b]


def nf4_dequantize(floating[::1] out,                  # (stop - start,)  written
                   const unsigned char[::1] packed,    # (ceil(N / 2),)
                   const float[::1] code,              # (16,) the NF4 values
                   const float[::1] absmax,            # (NB,) float32 absmax, or (1,) unused with double_quant
                   const signed char[::1] absmax_q,    # (NB,) int8 codes, or (1,) unused without
                   const float[::1] absmax_step,       # (ceil(NB / 256),), or (1,) unused without
                   double absmax_mean,
                   bint double_quant,
                   Py_ssize_t start,                   # first flattened element to produce
                   int block_shift,
                   int num_threads=1):
    """Elements [start, start + len(out)) of the flattened weight: a whole tensor or a range of rows."""
    cdef Py_ssize_t stop = start + out.shape[0], b, b0, b1, lo, hi
    cdef floating* op
    cdef const unsigned char* pp = &packed[0]
    cdef const float* cp = &code[0]
    cdef const float* ap = &absmax[0]
    cdef const signed char* qp = &absmax_q[0]
    cdef const float* sp = &absmax_step[0]
    if stop <= start:
        return
    op = &out[0]
    b0 = start >> block_shift
    b1 = ((stop - 1) >> block_shift) + 1
    if num_threads > 1:
        for b in prange(b0, b1, nogil=True, schedule="static", num_threads=num_threads):
            lo = b << block_shift
            hi = (b + 1) << block_shift
            _dequant_block(op, pp, cp, _block_scale(ap, qp, sp, absmax_mean, double_quant, b),
                           start if lo < start else lo, stop if hi > stop else hi, start)
    else:
        with nogil:
            for b in range(b0, b1):
                lo = b << block_shift
                hi = (b + 1) << block_shift
                _dequant_block(op, pp, cp, _block_scale(ap, qp, sp, absmax_mean, double_quant, b),
                               start if lo < start else lo, stop if hi > stop else hi, start)


cdef inline void _dequant_range(floating* out, const unsigned char* packed, const float* code,
                                const float* absmax, const signed char* absmax_q,
                                const float* absmax_step, double mean, bint double_quant,
                                Py_ssize_t lo, Py_ssize_t hi, int block_shift) noexcept nogil:
    """out[i - lo] for the flattened elements i in [lo, hi), block after block, on one thread."""
    cdef Py_ssize_t b, e
    while lo < hi:
        b = lo >> block_shift
        e = (b + 1) << block_shift
        if e > hi:
            e = hi
        _dequant_block(out, packed, code, _block_scale(absmax, absmax_q, absmax_step, mean,
                                                       double_quant, b), lo, e, lo)
        out = out + (e - lo)
        lo = e


def nf4_dequantize_cols(floating[::1] out,                  # (R * C,) an (R, C) tile, written
                        const unsigned char[::1] packed,    # (ceil(N / 2),)
                        const float[::1] code,              # (16,)
                        const float[::1] absmax,            # as nf4_dequantize
                        const signed char[::1] absmax_q,
                        const float[::1] absmax_step,
                        double absmax_mean,
                        bint double_quant,
                        Py_ssize_t row_start,               # first of the R rows
                        Py_ssize_t col_start,               # first of the C columns
                        Py_ssize_t C,
                        Py_ssize_t K,                       # row length of the weight (in_features)
                        int block_shift,
                        int num_threads=1):
    """W[row_start : row_start + R, col_start : col_start + C] of the (rows, K) weight: a strip
    of columns, for products that contract over the rows (g @ W). One row per iteration."""
    cdef Py_ssize_t R = out.shape[0] // C if C > 0 else 0, r, lo
    cdef floating* op
    cdef const unsigned char* pp = &packed[0]
    cdef const float* cp = &code[0]
    cdef const float* ap = &absmax[0]
    cdef const signed char* qp = &absmax_q[0]
    cdef const float* sp = &absmax_step[0]
    if R == 0:
        return
    op = &out[0]
    if num_threads > 1:
        for r in prange(R, nogil=True, schedule="static", num_threads=num_threads):
            lo = (row_start + r) * K + col_start
            _dequant_range(op + r * C, pp, cp, ap, qp, sp, absmax_mean, double_quant,
                           lo, lo + C, block_shift)
    else:
        with nogil:
            for r in range(R):
                lo = (row_start + r) * K + col_start
                _dequant_range(op + r * C, pp, cp, ap, qp, sp, absmax_mean, double_quant,
                               lo, lo + C, block_shift)


# --- double quantization of the absmax values: int8, symmetric, one step per 256 values -----

def absmax_quantize(signed char[::1] q,         # (NB,)              written
                    float[::1] step,            # (ceil(NB / 256),)  written
                    const float[::1] absmax,    # (NB,)
                    float mean):
    """q = round((absmax - mean) / step), step = max|absmax - mean| / 127 per 256-block.

    NB is N / 64 for a weight of N elements: small, so this runs on one thread.
    """
    cdef Py_ssize_t NB = absmax.shape[0], ND = step.shape[0], d, i, lo, hi
    cdef float c, m
    cdef double r
    with nogil:
        for d in range(ND):
            lo = d << DQ_SHIFT
            hi = (d + 1) << DQ_SHIFT
            if hi > NB:
                hi = NB
            m = 0
            for i in range(lo, hi):
                c = fabsf(absmax[i] - mean)
                if c > m:
                    m = c
            step[d] = m / <float>DQ_MAX_CODE
            for i in range(lo, hi):
                if step[d] > 0:
                    r = rint(<double>(absmax[i] - mean) / <double>step[d])
                else:
                    r = 0
                if r > DQ_MAX_CODE:
                    r = DQ_MAX_CODE
                elif r < -DQ_MAX_CODE:
                    r = -DQ_MAX_CODE
                q[i] = <signed char>r


def absmax_dequantize(float[::1] absmax,              # (NB,)  written
                      const signed char[::1] q,       # (NB,)
                      const float[::1] step,          # (ceil(NB / 256),)
                      double mean):
    cdef Py_ssize_t NB = q.shape[0], i
    with nogil:
        for i in range(NB):
            absmax[i] = <float>(<double>q[i] * <double>step[i >> DQ_SHIFT] + mean)
