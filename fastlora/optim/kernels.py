"""Validated wrappers around the optimizer kernels (fastlora._ext.adamw / sgd / clip_grad).

Each function works on plain ndarrays, in place, and has a NumPy twin of the same signature in
fastlora.reference.optim. The wrappers check dtypes, shapes and writeability with errors that
name the argument, turn step counts into the scalars the kernels take, and let non-contiguous
arrays through by updating a contiguous copy and writing it back. The kernels run with the
GIL released.
"""
import math

import numpy as np

from fastlora._ext import adamw as _adamw
from fastlora._ext import clip_grad as _clip
from fastlora._ext import sgd as _sgd
from fastlora._runtime.threads import threads_for
from fastlora.checks import check_grads, check_int, check_real


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class _Flat:
    """1-D C-contiguous views of arrays the kernel updates; `finish()` writes copies back."""

    def __init__(self):
        self._writeback = []

    def inout(self, name, a, like):
        """a, checked against `like` (dtype and shape) and writeable, as a flat view or copy."""
        _check_like(name, a, like)
        if not a.flags.writeable:
            raise ValueError(f"{name} is read-only; it is updated in place")
        if a.flags.c_contiguous:
            return a.reshape(-1)
        work = np.ascontiguousarray(a)
        self._writeback.append((a, work))
        return work.reshape(-1)

    def finish(self):
        for original, work in self._writeback:
            original[...] = work


def _check_like(name, a, like):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype} like param, got {a.dtype}")
    if a.shape != like.shape:
        raise ValueError(f"{name} must have shape {like.shape} like param, got {a.shape}")


def _check_param(param):
    if not isinstance(param, np.ndarray):
        raise TypeError(f"param must be a numpy.ndarray, got {type(param).__name__}")
    if param.dtype not in _FLOATS:
        raise TypeError(f"param must be float32 or float64, got {param.dtype}")


def _flat_in(name, a, like):
    """A read-only input (the gradient) as a flat C-contiguous array (a copy only when needed)."""
    _check_like(name, a, like)
    return np.ascontiguousarray(a).reshape(-1)


# --- AdamW ----------------------------------------------------------------------------------

def adamw_update(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay):
    """One fused AdamW update of param, exp_avg and exp_avg_sq, in place (torch.optim.AdamW's).

    All four arrays share param's dtype (float32 or float64) and shape; step counts this
    update (1 on the first), for the bias corrections.
    """
    _check_param(param)
    step = check_int("step", step, low=1)
    lr = check_real("lr", lr, low=0.0)
    beta1 = check_real("beta1", beta1, low=0.0, high=1.0, high_open=True)
    beta2 = check_real("beta2", beta2, low=0.0, high=1.0, high_open=True)
    eps = check_real("eps", eps, low=0.0, low_open=True)
    weight_decay = check_real("weight_decay", weight_decay, low=0.0)
    flat = _Flat()
    p = flat.inout("param", param, param)
    g = _flat_in("grad", grad, param)
    m = flat.inout("exp_avg", exp_avg, param)
    v = flat.inout("exp_avg_sq", exp_avg_sq, param)
    _adamw_kernel(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay)
    flat.finish()


def _adamw_kernel(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """Call the kernel on flat, checked arrays. The optimizer calls this directly for the
    buffers it owns, saving the checks on every parameter of every step."""
    # torch computes these in Python floats (double) too
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    _adamw.adamw_step(p, m, v, g, 1.0 - lr * weight_decay, 1.0 - beta1, beta2,
                      lr / bias_correction1, math.sqrt(bias_correction2), eps,
                      threads_for(p.shape[0]))


# --- SGD ------------------------------------------------------------------------------------

_NO_BUFFER = {np.dtype(np.float32): np.empty(0, np.float32),
              np.dtype(np.float64): np.empty(0, np.float64)}


def sgd_update(param, grad, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov,
               first_step):
    """One SGD update of param (and momentum_buffer, None when momentum == 0), in place.

    first_step: the buffer holds nothing yet and takes the first direction undamped, as torch's.
    """
    _check_param(param)
    momentum = check_real("momentum", momentum, low=0.0)
    lr = check_real("lr", lr, low=0.0)
    dampening = check_real("dampening", dampening, low=0.0, high=1.0)
    weight_decay = check_real("weight_decay", weight_decay, low=0.0)
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0")
    if momentum == 0.0 and momentum_buffer is not None:
        raise ValueError("momentum_buffer must be None when momentum == 0")
    flat = _Flat()
    p = flat.inout("param", param, param)
    g = _flat_in("grad", grad, param)
    b = flat.inout("momentum_buffer", momentum_buffer, param) if momentum != 0.0 else None
    _sgd_kernel(p, g, b, lr, momentum, dampening, weight_decay, nesterov, first_step)
    flat.finish()


def _sgd_kernel(p, g, b, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """Call the kernel on flat, checked arrays (b None without momentum)."""
    if b is None:
        b = _NO_BUFFER[p.dtype]
    _sgd.sgd_step(p, b, g, lr, momentum, dampening, weight_decay, bool(nesterov),
                  bool(first_step), threads_for(p.shape[0]))


# --- gradient norm and scaling ---------------------------------------------------------------

def _grad_table(grads, writeable):
    """Group the arrays by dtype into kernel tables: {dtype: (ptrs, sizes, chunk_offsets, arrays)}.

    Also returns (original, contiguous copy) pairs for arrays that had to be copied; the
    table holds the arrays (copies included), keeping them alive until the kernel has run.
    """
    by_dtype, copies = {}, []
    for g in check_grads(grads, writeable):  # the twin's checks: both refuse the same input
        if not g.flags.c_contiguous:
            work = np.ascontiguousarray(g)
            copies.append((g, work))
            g = work
        by_dtype.setdefault(g.dtype, []).append(g)
    tables = {}
    for dtype, arrays in by_dtype.items():
        P = len(arrays)
        ptrs, sizes = np.empty(P, dtype=np.intp), np.empty(P, dtype=np.int64)
        offsets = np.empty(P + 1, dtype=np.int64)
        _clip.fill_table(ptrs, sizes, offsets, arrays)
        tables[dtype] = (ptrs, sizes, offsets, arrays)
    return tables, copies


def grad_norm(grads):
    """The L2 norm of all the arrays together (as if concatenated), accumulated in float64.

    One pass over the data; the result does not depend on the thread count.
    """
    tables, _ = _grad_table(grads, writeable=False)
    total = 0.0
    for dtype, (ptrs, sizes, offsets, _arrays) in sorted(tables.items(), key=lambda kv: kv[0].str):
        partial = np.empty(int(offsets[-1]), dtype=np.float64)
        total += _clip.sum_squares(partial, ptrs, sizes, offsets, dtype == np.float64,
                                   threads_for(int(sizes.sum())))
    return math.sqrt(total)


def scale_grads(grads, coef):
    """Multiply every array by coef in place (coef rounded to each array's dtype first)."""
    coef = check_real("coef", coef)
    tables, copies = _grad_table(grads, writeable=True)
    for dtype, (ptrs, sizes, offsets, _arrays) in tables.items():
        _clip.scale(ptrs, sizes, offsets, coef, dtype == np.float64, threads_for(int(sizes.sum())))
    for original, work in copies:
        original[...] = work
