"""Drop-in Cython kernels for NumPy models: validated, allocating wrappers around fastlora._ext.

Every function takes and returns plain ndarrays (float32 or float64; integer labels as
int64), checks dtypes and shapes with an error that names the argument, makes inputs
C-contiguous (a copy only when needed), allocates the outputs and calls the kernel with the
GIL released. Each has a NumPy twin of the same signature in fastlora.reference.

Dimension letters: N rows, D features, R = batch * heads, T sequence, B batch, V vocabulary,
H heads (Hkv key/value heads), hd head size.
"""
import numpy as np

from fastlora._ext import attention_softmax as _softmax
from fastlora._ext import cross_entropy as _ce
from fastlora._ext import embedding as _embedding
from fastlora._ext import gelu as _gelu
from fastlora._ext import layernorm as _ln
from fastlora._ext import rmsnorm as _rms
from fastlora._ext import rope as _rope
from fastlora._ext import swiglu as _swiglu
from fastlora._runtime import attention as _attention, blas as _blas
from fastlora._runtime.threads import threads_for

_FLOATS = (np.float32, np.float64)


def _float_array(name, a, ndim=None, dtype=None):
    """Check `a` is a floating ndarray of the given rank (and dtype); return it C-contiguous."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} like the first input, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _same_shape(name, a, shape):
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")


def _vectors(x, axis, **named):
    """Check each named array is a 1-D (x.shape[axis],) of x's dtype (a norm's per-row statistics,
    axis 0, or per-feature weights, axis 1); return them C-contiguous, in the order given."""
    checked = []
    for name, a in named.items():
        a = _float_array(name, a, ndim=1, dtype=x.dtype)
        _same_shape(name, a, (x.shape[axis],))
        checked.append(a)
    return checked


# --- LayerNorm ---------------------------------------------------------------------------

def layernorm_forward(x, weight, bias, eps=1e-5):
    """LayerNorm over the last axis. x (N, D), weight (D,), bias (D,) -> (out, mean (N,), rstd (N,))."""
    x = _float_array("x", x, ndim=2)
    weight, bias = _vectors(x, 1, weight=weight, bias=bias)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    out = np.empty_like(x)
    mean = np.empty(x.shape[0], dtype=x.dtype)
    rstd = np.empty(x.shape[0], dtype=x.dtype)
    _ln.layernorm_forward(out, mean, rstd, x, weight, bias, float(eps), threads_for(x.size))
    return out, mean, rstd


def layernorm_backward(dout, x, mean, rstd, weight):
    """-> (dx (N, D), dweight (D,), dbias (D,)) from the forward's cached mean and rstd."""
    x = _float_array("x", x, ndim=2)
    dout = _float_array("dout", dout, ndim=2, dtype=x.dtype)
    _same_shape("dout", dout, x.shape)
    mean, rstd = _vectors(x, 0, mean=mean, rstd=rstd)
    (weight,) = _vectors(x, 1, weight=weight)
    dx = np.empty_like(x)
    dweight = np.zeros_like(weight)
    dbias = np.zeros_like(weight)
    _ln.layernorm_backward(dx, dweight, dbias, dout, x, mean, rstd, weight, threads_for(x.size))
    return dx, dweight, dbias


# --- RMSNorm (Llama's) ---------------------------------------------------------------------

def rmsnorm_forward(x, weight, eps=1e-6):
    """RMSNorm over the last axis. x (N, D), weight (D,) -> (out, rstd (N,)): out = x * rstd *
    weight, rstd = 1 / sqrt(mean(x^2) + eps). Keep rstd for the backward."""
    x = _float_array("x", x, ndim=2)
    (weight,) = _vectors(x, 1, weight=weight)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    out = np.empty_like(x)
    rstd = np.empty(x.shape[0], dtype=x.dtype)
    _rms.rmsnorm_forward(out, rstd, x, weight, float(eps), threads_for(x.size))
    return out, rstd


def rmsnorm_backward(dout, x, rstd, weight):
    """-> (dx (N, D), dweight (D,)) from the forward's rstd."""
    x = _float_array("x", x, ndim=2)
    dout = _float_array("dout", dout, ndim=2, dtype=x.dtype)
    _same_shape("dout", dout, x.shape)
    (rstd,) = _vectors(x, 0, rstd=rstd)
    (weight,) = _vectors(x, 1, weight=weight)
    dx = np.empty_like(x)
    dweight = np.zeros_like(weight)
    _rms.rmsnorm_backward(dx, dweight, dout, x, rstd, weight, threads_for(x.size))
    return dx, dweight


