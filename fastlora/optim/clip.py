"""Gradient clipping by global L2 norm, as torch.nn.utils.clip_grad_norm_, in one Cython pass.

A non-finite norm (an overflow or a NaN somewhere in the gradients) is returned and reported
with a NonFiniteGradientWarning, and the gradients are left untouched: scaling by NaN would
destroy them, and the caller (the Trainer) skips such a step anyway.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Iterable

import numpy as np

from fastlora.autograd import Tensor
from fastlora.optim import kernels

# torch adds this to the norm before dividing, so an all-zero gradient never divides by zero
_NORM_EPS = 1e-6


class NonFiniteGradientWarning(RuntimeWarning):
    """The gradient norm is inf or NaN; the gradients were not scaled."""


def clip_grad_norm(params: Iterable[Any], max_norm: float, *, error_if_nonfinite: bool = False) -> float:
    """Scale the gradients of `params` in place so that their global L2 norm is at most max_norm.

    Returns the norm before clipping (a float; 0.0 when no parameter has a gradient). When
    max_norm / (norm + 1e-6) < 1 -- that is, when the norm exceeds max_norm -- every gradient
    is multiplied by that factor, exactly as torch does. Parameters whose grad is None are
    skipped, and a parameter listed twice counts once. A non-finite norm leaves the gradients as they are and warns
    (NonFiniteGradientWarning), or raises RuntimeError with error_if_nonfinite=True.
    max_norm may be math.inf to measure the norm without clipping.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) \
            or not float(max_norm) > 0:
        raise ValueError(f"max_norm must be a real number > 0, got {max_norm!r}")
    max_norm = float(max_norm)
    if isinstance(params, Tensor):
        params = [params]
    grads, seen = [], set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a fastlora Parameter (or Tensor), "
                            f"got {type(p).__name__}")
        # a parameter listed twice would count twice in the norm and be scaled twice
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            if not isinstance(p.grad, np.ndarray):
                raise TypeError(f"params[{i}].grad must be a numpy.ndarray or None, "
                                f"got {type(p.grad).__name__}")
            grads.append(p.grad)
    if not grads:
        return 0.0
    norm = kernels.grad_norm(grads)
    if not math.isfinite(norm):
        message = f"the gradient norm is {norm}; the gradients were left unscaled"
        if error_if_nonfinite:
            raise RuntimeError(message)
        warnings.warn(message, NonFiniteGradientWarning, stacklevel=2)
        return norm
    coef = max_norm / (norm + _NORM_EPS)
    if coef < 1.0:
        kernels.scale_grads(grads, coef)
    return norm


# torch's spelling, for people porting a training loop
clip_grad_norm_ = clip_grad_norm
