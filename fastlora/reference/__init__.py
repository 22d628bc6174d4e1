"""Plain-NumPy twins of every Cython kernel: slow, obvious, and the oracle the tests compare against.

Each function has the same signature as its fast twin in fastlora.kernels (arrays in,
arrays out, allocation included).
"""
from fastlora.reference.llama import (
    rmsnorm_backward,
    rmsnorm_forward,
    rope_backward,
    rope_forward,
    silu_mul_backward,
    silu_mul_forward,
)
from fastlora.reference.ops import (
    causal_attention_backward,
    causal_attention_forward,
    causal_softmax_backward,
    causal_softmax_forward,
    cross_entropy_forward,
    embedding_backward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_cross_entropy_forward,
)

__all__ = [
    "layernorm_forward", "layernorm_backward", "gelu_forward", "gelu_backward",
    "causal_softmax_forward", "causal_softmax_backward", "causal_attention_forward",
    "causal_attention_backward", "cross_entropy_forward", "embedding_backward",
    "rmsnorm_forward", "rmsnorm_backward", "silu_mul_forward", "silu_mul_backward",
    "rope_forward", "rope_backward", "linear_cross_entropy_forward",
]