# --- GELU ----------------------------------------------------------------------------------

def gelu_kernels(approximate):
    """(forward, backward) kernels for torch's `approximate` names: "none" (exact, erf) or "tanh"."""
    if not isinstance(approximate, str) or approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' (exact, erf) or 'tanh', got {approximate!r}")
    if approximate == "none":
        return _gelu.gelu_erf_forward, _gelu.gelu_erf_backward
    return _gelu.gelu_forward, _gelu.gelu_backward


def gelu_forward(x, approximate="tanh"):
    """GELU, any shape: x Phi(x) exactly (approximate="none", erf) or GPT-2's tanh approximation."""
    forward, _ = gelu_kernels(approximate)
    x = _float_array("x", x)
    out = np.empty_like(x)
    forward(out.reshape(-1), x.reshape(-1), threads_for(x.size))
    return out


def gelu_backward(dout, x, approximate="tanh"):
    """-> dx, same shape as x."""
    _, backward = gelu_kernels(approximate)
    x = _float_array("x", x)
    dout = _float_array("dout", dout, dtype=x.dtype)
    _same_shape("dout", dout, x.shape)
    dx = np.empty_like(x)
    backward(dx.reshape(-1), dout.reshape(-1), x.reshape(-1), threads_for(x.size))
    return dx


# --- SiLU gate (SwiGLU's elementwise part) -------------------------------------------------

def _gate_up(gate, up):
    gate = _float_array("gate", gate)
    up = _float_array("up", up, dtype=gate.dtype)
    _same_shape("up", up, gate.shape)
    return gate, up


def silu_mul_forward(gate, up):
    """silu(gate) * up, any shape (both the same): Llama's act_fn(gate_proj(x)) * up_proj(x)."""
    gate, up = _gate_up(gate, up)
    out = np.empty_like(gate)
    _swiglu.silu_mul_forward(out.reshape(-1), gate.reshape(-1), up.reshape(-1), threads_for(gate.size))
    return out


def silu_mul_backward(dout, gate, up):
    """-> (dgate, dup), each like gate."""
    gate, up = _gate_up(gate, up)
    dout = _float_array("dout", dout, dtype=gate.dtype)
    _same_shape("dout", dout, gate.shape)
    dgate, dup = np.empty_like(gate), np.empty_like(gate)
    _swiglu.silu_mul_backward(dgate.reshape(-1), dup.reshape(-1), dout.reshape(-1), gate.reshape(-1),
                              up.reshape(-1), threads_for(gate.size))
    return dgate, dup


# --- rotary position embeddings (RoPE) -------------------------------------------------------

