"""NumPy twins of the Llama-family kernels: RMSNorm, the SiLU gate silu(gate) * up and rotary
position embeddings (RoPE). Written for clarity, in float64 internally, never for speed; they
check their own arguments (independently of fastlora.kernels, whose checks they mirror).

Dimension letters: N rows, D features, B batch, T sequence, H heads, hd head size.
"""
import numpy as np


# --- RMSNorm -------------------------------------------------------------------------------

def rmsnorm_forward(x, weight, eps=1e-6):
    """x (N, D) -> (out (N, D), rstd (N,)): out = x / sqrt(mean(x^2) + eps) * weight."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    x64 = x.astype(np.float64)
    rstd = 1.0 / np.sqrt((x64 * x64).mean(axis=-1) + eps)
    out = x64 * rstd[:, None] * weight
    return out.astype(x.dtype), rstd.astype(x.dtype)


def rmsnorm_backward(dout, x, rstd, weight):
    """-> (dx (N, D), dweight (D,)) from the forward's rstd."""
    dout64, x64 = dout.astype(np.float64), x.astype(np.float64)
    r = rstd.astype(np.float64)[:, None]
    xhat = x64 * r
    g = dout64 * weight
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    dweight = (dout64 * xhat).sum(0)
    return dx.astype(x.dtype), dweight.astype(x.dtype)


# --- SiLU gate (SwiGLU's elementwise part) -------------------------------------------------

def _sigmoid(a):
    e = np.exp(-np.abs(a))  # never overflows
    return np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _check_same_shape(gate, up):
    if np.shape(up) != np.shape(gate):
        raise ValueError(f"up must have shape {np.shape(gate)} like gate, got {np.shape(up)}")


def silu_mul_forward(gate, up):
    """silu(gate) * up = gate * sigmoid(gate) * up, any shape."""
    _check_same_shape(gate, up)
    g64 = gate.astype(np.float64)
    return (g64 * _sigmoid(g64) * up).astype(gate.dtype)


def silu_mul_backward(dout, gate, up):
    """-> (dgate, dup): d silu(g) / dg = s (1 + g (1 - s)), s = sigmoid(g)."""
    _check_same_shape(gate, up)
    g64, dout64 = gate.astype(np.float64), dout.astype(np.float64)
    s = _sigmoid(g64)
    dgate = dout64 * up * s * (1.0 + g64 * (1.0 - s))
    dup = dout64 * g64 * s
    return dgate.astype(gate.dtype), dup.astype(gate.dtype)


# --- rotary position embeddings ------------------------------------------------------------

def _rope_heads(x, cos, sin, num_heads):
    """(B, T, H * hd) -> float64 halves x1, x2 (B, T, H, hd / 2), checking the shapes."""
    B, T, D = x.shape
    if D % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide D={D}")
    hd = D // num_heads
    if hd % 2:
        raise ValueError(f"the head size {hd} must be even: RoPE rotates its two halves")
    for name, table in (("cos", cos), ("sin", sin)):
        if np.shape(table) != (T, hd // 2):
            raise ValueError(f"{name} must have shape {(T, hd // 2)}, got {np.shape(table)}")
    x4 = x.astype(np.float64).reshape(B, T, num_heads, hd)
    return x4[..., : hd // 2], x4[..., hd // 2:]


def rope_forward(x, cos, sin, num_heads):
    """x (B, T, H * hd), cos and sin (T, hd / 2) -> out like x; per head, with x = [x1, x2]:
    [x1 cos - x2 sin, x2 cos + x1 sin] (Hugging Face's x * cos + rotate_half(x) * sin)."""
    x1, x2 = _rope_heads(x, cos, sin, num_heads)
    c, s = (np.asarray(t, np.float64)[None, :, None, :] for t in (cos, sin))
    out = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def rope_backward(dout, cos, sin, num_heads):
    """-> dx like dout: the transposed rotation, [g1 cos + g2 sin, g2 cos - g1 sin]."""
    g1, g2 = _rope_heads(dout, cos, sin, num_heads)
    c, s = (np.asarray(t, np.float64)[None, :, None, :] for t in (cos, sin))
    dx = np.concatenate([g1 * c + g2 * s, g2 * c - g1 * s], axis=-1)
    return dx.reshape(dout.shape).astype(dout.dtype)
