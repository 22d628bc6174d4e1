"""DoRA's linear op: one autograd node for the base product, the LoRA branch, the magnitude and bias.

DoRA (weight-decomposed LoRA, as PEFT's `use_dora=True`) trains, beside A and B, a magnitude
m (O,) per output row; the adapted weight W + s B A is normalised per row and rescaled by it:

    W' = (m / n) * (W + s B A),   n = ||W + s B A|| per row, a constant (PEFT detaches it)
    out = x W'^T + b = f * (x W^T + s x A^T B^T) + b,   f = m / n

In training with dropout, PEFT applies the scale to the dropped-out input's products only:
out = x W^T + b + (f - 1) * x' W^T + f * s x' A^T B^T, x' = dropout(x); so does this op.

`weight_norm(W, A, B, scaling)` gives n (the layer computes it each forward, outside the graph,
and passes it in: the op's gradient is then exact for its inputs, which a float64 gradcheck
checks). Without dropout, forward and backward are csrc/dora.pyx (see there); otherwise every
product is a BLAS GEMM. Backward (n constant, gs = g * f):

    dm = sum_n g * y / n  (y = x W^T + s x A^T B^T, kept from the forward)
    dB = gs^T u,  u = s x A^T;   v = s gs B;   dA = v^T x;   dx = gs W + v A;   db = sum_n g

Dimension letters: N rows (batch * time), I in_features, O out_features, R rank.
"""
import numpy as np

from fastlora._ext import dora as _dora
from fastlora._ext import lora as _lora
from fastlora._runtime import blas
from fastlora._runtime import gemm
from fastlora._runtime.threads import threads_for
from fastlora.autograd.tensor import Tensor, make_result
from fastlora.lora.kernels import check_dropout_args
from fastlora.lora.ops import _check, _dropout


def _fused(dtype):
    return gemm.fused_available() and dtype in (np.float32, np.float64)


