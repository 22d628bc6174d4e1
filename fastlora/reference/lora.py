"""Plain-NumPy twins of the LoRA kernels (csrc/lora.pyx) and of the fused LoRA linear op.

The dropout of the LoRA branch draws its mask from a counter-based hash (lowbias32 of a
golden-ratio step from the seed, per flat element index), not from a stateful generator:
the same (seed, index) always gives the same keep/drop decision, so backward recomputes
the mask instead of storing it, and the fast kernel and this twin agree bit for bit on
which elements are kept.

Dimension letters: N rows (batch * time), I in_features, O out_features, R rank.
"""
import numpy as np

from fastlora.spec import dropout_threshold

_WEYL = np.uint32(0x9E3779B9)
_MIX1 = np.uint32(0x7FEB352D)
_MIX2 = np.uint32(0x846CA68B)


def dropout_keep_mask(size, p, seed):
    """Boolean keep mask of `size` (< 2**32) elements for dropout probability p and a 32-bit seed."""
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps on purpose
        z = np.arange(size, dtype=np.uint32) * _WEYL + np.uint32(seed)
        z = (z ^ (z >> np.uint32(16))) * _MIX1
        z = (z ^ (z >> np.uint32(15))) * _MIX2
        z = z ^ (z >> np.uint32(16))
    return z >= np.uint32(dropout_threshold(p))


def lora_dropout_forward(x, p, seed):
    """Inverted dropout of x (any shape, C order): kept elements scaled by 1/(1-p), others 0."""
    keep = dropout_keep_mask(x.size, p, seed).reshape(x.shape)
    factor = np.where(keep, x.dtype.type(1.0 / (1.0 - p)), x.dtype.type(0))
    return x * factor  # a multiply, as the kernel: inf or NaN stay NaN when dropped, as in torch


def lora_dropout_backward(dx, t, p, seed):
    """dx + dropout'(t): the gradient t of the dropped-out input, masked and scaled, added to dx."""
    return dx + lora_dropout_forward(t, p, seed)


def lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling, p=0.0, seed=0):
    """y = x W^T + b + scaling * dropout(x) A^T B^T. x (N, I), W (O, I), b (O,) or None,
    A (R, I), B (O, R). Computed in float64, returned in x's dtype."""
    x64 = x.astype(np.float64)
    xin = x64 if p == 0.0 else lora_dropout_forward(x, p, seed).astype(np.float64)
    y = x64 @ weight.astype(np.float64).T + scaling * (xin @ lora_A.T.astype(np.float64)) @ lora_B.T
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def lora_linear_backward(g, x, weight, lora_A, lora_B, scaling, p=0.0, seed=0):
    """-> (dx (N, I), dA (R, I), dB (O, R), dbias (O,)) of sum(g * y), no gradient for W."""
    g64, x64 = g.astype(np.float64), x.astype(np.float64)
    A, B, W = (a.astype(np.float64) for a in (lora_A, lora_B, weight))
    xin = x64 if p == 0.0 else lora_dropout_forward(x, p, seed).astype(np.float64)
    dxin = scaling * (g64 @ B) @ A  # gradient at the dropout output
    dx_lora = dxin if p == 0.0 else lora_dropout_forward(dxin, p, seed)
    dx = g64 @ W + dx_lora
    dA = scaling * (g64 @ B).T @ xin
    dB = scaling * g64.T @ (xin @ A.T)
    db = g64.sum(axis=0)
    return tuple(a.astype(x.dtype) for a in (dx, dA, dB, db))
