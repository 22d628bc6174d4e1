"""Which tokenizer a path holds, and what a Hugging Face tokenizer folder says about it.

Pure Python (no `tokenizers` import), so `load_tokenizer` can tell fastlora's own JSON apart
from a Hugging Face tokenizer without the optional dependency.

A path is one of:
    a fastlora tokenizer JSON (top-level "type" in {"bpe", "char"}; the bundled
        assets/tokenizer.json is one, despite its name), or a folder holding one as tokenizer.json
    a Hugging Face tokenizer.json file (top-level "model"), or a folder holding one
    a folder with vocab.json + merges.txt (GPT-2 byte-level BPE, no tokenizer.json)
Anything else is refused, naming what was found and what is read.

The folder's tokenizer_config.json, special_tokens_map.json, chat_template.jinja and
config.json are read the way transformers (v5) reads them: special_tokens_map.json counts
only when tokenizer_config.json has no "added_tokens_decoder"; with a tokenizer.json present
add_bos_token / add_eos_token are ignored (its post-processor decides); config.json's
*_token_id fill a role only when no tokenizer file mentions it.
"""
import json
import os
from dataclasses import dataclass, field

SUPPORTED = ("a fastlora tokenizer JSON, a Hugging Face tokenizer.json, or a folder holding "
             "tokenizer.json or vocab.json + merges.txt")
ROLES = ("pad", "eos", "unk", "bos", "sep", "cls", "mask")  # pad, eos, unk first, as fastlora's
FASTLORA_KINDS = ("bpe", "char")
# transformers' GPT2Tokenizer defaults, used when the files say GPT-2 but name no token
GPT2_DEFAULTS = {"unk": "<|endoftext|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>"}
GPT2_CLASSES = ("GPT2Tokenizer", "GPT2TokenizerFast")
# the roles a folder without any tokenizer config may take from its special added tokens
KNOWN_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")
VERY_LARGE = int(1e29)  # transformers writes 1e30 for "no limit"


@dataclass
class Found:
    """What find_tokenizer saw: kind "fastlora" (file) or "hf" (folder + one of the sources)."""
    kind: str
    path: str                    # what the user passed
    file: str = None             # the tokenizer JSON (fastlora's or tokenizer.json), if any
    text: str = None             # its text, already read
    folder: str = None           # where the side files (configs, vocab.json, ...) live
    vocab_merges: tuple = None   # (vocab.json, merges.txt) when there is no tokenizer.json


@dataclass
class FolderConfig:
    """The side files of a Hugging Face tokenizer, reduced to what fastlora uses."""
    tokenizer_config: dict = field(default_factory=dict)  # written back by save()
    specials: dict = field(default_factory=dict)          # role -> token text or None
    extra_specials: list = field(default_factory=list)    # additional/extra special tokens
    added_tokens: list = field(default_factory=list)      # [(id, content, flags)] from configs
    add_bos_token: bool = None
    add_eos_token: bool = None
    add_prefix_space: bool = None
    model_max_length: int = None
    chat_templates: dict = field(default_factory=dict)    # name -> jinja source
    clean_up_tokenization_spaces: bool = False
    force_bpe_cleanup: bool = False
    has_config: bool = False                              # any tokenizer config file seen


def _read_text(path):
    """The file's text, or None when it is not a JSON text (checked on its first bytes, so a
    multi-gigabyte weights file given by mistake is not read whole)."""
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head[:1] not in (b"{", b"["):
            return None
        fh.seek(0)
        blob = fh.read()
    try:
        return blob.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _parse(path, text):
    """-> the JSON object in text, or a ValueError naming the file."""
    if text is None:
        raise ValueError(f"{path}: does not hold JSON, so it is no tokenizer JSON (a "
                         f"sentencepiece tokenizer.model, or weights, are not read as one); "
                         f"fastlora reads {SUPPORTED}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fastlora reads {SUPPORTED}") from None


def _classify(path, text, where):
    """fastlora or hf, judged from the top-level keys of a JSON file."""
    obj = _parse(path, text)
    if isinstance(obj, dict) and obj.get("type") in FASTLORA_KINDS:
        return "fastlora"
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return "hf"
    got = obj.get("type") if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path}: field 'type' must be one of {list(FASTLORA_KINDS)}, got {got!r}: "
                     f"this {where} is neither a fastlora tokenizer nor a Hugging Face "
                     f"tokenizer.json (which has 'model' and 'added_tokens'); fastlora reads "
                     f"{SUPPORTED}")


