"""NumPy reference implementations of the model kernels (LayerNorm, GELU, attention softmax,
cross-entropy). Written for clarity, in float64 internally, never for speed."""
import math

import numpy as np

SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)
# NumPy has no erf: libm's, one element at a time (slow, accurate to float64)
_erf = np.vectorize(math.erf, otypes=[np.float64])


def layernorm_forward(x, weight, bias, eps=1e-5):
    """x (N, D) -> (out (N, D), mean (N,), rstd (N,))."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1)
    var = ((x64 - mean[:, None]) ** 2).mean(axis=-1)
    rstd = 1.0 / np.sqrt(var + eps)
    out = (x64 - mean[:, None]) * rstd[:, None] * weight + bias
    return out.astype(x.dtype), mean.astype(x.dtype), rstd.astype(x.dtype)


def layernorm_backward(dout, x, mean, rstd, weight):
    """-> (dx (N, D), dweight (D,), dbias (D,))."""
    dout64, x64 = dout.astype(np.float64), x.astype(np.float64)
    xhat = (x64 - mean[:, None].astype(np.float64)) * rstd[:, None]
    g = dout64 * weight
    dx = rstd[:, None] * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    dweight = (dout64 * xhat).sum(0)
    dbias = dout64.sum(0)
    return dx.astype(x.dtype), dweight.astype(x.dtype), dbias.astype(x.dtype)


def _check_approximate(approximate):
    if not isinstance(approximate, str) or approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' (exact, erf) or 'tanh', got {approximate!r}")


def gelu_forward(x, approximate="tanh"):
    """GELU: x Phi(x) with the normal CDF Phi (approximate="none") or GPT-2's tanh approximation."""
    _check_approximate(approximate)
    x64 = x.astype(np.float64)
    if approximate == "none":
        return (0.5 * x64 * (1.0 + _erf(x64 / np.sqrt(2.0)))).astype(x.dtype)
    return (0.5 * x64 * (1.0 + np.tanh(SQRT_2_OVER_PI * (x64 + 0.044715 * x64 ** 3)))).astype(x.dtype)


def gelu_backward(dout, x, approximate="tanh"):
    _check_approximate(approximate)
    x64 = x.astype(np.float64)
    if approximate == "none":  # Phi(x) + x phi(x)
        grad = 0.5 * (1.0 + _erf(x64 / np.sqrt(2.0))) + x64 * np.exp(-0.5 * x64 ** 2) / np.sqrt(2.0 * np.pi)
        return (dout * grad).astype(x.dtype)
    t = np.tanh(SQRT_2_OVER_PI * (x64 + 0.044715 * x64 ** 3))
    dinner = SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x64 ** 2)
    return (dout * (0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * dinner)).astype(x.dtype)


