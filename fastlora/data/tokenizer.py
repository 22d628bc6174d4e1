"""What every fastlora tokenizer shares, plus the simplest one (CharTokenizer).

Id layout, the same for every tokenizer here: the special tokens come first (pad = 0,
eos = 1, unk = 2, then any others in the order given), then the base alphabet, then (for
BPE) one id per merge. pad = 0 matches DataCollator's default pad_token_id.

Special tokens are never produced from text unless encode is asked to (allowed_special): a
record that happens to contain "<eos>" is trained on as those five characters, and cannot
end a sequence early or smuggle in a control token.

The pipeline accepts any object with encode / decode / vocab_size / pad_token_id /
eos_token_id (`check_tokenizer`). A Hugging Face tokenizer is one such object:
load_tokenizer(path) returns an HFTokenizer (fastlora/data/hf_tokenizer.py) for a Hugging
Face folder or tokenizer.json, and one of the classes here for fastlora's own JSON.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any, Collection, Dict, List, Optional, Union

import numpy as np

from fastlora._typing import ArrayLike, PathLike
from fastlora.io import read_json, write_json_atomic
from fastlora.log import get_logger

logger = get_logger(__name__)

DEFAULT_SPECIAL_TOKENS = {"pad": "<pad>", "eos": "<eos>", "unk": "<unk>"}
REQUIRED_ROLES = ("pad", "eos", "unk")
FORMAT_VERSION = 1


def normalize_special_tokens(special_tokens):
    """-> {role: token} with pad, eos, unk first; checks roles and tokens are usable."""
    if special_tokens is None:
        return dict(DEFAULT_SPECIAL_TOKENS)
    if not isinstance(special_tokens, dict):
        raise TypeError("special_tokens must be a dict {role: token} such as "
                        f"{DEFAULT_SPECIAL_TOKENS}, got {type(special_tokens).__name__}")
    missing = [role for role in REQUIRED_ROLES if role not in special_tokens]
    if missing:
        raise ValueError(f"special_tokens must name the roles {list(REQUIRED_ROLES)}; "
                         f"missing {missing}")
    for role, token in special_tokens.items():
        if not isinstance(role, str) or not role.isidentifier():
            raise ValueError(f"special token role {role!r} must be an identifier like 'bos'")
        if not isinstance(token, str) or not token:
            raise ValueError(f"special token {role!r} must be a non-empty string, got {token!r}")
    seen = Counter(special_tokens.values())
    dupes = [token for token, n in seen.items() if n > 1]
    if dupes:
        raise ValueError(f"special tokens must be distinct; {dupes} is used for more than one role")
    ordered = {role: special_tokens[role] for role in REQUIRED_ROLES}
    ordered.update((role, token) for role, token in special_tokens.items() if role not in ordered)
    return ordered


def check_texts(texts, name="texts"):
    """Training texts: a list (or other iterable) of str, not a single str."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings, not a single {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(text).__name__}")
    return texts


def choose_alphabet(texts, room, special_tokens):
    """The characters to give ids: all of them if they fit in `room` (None: no limit), else the
    most frequent.

    Returns them sorted by code point. Characters left out encode as unk, with a warning.
    """
    counts = Counter()
    for text in texts:
        counts.update(text)
    if not counts:
        raise ValueError("texts hold no characters: there is nothing to learn an alphabet from")
    ranked = sorted(counts, key=lambda ch: (-counts[ch], ch))
    if room is None:
        room = len(ranked)
    kept, dropped = ranked[:room], ranked[room:]
    if dropped:
        lost = sum(counts[ch] for ch in dropped)
        warnings.warn(f"{len(dropped)} of {len(counts)} distinct characters do not fit the "
                      f"vocabulary ({room} ids left after {len(special_tokens)} special tokens); "
                      f"they ({lost} occurrences, e.g. {''.join(dropped[:10])!r}) will encode "
                      f"as {special_tokens['unk']!r}", stacklevel=3)
    return sorted(kept)


def check_alphabet(alphabet, where="alphabet"):
    if not isinstance(alphabet, (list, tuple)):
        raise ValueError(f"{where} must be a list of single characters")
    for i, ch in enumerate(alphabet):
        if not isinstance(ch, str) or len(ch) != 1:
            raise ValueError(f"{where}[{i}] must be a single character, got {ch!r}")
    if len(set(alphabet)) != len(alphabet):
        dupes = [ch for ch, n in Counter(alphabet).items() if n > 1]
        raise ValueError(f"{where} repeats {dupes[:5]}")
    return list(alphabet)


