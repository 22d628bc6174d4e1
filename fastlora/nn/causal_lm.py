"""CausalLM: what every language model here shares, whatever its blocks are.

A subclass sets `self.config` (with at least vocab_size and max_seq_len) and `self.hf_config`
(the Hugging Face config.json it was loaded from, or None), and implements
hidden_states(input_ids (B, T)) -> the final norm's output (B, T, D) and head_weight() -> the
(V, D) weight of its LM head (a tied embedding's or lm_head's). This class makes the logits
(forward), the fused loss (loss: the head and the cross-entropy together, never the whole
logits), checks token ids, generates, and reads and writes the Hugging Face folder layout
(fastlora.nn.pretrained).
"""
import numpy as np

from fastlora.autograd import ops
from fastlora.autograd.tensor import Tensor, no_grad
from fastlora.nn.checkpointing import GradientCheckpointing
from fastlora.nn.layers import Linear
from fastlora.nn.module import Module


class CausalLM(GradientCheckpointing, Module):
    """Base class of GPT and Llama: logits and the fused loss, token-id checks, generate,
    save_pretrained/from_pretrained, gradient checkpointing (fastlora.nn.checkpointing)."""

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def forward(self, input_ids, position_ids=None):
        """Logits (B, T, V) of input_ids (B, T); position_ids (B, T) for packed rows (see
        position_info)."""
        return self.logits(with_positions(self.hidden_states, input_ids, position_ids))

    def position_info(self, ids, position_ids):
        """(positions, segment starts) for hidden_states: arange(T) and None by default; for
        packed rows (several records in one row), position_ids (B, T) counting 0, 1, ... within
        each record, and the (B, T) starts that keep each token's attention in its record."""
        if position_ids is None:
            return np.arange(ids.shape[1]), None
        from fastlora._runtime.attention import segment_starts
        starts = segment_starts(position_ids, ids.shape)
        return np.asarray(position_ids, dtype=np.int64), starts

    def logits(self, hidden):
        """The head: hidden (B, T, D) -> logits (B, T, V), through lm_head when there is one (so
        an adapter or a quantized weight put there takes part), else the tied embedding."""
        head = self._modules.get("lm_head")
        if head is not None:
            return head(hidden)
        return ops.linear(hidden, self.head_weight())

    def fused_head_weight(self):
        """head_weight() when the head is that weight alone (tied, or an lm_head that is a plain
        Linear without bias), so the loss may fuse it; None when lm_head is anything else (LoRA
        on lm_head, modules_to_save, a quantized layer): the loss then goes through logits()."""
        head = self._modules.get("lm_head")
        if head is not None and not (type(head) is Linear and head.bias is None):
            return None
        return self.head_weight()

    def loss(self, input_ids, labels, ignore_index=-100, position_ids=None):
        """Mean next-token cross-entropy of input_ids against labels (B, T), the shift inside and
        ignore_index skipped: the number cross_entropy(self(input_ids), labels) gives, without
        the (B, T, V) logits: the head is fused into the loss (ops.linear_cross_entropy) and
        multiplies only the rows that score."""
        hidden = with_positions(self.hidden_states, input_ids, position_ids)
        weight = self.fused_head_weight()
        if weight is None:
            return ops.cross_entropy(self.logits(hidden), labels, ignore_index)
        return ops.linear_cross_entropy(hidden, weight, labels, ignore_index)

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

    def generate(self, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=None,
                 eos_token_id=None, stop_strings=None, tokenizer=None, seed=None, attention_mask=None):
        """Sample continuations of `ids` (T,) or (B, T); temperature 0 is greedy.

        Each step, as transformers' generate does it: repetition_penalty (> 0) divides the
        positive logits and multiplies the negative ones of every token already in the row
        (prompt included); then, unless greedy, temperature, top_k, and top_p (the smallest
        set of most likely tokens whose probability reaches top_p) shape the distribution.
        A row stops at any id of eos_token_id (an int or a list), or once its new text
        contains one of stop_strings (which needs the `tokenizer` to decode); the tokens that
        finished it are kept, and a finished row is filled with the first eos id (or the
        tokenizer's pad). The context is cropped to the last max_seq_len tokens. Returns the
        ids with the new tokens appended, as an int64 array of the input's rank.

        A key/value cache (fastlora.nn.kv_cache) makes each step run the new token only, with
        the same tokens as running the whole context. Prompts of different lengths generate
        as one batch: give them as a list (the result is a list, each row its prompt and its
        new tokens), or ids left-padded with an attention_mask (B, T) of 0 at the
        padding and 1 at tokens, as transformers takes them (the result keeps the padding).
        Padding is never attended to and positions count real tokens only, so each row gets
        the tokens it would get alone.
        """
        from fastlora.nn.kv_cache import Decoder, check_left_padding, left_pad
        ragged = isinstance(ids, (list, tuple)) and len(ids) > 1 and all(np.ndim(r) == 1 for r in ids) \
            and len({len(r) for r in ids}) > 1
        lengths = None
        if ragged:
            if attention_mask is not None:
                raise ValueError("give either a list of prompts or ids with an attention_mask, not both")
            lengths = [len(r) for r in ids]
            # each row padded with its own first token: the repetition penalty sees nothing new
            ids, attention_mask = left_pad(ids, pad_id=0)
            for b, n in enumerate(lengths):
                ids[b, : ids.shape[1] - n] = ids[b, ids.shape[1] - n]
        single = not ragged and np.ndim(ids.data if isinstance(ids, Tensor) else ids) == 1
        ids = self.check_input_ids(ids, "ids")
        mask = np.ones(ids.shape, dtype=bool) if attention_mask is None else \
            check_left_padding(attention_mask, ids.shape)
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        sampler = Sampler(temperature, top_k, top_p, repetition_penalty)
        eos = _token_ids(eos_token_id, self.config.vocab_size)
        stops = StopStrings(stop_strings, tokenizer, ids.shape[1])
        fill = eos[0] if eos else (tokenizer.pad_token_id if stops else None)
        rng = np.random.default_rng(seed)
        out = ids.astype(np.int64)
        finished = np.zeros(out.shape[0], dtype=bool)
        decoder = Decoder(self, mask, out.shape[1] + max_new_tokens)
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                for _ in range(max_new_tokens):
                    logits = decoder.next_logits(out)
                    nxt = sampler(logits, out, rng)
                    if fill is not None:
                        nxt = np.where(finished, fill, nxt)
                    out = np.concatenate([out, nxt[:, None]], axis=1)
                    if eos:
                        finished |= np.isin(nxt, eos)
                    if stops:
                        finished |= stops.hit(out, ~finished)
                    if fill is not None and finished.all():
                        break
        finally:
            self.train(was_training)
        if ragged:
            return [row[ids.shape[1] - n:] for row, n in zip(out, lengths)]
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



