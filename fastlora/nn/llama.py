"""Llama-family decoders (Llama, Qwen2, Mistral, SmolLM2, TinyLlama), with Hugging Face's own names.

Pre-norm blocks: x = x + attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x)), with
RMSNorm, rotary position embeddings on q and k, grouped-query attention (num_kv_heads key/value
heads, each shared by num_heads / num_kv_heads query heads) and a SwiGLU MLP,
down_proj(silu(gate_proj(x)) * up_proj(x)). Parameter names are transformers' own:

    model.embed_tokens.weight                         (V, D)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  q (H*hd, D), k/v (Hkv*hd, D), o (D, H*hd)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight   gate/up (I, D), down (D, I)
    model.layers.{i}.input_layernorm.weight, post_attention_layernorm.weight   (D,)
    model.norm.weight                                 (D,)
    lm_head.weight                                    (V, D), absent when tied to the embedding

Dimension letters: B batch, T sequence, D hidden_size, H heads, Hkv key/value heads, hd head_dim,
I intermediate_size, V vocabulary.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from fastlora.autograd import Tensor, ops
from fastlora.nn.causal_lm import CausalLM
from fastlora.nn.layers import Embedding, Linear
from fastlora.nn.module import Module, ModuleList, Parameter

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_seq_len: int
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "linear"|"llama3", "factor": ...}
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    def validate(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads} "
                             "when head_dim is not given")
        if self.dim_per_head % 2:
            raise ValueError(f"head_dim={self.dim_per_head} must be even (RoPE rotates pairs)")
        if not 0 < self.rms_norm_eps < 1:
            raise ValueError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")

    @property
    def dim_per_head(self):
        return self.head_dim or self.hidden_size // self.num_heads

    def num_parameters(self):
        """How many weights a Llama of this config holds, computed without building it."""
        D, I, V, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.dim_per_head
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attention = D * (q + 2 * kv) + q * D + self.qkv_bias * (q + 2 * kv) + self.o_bias * D
        mlp = 3 * D * I + self.mlp_bias * (2 * I + D)
        return V * D + self.num_layers * (attention + mlp + 2 * D) + D + (0 if self.tie_word_embeddings else V * D)


def rope_inverse_frequencies(config):
    """(hd/2,) float64: theta^(-2i/hd), scaled as rope_scaling says (transformers' formulas)."""
    hd = config.dim_per_head
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    scaling = config.rope_scaling
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled)
    return inv_freq


class RMSNorm(Module):
    def __init__(self, dim, eps=1e-6, dtype=np.float32):
        super().__init__()
        self.eps = float(eps)
        self.weight = Parameter(np.ones(dim, dtype=dtype))

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LlamaAttention(Module):
    def __init__(self, cfg, rng, dtype):
        super().__init__()
        D, hd = cfg.hidden_size, cfg.dim_per_head
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.q_proj = Linear(D, cfg.num_heads * hd, bias=cfg.qkv_bias, rng=rng, dtype=dtype)
        self.k_proj = Linear(D, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, rng=rng, dtype=dtype)
        self.v_proj = Linear(D, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, rng=rng, dtype=dtype)
        self.o_proj = Linear(cfg.num_heads * hd, D, bias=cfg.o_bias, rng=rng, dtype=dtype)

    def forward(self, x, cos, sin, segment_starts=None):
        q = ops.rope(self.q_proj(x), cos, sin, self.num_heads)
        k = ops.rope(self.k_proj(x), cos, sin, self.num_kv_heads)
        return self.o_proj(ops.causal_attention(q, k, self.v_proj(x), self.num_heads, self.num_kv_heads,
                                                segment_starts=segment_starts))


class LlamaMLP(Module):
    def __init__(self, cfg, rng, dtype):
        super().__init__()
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(D, I, bias=cfg.mlp_bias, rng=rng, dtype=dtype)
        self.up_proj = Linear(D, I, bias=cfg.mlp_bias, rng=rng, dtype=dtype)
        self.down_proj = Linear(I, D, bias=cfg.mlp_bias, rng=rng, dtype=dtype)

    def forward(self, x):
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(Module):
    def __init__(self, cfg, rng, dtype):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rng, dtype)
        self.mlp = LlamaMLP(cfg, rng, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x, cos, sin, segment_starts=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_starts)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(Module):
    """The decoder stack without the head: transformers' `model.` prefix."""

    def __init__(self, cfg, rng, dtype):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rng=rng, dtype=dtype)
        self.layers = ModuleList([LlamaDecoderLayer(cfg, rng, dtype) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class Llama(CausalLM):
    """Llama(LlamaConfig(...)) or Llama(vocab_size=..., hidden_size=..., ...): forward(ids) -> logits."""

    def __init__(self, config=None, seed=0, dtype=np.float32, **fields):
        super().__init__()
        if config is None:
            config = LlamaConfig(**fields)
        elif fields:
            raise TypeError("give a LlamaConfig or its fields as keywords, not both")
        config.validate()
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.config = config
        rng = np.random.default_rng(seed)
        self.model = LlamaModel(config, rng, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, rng=rng, dtype=dtype)
        self.hf_config = None
        # the rotation angles of every position, computed once: (max_seq_len, hd/2)
        angles = np.outer(np.arange(config.max_seq_len, dtype=np.float64), rope_inverse_frequencies(config))
        self._cos, self._sin = np.cos(angles), np.sin(angles)

    def hidden_states(self, input_ids, position_ids=None):
        """The final RMSNorm's output (B, T, D): what the head turns into logits. position_ids
        (B, T), for packed rows: positions restarting at 0 at each record, which also keep
        attention within each record (CausalLM.position_info)."""
        ids = self.check_input_ids(input_ids)
        positions, starts = self.position_info(ids, position_ids)
        x = self.model.embed_tokens(ids)
        dtype = x.data.dtype
        # one (T, hd / 2) table for every row, or (B, T, hd / 2) for packed rows' own positions
        cos, sin = self._cos[positions].astype(dtype), self._sin[positions].astype(dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin) if starts is None else layer(x, cos, sin, starts)
        return self.model.norm(x)

    def head_weight(self):
        """The (V, D) weight the logits come from: embed_tokens' when tied, else lm_head's."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def kv_shape(self):
        """(key/value heads, head size) of the attention layers: what a KVCache holds."""
        return self.config.num_kv_heads, self.config.dim_per_head

    def decode_hidden(self, ids, cache, positions):
        """Generation's forward (fastlora.nn.kv_cache): the hidden states (B, t, D) of the new
        tokens ids (B, t) at positions (B, t) (RoPE at each row's own positions), each layer's
        attention reading the cache and adding these tokens' keys and values to it."""
        x = self.model.embed_tokens(ids)
        dtype = x.data.dtype
        cos, sin = self._cos[positions].astype(dtype), self._sin[positions].astype(dtype)
        for i, layer in enumerate(self.model.layers):
            h, attn = layer.input_layernorm(x), layer.self_attn
            q = ops.rope_rows(attn.q_proj(h).data, cos, sin, attn.num_heads)
            k = ops.rope_rows(attn.k_proj(h).data, cos, sin, attn.num_kv_heads)
            mixed = cache.attend(i, q, k, attn.v_proj(h).data, attn.num_heads)
            x = x + attn.o_proj(Tensor(mixed))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.norm(x)
