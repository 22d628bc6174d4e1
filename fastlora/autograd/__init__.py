"""A small reverse-mode autograd over NumPy: Tensor, no_grad and the differentiable ops."""
from fastlora.autograd.ops import (
    add, causal_attention, cross_entropy, dropout, embedding, gelu, layer_norm, linear, matmul,
    mean, mul, neg, reshape, rms_norm, rope, silu_mul, sum, transpose,
)
from fastlora.autograd.tensor import Tensor, is_grad_enabled, no_grad

__all__ = [
    "Tensor", "no_grad", "is_grad_enabled", "add", "neg", "mul", "matmul", "sum", "mean",
    "reshape", "transpose", "embedding", "linear", "layer_norm", "gelu", "causal_attention",
    "cross_entropy", "dropout", "rms_norm", "silu_mul", "rope",
]