def causal_softmax_forward(scores, scale, starts=None, num_heads=1):
    """scores (R, T, T) raw q @ k^T -> probs (R, T, T), zero above the diagonal; with starts
    (R / num_heads, T), row i of matrix r also zero before starts[r // num_heads, i]."""
    T = scores.shape[-1]
    s = scores.astype(np.float64) * scale
    allowed = np.tril(np.ones((T, T), dtype=bool))
    if starts is not None:  # this twin builds the (T, T) masks; the kernels never do
        j = np.arange(T)
        allowed = allowed & (j[None, None, :] >= np.repeat(np.asarray(starts), num_heads, axis=0)[:, :, None])
    s = np.where(allowed, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return (e / e.sum(-1, keepdims=True)).astype(scores.dtype)


def causal_softmax_backward(probs, dprobs, scale):
    """-> dscores (R, T, T) with respect to the raw (unscaled) scores."""
    p, dp = probs.astype(np.float64), dprobs.astype(np.float64)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
    return ds.astype(probs.dtype)


def _heads(a, num_heads):  # (B, T, D) -> (B, H, T, hd) float64
    B, T, D = a.shape
    return a.astype(np.float64).reshape(B, T, num_heads, D // num_heads).transpose(0, 2, 1, 3)


def _join(a):  # (B, H, T, hd) -> (B, T, D)
    B, H, T, hd = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, H * hd)


def _kv_groups(num_heads, num_kv_heads):
    """Query heads per key/value head (GQA; 1 without num_kv_heads)."""
    if num_kv_heads is None:
        return 1
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    return num_heads // num_kv_heads


def _shared_heads(a, num_heads, num_kv_heads):  # (B, T, Hkv * hd) -> (B, H, T, hd), each kv head repeated
    groups = _kv_groups(num_heads, num_kv_heads)
    return np.repeat(_heads(a, num_heads // groups), groups, axis=1)


def causal_attention_forward(q, k, v, num_heads, num_kv_heads=None, segment_starts=None):
    """q (B, T, H * hd), k, v (B, T, Hkv * hd) -> (out like q, probs (B*H, T, T)): causal softmax
    attention per head; query head h reads key/value head h // (H / Hkv) (Hkv = H without
    num_kv_heads). This twin repeats k and v per query head; the kernel never does. With
    segment_starts (B, T), token i of row b attends to [segment_starts[b, i], i] only."""
    B, T, D = q.shape
    scale = 1.0 / np.sqrt(D // num_heads)
    qh = _heads(q, num_heads)
    kh, vh = (_shared_heads(a, num_heads, num_kv_heads) for a in (k, v))
    probs = causal_softmax_forward((qh @ kh.transpose(0, 1, 3, 2)).reshape(-1, T, T), scale, segment_starts,
                                   num_heads)
    out = _join(probs.reshape(B, num_heads, T, T) @ vh)
    return out.astype(q.dtype), probs.astype(q.dtype)


def causal_attention_backward(dout, probs, q, k, v, num_heads, num_kv_heads=None):
    """-> (dq like q, dk like k, dv like v) from dout (like q) and the forward's probs; a shared
    key/value head's gradients sum over the query heads that read it."""
    B, T, D = q.shape
    scale = 1.0 / np.sqrt(D // num_heads)
    groups = _kv_groups(num_heads, num_kv_heads)
    qh, gh = _heads(q, num_heads), _heads(dout, num_heads)
    kh, vh = (_shared_heads(a, num_heads, num_kv_heads) for a in (k, v))
    p = probs.astype(np.float64).reshape(B, num_heads, T, T)
    dprobs = gh @ vh.transpose(0, 1, 3, 2)
    dv = p.transpose(0, 1, 3, 2) @ gh
    ds = causal_softmax_backward(p.reshape(-1, T, T), dprobs.reshape(-1, T, T), scale).reshape(p.shape)
    dq, dk = ds @ kh, ds.transpose(0, 1, 3, 2) @ qh
    dk, dv = (a.reshape(B, num_heads // groups, groups, T, -1).sum(axis=2) for a in (dk, dv))
    return tuple(_join(a).astype(q.dtype) for a in (dq, dk, dv))


def cross_entropy_forward(logits, labels, ignore_index=-100, compute_grad=True):
    """Shifted masked cross-entropy. logits (B, T, V), labels (B, T).

    Returns (mean loss (float), count of scored positions, dlogits (B, T, V) of the mean or None).
    """
    B, T, V = logits.shape
    targets = np.full((B, T), ignore_index, dtype=np.int64)
    targets[:, :-1] = labels[:, 1:]
    mask = targets != ignore_index
    count = int(mask.sum())
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    safe = np.where(mask, targets, 0)
    nll = -np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    loss = float((nll * mask).sum() / count) if count else float("nan")
    dlogits = None
    if compute_grad:
        g = np.exp(logp)
        np.put_along_axis(g, safe[..., None], np.take_along_axis(g, safe[..., None], -1) - 1.0, -1)
        g = g * mask[..., None] / max(count, 1)
        dlogits = g.astype(logits.dtype)
    return loss, count, dlogits


def linear_cross_entropy_forward(hidden, weight, labels, ignore_index=-100, compute_grad=True, chunk_rows=None):
    """The cross-entropy of the whole logits hidden (B, T, D) @ weight (V, D)^T, made at once in
    float64. Returns (mean loss, count, dhidden (B, T, D), dweight (V, D)), the gradients None
    without compute_grad. chunk_rows is the fast twin's and changes nothing here."""
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, {hidden.shape[-1]}) to match hidden's last axis, got {weight.shape}")
    labels = np.asarray(labels)
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must have shape {hidden.shape[:2]} to match the logits, got {labels.shape}")
    if np.any((labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))):
        raise ValueError(f"labels hold a value outside [0, {weight.shape[0]}) that is not ignore_index")
    h64, w64 = hidden.astype(np.float64), weight.astype(np.float64)
    loss, count, dlogits = cross_entropy_forward(h64 @ w64.T, labels, ignore_index, compute_grad)
    if not compute_grad:
        return loss, count, None, None
    dhidden = dlogits @ w64
    dweight = np.einsum("btv,btd->vd", dlogits, h64)
    return loss, count, dhidden.astype(hidden.dtype), dweight.astype(hidden.dtype)


def embedding_backward(g, ids, vocab_size):
    """The (vocab_size, D) gradient of an embedding table from g (*ids.shape, D): row ids[n]
    gets the sum of the g rows of every position n holding that id."""
    g2 = g.reshape(-1, g.shape[-1]).astype(np.float64)
    dweight = np.zeros((vocab_size, g.shape[-1]), dtype=np.float64)
    np.add.at(dweight, np.asarray(ids).reshape(-1), g2)
    return dweight.astype(g.dtype)
