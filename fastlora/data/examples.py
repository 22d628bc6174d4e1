"""Canonical records -> token ids and which of them are scored (the labels that are not -100).

    Alpaca  prompt (instruction, input, response header) unscored + output + [eos] scored
    text    every token scored, + [eos]
    chat    rendered by the tokenizer's chat template (ChatML when it has none); only the
            assistant turns are scored, as TRL's assistant-only loss scores them

Alpaca prompts and outputs are encoded separately and joined, so the mask boundary sits where
generation starts (the prompt is exactly what generate() is fed). A chat record is encoded
the way transformers' apply_chat_template encodes it: a Hugging Face tokenizer tokenizes the
whole rendering (special-token text read as the special tokens) and a token is scored when
its characters overlap an assistant span (transformers' return_assistant_tokens_mask does the
same with char_to_token). fastlora's own tokenizers have no chat template and no special
tokens for ChatML's markers: the ChatML text is cut at the span boundaries and each piece
encoded, the markers as plain text. The assistant spans are the template's {% generation %}
blocks where it has them, else found by rendering prefixes (chat.assistant_spans). No eos is
added to a chat record: the template's own end-of-turn marks the stop.

Every error names the record (the caller's `at`) and the field.
"""
from itertools import chain

import numpy as np

from fastlora.data import chat
from fastlora.data.formats import ALPACA, CHAT, TEXT, record_kind
from fastlora.data.hf_tokenizer import HFTokenizer
from fastlora.data.tokenizer import Tokenizer


