"""Generation with a key/value cache: a prefill of the prompt, then one token per step.

Each attention layer keeps the keys and values of every position it has seen (after RoPE, for
a Llama), so a decode step runs the model on the new token only: its projections, its
attention against the cache, its MLP and the head on that one row. The models' own
`decode_hidden(ids, cache, positions)` (GPT, Llama) run their layers that way; `Decoder` feeds
generate's growing ids through them.

Batches of prompts of different lengths are left-padded: `KVCache.valid` marks the cached
positions that hold real tokens, and attention never reads the others. Positions count the
real tokens only (the first real token of every row is position 0), as transformers'
generate makes them from the attention mask, so a padded row gets the tokens it would get
alone.

Dimension letters: B batch, t new positions, S cached positions, H query heads, Hkv key/value
heads (each shared by G = H / Hkv query heads), hd head size, D width.
"""
import numpy as np

from fastlora.autograd.tensor import Tensor


class KVCache:
    """Keys and values (B, Hkv, capacity, hd) of each layer, and which positions are real."""

    def __init__(self, num_layers, batch, capacity, num_kv_heads, head_dim, dtype):
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [np.empty(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [np.empty(shape, dtype=dtype) for _ in range(num_layers)]
        self.valid = np.zeros((batch, capacity), dtype=bool)
        self.length = 0  # positions cached (the same for every row: padding is cached too)
        self.new = 0     # positions the current step adds

    @property
    def capacity(self):
        return self.valid.shape[1]

    def begin(self, valid):
        """Start a step that adds valid.shape[1] positions; valid (B, t): which are real tokens."""
        t = valid.shape[1]
        if self.length + t > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {self.length} + {t} do not fit")
        self.valid[:, self.length:self.length + t] = valid
        self.new = t

    def commit(self):
        """End the step: the positions it added are now cached."""
        self.length += self.new
        self.new = 0

    def attend(self, layer, q, k, v, num_heads):
        """Causal attention of this step's positions over every cached one, in layer `layer`.

        q (B, t, H * hd), k and v (B, t, Hkv * hd) of the new positions (k and v are stored in the
        cache) -> (B, t, H * hd): softmax(q k^T / sqrt(hd)) v over the real positions up to
        each query's own; query head h reads key/value head h // G, as ops.causal_attention.
        """
        B, t, width = q.shape
        n, S = self.length, self.length + t
        keys, values = self.keys[layer], self.values[layer]
        Hkv, hd = keys.shape[1], keys.shape[3]
        G = num_heads // Hkv
        keys[:, :, n:S] = k.reshape(B, t, Hkv, hd).transpose(0, 2, 1, 3)
        values[:, :, n:S] = v.reshape(B, t, Hkv, hd).transpose(0, 2, 1, 3)
        # each key/value head's G query heads stacked: one (G t, S) product per key/value head
        qh = q.reshape(B, t, Hkv, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * t, hd)
        scores = np.matmul(qh, keys[:, :, :S].transpose(0, 1, 3, 2))  # (B, Hkv, G t, S)
        scores *= 1.0 / np.sqrt(hd)
        if t > 1 or not self.valid[:, :S].all():  # a lone new token of unpadded rows sees every key
            allowed = self.valid[:, None, :S] & (np.arange(S)[None, None, :] <= np.arange(n, S)[None, :, None])
            # a padding query has no real key at or before it: it reads itself (its output is never used)
            allowed[:, np.arange(t), np.arange(n, S)] |= ~self.valid[:, n:S]
            blocked = np.broadcast_to(~allowed[:, None, None], (B, Hkv, G, t, S)).reshape(scores.shape)
            np.copyto(scores, -np.inf, where=blocked)
        scores -= scores.max(-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(-1, keepdims=True)
        out = np.matmul(scores, values[:, :, :S])  # (B, Hkv, G t, hd)
        return np.ascontiguousarray(out.reshape(B, Hkv, G, t, hd).transpose(0, 3, 1, 2, 4).reshape(B, t, width))


def left_pad(sequences, pad_id):
    """A list of 1-D token sequences -> (ids (B, T) left-padded with pad_id, mask (B, T) bool)."""
    rows = [np.asarray(s).reshape(-1) for s in sequences]
    if not rows or any(r.size == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    T = max(r.size for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=bool)
    for b, r in enumerate(rows):
        ids[b, T - r.size:] = r
        mask[b, T - r.size:] = True
    return ids, mask


def check_left_padding(mask, shape):
    """attention_mask (B, T) of 0/1 (or bools), padding on the left only, a real token per row."""
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask must have the ids' shape {tuple(shape)}, got {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold 0 (padding) and 1 (tokens) only")
    mask = mask.astype(bool)
    if not mask[:, -1].all() or np.any(mask[:, :-1] & ~mask[:, 1:]):
        raise ValueError("attention_mask must pad on the left only (zeros, then ones, the last position a "
                         "token): generation appends on the right")
    return mask


class Decoder:
    """Logits of the next position for generate, each step running only the new tokens.

    The first call prefills the prompt, each later one feeds the token appended since. Past
    max_seq_len the context is cropped to its last max_seq_len tokens, as the uncached path
    does, which moves every position: from then on each step prefills the cropped window
    afresh (a full forward, as before the cache existed). A CausalLM subclass that only has a
    forward (no decode_hidden) runs the whole cropped context every step, without padding.
    """

    def __init__(self, model, mask, total_length):
        self.model, self.mask = model, mask
        self.window = model.config.max_seq_len
        self.capacity = min(total_length, self.window)
        self.cache = None
        self.cached = callable(getattr(model, "decode_hidden", None))
        if not self.cached and not mask.all():
            raise ValueError(f"{type(model).__name__} has no decode_hidden: it cannot generate from padded prompts")

    def _new_cache(self, batch, capacity):
        kv_heads, head_dim = self.model.kv_shape()
        return KVCache(self.model.config.num_layers, batch, capacity, kv_heads, head_dim, self.model.dtype)

    def next_logits(self, out):
        """out (B, T): every token so far -> logits (B, V) float64 of position T."""
        B, T = out.shape
        if not self.cached:
            return self.model.forward(out[:, -self.window:]).data[:, -1, :].astype(np.float64)
        if self.mask.shape[1] < T:  # generated tokens are real
            self.mask = np.concatenate([self.mask, np.ones((B, T - self.mask.shape[1]), bool)], axis=1)
        if T > self.window:  # cropped: positions move, so nothing cached can be reused
            self.cache = self._new_cache(B, self.window)
            ids, mask, start = out[:, -self.window:], self.mask[:, T - self.window:T], 0
        else:
            if self.cache is None:
                self.cache = self._new_cache(B, self.capacity)
            start = self.cache.length
            ids, mask = out[:, start:T], self.mask[:, :T]
        # each row's position: how many real tokens precede it (padding: 0, never read)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, start:]
        self.cache.begin(mask[:, start:])
        hidden = self.model.decode_hidden(ids, self.cache, positions)
        self.cache.commit()
        last = Tensor(np.ascontiguousarray(hidden.data[:, -1:, :]))
        return self.model.logits(last).data[:, 0, :].astype(np.float64)
