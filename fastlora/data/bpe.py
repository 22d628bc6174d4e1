"""BPETokenizer: byte-pair encoding over characters, trained here, small enough for vocab 100.

GPT-2 starts from the 256 bytes, which leaves no room in a 100-token vocabulary. This
tokenizer starts from the characters of the training text instead (the most frequent ones
when they do not all fit; the rest encode as unk) and spends every remaining id on merges.

Text is first cut into pieces GPT-2 style (a word with its leading space, a run of digits,
of punctuation, of whitespace), and merges never cross a piece boundary. That keeps the
vocabulary made of useful units and lets both training and encoding work on distinct
pieces: training counts each distinct piece once with its frequency, and encode caches each
piece's ids. The merge loop and the encoder are Cython (csrc/bpe.pyx).

Guarantees: every id is below vocab_size; unseen characters become unk instead of raising;
decode(encode(s)) == s for any s written in the training alphabet. Given the same piece
regex, vocabulary size and min_frequency, Hugging Face `tokenizers` learns the same
vocabulary and cuts text into the same tokens (tests/test_data_hf_oracle.py checks it).
"""
from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Sequence
from itertools import chain
from typing import Dict, Optional

import numpy as np

from fastlora.data import bpe_kernels
from fastlora.data.tokenizer import (
    _KINDS,
    Tokenizer,
    check_alphabet,
    check_texts,
    choose_alphabet,
    normalize_special_tokens,
)
from fastlora.checks import check_merges

PRETOKENIZER = "fastlora-v1"
# contractions | a word with an optional leading space | digits | punctuation (and "_") |
# whitespace that is not the space before a word | any other whitespace. The alternatives
# cover every character, so "".join(pieces) == text always (a property test checks it).
PIECE = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

_CACHE_LIMIT = 1 << 19  # distinct pieces kept; past this the cache starts over
_SPELLED_UP_TO = 64     # characters: shorter merged tokens keep their text, longer ones spell it on demand


def split_pieces(text):
    """Cut `text` into the pieces merges cannot cross."""
    return PIECE.findall(text)


class BPETokenizer(Tokenizer):
    """Build with BPETokenizer.train(texts, vocab_size) or BPETokenizer.load(path)."""

    kind = "bpe"

    def __init__(self, alphabet, merges, special_tokens=None):
        special = normalize_special_tokens(special_tokens)
        self._alphabet = check_alphabet(alphabet)
        self._n_base = len(special) + len(self._alphabet)
        self._merges = check_merges(merges, self._n_base)
        if len(self._merges) and self._merges.min() < len(special):
            r = int(np.argmax(self._merges.min(axis=1) < len(special)))
            raise ValueError(f"merges[{r}] = {self._merges[r].tolist()} joins a special token "
                             f"(ids below {len(special)}); special tokens never merge")
        # training never repeats a pair (once merged it cannot re-form), so a repeat means a
        # corrupted or hand-edited file; its second id could never be emitted
        keys = self._merges[:, 0].astype(np.int64) << 32 | self._merges[:, 1]
        if len(np.unique(keys)) != len(keys):
            _, first = np.unique(keys, return_index=True)
            r = int(np.setdiff1d(np.arange(len(keys)), first)[0])
            raise ValueError(f"merges[{r}] = {self._merges[r].tolist()} repeats an earlier merge")
        self._table = bpe_kernels.build_merge_table(self._merges, self._n_base)
        super().__init__(TokenTexts(list(special.values()) + self._alphabet, self._merges), special)
        self._char_ids = {ch: len(special) + i for i, ch in enumerate(self._alphabet)}
        self._cache = {}

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, special_tokens: Optional[Dict[str, str]] = None,
              min_frequency: int = 2) -> BPETokenizer:
        """Learn a vocabulary of at most `vocab_size` ids from `texts` (a list of str).

        Merges stop early when no pair occurs `min_frequency` times, so the result can be
        smaller than asked for; `vocab_size` is an upper bound on every id ever emitted.
        """
        texts = check_texts(texts)
        special = normalize_special_tokens(special_tokens)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) \
                or vocab_size <= len(special):
            raise ValueError(f"vocab_size must be an int > {len(special)} (the special tokens), "
                             f"got {vocab_size!r}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        alphabet = choose_alphabet(texts, vocab_size - len(special), special)
        n_base = len(special) + len(alphabet)
        num_merges = vocab_size - n_base

        char_ids = {ch: len(special) + i for i, ch in enumerate(alphabet)}
        sym, offsets, counts = piece_table(texts, char_ids)
        merges, _ = bpe_kernels.train_merges(sym, offsets, counts, n_base, num_merges,
                                             min_frequency)
        return cls(alphabet, merges, special)

    @property
    def merges(self):
        """(M, 2) int32: merge r joins ids merges[r] into id n_base + r (a copy)."""
        return self._merges.copy()

    def _encode_ordinary(self, text):
        pieces = PIECE.findall(text)
        cache = self._cache
        missing = set(pieces).difference(cache)
        if missing:
            self._encode_pieces(list(missing))
        return list(chain.from_iterable(map(cache.__getitem__, pieces)))

    def encode_batch(self, texts, allowed_special=False):
        """[encode(t) for t in texts], with one kernel call for all the pieces not yet cached."""
        texts = check_texts(texts)
        if allowed_special:
            return super().encode_batch(texts, allowed_special)
        split = [PIECE.findall(text) for text in texts]
        cache = self._cache
        missing = set().union(*split).difference(cache)
        if missing:
            self._encode_pieces(list(missing))
        get = cache.__getitem__
        return [list(chain.from_iterable(map(get, pieces))) for pieces in split]

    def _encode_pieces(self, pieces):
        """Run the kernel over pieces not seen before and remember their ids."""
        if len(self._cache) + len(pieces) > _CACHE_LIMIT:
            self._cache.clear()
        get, unk = self._char_ids.get, self.unk_token_id
        sym, offsets = [], [0]
        for piece in pieces:
            sym.extend([get(ch, unk) for ch in piece])
            offsets.append(len(sym))
        if unk in sym:
            self._note_unknown("".join(pieces))
        ids, out_offsets = bpe_kernels.encode_words(np.array(sym, dtype=np.int32),
                                                    np.array(offsets, dtype=np.int64),
                                                    self._merges, self._n_base, self._table)
        ids, out_offsets = ids.tolist(), out_offsets.tolist()
        cache = self._cache
        for k, piece in enumerate(pieces):
            cache[piece] = tuple(ids[out_offsets[k]:out_offsets[k + 1]])

    def _state(self):
        return {"pre_tokenizer": PRETOKENIZER, "alphabet": self._alphabet,
                "merges": self._merges.tolist()}

    @classmethod
    def _from_state(cls, path, state, special):
        if state.get("pre_tokenizer") != PRETOKENIZER:
            raise ValueError(f"{path}: field 'pre_tokenizer' must be {PRETOKENIZER!r}, "
                             f"got {state.get('pre_tokenizer')!r}")
        try:
            alphabet = check_alphabet(state.get("alphabet"), "field 'alphabet'")
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        merges = state.get("merges")
        if not isinstance(merges, list) or not all(
                isinstance(m, list) and len(m) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in m)
                for m in merges):
            raise ValueError(f"{path}: field 'merges' must be a list of [left, right] int pairs")
        try:
            return cls(alphabet, np.array(merges, dtype=np.int64).reshape(-1, 2), special)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"{path}: field 'merges': {exc}") from None