def weight_norm(weight, lora_A, lora_B, scaling):
    """||W + s B A|| per output row, (O,) in W's dtype: ndarrays W (O, I), A (R, I), B (O, R)."""
    W, A, B = weight, lora_A, lora_B
    if W.dtype != A.dtype or W.dtype != B.dtype:
        raise TypeError(f"weight, lora_A and lora_B must share one dtype, got {W.dtype}, {A.dtype}, {B.dtype}")
    if W.ndim != 2 or A.shape != (A.shape[0], W.shape[1]) or B.shape != (W.shape[0], A.shape[0]):
        raise ValueError(f"weight (O, I), lora_A (R, I) and lora_B (O, R) do not fit: {W.shape}, {A.shape}, {B.shape}")
    sB = np.ascontiguousarray(B) * W.dtype.type(scaling)
    if not _fused(W.dtype):
        return np.linalg.norm(W + sB @ A, axis=1).astype(W.dtype, copy=False)
    O, I = W.shape
    threads = max(1, min(blas.threads_for_gemm(O, I, A.shape[0]), (O + _dora.CHUNK_ROWS - 1) // _dora.CHUNK_ROWS))
    norm = np.empty(O, dtype=W.dtype)
    _dora.dora_weight_norm(norm, np.empty((threads, _dora.CHUNK_ROWS, I), W.dtype), np.ascontiguousarray(W),
                           np.ascontiguousarray(A), sB, threads)
    return norm


def _check_dora(magnitude, norm, O, dtype):
    if not isinstance(magnitude, Tensor):
        raise TypeError(f"magnitude must be a Tensor, got {type(magnitude).__name__}")
    if magnitude.shape != (O,) or magnitude.dtype != dtype:
        raise ValueError(f"magnitude must be ({O},) {dtype}, got {magnitude.shape} {magnitude.dtype}")
    if not isinstance(norm, np.ndarray) or norm.shape != (O,):
        raise ValueError(f"weight_norm must be an ndarray ({O},), got {getattr(norm, 'shape', type(norm).__name__)}")


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, weight_norm, dropout_p=0.0, seed=0):
    """x (..., I) -> (..., O): PEFT's DoRA output as one autograd op (see the module docstring).

    weight (O, I) a Tensor (normally frozen); bias (O,) or None; lora_A (R, I); lora_B (O, R);
    magnitude (O,): Tensors of one dtype. weight_norm: ndarray (O,), ||W + s B A|| per row (a
    constant here). dropout_p / seed as in fastlora.lora.ops.lora_linear.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"DoRA needs a dense weight Tensor, got {type(weight).__name__}")
    _check(x, weight, bias, lora_A, lora_B)
    O, I = weight.shape
    _check_dora(magnitude, weight_norm, O, weight.dtype)
    threshold, keep_scale, seed = check_dropout_args(dropout_p, seed, x.size if dropout_p > 0 else 0)
    use_dropout = dropout_p > 0.0
    dtype = weight.dtype
    W, A, B, b = weight.data, lora_A.data, lora_B.data, None if bias is None else bias.data
    rnorm = (1.0 / weight_norm.astype(np.float64)).astype(dtype)
    f = (magnitude.data.astype(np.float64) / weight_norm).astype(dtype)
    x2 = np.ascontiguousarray(x.data.reshape(-1, I))
    N = x2.shape[0]
    s = dtype.type(scaling)
    fused = not use_dropout and _fused(dtype)

    if fused:
        out = np.empty((N, O), dtype)
        y = np.empty((N, O), dtype)
        u = np.empty((N, A.shape[0]), dtype)
        threads = blas.threads_for_gemm(N, O, I)
        blas.use(1, force=True)  # the kernel's threads each call BLAS, which must not start its own
        _dora.dora_forward(out, y, u, x2, np.ascontiguousarray(W), np.empty(0, dtype) if b is None else
                           np.ascontiguousarray(b), f, np.ascontiguousarray(A.T) * s, np.ascontiguousarray(B.T),
                           threads)
    else:
        xin = _dropout(x2, threshold, keep_scale, seed) if use_dropout else x2
        u = gemm.matmul(xin, A, trans_b=True)
        u *= s
        y = gemm.matmul(xin, W, trans_b=True)  # x' W^T
        if use_dropout:
            out = gemm.matmul(x2, W, trans_b=True, bias=b) - y  # x W^T + b - x' W^T, + f y' below
        gemm.matmul(u, B, trans_b=True, out=y, accumulate=True)  # y' = x' W^T + u B^T
        if use_dropout:
            out += f * y
        else:
            out = f * y if b is None else f * y + b
        del xin
    out = out.reshape(*x.shape[:-1], O)

    def backward(g):
        g2 = np.ascontiguousarray(g.reshape(N, O))
        if fused:
            threads = blas.threads_for_gemm(N, I, O)
            R = A.shape[0]
            dx = np.empty((N, I) if x.requires_grad else (0, I), dtype)
            dA_parts, dB_parts = np.empty((threads, R, I), dtype), np.empty((threads, O, R), dtype)
            dm_parts = np.empty((threads, O), dtype)
            blas.use(1, force=True)
            _dora.dora_backward(dx, dA_parts, dB_parts, dm_parts, np.empty((N, O), dtype),
                                np.empty((threads, _dora.CHUNK_ROWS, R), dtype), g2, x2, u, y,
                                np.ascontiguousarray(W), np.ascontiguousarray(A), B * s, f, rnorm, threads)
            dx = dx.reshape(x.shape) if x.requires_grad else None
            dA, dB, dm = dA_parts.sum(axis=0), dB_parts.sum(axis=0), dm_parts.sum(axis=0)
        else:
            dx, dA, dB, dm = _backward_unfused(g2)
        db = g2.sum(axis=0) if bias is not None and bias.requires_grad else None
        dW = gemm.matmul(g2, x2, trans_a=True) if weight.requires_grad else None
        return (dx, dA, dB, dm, dW) + ((db,) if bias is not None else ())

    def _backward_unfused(g2):
        gs = g2 * f
        dm = (g2 * y).sum(axis=0) * rnorm
        dB = gemm.matmul(gs, u, trans_a=True)
        v = gemm.matmul(gs, B)
        v *= s
        xin = _dropout(x2, threshold, keep_scale, seed) if use_dropout else x2
        dA = gemm.matmul(v, xin, trans_a=True)
        dx = None
        if x.requires_grad:
            if use_dropout:  # dx = g W + mask * ((gs - g) W + v A)
                t = gemm.matmul(gs - g2, W)
                gemm.matmul(v, A, out=t, accumulate=True)
                dx = gemm.matmul(g2, W)
                _lora.lora_dropout_backward(dx.reshape(-1), t.reshape(-1), threshold, keep_scale, seed,
                                            threads_for(t.size))
            else:
                dx = gemm.matmul(gs, W)
                gemm.matmul(v, A, out=dx, accumulate=True)
            dx = dx.reshape(x.shape)
        return dx, dA, dB, dm

    parents = (x, lora_A, lora_B, magnitude, weight) + ((bias,) if bias is not None else ())
    return make_result(out, parents, backward)
