"""The fused linear + cross-entropy of the LM head: the loss (and its gradients) of
hidden @ weight^T against the next tokens, without ever holding the (B, T, V) logits.

Liger-Kernel's fused linear cross-entropy is the model: only the rows that score are
gathered (a position whose next label is ignore_index needs no logits at all), then, a chunk
of rows at a time, one BLAS product makes the chunk's logits (chunk, V), the Cython kernel
(csrc/linear_cross_entropy.pyx) turns them into the rows' losses and, in place, into their
gradient, and two more products fold that gradient into d(hidden) rows and d(weight). Memory
beyond the inputs: one (chunk, V) buffer, reused, plus the (M, D) gathered rows and their
gradient. The gradients are computed in the forward pass, as Liger does (the backward only
scales them): recomputing the logits later would cost a third product.

Unchecked helpers: fastlora.kernels.linear_cross_entropy_forward validates and allocates for
users, fastlora.autograd.ops.linear_cross_entropy is the differentiable op.

Dimension letters: N = B * T positions, M the rows that score, D hidden width, V vocabulary.
"""
import numpy as np

from fastlora._ext import linear_cross_entropy as _kernel
from fastlora._runtime import gemm
from fastlora._runtime.threads import threads_for

# logits held at once, in elements (64 MiB of float32): each chunk's two products read the
# whole head weight (154 MB at GPT-2's vocabulary), so fewer, taller chunks pay that less often.
# Measured on 2 cores, GPT-2's head (768 scored rows, d(hidden) only), best of 3: 121 GFLOP/s in
# chunks of 83 rows (4M logits), 143-144 in 128 or 256, 137 in one chunk of 768
# (bench/test_bench_head.py::test_chunk_rows). The chunks are cut evenly: 768 rows are 3 x 256.
CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK_ROWS = 32
_NO_ARGMAX = np.empty(0, dtype=np.int64)


def scored_rows(labels, ignore_index):
    """labels (B, T) int64 -> (rows (M,) int64 flat indices into the B * T positions whose next
    label scores, targets (M,) int64 those labels): position t of row b is scored against
    labels[b, t + 1], as fl.cross_entropy does; the last position has no target."""
    B, T = labels.shape
    nxt = np.full((B, T), ignore_index, dtype=np.int64)
    nxt[:, :-1] = labels[:, 1:]
    flat = nxt.reshape(-1)
    rows = np.flatnonzero(flat != ignore_index)
    return rows, np.ascontiguousarray(flat[rows])


def chunk_rows_for(vocab_size, rows):
    """Rows per chunk: at most CHUNK_ELEMENTS of logits (but at least MIN_CHUNK_ROWS rows), the
    `rows` cut into that many equal chunks."""
    most = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab_size, 1))
    chunks = -(-rows // most)
    return int(max(1, -(-rows // max(chunks, 1))))


def forward(h, weight, targets, scale, want_dh, want_dw, chunk_rows=None, argmax=None):
    """The scored rows h (M, D) against weight (V, D) (both C-contiguous, one float dtype) and
    targets (M,) int64 in [0, V).

    Returns (sum of the M losses as a float64, dh (M, D) or None, dw (V, D) or None), the
    gradients being those of scale * that sum. argmax, an (M,) int64 array when given, gets
    each row's most likely class (first of ties, as np.argmax).
    """
    M, D = h.shape
    V = weight.shape[0]
    compute_grad = want_dh or want_dw
    dh = np.empty_like(h) if want_dh else None
    dw = np.zeros_like(weight) if want_dw else None
    if M == 0:
        return 0.0, dh, dw
    step = chunk_rows or chunk_rows_for(V, M)
    buffer = np.empty((min(step, M), V), dtype=h.dtype)
    row_loss = np.empty(M, dtype=h.dtype)
    for start in range(0, M, step):
        stop = min(start + step, M)
        logits = buffer[: stop - start]
        rows = h[start:stop]
        gemm.matmul(rows, weight, trans_b=True, out=logits)
        _kernel.cross_entropy_rows(logits, row_loss[start:stop], _NO_ARGMAX if argmax is None else argmax[start:stop],
                                   targets[start:stop], float(scale), compute_grad, threads_for(logits.size))
        if want_dh:  # d(rows) = dlogits @ W
            gemm.matmul(logits, weight, out=dh[start:stop])
        if want_dw:  # dW += dlogits^T @ rows
            gemm.matmul(logits, rows, trans_a=True, out=dw, accumulate=True)
    return float(row_loss.sum(dtype=np.float64)), dh, dw
