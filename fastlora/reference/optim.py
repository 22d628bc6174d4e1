"""Plain-NumPy twins of the optimizer kernels (fastlora.optim.kernels): same signatures, same
in-place contract, same rejections; float64 arithmetic inside, written for clarity, never speed.

The formulas are torch.optim's, written out once:

AdamW (decoupled weight decay, bias-corrected), at step t >= 1:
    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g**2
    p <- p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

SGD:
    d <- g + weight_decay * p
    b <- d on the first step, else momentum * b + (1 - dampening) * d      (with momentum)
    d <- d + momentum * b (Nesterov) or b                                  (with momentum)
    p <- p - lr * d

Gradient clipping: the global L2 norm of all gradients, and an in-place scale.
"""
import math
import numbers

import numpy as np

from fastlora.checks import check_grads

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _check_arrays(param, **others):
    """param and the named arrays: ndarrays of one float dtype and one shape; `grad` may be read-only."""
    if not isinstance(param, np.ndarray):
        raise TypeError(f"param must be a numpy.ndarray, got {type(param).__name__}")
    if param.dtype not in _FLOATS:
        raise TypeError(f"param must be float32 or float64, got {param.dtype}")
    for name, a in [("param", param)] + list(others.items()):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
        if a.dtype != param.dtype:
            raise TypeError(f"{name} must have dtype {param.dtype} like param, got {a.dtype}")
        if a.shape != param.shape:
            raise ValueError(f"{name} must have shape {param.shape} like param, got {a.shape}")
        if name != "grad" and not a.flags.writeable:
            raise ValueError(f"{name} is read-only; it is updated in place")


def _check_range(name, value, low, high=math.inf, low_open=False, high_open=True):
    """value is a finite real in [low, high) (or the bounds given); the error names it and them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if math.isnan(v) or too_low or too_high or math.isinf(v):
        lo = "(" if low_open else "["
        hi = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"{name} must be finite and in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def _check_step(step):
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int, got {step!r}")
    if step < 1:
        raise ValueError(f"step must be an int >= 1 (the count including this update), got {step!r}")
    return int(step)


def adamw_update(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update of param, exp_avg and exp_avg_sq, in place. step counts this update."""
    _check_arrays(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    step = _check_step(step)
    lr = _check_range("lr", lr, 0.0)
    beta1 = _check_range("beta1", beta1, 0.0, 1.0)
    beta2 = _check_range("beta2", beta2, 0.0, 1.0)
    eps = _check_range("eps", eps, 0.0, low_open=True)
    weight_decay = _check_range("weight_decay", weight_decay, 0.0)

    p = param.astype(np.float64) * (1.0 - lr * weight_decay)
    g = grad.astype(np.float64)
    m = beta1 * exp_avg.astype(np.float64) + (1.0 - beta1) * g
    v = beta2 * exp_avg_sq.astype(np.float64) + (1.0 - beta2) * g * g
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    p = p - (lr / bias_correction1) * m / (np.sqrt(v) / math.sqrt(bias_correction2) + eps)
    param[...] = p
    exp_avg[...] = m
    exp_avg_sq[...] = v


def sgd_update(param, grad, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov,
               first_step):
    """One SGD update of param (and momentum_buffer, None when momentum == 0), in place.

    first_step: the buffer holds nothing yet and takes the first direction undamped, as torch's.
    """
    momentum = _check_range("momentum", momentum, 0.0)
    if momentum == 0.0:
        if momentum_buffer is not None:
            raise ValueError("momentum_buffer must be None when momentum == 0")
        _check_arrays(param, grad=grad)
    else:
        _check_arrays(param, grad=grad, momentum_buffer=momentum_buffer)
    lr = _check_range("lr", lr, 0.0)
    dampening = _check_range("dampening", dampening, 0.0, 1.0, high_open=False)
    weight_decay = _check_range("weight_decay", weight_decay, 0.0)
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0")

    p = param.astype(np.float64)
    d = grad.astype(np.float64) + weight_decay * p
    if momentum != 0.0:
        if first_step:
            b = d
        else:
            b = momentum * momentum_buffer.astype(np.float64) + (1.0 - dampening) * d
        momentum_buffer[...] = b
        d = d + momentum * b if nesterov else b
    param[...] = p - lr * d


def grad_norm(grads):
    """The L2 norm of all the arrays together (as if concatenated), accumulated in float64."""
    grads = check_grads(grads, writeable=False)
    return math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))


def scale_grads(grads, coef):
    """Multiply every array by coef in place (coef rounded to each array's dtype first)."""
    grads = check_grads(grads, writeable=True)
    coef = _check_range("coef", coef, -math.inf)
    for g in grads:
        g *= g.dtype.type(coef)
