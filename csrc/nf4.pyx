# cython: language_level=3
"""NF4 4-bit block quantization (QLoRA), both directions, plus the int8 double quantization
of the per-block absmax values. The format is described in fastlora/reference/nf4.py.

The weight is seen flattened: N elements, NB = ceil(N / block_size) blocks, block_size a power
of two passed as its log2 (`block_shift`) so that element i's block is i >> block_shift.
The 16-entry code table and its 15 decision thresholds are arguments, not constants here, so
the one table in fastlora.reference.nf4 is the only copy.

Threads: quantize and dequantize split the work by blocks (or bytes) with prange; every output
byte or element is written by exactly one iteration, so no two threads touch the same memory.
Small jobs (num_threads == 1) run a plain loop: starting an OpenMP team costs more than them.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport fabs, fabsf, rint

cdef enum:
    ZERO_CODE = 7          # the code of 0.0: all-zero blocks and the padding nibble
    DQ_SHIFT = 8           # 256 absmax values per double-quantization block
    DQ_MAX_CODE = 127


cdef inline floating _abs(floating v) noexcept nogil:
    if floating is float:
        return fabsf(v)
    else:
        return fabs(v)


cdef inline unsigned char _nearest_code(floating v, const floating* t) noexcept nogil:
    """#{k : v > t[k]} for the 15 sorted thresholds t: a branch-free binary search (4 compares)."""
    cdef int c = 8 if v > t[7] else 0
    if v > t[c + 3]:
        c = c + 4
    if v > t[c + 1]:
        c = c + 2
    if v > t[c]:
        c = c + 1
    return <unsigned char>c


cdef inline void _absmax_block(float* absmax, floating* amax, const floating* x,
                               Py_ssize_t b, Py_ssize_t N, int block_shift) noexcept nogil:
    cdef Py_ssize_t i, lo = b << block_shift, hi = (b + 1) << block_shift
    cdef floating m = 0, a
    if hi > N:
        hi = N
    for i in range(lo, hi):
        a = _abs(x[i])
        if a > m:
            m = a
    absmax[b] = <float>m
    amax[b] = m


cdef inline unsigned char _code_of(floating v, floating m, const floating* t) noexcept nogil:
    # Divide rather than multiply by 1/m (as bitsandbytes does): 1/m overflows for a subnormal
    # absmax, and quantizing is done once per weight, so the slower division is affordable.
    if m > 0:
        return _nearest_code(v / m, t)
    return ZERO_CODE


cdef inline unsigned char _pack_pair(const floating* x, const floating* amax, const floating* t,
                                     Py_ssize_t j, Py_ssize_t N, int block_shift) noexcept nogil:
    cdef Py_ssize_t i = 2 * j
    cdef unsigned char hi = _code_of(x[i], amax[i >> block_shift], t)
    cdef unsigned char lo = ZERO_CODE
    if i + 1 < N:
        lo = _code_of(x[i + 1], amax[(i + 1) >> block_shift], t)
    return <unsigned char>((hi << 4) | lo)


def nf4_quantize(unsigned char[::1] packed,        # (ceil(N / 2),)  written
                 float[::1] absmax,                # (NB,)           written
                 floating[::1] amax,               # (NB,)           scratch: absmax in x's precision
                 const floating[::1] x,            # (N,)
                 const floating[::1] thresholds,   # (15,) sorted midpoints between the codes
                 int block_shift,
                 int num_threads=1):
    cdef Py_ssize_t N = x.shape[0], NB = absmax.shape[0], NP = packed.shape[0], b, j
    cdef const floating* xp = &x[0]
    cdef const floating* tp = &thresholds[0]
    cdef floating* mp = &amax[0]
    cdef float* ap = &absmax[0]
    # Two passes: block absmax first, then one byte (two codes) per iteration, so a byte is
    # never shared between threads even when a block is a single element.
    if num_threads > 1:
        for b in prange(NB, nogil=True, schedule="static", num_threads=num_threads):
            _absmax_block(ap, mp, xp, b, N, block_shift)
        for j in prange(NP, nogil=True, schedule="static", num_threads=num_threads):
            packed[j] = _pack_pair(xp, mp, tp, j, N, block_shift)
    else:
        with nogil:
            for b in range(NB):
                _absmax_block(ap, mp, xp, b, N, block_shift)
            for j in range(NP):
                packed[j] = _pack_pair(xp, mp, tp, j, N, block_shift)


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