def check_rope(x, cos, sin, num_heads):
    """Check RoPE's operands for x (B, T, H * hd), an ndarray: num_heads divides its last axis
    into heads of an even size hd, and cos and sin are (T, hd / 2) of x's dtype. Returns
    (cos, sin) C-contiguous and num_heads as an int."""
    num_heads = _check_heads(x, num_heads, "x")
    hd = x.shape[2] // num_heads
    if hd % 2:
        raise ValueError(f"the head size {hd} (x's last axis {x.shape[2]} / num_heads={num_heads}) "
                         "must be even: RoPE rotates its two halves")
    cos = _float_array("cos", cos, ndim=2, dtype=x.dtype)
    sin = _float_array("sin", sin, ndim=2, dtype=x.dtype)
    _same_shape("cos", cos, (x.shape[1], hd // 2))
    _same_shape("sin", sin, (x.shape[1], hd // 2))
    return cos, sin, num_heads


def rope_forward(x, cos, sin, num_heads):
    """Rotary position embedding, Hugging Face's rotate_half convention. x (B, T, H * hd), cos and
    sin the half-tables (T, hd / 2) -> out like x: per head, x = [x1, x2] becomes
    [x1 cos - x2 sin, x2 cos + x1 sin]."""
    x = _float_array("x", x, ndim=3)
    cos, sin, num_heads = check_rope(x, cos, sin, num_heads)
    out = np.empty_like(x)
    _rope.rope_forward(out, x, cos, sin, num_heads, threads_for(x.size))
    return out


def rope_backward(dout, cos, sin, num_heads):
    """-> dx like dout: the inverse rotation."""
    dout = _float_array("dout", dout, ndim=3)
    cos, sin, num_heads = check_rope(dout, cos, sin, num_heads)
    dx = np.empty_like(dout)
    _rope.rope_backward(dx, dout, cos, sin, num_heads, threads_for(dout.size))
    return dx


# --- causal attention softmax ----------------------------------------------------------------

def _scores_3d(name, a, dtype=None):
    a = _float_array(name, a, dtype=dtype)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must be (..., T, T) with square last two axes, got shape {a.shape}")
    return a.reshape(-1, a.shape[-1], a.shape[-1])


def causal_softmax_forward(scores, scale):
    """Softmax of scale * scores over j <= i, zeros above the diagonal. scores (..., T, T)."""
    s = _scores_3d("scores", scores)
    probs = np.empty_like(s)
    _softmax.causal_softmax_forward(probs, s, float(scale), threads_for(s.size))
    return probs.reshape(scores.shape)


def causal_softmax_backward(probs, dprobs, scale):
    """-> dscores (..., T, T), the gradient with respect to the raw (unscaled) scores."""
    p = _scores_3d("probs", probs)
    dp = _scores_3d("dprobs", dprobs, dtype=p.dtype)
    _same_shape("dprobs", dprobs, probs.shape)
    ds = np.empty_like(p)
    _softmax.causal_softmax_backward(ds, p, dp, float(scale), threads_for(p.size))
    return ds.reshape(probs.shape)


# --- fused causal attention ------------------------------------------------------------------

def _positive_int(name, n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return int(n)


def _check_heads(a, num_heads, name="q"):
    num_heads = _positive_int("num_heads", num_heads)
    if a.shape[2] % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide D={a.shape[2]} ({name} has shape {a.shape})")
    return num_heads


def check_attention_heads(q, k, v, num_heads, num_kv_heads=None):
    """Check the head counts and shapes of attention's operands (ndarrays, 3-D): q (B, T, H * hd),
    k and v (B, T, Hkv * hd), Hkv = num_kv_heads (None: H) dividing H. -> (H, Hkv or None)."""
    num_heads = _check_heads(q, num_heads)
    if num_kv_heads is not None:
        num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    B, T, D = q.shape
    kv_shape = (B, T, D // num_heads * (num_kv_heads or num_heads))
    _same_shape("k", k, kv_shape)
    _same_shape("v", v, kv_shape)
    return num_heads, num_kv_heads


def _qkv(q, k, v, num_heads, num_kv_heads):
    q = _float_array("q", q, ndim=3)
    k = _float_array("k", k, ndim=3, dtype=q.dtype)
    v = _float_array("v", v, ndim=3, dtype=q.dtype)
    return (q, k, v) + check_attention_heads(q, k, v, num_heads, num_kv_heads)


def causal_attention_forward(q, k, v, num_heads, num_kv_heads=None):
    """q (B, T, D = H * hd), k and v (B, T, Hkv * hd) -> (out (B, T, D), probs (B*H, T, T)): per
    head h (columns h*hd ...), softmax(q k^T / sqrt(hd) + causal mask) v, with k and v of
    key/value head h // (H / Hkv) (grouped-query attention; num_kv_heads=None: Hkv = H, each
    head its own). Keep probs for the backward."""
    q, k, v, num_heads, num_kv_heads = _qkv(q, k, v, num_heads, num_kv_heads)
    with _blas.kept():  # the caller's own NumPy products keep their BLAS threads
        return _attention.forward(q, k, v, num_heads, num_kv_heads)


def causal_attention_backward(dout, probs, q, k, v, num_heads, num_kv_heads=None):
    """-> (dq like q, dk like k, dv like v) from dout (B, T, D) and the forward's probs."""
    q, k, v, num_heads, num_kv_heads = _qkv(q, k, v, num_heads, num_kv_heads)
    dout = _float_array("dout", dout, ndim=3, dtype=q.dtype)
    _same_shape("dout", dout, q.shape)
    B, T, _ = q.shape
    probs = _float_array("probs", probs, ndim=3, dtype=q.dtype)
    _same_shape("probs", probs, (B * num_heads, T, T))
    with _blas.kept():
        return _attention.backward(dout, probs, q, k, v, num_heads, num_kv_heads)


# --- cross-entropy ---------------------------------------------------------------------------

def check_labels(labels, shape, vocab_size, ignore_index=-100):
    """Validate integer labels of `shape` in [0, vocab_size) or == ignore_index; return int64 C array."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got {labels.dtype}")
    if labels.shape != tuple(shape):
        raise ValueError(f"labels must have shape {tuple(shape)} to match the logits, got {labels.shape}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"labels{list(where)} = {int(labels[where])} is outside [0, {vocab_size}) "
                         f"and is not ignore_index={ignore_index}")
    return np.ascontiguousarray(labels, dtype=np.int64)


def cross_entropy_forward(logits, labels, ignore_index=-100, compute_grad=True):
    """Shifted masked cross-entropy, as fl.cross_entropy but on ndarrays.

    logits (B, T, V), labels (B, T): position t is scored against labels[:, t + 1]; labels
    equal to ignore_index are skipped. Returns (mean loss, number of scored positions,
    dlogits (B, T, V) of the mean loss, or None without compute_grad). The loss is NaN when
    nothing is scored.
    """
    logits = _float_array("logits", logits, ndim=3)
    B, T, V = logits.shape
    labels = check_labels(labels, (B, T), V, ignore_index)
    count = int(np.count_nonzero(labels[:, 1:] != ignore_index))
    row_loss = np.empty((B, T), dtype=logits.dtype)
    dlogits = np.empty_like(logits) if compute_grad else np.empty((0, 0, 0), dtype=logits.dtype)
    _ce.cross_entropy_forward(dlogits, row_loss, logits, labels, int(ignore_index),
                              1.0 / max(count, 1), bool(compute_grad), threads_for(logits.size))
    total = float(row_loss.sum(dtype=np.float64))
    loss = total / count if count else float("nan")
    return loss, count, (dlogits if compute_grad else None)


# --- fused linear + cross-entropy (the LM head and its loss) ----------------------------------

def linear_cross_entropy_forward(hidden, weight, labels, ignore_index=-100, compute_grad=True, chunk_rows=None):
    """The shifted masked cross-entropy of the logits hidden @ weight^T, never holding them whole.

    hidden (B, T, D), weight (V, D) (a tied embedding or an lm_head), labels (B, T): position t
    is scored against labels[:, t + 1]; labels equal to ignore_index are skipped, and so are
    their rows of the product (fastlora._linear_ce). Returns (mean loss, number of scored
    positions, dhidden (B, T, D), dweight (V, D)): the gradients of the mean loss (zero rows
    where nothing scores), or None and None without compute_grad. chunk_rows: rows of logits
    made at once (None: up to 16M logits). The loss is NaN when nothing is scored.
    """
    from fastlora import _linear_ce
    hidden = _float_array("hidden", hidden, ndim=3)
    weight = _float_array("weight", weight, ndim=2, dtype=hidden.dtype)
    B, T, D = hidden.shape
    if weight.shape[1] != D:
        raise ValueError(f"weight must be (V, {D}) to match hidden's last axis, got {weight.shape}")
    if chunk_rows is not None:
        chunk_rows = _positive_int("chunk_rows", chunk_rows)
    labels = check_labels(labels, (B, T), weight.shape[0], ignore_index)
    rows, targets = _linear_ce.scored_rows(labels, int(ignore_index))
    count = rows.size
    h = np.ascontiguousarray(hidden.reshape(B * T, D)[rows])
    with _blas.kept():  # the caller's own NumPy products keep their BLAS threads
        total, dh, dweight = _linear_ce.forward(h, weight, targets, 1.0 / max(count, 1), compute_grad,
                                                compute_grad, chunk_rows)
    loss = total / count if count else float("nan")
    if not compute_grad:
        return loss, count, None, None
    dhidden = np.zeros((B * T, D), dtype=hidden.dtype)
    dhidden[rows] = dh
    return loss, count, dhidden.reshape(B, T, D), dweight


# --- embedding -------------------------------------------------------------------------------

def check_token_ids(name, ids, vocab_size):
    """Validate an integer array of token ids in [0, vocab_size); return it flat, int64, C-contiguous."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {ids.dtype}")
    flat = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        bad = flat[(flat < 0) | (flat >= vocab_size)][0]
        raise ValueError(f"{name} holds {int(bad)}, outside [0, {vocab_size})")
    return flat


def embedding_backward(g, ids, vocab_size):
    """The (vocab_size, D) gradient of an embedding table: g (*ids.shape, D), ids integers in
    [0, vocab_size); positions holding the same id add into its row."""
    if not (isinstance(vocab_size, (int, np.integer)) and vocab_size > 0):
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    flat = check_token_ids("ids", ids, vocab_size)
    ids_shape = np.shape(ids)
    g = _float_array("g", g)
    if g.shape[:-1] != ids_shape:
        raise ValueError(f"g must have shape {ids_shape + (g.shape[-1] if g.ndim else 0,)} "
                         f"(ids.shape + (D,)), got {g.shape}")
    dweight = np.zeros((vocab_size, g.shape[-1]), dtype=g.dtype)
    _embedding.embedding_backward(dweight, flat, g.reshape(-1, g.shape[-1]))
    return dweight
