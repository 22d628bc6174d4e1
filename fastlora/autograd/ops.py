"""Differentiable ops: each forward next to its gradient rule.

Elementary ops (add, mul, matmul, sum, reshape, transpose, ...) for users' own models, and
the fused ops the GPT runs on (embedding, linear, layer_norm, gelu, causal_attention,
cross_entropy, dropout) and those Llama-family models add (rms_norm, silu_mul, rope, and
grouped-query causal_attention), whose inner loops are the Cython kernels of fastlora._ext.
Broadcasting is summed back to shape in one place: `_unbroadcast`.
"""
from __future__ import annotations

import numpy as np

from fastlora._ext import cross_entropy as _ce
from fastlora._ext import embedding as _embedding
from fastlora._ext import layernorm as _ln
from fastlora._ext import rmsnorm as _rms
from fastlora._ext import rope as _rope
from fastlora._ext import swiglu as _swiglu
from fastlora._runtime import attention as _attention
from fastlora._runtime import gemm
from fastlora._runtime.threads import threads_for
from fastlora._typing import ArrayLike
from fastlora.autograd.tensor import Tensor, _lift, is_grad_enabled, make_result
from fastlora.kernels import check_attention_heads, check_labels, check_rope, check_token_ids, gelu_kernels


def _unbroadcast(g, shape):
    """Sum g over the axes that broadcasting added or stretched, so it has `shape`."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if stretched:
        g = g.sum(axis=stretched, keepdims=True)
    return g


# --- elementary ops --------------------------------------------------------------------------

def add(a, b):
    a = a if isinstance(a, Tensor) else _lift(a, b)
    b = _lift(b, a)
    sa, sb = a.shape, b.shape
    return make_result(a.data + b.data, (a, b),
                       lambda g: (_unbroadcast(g, sa), _unbroadcast(g, sb)))


def neg(a):
    return make_result(-a.data, (a,), lambda g: (-g,))


def mul(a, b):
    a = a if isinstance(a, Tensor) else _lift(a, b)
    b = _lift(b, a)
    ad, bd = a.data, b.data
    return make_result(ad * bd, (a, b),
                       lambda g: (_unbroadcast(g * bd, ad.shape), _unbroadcast(g * ad, bd.shape)))


def matmul(a, b):
    """a @ b with NumPy's rules (batched, broadcast); 1-D operands are not supported."""
    a = a if isinstance(a, Tensor) else _lift(a, b)
    b = _lift(b, a)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs operands of rank >= 2, got shapes {a.shape} and {b.shape}")
    ad, bd = a.data, b.data

    def backward(g):
        ga = _unbroadcast(np.matmul(g, np.swapaxes(bd, -1, -2)), ad.shape) if a.requires_grad else None
        gb = _unbroadcast(np.matmul(np.swapaxes(ad, -1, -2), g), bd.shape) if b.requires_grad else None
        return ga, gb

    return make_result(np.matmul(ad, bd), (a, b), backward)


def sum(a, axis=None, keepdims=False):  # noqa: A001 - mirrors numpy's name
    shape = a.shape

    def backward(g):
        if axis is not None and not keepdims:
            g = np.expand_dims(g, axis)
        return (np.broadcast_to(g, shape).astype(g.dtype, copy=True),)

    return make_result(np.asarray(a.data.sum(axis=axis, keepdims=keepdims)), (a,), backward)


def mean(a, axis=None, keepdims=False):
    count = a.size if axis is None else int(np.prod([a.shape[i] for i in np.atleast_1d(axis)]))
    return mul(sum(a, axis, keepdims), 1.0 / count)


def reshape(a, shape):
    old = a.shape
    return make_result(a.data.reshape(shape), (a,), lambda g: (g.reshape(old),))


def transpose(a, axes=None):
    inverse = None if axes is None else tuple(np.argsort(axes))
    return make_result(a.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),))


# --- fused model ops -----------------------------------------------------------------------------

def embedding(ids, weight):
    """weight[ids]: ids an integer array of any shape, weight (V, D) -> (*ids.shape, D)."""
    ids = np.asarray(ids)
    flat_ids = check_token_ids("token ids", ids, weight.shape[0])

    def backward(g):
        dw = np.zeros_like(weight.data)
        _embedding.embedding_backward(dw, flat_ids, np.ascontiguousarray(g).reshape(-1, g.shape[-1]))
        return (dw,)

    return make_result(weight.data[ids], (weight,), backward)


