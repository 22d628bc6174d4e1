"""Plain-NumPy twins of the DoRA kernels (csrc/dora.pyx) and of the DoRA linear op with dropout.

DoRA (as PEFT defines it): the adapted weight W + s B A is normalised per output row and
rescaled by a trained magnitude m (O,), the norm n held constant (no gradient through it):

    y = x W^T + s dropout(x) A^T B^T ... see dora_forward;   out = (m / n) * y + b

Computed in float64, returned in x's dtype. Dimension letters as in fastlora.reference.lora.
"""
import numpy as np

from fastlora.reference.lora import lora_dropout_forward


def dora_weight_norm(weight, lora_A, lora_B, scaling):
    """||W + s B A|| per output row (O,)."""
    W, A, B = (a.astype(np.float64) for a in (weight, lora_A, lora_B))
    return np.linalg.norm(W + scaling * B @ A, axis=1).astype(weight.dtype)


def dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, norm, p=0.0, seed=0):
    """PEFT's DoRA output. Without dropout: (m / n) * (x W^T + s x A^T B^T) + b. With dropout
    (x' = dropout(x)): x W^T + b + (m / n - 1) * x' W^T + (m / n) * s x' A^T B^T."""
    x64, W, A, B = (a.astype(np.float64) for a in (x, weight, lora_A, lora_B))
    f = magnitude.astype(np.float64) / norm.astype(np.float64)
    xin = x64 if p == 0.0 else lora_dropout_forward(x, p, seed).astype(np.float64)
    y = x64 @ W.T + (f - 1) * (xin @ W.T) + f * (scaling * (xin @ A.T) @ B.T)
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def dora_backward(g, x, weight, lora_A, lora_B, magnitude, scaling, norm, p=0.0, seed=0):
    """-> (dx (N, I), dA (R, I), dB (O, R), dm (O,), dbias (O,)) of sum(g * out), n constant."""
    g64, x64, W, A, B = (a.astype(np.float64) for a in (g, x, weight, lora_A, lora_B))
    n = norm.astype(np.float64)
    f = magnitude.astype(np.float64) / n
    xin = x64 if p == 0.0 else lora_dropout_forward(x, p, seed).astype(np.float64)
    lora = scaling * (xin @ A.T) @ B.T
    dm = (g64 * (xin @ W.T + lora)).sum(axis=0) / n
    gs = g64 * f
    dxin = (gs - g64) @ W + scaling * (gs @ B) @ A  # gradient at the dropout output
    dx = g64 @ W + (dxin if p == 0.0 else lora_dropout_forward(dxin, p, seed))
    dA = scaling * (gs @ B).T @ xin
    dB = scaling * gs.T @ (xin @ A.T)
    db = g64.sum(axis=0)
    return tuple(a.astype(x.dtype) for a in (dx, dA, dB, dm, db))
