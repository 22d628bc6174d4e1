"""Checked, allocating wrappers around the LoRA Cython kernels (fastlora._ext.lora).

Same signatures as the NumPy twins in fastlora.reference.lora, so tests run one against
the other. The kernels themselves never allocate or validate; these functions do.
"""
import numpy as np

from fastlora._ext import lora as _lora
from fastlora._runtime.threads import threads_for
from fastlora.spec import dropout_threshold

_FLOATS = (np.float32, np.float64)


def _check_float(name, a, dtype=None):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} like x, got {a.dtype}")


MAX_ELEMENTS = 2 ** 32  # the hash counts elements in 32 bits


def check_dropout_args(p, seed, size=0):
    """p in [0, 1), seed an int in [0, 2**32), fewer than 2**32 elements: the kernels' preconditions."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if size >= MAX_ELEMENTS:
        raise ValueError(f"LoRA dropout handles fewer than 2**32 elements per call, got {size}")
    return dropout_threshold(p), 1.0 / (1.0 - p), int(seed)


def lora_dropout_forward(x, p, seed):
    """Inverted dropout of x (any shape) with the counter-based mask of (seed, flat index)."""
    _check_float("x", x)
    threshold, scale, seed = check_dropout_args(p, seed, x.size)
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _lora.lora_dropout_forward(out.reshape(-1), x.reshape(-1), threshold, scale, seed, threads_for(x.size))
    return out


def lora_dropout_backward(dx, t, p, seed):
    """dx + (the same mask) * t / (1 - p), computed in place in dx when dx is C-contiguous."""
    _check_float("dx", dx)
    _check_float("t", t, dtype=dx.dtype)
    if dx.shape != t.shape:
        raise ValueError(f"t must have shape {dx.shape} like dx, got {t.shape}")
    threshold, scale, seed = check_dropout_args(p, seed, t.size)
    dx = np.ascontiguousarray(dx)
    t = np.ascontiguousarray(t)
    _lora.lora_dropout_backward(dx.reshape(-1), t.reshape(-1), threshold, scale, seed, threads_for(t.size))
    return dx