def linear(x, weight, bias=None):
    """x (..., in) @ weight.T (out, in) + bias (out,) -> (..., out)."""
    xd, wd = x.data, weight.data
    x2 = xd.reshape(-1, xd.shape[-1])
    out = gemm.matmul(x2, wd, trans_b=True, bias=None if bias is None else bias.data)
    out = out.reshape(*xd.shape[:-1], wd.shape[0])
    # the rule keeps x only to make a weight gradient: a frozen weight's input is freed as soon
    # as nothing else needs it (the graph holds no data: fastlora.autograd.tensor)
    x_shape, want_dx, want_db = xd.shape, x.requires_grad, bias is not None and bias.requires_grad
    x_kept = x2 if weight.requires_grad else None

    def backward(g):
        g2 = g.reshape(-1, g.shape[-1])
        dx = gemm.matmul(g2, wd).reshape(x_shape) if want_dx else None
        dw = gemm.matmul(g2, x_kept, trans_a=True) if x_kept is not None else None
        if bias is None:
            return dx, dw
        return dx, dw, (g2.sum(axis=0) if want_db else None)

    parents = (x, weight) if bias is None else (x, weight, bias)
    return make_result(out, parents, backward)


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last axis with affine weight and bias (D,)."""
    xd = np.ascontiguousarray(x.data)
    x2 = xd.reshape(-1, xd.shape[-1])
    N = x2.shape[0]
    out = np.empty_like(x2)
    mean = np.empty(N, dtype=xd.dtype)
    rstd = np.empty(N, dtype=xd.dtype)
    _ln.layernorm_forward(out, mean, rstd, x2, weight.data, bias.data, eps, threads_for(x2.size))

    def backward(g):
        g2 = np.ascontiguousarray(g).reshape(x2.shape)
        dx = np.empty_like(x2)
        # a frozen affine (LoRA) gets no gradient: (0,) arrays tell the kernel to skip it
        affine_grads = weight.requires_grad or bias.requires_grad
        dw = np.zeros_like(weight.data) if affine_grads else np.empty(0, dtype=x2.dtype)
        db = np.zeros_like(bias.data) if affine_grads else np.empty(0, dtype=x2.dtype)
        _ln.layernorm_backward(dx, dw, db, g2, x2, mean, rstd, weight.data, threads_for(x2.size))
        return (dx.reshape(xd.shape),) + ((dw, db) if affine_grads else (None, None))

    return make_result(out.reshape(xd.shape), (x, weight, bias), backward)


def gelu(x, approximate="tanh"):
    """GELU, as torch's F.gelu: approximate="tanh" (GPT-2's, the default) or "none" (exact, erf)."""
    forward_kernel, backward_kernel = gelu_kernels(approximate)
    xd = np.ascontiguousarray(x.data)
    out = np.empty_like(xd)
    forward_kernel(out.reshape(-1), xd.reshape(-1), threads_for(xd.size))

    def backward(g):
        dx = np.empty_like(xd)
        backward_kernel(dx.reshape(-1), np.ascontiguousarray(g).reshape(-1), xd.reshape(-1), threads_for(xd.size))
        return (dx,)

    return make_result(out, (x,), backward)


def rms_norm(x, weight, eps):
    """RMSNorm over the last axis (Hugging Face's LlamaRMSNorm): x / sqrt(mean(x^2) + eps) *
    weight (D,), computed in x's dtype (float32 or float64)."""
    xd = np.ascontiguousarray(x.data)
    if weight.shape != xd.shape[-1:]:
        raise ValueError(f"rms_norm: weight must have shape {xd.shape[-1:]} (x's last axis), got {weight.shape}")
    x2 = xd.reshape(-1, xd.shape[-1])
    out = np.empty_like(x2)
    rstd = np.empty(x2.shape[0], dtype=xd.dtype)
    _rms.rmsnorm_forward(out, rstd, x2, weight.data, eps, threads_for(x2.size))

    def backward(g):
        dx = np.empty_like(x2)
        # a frozen weight (LoRA) gets no gradient: a (0,) array tells the kernel to skip it
        dw = np.zeros_like(weight.data) if weight.requires_grad else np.empty(0, dtype=x2.dtype)
        _rms.rmsnorm_backward(dx, dw, np.ascontiguousarray(g).reshape(x2.shape), x2, rstd, weight.data,
                              threads_for(x2.size))
        return dx.reshape(xd.shape), (dw if weight.requires_grad else None)

    return make_result(out.reshape(xd.shape), (x, weight), backward)


def silu_mul(gate, up):
    """silu(gate) * up, SwiGLU's elementwise part (Llama's act_fn(gate_proj(x)) * up_proj(x))."""
    gd, ud = np.ascontiguousarray(gate.data), np.ascontiguousarray(up.data)
    if gd.shape != ud.shape:
        raise ValueError(f"silu_mul: up must have gate's shape {gd.shape}, got {ud.shape}")
    out = np.empty_like(gd)
    _swiglu.silu_mul_forward(out.reshape(-1), gd.reshape(-1), ud.reshape(-1), threads_for(gd.size))

    def backward(g):
        dgate, dup = np.empty_like(gd), np.empty_like(gd)
        _swiglu.silu_mul_backward(dgate.reshape(-1), dup.reshape(-1), np.ascontiguousarray(g).reshape(-1),
                                  gd.reshape(-1), ud.reshape(-1), threads_for(gd.size))
        return dgate, dup

    return make_result(out, (gate, up), backward)


def rope(x, cos, sin, num_heads):
    """Rotary position embedding, Hugging Face's rotate_half convention, on x (B, T, H * hd) (the
    heads side by side, as the q/k projections make them). cos and sin: ndarrays (T, hd / 2) of
    x's dtype, the half-tables (Hugging Face's cos is cat(freqs, freqs).cos()). Per head, with
    x = [x1, x2]: [x1 cos - x2 sin, x2 cos + x1 sin]; the gradient is the inverse rotation.
    Packed rows, whose positions differ by row, give tables (B, T, hd / 2) gathered at each
    token's position; those rotate in NumPy."""
    if np.ndim(cos) == 3:
        return _rope_rows(x, cos, sin, num_heads)
    xd = np.ascontiguousarray(x.data)
    if xd.ndim != 3:
        raise ValueError(f"rope: x must be (B, T, H * hd), got shape {xd.shape}")
    cos, sin, num_heads = check_rope(xd, cos, sin, num_heads)
    out = np.empty_like(xd)
    _rope.rope_forward(out, xd, cos, sin, num_heads, threads_for(xd.size))

    def backward(g):  # the inverse rotation needs nothing of x: x is not kept
        g = np.ascontiguousarray(g)
        dx = np.empty_like(g)
        _rope.rope_backward(dx, g, cos, sin, num_heads, threads_for(g.size))
        return (dx,)

    return make_result(out, (x,), backward)


def _rope_rows(x, cos, sin, num_heads):
    """rope with (B, T, hd / 2) tables: each token rotated by its own position's angles."""
    xd = x.data
    B, T, width = xd.shape
    if cos.shape != sin.shape or cos.shape[:2] != (B, T) or width % num_heads or 2 * cos.shape[2] != width // num_heads:
        raise ValueError(f"rope: tables {cos.shape} do not fit x {xd.shape} with {num_heads} heads")
    return make_result(rope_rows(xd, cos, sin, num_heads), (x,), lambda g: (rope_rows(g, cos, -sin, num_heads),))


def rope_rows(x, cos, sin, num_heads):
    """RoPE of an ndarray x (B, t, H * hd) with per-token half-tables cos, sin (B, t, hd / 2),
    in NumPy: packed rows and generation's left-padded rows each have their own positions (the
    kernel takes one (T, hd / 2) table for every row). With -sin it is the inverse rotation."""
    B, t, width = x.shape
    xh = x.reshape(B, t, num_heads, width // num_heads)
    half = xh.shape[-1] // 2
    x1, x2 = xh[..., :half], xh[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(B, t, width)


# The attention probabilities (B * H, T, T) are kept for the backward up to this size, and made
# again there above it: at GPT-2-124M's shape (B 4, T 256, 12 heads) they are 12.6 MB a layer,
# 151 MB a step, for an extra attention forward costing about 2% of the step (SmolLM2-135M's:
# 283 MB); the base workload's 6.3 MB are kept (there the forward is 4% of a step)
KEEP_ATTENTION_PROBS_BYTES = 8 << 20


def causal_attention(q, k, v, num_heads, num_kv_heads=None, segment_starts=None):
    """Multi-head causal self-attention core: q (B, T, D) -> (B, T, D), heads split D.

    softmax(q k^T / sqrt(hd) + causal mask) v, per head, heads joined again; hd = D / num_heads.
    Grouped-query attention with num_kv_heads (Hkv, dividing num_heads): k and v are
    (B, T, Hkv * hd) and query head h reads key/value head h // (num_heads / Hkv), in place
    (never repeated in memory); None: k and v are like q, one key/value head per head.
    segment_starts (B, T), for packed rows: token i of row b attends to [segment_starts[b, i], i],
    its own record (fastlora._runtime.attention.segment_starts makes them from position_ids).
    fastlora._runtime.attention runs it (the fused kernel where NumPy's BLAS is reachable).
    """
    qd, kd, vd = (np.ascontiguousarray(t.data) for t in (q, k, v))
    num_heads, num_kv_heads = check_attention_heads(qd, kd, vd, num_heads, num_kv_heads)
    starts = None if segment_starts is None else _attention.check_starts(segment_starts, *qd.shape[:2])
    out, probs = _attention.forward(qd, kd, vd, num_heads, num_kv_heads, starts=starts)
    if probs.nbytes > KEEP_ATTENTION_PROBS_BYTES:
        probs = None  # made again by the backward

    def backward(g):
        p = probs if probs is not None else _attention.forward(qd, kd, vd, num_heads, num_kv_heads, starts=starts)[1]
        return _attention.backward(np.ascontiguousarray(g), p, qd, kd, vd, num_heads, num_kv_heads, starts=starts)

    return make_result(out, (q, k, v), backward)


def cross_entropy(logits: Tensor, labels: ArrayLike, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy: logits[:, t] is scored against labels[:, t + 1].

    logits (B, T, V) Tensor, labels (B, T) ints; positions whose label is ignore_index are
    skipped. Log-softmax, NLL and (when a gradient is needed) the gradient come from one
    pass of the Cython kernel. A batch with nothing to score is a ValueError, not a NaN.
    """
    if not isinstance(logits, Tensor):
        logits = Tensor(logits)
    if logits.ndim == 2:  # a single sequence (T, V)
        return cross_entropy(reshape(logits, (1,) + logits.shape), np.asarray(labels)[None], ignore_index)
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {logits.shape}")
    ld = np.ascontiguousarray(logits.data)
    if ld.dtype not in (np.float32, np.float64):
        raise TypeError(f"logits must be float32 or float64, got {ld.dtype}")
    B, T, V = ld.shape
    labels = check_labels(labels, (B, T), V, ignore_index)
    count = int(np.count_nonzero(labels[:, 1:] != ignore_index))
    if count == 0:
        raise ValueError("labels leave no position to score: every label after the first "
                         f"of each row is ignore_index={ignore_index}")
    want_grad = logits.requires_grad and is_grad_enabled()
    dlogits = np.empty_like(ld) if want_grad else np.empty((0, 0, 0), dtype=ld.dtype)
    row_loss = np.empty((B, T), dtype=ld.dtype)
    _ce.cross_entropy_forward(dlogits, row_loss, ld, labels, int(ignore_index), 1.0 / count,
                              want_grad, threads_for(ld.size))
    total = row_loss.sum(dtype=np.float64)
    loss = np.asarray(total / count, dtype=ld.dtype)

    def backward(g):
        scale = float(g)
        return (dlogits if scale == 1.0 else dlogits * scale,)

    return make_result(loss, (logits,), backward)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_rows=None):
    """cross_entropy(linear(hidden, weight), labels), fused: the LM head and its loss without the
    (B, T, V) logits. hidden (B, T, D) Tensor, weight (V, D) Tensor (a tied embedding or an
    lm_head without bias), labels (B, T) ints, scored with the shift inside and ignore_index
    skipped, as cross_entropy does. Only the rows that score are multiplied, a chunk at a time
    (fastlora._linear_ce); the gradients are made in this forward pass, when grad is on and
    hidden or weight needs one, and the backward only scales them."""
    from fastlora import _linear_ce
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be (B, T, D), got shape {hidden.shape}")
    hd, wd = hidden.data, weight.data
    if wd.ndim != 2 or wd.shape[1] != hd.shape[2] or wd.dtype != hd.dtype:
        raise ValueError(f"weight must be (V, {hd.shape[2]}) {hd.dtype} like hidden, got {wd.shape} {wd.dtype}")
    B, T, D = hd.shape
    labels = check_labels(labels, (B, T), wd.shape[0], ignore_index)
    rows, targets = _linear_ce.scored_rows(labels, int(ignore_index))
    count = rows.size
    if count == 0:
        raise ValueError("labels leave no position to score: every label after the first "
                         f"of each row is ignore_index={ignore_index}")
    grad_on = is_grad_enabled()
    want_dh, want_dw = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    h = np.ascontiguousarray(hd.reshape(B * T, D)[rows])
    total, dh, dw = _linear_ce.forward(h, np.ascontiguousarray(wd), targets, 1.0 / count, want_dh, want_dw,
                                       chunk_rows)
    del h
    dtype = hd.dtype
    loss = np.asarray(total / count, dtype=dtype)

    def backward(g):
        scale = float(g)
        dhidden = None
        if dh is not None:
            dhidden = np.zeros((B * T, D), dtype=dtype)
            dhidden[rows] = dh if scale == 1.0 else dh * scale
            dhidden = dhidden.reshape(B, T, D)
        return dhidden, (None if dw is None else dw if scale == 1.0 else dw * scale)

    return make_result(loss, (hidden, weight), backward)


def dropout(x, p, training, rng):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    mask = (rng.random(x.shape) >= p).astype(x.dtype) / (1.0 - p)
    return make_result(x.data * mask, (x,), lambda g: (g * mask,))
