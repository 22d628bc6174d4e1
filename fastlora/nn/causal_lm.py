"""CausalLM: what every language model here shares, whatever its blocks are.

A subclass sets `self.config` (with at least vocab_size and max_seq_len) and `self.hf_config`
(the Hugging Face config.json it was loaded from, or None), and implements
forward(input_ids (B, T)) -> logits (B, T, V). This class checks token ids, generates, and
reads and writes the Hugging Face folder layout (fastlora.nn.pretrained).
"""
import numpy as np

from fastlora.autograd.tensor import Tensor, no_grad
from fastlora.nn.module import Module


class CausalLM(Module):
    """Base class of GPT and Llama: token-id checks, generate, save_pretrained/from_pretrained."""

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def check_input_ids(self, input_ids, name="input_ids"):
        """Validate token ids: an int array (B, T) or (T,), 1 <= T <= max_seq_len, ids in [0, V)."""
        ids = np.asarray(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
        if ids.dtype.kind not in "iu":
            if ids.size == 0 or ids.dtype.kind != "f" or not np.all(ids == np.round(ids)):
                raise TypeError(f"{name} must be an integer array, got dtype {ids.dtype}")
            ids = ids.astype(np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2:
            raise ValueError(f"{name} must be (batch, seq_len), got shape {ids.shape}")
        T = ids.shape[1]
        if not 1 <= T <= self.config.max_seq_len:
            raise ValueError(f"{name} has sequence length {T}; it must be in [1, max_seq_len="
                             f"{self.config.max_seq_len}]")
        V = self.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            bad = ids[(ids < 0) | (ids >= V)].flat[0]
            raise ValueError(f"{name} contains token id {int(bad)}, outside [0, vocab_size={V})")
        return ids

    def generate(self, ids, max_new_tokens, temperature=1.0, top_k=None, eos_token_id=None, seed=None):
        """Sample continuations of `ids` (T,) or (B, T); temperature 0 is greedy.

        The context is cropped to the last max_seq_len tokens. Returns the ids with the new
        tokens appended, as an int64 array of the input's rank.
        """
        single = np.ndim(ids.data if isinstance(ids, Tensor) else ids) == 1
        ids = self.check_input_ids(ids, "ids")
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not (isinstance(top_k, (int, np.integer)) and top_k >= 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        rng = np.random.default_rng(seed)
        out = ids.astype(np.int64)
        finished = np.zeros(out.shape[0], dtype=bool)
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                for _ in range(max_new_tokens):
                    context = out[:, -self.config.max_seq_len:]
                    logits = self.forward(context).data[:, -1, :].astype(np.float64)
                    nxt = _sample(logits, temperature, top_k, rng)
                    if eos_token_id is not None:
                        nxt = np.where(finished, eos_token_id, nxt)
                        finished |= nxt == eos_token_id
                    out = np.concatenate([out, nxt[:, None]], axis=1)
                    if eos_token_id is not None and finished.all():
                        break
        finally:
            self.train(was_training)
        return out[0] if single else out

    def save_pretrained(self, folder, tokenizer=None):
        """Write the Hugging Face layout (config.json + model.safetensors) transformers loads."""
        from fastlora.nn.pretrained import save_pretrained
        return save_pretrained(self, folder, tokenizer)

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32, dropout=0.0):
        """This class of model from a Hugging Face folder, or a file GPT.save wrote (fastlora.from_pretrained)."""
        from fastlora.nn.pretrained import from_pretrained
        model = from_pretrained(path, dtype=dtype, dropout=dropout)
        if not isinstance(model, cls):
            raise ValueError(f"{path}: holds a {type(model).__name__}, not a {cls.__name__}")
        return model



def _sample(logits, temperature, top_k, rng):
    """Next token per row of logits (B, V): argmax at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)
