"""HFTokenizer: a Hugging Face tokenizer (through the `tokenizers` library) behind fastlora's
tokenizer protocol.

    tok = fastlora.load_tokenizer("gpt2-folder")      # tokenizer.json, or vocab.json + merges.txt
    tok.encode("Hello <|endoftext|>")                 # special-token text read as plain text
    tok.encode("Hello <|endoftext|>", allowed_special=True)   # == AutoTokenizer(...)["input_ids"]

Ids equal transformers.AutoTokenizer's on the same folder when allowed_special=True (the
special tokens named by the configs are added the way transformers adds them). By default,
as for fastlora's own tokenizers, special-token text in a record is tokenized as ordinary
text, so a record holding "<|endoftext|>" cannot end a sequence early; that is tokenizers'
`encode_special_tokens` switch, set on a second copy of the backend so neither call mutates
shared state. add_special_tokens=True applies the post-processor (bos for Llama-style).

A tokenizer without a pad token pads with eos (pad_token_id == eos_token_id), as Hugging Face
users do; the collator pads labels with -100, so padding is never scored while a trained eos
keeps its label. One with neither eos nor pad is refused at load.

`tokenizers` is optional (pip install 'fastlora[hf]') and imported only when an HFTokenizer is
made; loading never downloads and never unpickles.
"""
from __future__ import annotations

import json
import os
from typing import Any, Collection, List, Mapping, Optional, Sequence, Union

from fastlora._typing import ArrayLike
from fastlora.data.hf_files import (KNOWN_EOS, ROLES, FolderConfig, find_tokenizer,
                                    read_folder_config)
from fastlora.data.tokenizer import check_ids, check_texts
from fastlora.io import atomic_write, write_json_atomic

INSTALL_HINT = "pip install 'fastlora[hf]'"
# the keys of a loaded tokenizer_config.json that save() rewrites or drops: the special tokens
# and settings it writes itself, and files it does not write
_REWRITTEN = {f"{role}_token" for role in ROLES} | {
    "added_tokens_decoder", "additional_special_tokens", "extra_special_tokens", "chat_template",
    "model_max_length", "clean_up_tokenization_spaces", "add_bos_token", "add_eos_token",
    "vocab_file", "merges_file", "tokenizer_file", "name_or_path"}


def require_tokenizers(what="a Hugging Face tokenizer"):
    """-> the `tokenizers` module, or one ImportError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise ImportError(f"{what} needs the `tokenizers` package, which is not installed: "
                          f"{INSTALL_HINT}") from None
    if not hasattr(tokenizers.Tokenizer, "encode_special_tokens"):
        raise ImportError(f"{what} needs tokenizers >= 0.19 (for encode_special_tokens), found "
                          f"{tokenizers.__version__}: {INSTALL_HINT}")
    return tokenizers


def _clean_up_tokenization(text):
    """transformers' clean_up_tokenization: drop the space WordPiece leaves before punctuation."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                     (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                     (" 're", "'re")):
        text = text.replace(old, new)
    return text