class TokenTexts(Sequence):
    """id -> text of a BPE vocabulary, in memory linear in the number of merges.

    Writing out every merged token's text costs the sum of their lengths, which a chain of
    merges (a+b, ab+c, abc+d, ...) makes quadratic: 200k chained merges in a 2.5 MB file took
    7.7 GB. Here a token of at most _SPELLED_UP_TO characters keeps its text (built from its two
    halves, so at most that much work each); a longer one is spelled out from the merges when
    asked for, in time linear in its length.
    """

    def __init__(self, base, merges):
        self._n_base = len(base)
        self._merges = merges
        texts, lengths = list(base), [len(t) for t in base]
        for left, right in merges.tolist():
            n = lengths[left] + lengths[right]
            lengths.append(n)
            # both halves are shorter than n, so when n is short enough both have their text
            texts.append(texts[left] + texts[right] if n <= _SPELLED_UP_TO else None)
        self._texts = texts

    def __len__(self):
        return len(self._texts)

    def __getitem__(self, i):
        i = operator.index(i)
        text = self._texts[i]
        if text is not None:
            return text
        parts, stack = [], [i % len(self._texts)]
        while stack:  # depth first, left half before right
            j = stack.pop()
            if self._texts[j] is not None:
                parts.append(self._texts[j])
            else:
                left, right = self._merges[j - self._n_base]
                stack += (int(right), int(left))
        return "".join(parts)


def piece_table(texts, char_ids):
    """The distinct pieces of `texts` as the training kernel's input.

    -> (sym int32, offsets int64, counts int64): each distinct piece once, as alphabet ids,
    with how often it occurs. A character missing from `char_ids` (it will be unk) splits
    its piece, so no merge spans it: decode would print "<unk>" glued to its neighbours.
    """
    pieces = Counter()
    for text in texts:
        pieces.update(PIECE.findall(text))
    sym, offsets, counts = [], [0], []
    for piece, count in pieces.items():
        ids = [char_ids.get(ch, -1) for ch in piece]
        for part in _split_at(ids, -1):
            if len(part) > 1:  # a single symbol has no pair to count
                sym.extend(part)
                offsets.append(len(sym))
                counts.append(count)
    return (np.array(sym, dtype=np.int32), np.array(offsets, dtype=np.int64),
            np.array(counts, dtype=np.int64))


def _split_at(ids, sep):
    """[1, 2, sep, 3] -> [[1, 2], [3]]."""
    part = []
    for i in ids:
        if i == sep:
            yield part
            part = []
        else:
            part.append(i)
    yield part


_KINDS["bpe"] = BPETokenizer