class ExampleEncoder:
    """encode(records, ats) -> the records' token ids and scored flags, as flat arrays."""

    def __init__(self, tokenizer, formatter, add_eos=True):
        self.tokenizer, self.formatter = tokenizer, formatter
        self.end = [int(tokenizer.eos_token_id)] if add_eos else []
        self.vocab_size = int(tokenizer.vocab_size)
        self.hf = isinstance(tokenizer, HFTokenizer)
        self.template = tokenizer.resolve_chat_template() if self.hf else chat.CHATML_TEMPLATE

    def render(self, messages, add_generation_prompt=False, with_spans=False):
        """The chat template's text for `messages` (see chat.render)."""
        if self.hf:
            return self.tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                              with_spans=with_spans)
        return chat.render(self.template, messages, add_generation_prompt=add_generation_prompt,
                           with_spans=with_spans)

    # --- plans: the texts to encode, and which are scored ------------------------------------

    def plan(self, record, at):
        """("pieces", [(text, scored, field)], eos scored?) or ("spans", text, [(start, end)])."""
        kind = record_kind(record)
        if kind == ALPACA:
            instruction, input_, output = record["instruction"], record["input"], record["output"]
            try:
                # format() refuses fields that hold a section header: trained on, they teach
                # the model a template it cannot tell apart from the real one
                self.formatter.format(instruction, input_, output)
            except ValueError as exc:
                raise ValueError(f"{at}: {exc}") from None
            return "pieces", [(self.formatter.prompt(instruction, input_), False, "instruction/input"),
                              (output, True, "output")]
        if kind == TEXT:
            return "pieces", [(record["text"], True, "text")]
        try:
            text, spans = chat.assistant_spans(self.render, self.template, record["messages"])
        except ValueError as exc:
            raise ValueError(f"{at}: {exc}") from None
        if not spans:
            raise ValueError(f"{at}: the chat template marks no assistant text in this conversation, "
                             f"so nothing in it would be trained on")
        if self.hf:
            return "spans", text, spans
        pieces, pos = [], 0
        for start, end in spans:
            pieces += [(text[pos:start], False, "messages"), (text[start:end], True, "messages")]
            pos = end
        return "pieces", pieces + [(text[pos:], False, "messages")]

    # --- encoding ----------------------------------------------------------------------------

    def encode(self, records, ats):
        """-> (ids int32 (N,), scored bool (N,), offsets int64 (R + 1,)): record r's tokens are
        ids[offsets[r]:offsets[r + 1]], all the records' tokens in one flat array."""
        plans = [self.plan(r, at) for r, at in zip(records, ats)]
        texts = [t for p in plans if p[0] == "pieces" for t, _, _ in p[1]]
        fields = [(i, f) for i, p in enumerate(plans) if p[0] == "pieces" for _, _, f in p[1]]
        encoded = self._encode_texts(texts, fields, ats)
        # every piece's tokens in one array; piece k holds flat[starts[k]:starts[k + 1]]
        piece_sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        starts = np.concatenate([[0], np.cumsum(piece_sizes)])
        flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=int(starts[-1]))
        flags = np.repeat([s for p in plans if p[0] == "pieces" for _, s, _ in p[1]], piece_sizes).astype(bool)
        del encoded
        spanned = iter(self.tokenizer.encode_with_offsets([p[1] for p in plans if p[0] == "spans"],
                                                          allowed_special=True) if self.hf else ())
        end_ids, end_flags = np.array(self.end, dtype=np.int64), np.ones(len(self.end), dtype=bool)
        ids_parts, scored_parts, sizes, piece = [], [], [], 0
        for record, p in zip(records, plans):
            if p[0] == "spans":
                ids, offsets = next(spanned)
                ids_parts.append(np.asarray(ids, dtype=np.int64))
                scored_parts.append(_overlaps(offsets, p[2]))
                sizes.append(len(ids))
                continue
            a, b = starts[piece], starts[piece + len(p[1])]
            piece += len(p[1])
            ids_parts.append(flat[a:b])
            scored_parts.append(flags[a:b])
            sizes.append(int(b - a))
            if record_kind(record) != CHAT:
                ids_parts.append(end_ids)
                scored_parts.append(end_flags)
                sizes[-1] += len(end_ids)
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int64)
        scored = np.concatenate(scored_parts) if scored_parts else np.zeros(0, dtype=bool)
        offsets = np.concatenate([[0], np.cumsum(np.array(sizes, dtype=np.int64))]).astype(np.int64)
        self._check(ids, scored, offsets, records, ats)
        return ids.astype(np.int32), scored, offsets

    def _check(self, ids, scored, offsets, records, ats):
        """Every id in range, and something scored in every record; errors name the record."""
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            k = int(np.argmax(bad))
            r = int(np.searchsorted(offsets, k, side="right")) - 1
            raise ValueError(f"{ats[r]}: the tokenizer returned id {int(ids[k])} outside "
                             f"[0, vocab_size = {self.vocab_size})")
        counts = np.add.reduceat(scored.astype(np.int64), offsets[:-1]) if len(scored) else np.zeros(len(records))
        empty = (offsets[1:] == offsets[:-1]) | (counts == 0)
        if empty.any():
            r = int(np.argmax(empty))
            raise ValueError(f"{ats[r]}: {_nothing_scored(records[r], self.end)}")

    def _encode_texts(self, texts, fields, ats):
        tokenizer = self.tokenizer
        if isinstance(tokenizer, (Tokenizer, HFTokenizer)):
            # ours encode a batch with one kernel call (per text, the call overhead dominates),
            # a Hugging Face one in parallel in Rust; the ids are range-checked all at once
            return tokenizer.encode_batch(texts)
        return [self._check_ids(tokenizer.encode(text), ats[i], field)
                for text, (i, field) in zip(texts, fields)]

    def _check_ids(self, ids, at, field):
        """A foreign tokenizer's output for one field as a list of ints in [0, vocab_size)."""
        ids = np.asarray(list(ids))
        if ids.size == 0:
            return []
        if ids.dtype.kind not in "iu" or ids.ndim != 1:
            raise ValueError(f"{at}: tokenizer.encode({field}) must return a list of ints, got dtype "
                             f"{ids.dtype} shape {ids.shape}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"{at}: tokenizer.encode({field}) returned id {int(ids[np.argmax(bad)])} "
                             f"outside [0, vocab_size = {self.vocab_size})")
        return ids.tolist()

    # --- prompts for generation --------------------------------------------------------------

    def prompt_and_reference(self, record):
        """(prompt ids, reference answer, stop strings) for asking the model this record's
        (last) answer, or None for a text record."""
        kind = record_kind(record)
        if kind == TEXT:
            return None
        if kind == ALPACA:
            prompt = self.formatter.prompt(record["instruction"], record["input"])
            return _ids(self.tokenizer.encode(prompt)), record["output"], []
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt, end = chat.reply_parts(self.render, messages, last)
        ids = self.tokenizer.encode(prompt, allowed_special=True) if self.hf else self.tokenizer.encode(prompt)
        return _ids(ids), messages[last]["content"], [end.strip()] if end and end.strip() else []


def _ids(ids):
    return np.asarray(list(ids), dtype=np.int64)


def _overlaps(offsets, spans):
    """Per token: do its characters [start, end) overlap any span?"""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    scored = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        scored |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return scored


def _nothing_scored(record, end):
    kind = record_kind(record)
    if kind == CHAT:
        return "the assistant turns encode to no tokens, so nothing would be trained on"
    field = "output" if kind == ALPACA else "text"
    return f"the {field} encodes to no tokens and add_eos=False, so it has nothing to score"