class Sampler:
    """Next token per row of logits (B, V): the logits processors of transformers' generate."""

    def __init__(self, temperature=1.0, top_k=None, top_p=None, repetition_penalty=None):
        if not isinstance(temperature, (int, float, np.number)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and not (isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool)
                                      and top_k >= 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float, np.number)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
        if repetition_penalty is not None and not (
                isinstance(repetition_penalty, (int, float, np.number)) and repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a number > 0 or None, got {repetition_penalty!r}")
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        self.repetition_penalty = repetition_penalty

    def __call__(self, logits, seen, rng):
        """logits (B, V) float64 of the next position; seen (B, T): every token so far."""
        if self.repetition_penalty is not None and self.repetition_penalty != 1:
            logits = penalize_repetition(logits, seen, self.repetition_penalty)
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = np.partition(logits, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            logits = np.where(logits < kth, -np.inf, logits)
        if self.top_p is not None and self.top_p < 1:
            logits = nucleus(logits, self.top_p)
        logits = logits - logits.max(-1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def penalize_repetition(logits, seen, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor: for each token present in the row's
    `seen`, a logit < 0 is multiplied by `penalty`, any other divided by it."""
    logits = logits.copy()
    for b in range(logits.shape[0]):
        tokens = np.unique(seen[b])
        score = logits[b, tokens]
        logits[b, tokens] = np.where(score < 0, score * penalty, score / penalty)
    return logits


def nucleus(logits, top_p):
    """transformers' TopPLogitsWarper: keep the most likely tokens whose probabilities sum to
    top_p (at least one), -inf for the rest."""
    order = np.argsort(logits, axis=-1, kind="stable")          # ascending
    ranked = np.take_along_axis(logits, order, axis=-1)
    p = np.exp(ranked - ranked[:, -1:])
    cumulative = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
    drop = cumulative <= 1 - top_p
    drop[:, -1] = False
    out = logits.copy()
    np.put_along_axis(out, order, np.where(drop, -np.inf, ranked), axis=-1)
    return out


class StopStrings:
    """Which rows' new text (after the first `start` tokens) contains a stop string."""

    def __init__(self, stop_strings, tokenizer, start):
        if stop_strings is None:
            stop_strings = []
        elif isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        stop_strings = list(stop_strings)
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        if stop_strings and (tokenizer is None or not hasattr(tokenizer, "decode")):
            raise ValueError("stop_strings needs the tokenizer (generate(..., tokenizer=tok)) to read the "
                             "new tokens as text")
        self.strings, self.tokenizer, self.start = stop_strings, tokenizer, start
        # a stop string ending in the newest token lies within its last 4 * len + 1 tokens: every
        # token decodes to at least one byte (a character to at most four)
        self.window = 4 * max(map(len, stop_strings), default=0) + 1

    def __bool__(self):
        return bool(self.strings)

    def hit(self, out, rows):
        done = np.zeros(out.shape[0], dtype=bool)
        for b in np.flatnonzero(rows):
            tail = out[b, max(self.start, out.shape[1] - self.window):]
            text = self.tokenizer.decode([int(t) for t in tail])
            done[b] = any(s in text for s in self.strings)
        return done


def _token_ids(eos_token_id, vocab_size):
    """eos_token_id (None, an int or a list of ints) -> list of ints in [0, vocab_size)."""
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < vocab_size:
            raise ValueError(f"eos_token_id must be a token id or a list of them in [0, {vocab_size}), "
                             f"got {eos_token_id!r}")
    return [int(i) for i in ids]


def causal_lm_loss(model, input_ids, labels, ignore_index=-100, position_ids=None):
    """The training loss of any model here: model.loss (the fused head) for a CausalLM or a
    LoRAModel over one, else cross_entropy(model(input_ids), labels) for a user's own Module
    that returns logits. Both give the same number (up to float rounding). position_ids: packed
    rows' positions (CausalLM.position_info)."""
    if isinstance(model, CausalLM) or isinstance(getattr(model, "base_model", None), CausalLM):
        return with_positions(model.loss, input_ids, position_ids, labels, ignore_index)
    return ops.cross_entropy(_call(model, input_ids, position_ids), labels, ignore_index)


def with_positions(fn, input_ids, position_ids, *args):
    """fn(input_ids, *args), passing position_ids only when there are some: a model of one's own
    (a CausalLM subclass, a model under LoRA) need not take them unless its rows are packed."""
    if position_ids is None:
        return fn(input_ids, *args)
    return fn(input_ids, *args, position_ids=position_ids)


def _call(model, input_ids, position_ids):
    """model(input_ids), with position_ids where given (a model of one's own must take them)."""
    if position_ids is None:
        return model(input_ids)
    try:
        return model(input_ids, position_ids=position_ids)
    except TypeError as exc:
        raise TypeError(f"packed rows need a model whose forward takes position_ids; "
                        f"{type(model).__name__}'s does not ({exc})") from None


def token_scores(model, input_ids, labels, ignore_index=-100, position_ids=None):
    """(sum of the scored positions' losses, how many, how many of them the model ranks first)
    for evaluation (loss and next-token accuracy), computed without a graph. Through the fused
    head when the model has one (its rows' argmax comes from the same pass), else from
    model(input_ids)'s logits (argmax: the first of ties, as np.argmax)."""
    from fastlora import _linear_ce
    from fastlora.kernels import check_labels
    lm = model if isinstance(model, CausalLM) else getattr(model, "base_model", None)
    with no_grad():
        weight = lm.fused_head_weight() if isinstance(lm, CausalLM) else None
        if weight is None:
            logits = _call(model, input_ids, position_ids).data
            B, T, V = logits.shape
            labels = check_labels(labels, (B, T), V, ignore_index)
            rows, targets = _linear_ce.scored_rows(labels, int(ignore_index))
            if rows.size == 0:
                return 0.0, 0, 0
            loss = float(ops.cross_entropy(logits, labels, ignore_index).data) * rows.size
            argmax = logits.reshape(B * T, V)[rows].argmax(-1)
            return loss, int(rows.size), int((argmax == targets).sum())
        hidden = with_positions(lm.hidden_states, input_ids, position_ids).data
        B, T, D = hidden.shape
        labels = check_labels(labels, (B, T), weight.shape[0], ignore_index)
        rows, targets = _linear_ce.scored_rows(labels, int(ignore_index))
        argmax = np.empty(rows.size, dtype=np.int64)
        total, _, _ = _linear_ce.forward(np.ascontiguousarray(hidden.reshape(B * T, D)[rows]),
                                         np.ascontiguousarray(weight.data), targets, 1.0, False, False,
                                         argmax=argmax)
        return total, int(rows.size), int((argmax == targets).sum())