def find_tokenizer(path):
    """-> Found for `path`, or FileNotFoundError / ValueError naming it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
    if not os.path.isdir(path):
        text = _read_text(path)
        kind = _classify(path, text, "JSON file")
        # a tokenizer.json's side files sit beside it; another name has none of its own
        folder = os.path.dirname(path) if os.path.basename(path) == "tokenizer.json" else None
        return Found(kind, path, file=path, text=text, folder=folder)
    inner = os.path.join(path, "tokenizer.json")
    if os.path.isfile(inner):
        text = _read_text(inner)
        return Found(_classify(inner, text, "tokenizer.json"), path, file=inner, text=text,
                     folder=path)
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return Found("hf", path, folder=path, vocab_merges=(vocab, merges))
    names = sorted(os.listdir(path))
    hint = ""
    if any(n.endswith(".model") for n in names):
        hint = (" (a .model file is a sentencepiece or tiktoken model, which fastlora does not "
                "convert; save the tokenizer with transformers' save_pretrained to get a "
                "tokenizer.json)")
    elif os.path.isfile(vocab) or os.path.isfile(merges):
        hint = " (vocab.json and merges.txt are read only together)"
    shown = names[:12] + (["..."] if len(names) > 12 else [])
    raise ValueError(f"{path}: no tokenizer found in this folder; it holds {shown or 'nothing'}"
                     f"{hint}; fastlora reads {SUPPORTED}")


def _json_file(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    obj = _parse(path, _read_text(path))
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(obj).__name__}")
    return obj


def token_text(value, where):
    """A special token as written in a config: a string, {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where} must be a token string or {{'content': ...}}, got {value!r}")


def _flag(value, where):
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"{where} must be true or false, got {value!r}")


def read_folder_config(found, id_to_token=None):
    """-> FolderConfig from the side files of `found` (none for a lone JSON file).

    id_to_token(id) -> text or None turns config.json's *_token_id into tokens.
    """
    cfg = FolderConfig()
    folder = found.folder
    if folder is None:
        return cfg
    tok_cfg = _json_file(folder, "tokenizer_config.json") or {}
    special_map = _json_file(folder, "special_tokens_map.json") or {}
    cfg.has_config = bool(tok_cfg or special_map)
    cfg.tokenizer_config = dict(tok_cfg)
    where = os.path.join(folder, "tokenizer_config.json")
    settings = dict(tok_cfg)
    if "added_tokens_decoder" not in tok_cfg:  # transformers' legacy rule
        settings.update(special_map)

    tokenizer_class = tok_cfg.get("tokenizer_class")
    if found.vocab_merges and tokenizer_class not in (None,) + GPT2_CLASSES:
        # another class may cut text differently (Qwen2's regex, RoBERTa's <s>...</s>): refuse
        # rather than give ids transformers would not
        raise ValueError(f"{where}: tokenizer_class is {tokenizer_class!r}, but vocab.json + "
                         f"merges.txt are read only as GPT-2's byte-level BPE "
                         f"({', '.join(GPT2_CLASSES)}); give a tokenizer.json (transformers' "
                         f"save_pretrained writes one); fastlora reads {SUPPORTED}")
    gpt2 = tokenizer_class in GPT2_CLASSES or found.vocab_merges is not None
    for role in ROLES:
        key = f"{role}_token"
        if key in settings:
            cfg.specials[role] = token_text(settings[key], f"{where}: {key}")
        elif gpt2 and role in GPT2_DEFAULTS:
            cfg.specials[role] = GPT2_DEFAULTS[role]
    extra = settings.get("extra_special_tokens") or settings.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        extra = list(extra.values())
    cfg.extra_specials = [token_text(t, f"{where}: additional special tokens") for t in extra]

    for idx, token in sorted((tok_cfg.get("added_tokens_decoder") or {}).items(),
                             key=lambda kv: int(kv[0])):
        if not isinstance(token, dict) or not isinstance(token.get("content"), str):
            raise ValueError(f"{where}: added_tokens_decoder[{idx}] must be an object with "
                             f"'content', got {token!r}")
        flags = {k: bool(token[k]) for k in ("lstrip", "rstrip", "single_word", "normalized",
                                             "special") if k in token}
        cfg.added_tokens.append((int(idx), token["content"], flags))

    if found.vocab_merges is not None:  # with tokenizer.json its post-processor decides
        cfg.add_bos_token = _flag(tok_cfg.get("add_bos_token"), f"{where}: add_bos_token")
        cfg.add_eos_token = _flag(tok_cfg.get("add_eos_token"), f"{where}: add_eos_token")
    cfg.add_prefix_space = _flag(tok_cfg.get("add_prefix_space"), f"{where}: add_prefix_space")
    limit = tok_cfg.get("model_max_length")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 < limit < VERY_LARGE:
        cfg.model_max_length = int(limit)
    cfg.clean_up_tokenization_spaces = bool(tok_cfg.get("clean_up_tokenization_spaces", False))
    cfg.force_bpe_cleanup = bool(tok_cfg.get(
        "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))

    template = tok_cfg.get("chat_template")
    if isinstance(template, str):
        cfg.chat_templates["default"] = template
    elif isinstance(template, list):  # [{"name": ..., "template": ...}], transformers v4
        cfg.chat_templates.update((t["name"], t["template"]) for t in template
                                  if isinstance(t, dict) and "name" in t and "template" in t)
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):  # transformers prefers the separate file
        cfg.chat_templates["default"] = _read_text(jinja)

    model_cfg = _json_file(folder, "config.json") or {}
    for role in ("eos", "bos", "pad"):
        token_id = model_cfg.get(f"{role}_token_id")
        if isinstance(token_id, list):  # several eos ids (Llama 3): the first is the main one
            token_id = token_id[0] if token_id else None
        if role not in cfg.specials and isinstance(token_id, int) and id_to_token is not None:
            cfg.specials[role] = id_to_token(token_id)
    return cfg