class HFTokenizer:
    """Wraps a `tokenizers.Tokenizer`; build with load_tokenizer(path) or
    HFTokenizer.from_pretrained(path), or directly: HFTokenizer(tok, eos_token="<|endoftext|>").
    """

    def __init__(self, tokenizer, special_tokens=None, eos_token=None, pad_token=None,
                 bos_token=None, unk_token=None, extra_special_tokens=(), chat_template=None,
                 model_max_length=None, clean_up_tokenization_spaces=False,
                 tokenizer_config=None, source=None):
        """tokenizer: a tokenizers.Tokenizer (copied, never changed); special_tokens: {role:
        token text} for roles pad, eos, unk, bos, sep, cls, mask (the *_token arguments win)."""
        tk = require_tokenizers()
        if not isinstance(tokenizer, tk.Tokenizer):
            raise TypeError(f"HFTokenizer wraps a tokenizers.Tokenizer, got "
                            f"{type(tokenizer).__name__}")
        self.source = source or "HFTokenizer"
        named = dict(special_tokens or {})
        unknown = set(named) - set(ROLES)
        if unknown:
            raise ValueError(f"special_tokens roles must be among {list(ROLES)}, got "
                             f"{sorted(unknown)}")
        named.update((role, token) for role, token in (("eos", eos_token), ("pad", pad_token),
                     ("bos", bos_token), ("unk", unk_token)) if token)
        self._declared = {role: named[role] for role in ROLES if named.get(role)}
        # the file's padding and truncation go back into save(); encode never applies them,
        # as transformers' tokenizer(text) does not unless asked
        self._padding, self._truncation = tokenizer.padding, tokenizer.truncation
        backend = tk.Tokenizer.from_str(tokenizer.to_str())  # ours: add_tokens below mutates it
        backend.no_padding()
        backend.no_truncation()
        # transformers adds every named special token the backend does not already treat as
        # added, as special (normalized=False); a token already in the model vocab keeps its id
        have = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in list(self._declared.values()) + list(extra_special_tokens)
                   if t not in have]
        if missing:
            backend.add_tokens([tk.AddedToken(t, special=True, normalized=False)
                                for t in dict.fromkeys(missing)])
        backend.encode_special_tokens = False
        self._backend = backend                     # recognises special-token text
        self._plain = tk.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True    # reads it as plain text
        decoder = backend.get_added_tokens_decoder()
        self._special_texts = {t.content for t in decoder.values() if t.special}
        # every id the tokenizer can produce: the model's, and added ids past its end
        self._vocab_size = max([backend.get_vocab_size(with_added_tokens=True)]
                               + [i + 1 for i in decoder])
        self._ids = {role: backend.token_to_id(token) for role, token in self._declared.items()}
        if "eos" not in self._ids and "pad" not in self._ids:
            raise ValueError(f"{self.source}: the tokenizer names neither an eos nor a pad token "
                             f"(its special tokens: {sorted(self._special_texts)}); fastlora "
                             f"needs eos to end sequences: set eos_token in tokenizer_config.json")
        # a missing pad pads with eos, as Hugging Face users do (labels there are -100); a
        # missing eos (a pad-only tokenizer) ends sequences with pad, the mirror case
        self._ids.setdefault("pad", self._ids.get("eos"))
        self._ids.setdefault("eos", self._ids["pad"])
        self.pad_is_eos = "pad" not in self._declared
        self.extra_special_tokens = list(extra_special_tokens)
        self.chat_template = chat_template
        self.chat_templates = {"default": chat_template} if chat_template else {}
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.tokenizer_config = dict(tokenizer_config or {})
        # transformers (v5) skips the clean-up for BPE: it would eat real spaces before ".,!?"
        self._cleanup = self.clean_up_tokenization_spaces and (
            type(backend.model).__name__ != "BPE" or self.tokenizer_config.get(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, found=None):
        """A folder (tokenizer.json, or vocab.json + merges.txt, with their configs) or a
        tokenizer.json file. Never downloads: `path` must exist on disk."""
        found = found or find_tokenizer(path)
        if found.kind != "hf":
            raise ValueError(f"{found.file}: this is a fastlora tokenizer, not a Hugging Face "
                             f"one; load it with fastlora.load_tokenizer")
        tk = require_tokenizers()
        where = found.file or found.folder
        try:
            if found.vocab_merges:
                backend = tk.Tokenizer(tk.models.BPE.from_file(*found.vocab_merges))
            else:
                backend = tk.Tokenizer.from_str(found.text)
        except Exception as exc:  # tokenizers raises bare Exception on a file it cannot read
            what = " + ".join(found.vocab_merges) if found.vocab_merges else where
            raise ValueError(f"{what}: the tokenizers library cannot read this tokenizer "
                             f"({exc}); fastlora reads tokenizers that `tokenizers` "
                             f"{tk.__version__} loads") from None
        cfg = read_folder_config(found, backend.id_to_token)
        _configure(tk, backend, found, cfg)
        roles = {role: token for role, token in cfg.specials.items() if token}
        if not cfg.has_config and "eos" not in roles:
            # no config names the tokens (a lone tokenizer.json): take a well-known end token
            specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
            eos = next((t for t in KNOWN_EOS if t in specials), None)
            if eos:
                roles["eos"] = eos
        tok = cls(backend, special_tokens=roles, extra_special_tokens=cfg.extra_specials,
                  chat_template=cfg.chat_templates.get("default"),
                  model_max_length=cfg.model_max_length,
                  clean_up_tokenization_spaces=cfg.clean_up_tokenization_spaces,
                  tokenizer_config=cfg.tokenizer_config, source=found.path)
        tok.chat_templates = dict(cfg.chat_templates)
        if found.vocab_merges:  # with a tokenizer.json its own post-processor decides
            tok._add_bos_eos(cfg.add_bos_token, cfg.add_eos_token)
        return tok

    def _add_bos_eos(self, add_bos, add_eos):
        """add_bos_token / add_eos_token as the TemplateProcessing that transformers'
        update_post_processor builds (a flag without its token is dropped, as there)."""
        tk = require_tokenizers()
        bos = self._declared.get("bos") if add_bos else None
        eos = self._declared.get("eos") if add_eos else None
        if bos is None and eos is None:
            return

        def template(seq, type_id):
            return (([f"{bos}:{type_id}"] if bos else []) + [f"${seq}:{type_id}"]
                    + ([f"{eos}:{type_id}"] if eos else []))
        processor = tk.processors.TemplateProcessing(
            single=" ".join(template("A", 0)), pair=" ".join(template("A", 0) + template("B", 1)),
            special_tokens=[(t, self._backend.token_to_id(t)) for t in (bos, eos) if t])
        self._backend.post_processor = self._plain.post_processor = processor

    # --- the protocol the pipeline relies on ------------------------------------------------

    @property
    def vocab_size(self):
        return self._vocab_size

    def __len__(self):
        return self._vocab_size

    @property
    def eos_token_id(self):
        return self._ids["eos"]

    @property
    def pad_token_id(self):
        return self._ids["pad"]

    @property
    def bos_token_id(self):
        return self._ids.get("bos")

    @property
    def unk_token_id(self):
        return self._ids.get("unk")

    @property
    def special_tokens(self):
        """{role: token text}: pad, eos, unk first (pad is eos's text when padding with eos)."""
        return {role: self._backend.id_to_token(self._ids[role]) for role in ROLES
                if role in self._ids}

    def token_to_id(self, token):
        """The id of `token` (its text in the vocabulary, e.g. "Ġhello"), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id):
        return self._backend.id_to_token(check_ids([token_id], self._vocab_size)[0])

    def _pick(self, allowed_special):
        """The backend that reads special-token text as `allowed_special` asks."""
        if allowed_special is False or allowed_special is None:
            return self._plain
        if allowed_special is True:
            return self._backend
        allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
        unknown = allowed - self._special_texts
        if unknown:
            raise ValueError(f"allowed_special names {sorted(unknown)}, which are not special "
                             f"tokens of this tokenizer ({sorted(self._special_texts)})")
        if not allowed:
            return self._plain
        if allowed == self._special_texts:
            return self._backend
        raise ValueError(f"allowed_special={sorted(allowed)}: an HFTokenizer recognises all "
                         f"its special tokens or none (True/False); the tokenizers library has "
                         f"no per-token switch")

    def encode(self, text: str, allowed_special: Union[bool, str, Collection[str]] = False,
               add_special_tokens: bool = False) -> List[int]:
        """text -> list of ids. Special-token text is read as plain text unless allowed;
        add_special_tokens=True applies the post-processor (e.g. a leading bos)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._pick(allowed_special).encode(
            text, add_special_tokens=bool(add_special_tokens)).ids

    def encode_batch(self, texts: Sequence[str], allowed_special: Union[bool, str, Collection[str]] = False,
                     add_special_tokens: bool = False) -> List[List[int]]:
        """[text] -> [list of ids], encoded in parallel by the tokenizers library."""
        texts = check_texts(texts)
        backend = self._pick(allowed_special)
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=bool(add_special_tokens))]

    def decode(self, ids: ArrayLike, skip_special_tokens: bool = False) -> str:
        """ids -> text, as transformers' decode. Ids outside [0, vocab_size) are an error."""
        text = self._backend.decode(check_ids(ids, self._vocab_size).tolist(),
                                    skip_special_tokens=bool(skip_special_tokens))
        return _clean_up_tokenization(text) if self._cleanup else text

    # --- files ------------------------------------------------------------------------------

    def save(self, path):
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into the
        folder `path` (each atomically), so transformers.AutoTokenizer loads it."""
        folder = os.fspath(path)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{folder}: HFTokenizer.save writes a folder (tokenizer.json and "
                             f"its configs), but this is a file")
        os.makedirs(folder, exist_ok=True)
        state = json.loads(self._backend.to_str())
        state["padding"], state["truncation"] = self._padding, self._truncation
        blob = json.dumps(state, ensure_ascii=False, indent=2) + "\n"
        atomic_write(os.path.join(folder, "tokenizer.json"), lambda fh: fh.write(blob), mode="w")
        declared = {f"{role}_token": token for role, token in self._declared.items()}
        config = {k: v for k, v in self.tokenizer_config.items() if k not in _REWRITTEN}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        # every role written, null where there is none (pad when padding with eos), so a
        # class default (GPT2Tokenizer's "<|endoftext|>") cannot fill it back in on reload
        config.update({f"{role}_token": self._declared.get(role) for role in ROLES},
                      clean_up_tokenization_spaces=self.clean_up_tokenization_spaces)
        if self.extra_special_tokens:
            config["extra_special_tokens"] = self.extra_special_tokens
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json_atomic(os.path.join(folder, "tokenizer_config.json"), config)
        write_json_atomic(os.path.join(folder, "special_tokens_map.json"), declared)
        return folder

    save_pretrained = save

    # --- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tokenize: bool = True,
                            add_generation_prompt: bool = False, chat_template: Optional[str] = None,
                            **kwargs: Any) -> Union[str, List[int]]:
        """The conversation rendered by the model's chat template, as transformers renders it.

        -> str with tokenize=False, else its ids (special-token text in the rendering is read as
        the special tokens, as transformers does; the template adds bos itself where it wants one).
        chat_template: a template string, or the name of one of the tokenizer's templates; a
        tokenizer without one uses ChatML.
        """
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                chat_template=chat_template, **kwargs)
        return self.encode(text, allowed_special=True) if tokenize else text

    def render_chat(self, messages, add_generation_prompt=False, chat_template=None, with_spans=False, **kwargs):
        """The template's text (and, with_spans, the [(start, end)] of its {% generation %} blocks)."""
        from fastlora.data.chat import render
        return render(self.resolve_chat_template(chat_template), messages,
                      add_generation_prompt=add_generation_prompt, with_spans=with_spans,
                      special_tokens={f"{role}_token": token for role, token in self._declared.items()},
                      **kwargs)

    def resolve_chat_template(self, chat_template=None):
        """The template text: `chat_template` itself or by name, else the tokenizer's, else ChatML."""
        from fastlora.data.chat import CHATML_TEMPLATE
        if chat_template is None:
            return self.chat_template or CHATML_TEMPLATE
        return self.chat_templates.get(chat_template, chat_template)

    def encode_with_offsets(self, texts, allowed_special=False):
        """[text] -> [(ids, [(start, end)] character span of each token)], encoded in parallel."""
        backend = self._pick(allowed_special)
        return [(e.ids, e.offsets) for e in backend.encode_batch(check_texts(texts), add_special_tokens=False)]

    def __repr__(self):
        pad = "eos" if self.pad_is_eos else self.pad_token_id
        return (f"HFTokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, "
                f"pad_token_id={pad}, bos_token_id={self.bos_token_id}, source={self.source!r})")


def _configure(tk, backend, found, cfg: FolderConfig):
    """Set up a freshly read backend as transformers would before naming special tokens."""
    if found.vocab_merges:  # GPT-2's layout: byte-level pieces and bytes back to text
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(
            add_prefix_space=bool(cfg.add_prefix_space))
        backend.decoder = tk.decoders.ByteLevel()
        backend.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    elif cfg.add_prefix_space is not None and isinstance(backend.pre_tokenizer,
                                                         tk.pre_tokenizers.ByteLevel):
        backend.pre_tokenizer.add_prefix_space = cfg.add_prefix_space
    have = {t.content for t in backend.get_added_tokens_decoder().values()}
    new = [tk.AddedToken(content, **flags) for _, content, flags in cfg.added_tokens
           if content not in have]
    if new:
        backend.add_tokens(new)

