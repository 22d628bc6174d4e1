"""Causal multi-head attention on ndarrays, forward and backward: the one place that picks how.

With NumPy's OpenBLAS reachable (fastlora._runtime.blas.gemm_pointers), the fused Cython kernel
(csrc/attention.pyx; switched with fastlora._runtime.gemm.set_enabled) runs every head's products and
softmax in one OpenMP loop, each thread on a single-threaded BLAS or, in the forward of small
heads, on the kernel's own register-blocked products (blas_products); otherwise NumPy's
stacked matmul runs the products (one BLAS call per (T, T) matrix, from one thread) around
the softmax kernel. All give the same numbers up to float rounding
(tests/test_gemm_attention.py). q, out: C-contiguous (B, T, D), H heads of hd = D / H;
k, v: (B, T, Hkv * hd), Hkv = num_kv_heads dividing H (grouped-query attention: query head h
reads key/value head h // (H / Hkv); num_kv_heads=None is H); probs: (B * H, T, T), the causal
softmax, zero above the diagonal. Neither path repeats k or v in memory: the NumPy one stacks
each group's query heads into one (G T, hd) operand against its key/value head.

Packed rows (several records in one row of T) pass starts (B, T): token i of row b attends to
[starts[b, i], i], its own record, never across; segment_starts(position_ids) makes them from
positions that restart at 0 at each record. Neither path makes a (T, T) mask: the softmax
kernels take each row's range.
"""
import numpy as np

from fastlora._ext import attention as _fused
from fastlora._ext import attention_softmax as _softmax
from fastlora._ext import blas as _blas_ext
from fastlora._runtime import blas
from fastlora._runtime.blas import threads_for_gemm
from fastlora._runtime.gemm import fused_available
from fastlora._runtime.threads import threads_for


def row_block(T):
    """Rows per causal block of the fused kernel: 32 up to T = 128, 64 beyond, where the bigger
    GEMMs win over the work skipped (measured on the small and base workloads, T = 128, 256)."""
    return 32 if T <= 128 else 64


def blas_products(head_dim):
    """Whether the fused forward's per-head products go to BLAS rather than its own register-
    blocked loops (csrc/small_gemm.h). Measured in one process, best of 160 calls: the loops
    take 0.053 vs 0.061 ms (tiny, head 8) and 0.50 vs 0.585 ms (small, head 32); BLAS's
    packing wins at 64 (base: 2.35 vs 2.75 ms), where a head's operands outgrow L1
    (bench/test_bench_kernels.py::test_attention_forward_own_products_vs_blas reruns it).
    The backward always uses BLAS."""
    return head_dim > 32


def _fused_threads(B, T, D, heads):
    # every head's products together decide, as one GEMM of that size would; `heads` are the
    # units the threads share (query heads forward, key/value heads backward)
    return 1 if B * heads < 2 else threads_for_gemm(B * T, T, D)


def _groups(num_heads, num_kv_heads):
    """(Hkv, G): key/value heads and query heads per key/value head."""
    kv = num_heads if num_kv_heads is None else num_kv_heads
    return kv, num_heads // kv


def segment_starts(position_ids, shape):
    """starts (B, T) int32 for packed rows, from position_ids (B, T) that count 0, 1, ... within
    each record: token i's record starts at i - position_ids[b, i]. ValueError unless each
    position is in [0, i] and goes up by one from the token before it or restarts at 0."""
    pos = np.asarray(position_ids)
    if pos.dtype.kind not in "iu":
        raise TypeError(f"position_ids must be an integer array, got dtype {pos.dtype}")
    if pos.shape != tuple(shape):
        raise ValueError(f"position_ids must have shape {tuple(shape)} like input_ids, got {pos.shape}")
    pos = pos.astype(np.int64)
    T = shape[1]
    starts = np.arange(T) - pos
    step = np.diff(pos, axis=1)
    if (pos < 0).any() or (starts < 0).any() or ((step != 1) & (pos[:, 1:] != 0)).any():
        raise ValueError("position_ids must count 0, 1, 2, ... within each record of a row (restarting "
                         "at 0 where a record starts), never above the token's index")
    return np.ascontiguousarray(starts, dtype=np.int32)


def check_starts(starts, B, T):
    """starts (B, T) for forward: ints with 0 <= starts[b, i] <= i, never decreasing along a row
    (the fused kernel skips the key columns before a block's first start) -> int32 C-contiguous."""
    starts = np.asarray(starts)
    if starts.dtype.kind not in "iu" or starts.shape != (B, T):
        raise ValueError(f"segment starts must be an int array of shape {(B, T)}, got {starts.dtype} {starts.shape}")
    if starts.size and ((starts < 0).any() or (starts > np.arange(T)).any() or (np.diff(starts, axis=1) < 0).any()):
        raise ValueError("segment starts must satisfy 0 <= starts[b, i] <= i and never decrease along a row "
                         "(each token's record starts where its records do, in order)")
    return np.ascontiguousarray(starts, dtype=np.int32)


