"""The GPT of docs/DESIGN.md: GPT-2 style, pre-LayerNorm, learned positions, tied LM head.

Dimension letters: B batch, T sequence length, D embed_dim, H heads, V vocabulary.
"""
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from fastlora.autograd import Tensor, ops
from fastlora.nn.causal_lm import CausalLM
from fastlora.nn.layers import ACTIVATIONS, MLP, Dropout, Embedding, LayerNorm, Linear, residual_std
from fastlora.nn.module import Module, ModuleList


@dataclass
class GPTConfig:
    vocab_size: int
    embed_dim: int
    num_heads: int
    num_layers: int
    max_seq_len: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    # what a Hugging Face GPT-2 config can vary; the defaults are the GPT of docs/DESIGN.md
    mlp_hidden: Optional[int] = None  # fc1's width; None: mlp_ratio * embed_dim (GPT-2's n_inner)
    activation: str = "gelu_tanh"     # or "gelu" (exact, erf)
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True  # False: a separate lm_head (V, D) without bias

    def validate(self):
        for name in ("vocab_size", "embed_dim", "num_heads", "num_layers", "max_seq_len", "mlp_ratio"):
            _check_positive_int(name, getattr(self, name))
        if self.mlp_hidden is not None:
            _check_positive_int("mlp_hidden", self.mlp_hidden)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if not (isinstance(self.layer_norm_eps, (float, int)) and 0 < self.layer_norm_eps < 1):
            raise ValueError(f"layer_norm_eps must be in (0, 1), got {self.layer_norm_eps!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")

    @property
    def hidden_dim(self):
        return self.mlp_hidden or self.mlp_ratio * self.embed_dim

    def num_parameters(self):
        """How many weights a GPT of this config holds, computed without building it."""
        D, I, V = self.embed_dim, self.hidden_dim, self.vocab_size
        block = 4 * (D * D + D) + (D * I + I) + (I * D + D) + 4 * D  # attention, MLP, two LayerNorms
        return V * D + self.max_seq_len * D + self.num_layers * block + 2 * D + (0 if self.tie_word_embeddings else V * D)


def _check_positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class CausalSelfAttention(Module):
    def __init__(self, dim, num_heads, rng, dtype, proj_std, dropout=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = Linear(dim, dim, rng=rng, dtype=dtype)
        self.k_proj = Linear(dim, dim, rng=rng, dtype=dtype)
        self.v_proj = Linear(dim, dim, rng=rng, dtype=dtype)
        self.out_proj = Linear(dim, dim, rng=rng, dtype=dtype, std=proj_std)
        self.resid_drop = Dropout(dropout, seed=_child_seed(rng))

    def forward(self, x, segment_starts=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        mixed = ops.causal_attention(q, k, v, self.num_heads, segment_starts=segment_starts)
        return self.resid_drop(self.out_proj(mixed))


class Block(Module):
    """x = x + attn(ln1(x)); x = x + mlp(ln2(x))."""

    def __init__(self, cfg, rng, dtype):
        super().__init__()
        proj_std = residual_std(cfg.num_layers)
        self.ln1 = LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps, dtype=dtype)
        self.attn = CausalSelfAttention(cfg.embed_dim, cfg.num_heads, rng, dtype, proj_std, cfg.dropout)
        self.ln2 = LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg.embed_dim, hidden_dim=cfg.hidden_dim, rng=rng, dtype=dtype, proj_std=proj_std,
                       activation=cfg.activation)
        self.mlp_drop = Dropout(cfg.dropout, seed=_child_seed(rng))

    def forward(self, x, segment_starts=None):
        x = x + self.attn(self.ln1(x), segment_starts)
        return x + self.mlp_drop(self.mlp(self.ln2(x)))