def check_ids(ids, vocab_size):
    """ids to decode -> int64 array; ids outside [0, vocab_size) are an error, not dropped."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D sequence of ints, got dtype {arr.dtype} and "
                         f"shape {arr.shape}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"ids[{i}] = {int(arr[i])} is outside [0, {vocab_size}) "
                         f"(vocab_size of this tokenizer)")
    return arr.astype(np.int64, copy=False)


class Tokenizer:
    """Base class: id <-> token tables, special tokens, decode, JSON save/load.

    Subclasses set `kind` (the "type" in the JSON file) and `_alphabet`, and implement
    _encode_ordinary(text), _state() (their JSON fields) and _from_state(path, state, special).
    """

    kind = None

    def __init__(self, tokens, special_tokens):
        self._special = dict(special_tokens)
        # id -> text; specials first, in self._special's order. A Sequence is kept as it is (BPE's
        # TokenTexts spells long tokens on demand rather than holding every text)
        self._tokens = tokens if isinstance(tokens, Sequence) else list(tokens)
        self._special_ids = {role: i for i, role in enumerate(self._special)}
        self._special_by_text = {token: i for i, token in enumerate(self._special.values())}
        self._is_special = np.zeros(len(self._tokens), dtype=bool)
        self._is_special[:len(self._special)] = True

    # --- the protocol the pipeline relies on ------------------------------------------------

    @property
    def vocab_size(self):
        return len(self._tokens)

    def __len__(self):
        return len(self._tokens)

    @property
    def pad_token_id(self):
        return self._special_ids["pad"]

    @property
    def eos_token_id(self):
        return self._special_ids["eos"]

    @property
    def unk_token_id(self):
        return self._special_ids["unk"]

    def _note_unknown(self, text):
        """Say once per tokenizer that characters of `text` outside the alphabet became unk: a
        tokenizer made for one kind of text (the bundled one knows the bundled tasks' ASCII)
        would otherwise turn another language into a run of unk tokens without a word."""
        if getattr(self, "_unknown_noted", False):
            return
        self._unknown_noted = True
        chars = sorted({ch for ch in text if ch not in self._char_ids})
        shown = ", ".join(map(repr, chars[:5])) + (", ..." if len(chars) > 5 else "")
        logger.warning(f"warning: characters this tokenizer has never seen ({shown}) are encoded as "
                       f"{self.id_to_token(self.unk_token_id)}; for such text use a tokenizer trained on it "
                       f"(fl.BPETokenizer.train, a Hugging Face tokenizer, or --tokenizer) (said once)")

    @property
    def bos_token_id(self):
        """The id of the "bos" special token, or None when the tokenizer has none."""
        return self._special_ids.get("bos")

    @property
    def special_tokens(self):
        """{role: token text}, in id order."""
        return dict(self._special)

    @property
    def alphabet(self):
        """The characters with their own id; decode(encode(s)) == s for text made of them."""
        return list(self._alphabet)

    def special_token_id(self, role):
        if role not in self._special_ids:
            raise KeyError(f"no special token with role {role!r}; roles: {list(self._special)}")
        return self._special_ids[role]

    def id_to_token(self, token_id):
        return self._tokens[self._check_ids([token_id])[0]]

    def encode(self, text: str, allowed_special: Union[bool, str, Collection[str]] = False) -> List[int]:
        """text -> list of ids. Special-token text is read as plain text unless allowed.

        allowed_special: False (default), True (every special token), or one special-token
        string or a collection of them to recognise in `text`.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if not allowed_special:
            return self._encode_ordinary(text)
        if allowed_special is True:
            allowed = set(self._special_by_text)
        elif isinstance(allowed_special, str):
            allowed = {allowed_special}
        else:
            allowed = set(allowed_special)
        unknown = allowed - set(self._special_by_text)
        if unknown:
            raise ValueError(f"allowed_special names {sorted(unknown)}, which are not special "
                             f"tokens of this tokenizer ({list(self._special_by_text)})")
        if not allowed:
            return self._encode_ordinary(text)
        # longest first, so "<eos>" is not read as a prefix special like "<e"
        pattern = "(" + "|".join(map(re.escape, sorted(allowed, key=len, reverse=True))) + ")"
        ids = []
        for i, part in enumerate(re.split(pattern, text)):
            if i % 2:
                ids.append(self._special_by_text[part])
            elif part:
                ids.extend(self._encode_ordinary(part))
        return ids

    def encode_batch(self, texts: Sequence[str], allowed_special: Union[bool, str, Collection[str]] = False
                     ) -> List[List[int]]:
        return [self.encode(text, allowed_special) for text in check_texts(texts)]

    def decode(self, ids: ArrayLike, skip_special_tokens: bool = False) -> str:
        """ids -> text. Ids outside [0, vocab_size) are an error, not silently dropped."""
        ids = self._check_ids(ids)
        if skip_special_tokens and len(ids):
            ids = ids[~self._is_special[ids]]
        tokens = self._tokens
        return "".join([tokens[i] for i in ids.tolist()])

    def _check_ids(self, ids):
        return check_ids(ids, self.vocab_size)

    # --- files --------------------------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Write the tokenizer as JSON (atomically: a crash never leaves a torn file)."""
        state = {"type": self.kind, "version": FORMAT_VERSION, "special_tokens": self._special}
        state.update(self._state())
        write_json_atomic(path, state)

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Read a tokenizer saved by save(); errors name the file and the field at fault."""
        state = read_json(path)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: a tokenizer file holds a JSON object, got "
                             f"{type(state).__name__}")
        kind = state.get("type")
        if cls.kind is None:  # Tokenizer.load / load_tokenizer: dispatch on the file's type
            if kind not in _KINDS:
                raise ValueError(f"{path}: field 'type' must be one of {sorted(_KINDS)}, "
                                 f"got {kind!r}")
            return _KINDS[kind].load(path)
        if kind != cls.kind:
            raise ValueError(f"{path}: field 'type' is {kind!r}, but {cls.__name__} reads "
                             f"{cls.kind!r} files")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: field 'version' must be {FORMAT_VERSION}, "
                             f"got {state.get('version')!r}")
        try:
            special = normalize_special_tokens(state.get("special_tokens"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: field 'special_tokens': {exc}") from None
        return cls._from_state(path, state, special)

    def __repr__(self):
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per character seen in training; anything else encodes as unk."""

    kind = "char"

    def __init__(self, alphabet, special_tokens=None):
        special = normalize_special_tokens(special_tokens)
        self._alphabet = check_alphabet(alphabet)
        super().__init__(list(special.values()) + self._alphabet, special)
        self._char_ids = {ch: len(special) + i for i, ch in enumerate(self._alphabet)}

    @classmethod
    def from_texts(cls, texts: Sequence[str], special_tokens: Optional[Dict[str, str]] = None,
                   vocab_size: Optional[int] = None) -> CharTokenizer:
        """Build the alphabet from `texts`; with vocab_size, keep only the most frequent chars."""
        texts = check_texts(texts)
        special = normalize_special_tokens(special_tokens)
        if vocab_size is None:
            room = None
        else:
            if not isinstance(vocab_size, int) or vocab_size <= len(special):
                raise ValueError(f"vocab_size must be an int > {len(special)} (the special "
                                 f"tokens), got {vocab_size!r}")
            room = vocab_size - len(special)
        return cls(choose_alphabet(texts, room, special), special)

    def _encode_ordinary(self, text):
        get, unk = self._char_ids.get, self.unk_token_id
        ids = [get(ch, unk) for ch in text]
        if unk in ids:
            self._note_unknown(text)
        return ids

    def _state(self):
        return {"alphabet": self._alphabet}

    @classmethod
    def _from_state(cls, path, state, special):
        try:
            return cls(check_alphabet(state.get("alphabet"), "field 'alphabet'"), special)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def load_tokenizer(path: PathLike) -> Any:
    """Load a tokenizer: fastlora's own JSON (its "type" says which class), a folder holding
    one as tokenizer.json, or a Hugging Face tokenizer (a folder with tokenizer.json or
    vocab.json + merges.txt, or a tokenizer.json file) as an HFTokenizer."""
    from fastlora.data.hf_files import find_tokenizer
    found = find_tokenizer(path)
    if found.kind == "fastlora":
        return Tokenizer.load(found.file)
    from fastlora.data.hf_tokenizer import HFTokenizer
    return HFTokenizer.from_pretrained(path, found)


def check_tokenizer(tokenizer):
    """Refuse, early and clearly, an object that cannot serve as a tokenizer here."""
    missing = [name for name in ("encode", "decode", "vocab_size", "pad_token_id", "eos_token_id")
               if not hasattr(tokenizer, name)]
    if missing:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} lacks {missing}; the pipeline "
                        "needs encode, decode, vocab_size, pad_token_id and eos_token_id")
    for name in ("vocab_size", "pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise TypeError(f"tokenizer.{name} must be a non-negative int, got {value!r}")
    for name in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, name) >= tokenizer.vocab_size:
            raise ValueError(f"tokenizer.{name} = {getattr(tokenizer, name)} is outside "
                             f"[0, vocab_size = {tokenizer.vocab_size})")
    return tokenizer


_KINDS = {"char": CharTokenizer}  # bpe.py registers BPETokenizer