def forward(q, k, v, num_heads, num_kv_heads=None, fused=None, starts=None):
    """(out (B, T, D), probs (B*H, T, T)) of softmax(q k^T / sqrt(hd) + causal mask) v per head;
    with starts (B, T) int32 (segment_starts), each token attends within its own record."""
    B, T, D = q.shape
    hd = D // num_heads
    scale = 1.0 / np.sqrt(hd)
    kv, groups = _groups(num_heads, num_kv_heads)
    if (fused_available() if fused is None else fused) and _blas_ext.has_gemm():
        out = np.empty_like(q)
        probs = np.empty((B * num_heads, T, T), dtype=q.dtype)
        blas.use(1, force=True)  # the kernel's threads each call BLAS, which must not start its own
        threads, blas_mm = _fused_threads(B, T, D, num_heads), blas_products(hd)
        scratch = np.empty((threads, 0 if blas_mm else 2 * hd, T), dtype=q.dtype)
        _fused.attention_forward(out, probs, scratch, q, k, v, num_heads, scale, threads, row_block(T),
                                 blas_mm, starts)
        return out, probs
    qh, kh, vh = _grouped(q, kv, groups), _heads(k, kv), _heads(v, kv)
    blas.use(threads_for_gemm(groups * T, T, hd))  # NumPy calls BLAS once per (G T, T) matrix of the stack
    scores = np.matmul(qh, kh.transpose(0, 1, 3, 2))  # (B, Hkv, G T, T), fresh and contiguous
    s3 = scores.reshape(B * num_heads, T, T)
    _softmax.causal_softmax_forward(s3, s3, scale, threads_for(s3.size), starts, num_heads)  # in place
    return _join(np.matmul(scores, vh), num_heads), s3


def backward(g, probs, q, k, v, num_heads, num_kv_heads=None, fused=None, starts=None):
    """(dq like q, dk like k, dv like v) from g = d out (B, T, D) and the forward's probs; a key/
    value head's gradients sum over its group of query heads. starts: the forward's, which only
    lets the fused kernel skip work (the probabilities are zero across records)."""
    B, T, D = q.shape
    hd = D // num_heads
    scale = 1.0 / np.sqrt(hd)
    kv, groups = _groups(num_heads, num_kv_heads)
    if (fused_available() if fused is None else fused) and _blas_ext.has_gemm():
        threads = _fused_threads(B, T, D, kv)
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        scratch = np.empty((threads, T, T), dtype=q.dtype)
        blas.use(1, force=True)
        _fused.attention_backward(dq, dk, dv, scratch, g, probs, q, k, v, num_heads, scale, threads, row_block(T),
                                  starts)
        return dq, dk, dv
    qh, gh, kh, vh = _grouped(q, kv, groups), _grouped(g, kv, groups), _heads(k, kv), _heads(v, kv)
    p4 = probs.reshape(B, kv, groups * T, T)
    blas.use(threads_for_gemm(groups * T, T, hd))
    dprobs = np.matmul(gh, vh.transpose(0, 1, 3, 2))
    dv = np.matmul(p4.transpose(0, 1, 3, 2), gh)  # (B, Hkv, T, hd): the group's sum
    d3 = dprobs.reshape(B * num_heads, T, T)
    _softmax.causal_softmax_backward(d3, probs, d3, scale, threads_for(d3.size))  # in place
    dq = np.matmul(dprobs, kh)
    dk = np.matmul(dprobs.transpose(0, 1, 3, 2), qh)
    return _join(dq, num_heads), _join(dk, kv), _join(dv, kv)


def _heads(a, num_heads):  # (B, T, D) -> (B, H, T, hd), a view
    B, T, D = a.shape
    return a.reshape(B, T, num_heads, D // num_heads).transpose(0, 2, 1, 3)


def _grouped(a, kv, groups):
    """(B, T, Hkv G hd) -> (B, Hkv, G T, hd): each key/value head's G query heads stacked
    (a view when G = 1: then it is _heads(a, Hkv))."""
    B, T, D = a.shape
    hd = D // (kv * groups)
    return a.reshape(B, T, kv, groups, hd).transpose(0, 2, 3, 1, 4).reshape(B, kv, groups * T, hd)


def _join(a, num_heads):  # (B, Hkv, G T, hd) or (B, H, T, hd) -> (B, T, H hd), contiguous
    B, hd = a.shape[0], a.shape[3]
    T = a.shape[1] * a.shape[2] // num_heads
    return np.ascontiguousarray(a.reshape(B, num_heads, T, hd).transpose(0, 2, 1, 3)).reshape(B, T, num_heads * hd)