class GPT(CausalLM):
    """GPT(vocab_size, embed_dim, num_heads, num_layers, max_seq_len, mlp_ratio=4, dropout=0.0).

    forward(input_ids (B, T) ints) -> logits Tensor (B, T, V). float32 unless dtype=np.float64.
    The keyword-only mlp_hidden, activation, layer_norm_eps and tie_word_embeddings cover the
    GPT-2 variants Hugging Face configs describe (see GPTConfig).
    """

    def __init__(self, vocab_size, embed_dim, num_heads, num_layers, max_seq_len,
                 mlp_ratio=4, dropout=0.0, seed=0, dtype=np.float32, *, mlp_hidden=None,
                 activation="gelu_tanh", layer_norm_eps=1e-5, tie_word_embeddings=True):
        super().__init__()
        self.config = GPTConfig(vocab_size, embed_dim, num_heads, num_layers, max_seq_len,
                                mlp_ratio, dropout, mlp_hidden, activation, layer_norm_eps,
                                tie_word_embeddings)
        self.config.validate()
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        rng = np.random.default_rng(seed)
        self.embed = Embedding(vocab_size, embed_dim, rng=rng, dtype=dtype)
        self.pos_embed = Embedding(max_seq_len, embed_dim, rng=rng, dtype=dtype)
        self.drop = Dropout(dropout, seed=_child_seed(rng))
        self.blocks = ModuleList([Block(self.config, rng, dtype) for _ in range(num_layers)])
        self.ln_f = LayerNorm(embed_dim, eps=layer_norm_eps, dtype=dtype)
        if not tie_word_embeddings:
            self.lm_head = Linear(embed_dim, vocab_size, bias=False, rng=rng, dtype=dtype)
        # the Hugging Face config.json this model was loaded from (None for a model made here):
        # save_pretrained writes its fields back, and adapters take GPT-2's module names
        self.hf_config = None

    def hidden_states(self, input_ids, position_ids=None):
        """The final LayerNorm's output (B, T, D): what the head turns into logits. position_ids
        (B, T), for packed rows: positions restarting at 0 at each record, which also keep
        attention within each record (CausalLM.position_info)."""
        ids = self.check_input_ids(input_ids)
        positions, starts = self.position_info(ids, position_ids)
        x = self.embed(ids) + self.pos_embed(positions)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x) if starts is None else block(x, starts)
        return self.ln_f(x)

    def head_weight(self):
        """The (V, D) weight the logits come from: the embedding's when tied (logits = x @
        embed.weight^T), else lm_head's."""
        return self.embed.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def kv_shape(self):
        """(key/value heads, head size) of the attention layers: what a KVCache holds."""
        return self.config.num_heads, self.config.embed_dim // self.config.num_heads

    def decode_hidden(self, ids, cache, positions):
        """Generation's forward (fastlora.nn.kv_cache): the hidden states (B, t, D) of the new
        tokens ids (B, t) at positions (B, t), each layer's attention reading the cache and
        adding these tokens' keys and values to it. Runs the same modules as forward."""
        x = self.drop(self.embed(ids) + self.pos_embed(positions))
        for i, block in enumerate(self.blocks):
            h, attn = block.ln1(x), block.attn
            mixed = cache.attend(i, attn.q_proj(h).data, attn.k_proj(h).data, attn.v_proj(h).data, attn.num_heads)
            x = x + attn.resid_drop(attn.out_proj(Tensor(mixed)))
            x = x + block.mlp_drop(block.mlp(block.ln2(x)))
        return self.ln_f(x)

    # --- files ------------------------------------------------------------------------------------
    def save(self, path, dtype=None):
        """Write weights to `path` (safetensors) and the config to `path` + '.json'; both atomic.

        dtype=np.float16 halves the file (the bundled base model is stored so); loading casts
        back to float32.
        """
        from fastlora.io import save_safetensors, write_json_atomic
        save_safetensors(path, {k: np.ascontiguousarray(v if dtype is None else v.astype(dtype))
                                for k, v in self.state_dict().items()})
        write_json_atomic(config_path(path), {"model_type": "fastlora-gpt", **asdict(self.config)})

    @classmethod
    def load(cls, path, dtype=None):
        """Build a GPT from `path` (safetensors) and its JSON config; never executes code."""
        from fastlora.io import load_safetensors, read_json
        cfg_file = config_path(path)
        cfg = read_json(cfg_file)
        required = ("vocab_size", "embed_dim", "num_heads", "num_layers", "max_seq_len")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{cfg_file}: config is missing {missing}")
        fields = {k: cfg[k] for k in GPTConfig.__dataclass_fields__ if k in cfg}
        state = load_safetensors(path)
        if dtype is None:  # keep float64 files float64; anything narrower computes in float32
            stored = state["embed.weight"].dtype if "embed.weight" in state else np.float32
            dtype = np.float64 if stored == np.float64 else np.float32
        config = GPTConfig(**fields)
        config.validate()
        held = sum(int(a.size) for a in state.values())
        if config.num_parameters() > 2 * held:  # refused before a model of that size is allocated
            raise ValueError(f"{cfg_file}: describes a model of {config.num_parameters():,} weights, but {path} "
                             f"holds {held:,}; the config and the weights do not belong together")
        model = cls(**fields, dtype=dtype)
        model.load_state_dict(state)
        return model


def _child_seed(rng):
    """A seed for a submodule's own Generator, drawn from the model's: same GPT seed, same masks."""
    return int(rng.integers(2 ** 63))


def config_path(weights_path):
    return os.fspath(weights_path) + ".json"
