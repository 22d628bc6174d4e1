"""HFTokenizer and load_tokenizer on Hugging Face tokenizers, checked against transformers.

Every tokenizer here is trained at test time by the `tokenizers` library (a tiny byte-level
BPE, GPT-2 style, and a Llama-style one whose post-processor adds bos) and saved with
transformers to temp folders; nothing is downloaded. Variants: a folder with tokenizer.json,
a folder with only vocab.json + merges.txt, and a bare tokenizer.json path.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from tokenizers import (Tokenizer, decoders, models, pre_tokenizers,  # noqa: E402
                        processors, trainers)

from fastlora.data import (BPETokenizer, DataCollator, FinetuneDataset, HFTokenizer,  # noqa: E402
                           load_tokenizer)
from fastlora.data.tokenizer import check_tokenizer  # noqa: E402

EOS = "<|endoftext|>"
WORDS = ["hello", "world", "héllo", "wörld", "naïve", "café", "日本語", "テキスト", "😀", "🚀🚀",
         "fine-tune", "LoRA", "the", "quick", "brown", "fox", "1234", "3.14", "x=y+1", "don't"]
SEPARATORS = [" ", "  ", "\n", "\n\n", "\t", " \n ", "   "]
TEXTS = ["", " ", "Hello world", "  leading and trailing  ", "line\nbreak\r\nwindows",
         "emoji 😀🚀 and ünïcödé", f"before {EOS} after", f"{EOS}", f"a{EOS}{EOS}b",
         "<|endoftext|", "tabs\t\tand   runs     of spaces", "mixed 日本語 text 123",
         "zero\u200bwidth", "combining é vs é", "\x00control\x7f"]


def _corpus(n=400):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 9))
        parts = [WORDS[i] for i in rng.integers(0, len(WORDS), k)]
        seps = [SEPARATORS[i] for i in rng.integers(0, len(SEPARATORS), k)]
        out.append("".join(p + s for p, s in zip(parts, seps)))
    return out


def _train(special_tokens, vocab_size=400):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok


@pytest.fixture(scope="module")
def gpt2_tok():
    return _train([EOS])


@pytest.fixture(scope="module")
def folders(tmp_path_factory, gpt2_tok):
    """{variant: path}: how a GPT-2-style tokenizer reaches fastlora."""
    root = tmp_path_factory.mktemp("hf")
    hf = transformers.GPT2TokenizerFast(tokenizer_object=gpt2_tok, eos_token=EOS, bos_token=EOS,
                                        unk_token=EOS)
    hf.save_pretrained(root / "json")
    vm = root / "vocab_merges"
    vm.mkdir()
    gpt2_tok.model.save(str(vm))  # vocab.json + merges.txt, as a slow GPT-2 save leaves them
    shutil.copy(root / "json" / "tokenizer_config.json", vm)
    assert sorted(os.listdir(vm)) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    return {"json": root / "json", "vocab_merges": vm, "file": root / "json" / "tokenizer.json"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A byte-level BPE whose post-processor puts <s> first, as Llama 3's does."""
    tok = _train(["<s>", "</s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    path = tmp_path_factory.mktemp("llama")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                         eos_token="</s>").save_pretrained(path)
    return path


_AUTO = {}


def auto(path, **kwargs):
    key = (str(path), tuple(sorted(kwargs.items())))
    if key not in _AUTO:
        _AUTO[key] = transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
    return _AUTO[key]


def hf_ids(path, text, add_special_tokens=False, **kwargs):
    return auto(path, **kwargs)(text, add_special_tokens=add_special_tokens)["input_ids"]


@pytest.mark.parametrize("variant", ["json", "vocab_merges", "file"])
@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_and_decode_equal_transformers(folders, variant, add_special_tokens):
    tok = load_tokenizer(folders[variant])
    assert isinstance(tok, HFTokenizer)
    oracle = folders["json"] if variant == "file" else folders[variant]
    for text in TEXTS + _corpus(30):
        ids = tok.encode(text, allowed_special=True, add_special_tokens=add_special_tokens)
        assert ids == hf_ids(oracle, text, add_special_tokens), text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == \
                auto(oracle).decode(ids, skip_special_tokens=skip)


_LOADED = {}


@pytest.mark.parametrize("variant", ["json", "vocab_merges", "llama"])
@settings(max_examples=40, deadline=None)
@given(parts=st.lists(st.one_of(st.text(max_size=30), st.sampled_from([EOS, "<s>", "</s>"]),
                                st.sampled_from(SEPARATORS)), max_size=6),
       add=st.booleans())
def test_arbitrary_text_matches_transformers(folders, llama_dir, variant, parts, add):
    text = "".join(parts)
    path = llama_dir if variant == "llama" else folders[variant]
    if variant not in _LOADED:
        _LOADED[variant] = load_tokenizer(path)
    tok = _LOADED[variant]
    ids = tok.encode(text, allowed_special=True, add_special_tokens=add)
    assert ids == hf_ids(path, text, add)
    assert tok.decode(ids, skip_special_tokens=add) == \
        auto(path).decode(ids, skip_special_tokens=add)
    # by default special-token text is plain text: transformers' split_special_tokens=True
    plain = tok.encode(text, add_special_tokens=add)
    assert plain == hf_ids(path, text, add, split_special_tokens=True)
    assert tok.decode(plain, skip_special_tokens=True) == text
    assert tok.encode_batch([text, text + "!"], add_special_tokens=add) == \
        [plain, tok.encode(text + "!", add_special_tokens=add)]


def test_special_token_ids_and_pad_falls_back_to_eos(folders):
    tok = load_tokenizer(folders["json"])
    ref = auto(folders["json"])
    assert tok.eos_token_id == ref.eos_token_id == tok.token_to_id(EOS)
    assert tok.bos_token_id == ref.bos_token_id and tok.unk_token_id == ref.unk_token_id
    assert ref.pad_token_id is None and tok.pad_is_eos and tok.pad_token_id == tok.eos_token_id
    assert tok.special_tokens == {"pad": EOS, "eos": EOS, "unk": EOS, "bos": EOS}
    assert tok.vocab_size == len(tok) == len(ref) > 300
    assert max(tok.encode("".join(TEXTS) + EOS, allowed_special=True)) < tok.vocab_size
    check_tokenizer(tok)
    assert tok.id_to_token(tok.eos_token_id) == EOS
    assert f"vocab_size={len(ref)}" in repr(tok) and "pad_token_id=eos" in repr(tok)
    # only vocab.json + merges.txt, no config: GPT-2's defaults name the tokens
    bare = folders["vocab_merges"].parent / "bare_vm"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folders["vocab_merges"] / name, bare)
    assert load_tokenizer(bare).eos_token_id == tok.eos_token_id
    # a tokenizer.json with no config beside it: the well-known end token is eos
    lone = folders["vocab_merges"].parent / "lone.json"
    shutil.copy(folders["file"], lone)
    assert load_tokenizer(lone).eos_token_id == tok.eos_token_id


def test_config_json_names_tokens_the_tokenizer_files_do_not(llama_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(llama_dir / "tokenizer.json", folder)
    ref = load_tokenizer(llama_dir)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "bos_token_id": ref.bos_token_id,
        "eos_token_id": [ref.eos_token_id, 7]}))
    tok = load_tokenizer(folder)
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    # a role the tokenizer config sets, even to null, is not taken from config.json
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>",
                                                              "bos_token": None}))
    assert load_tokenizer(folder).bos_token_id is None


def test_a_declared_pad_is_used_and_neither_eos_nor_pad_is_refused(tmp_path):
    tok = _train([EOS, "<pad>"])
    transformers.GPT2TokenizerFast(tokenizer_object=tok, eos_token=EOS,
                                   pad_token="<pad>").save_pretrained(tmp_path / "pad")
    loaded = load_tokenizer(tmp_path / "pad")
    assert loaded.pad_token_id == tok.token_to_id("<pad>") != loaded.eos_token_id
    assert not loaded.pad_is_eos
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "none")
    with pytest.raises(ValueError, match="neither an eos nor a pad token") as info:
        load_tokenizer(tmp_path / "none")
    assert str(tmp_path / "none") in str(info.value)


def test_llama_style_bos_from_the_post_processor(llama_dir):
    tok = load_tokenizer(llama_dir)
    ref = auto(llama_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    for text in TEXTS:
        with_bos = tok.encode(text, allowed_special=True, add_special_tokens=True)
        assert with_bos == hf_ids(llama_dir, text, True)
        assert with_bos[0] == tok.bos_token_id
        assert tok.encode(text, allowed_special=True) == hf_ids(llama_dir, text)
    assert tok.encode("<s>hi")[0] != tok.bos_token_id  # plain by default
    assert tok.decode(tok.encode("hi", add_special_tokens=True), skip_special_tokens=True) == "hi"


def test_vocab_merges_honours_its_config(folders, tmp_path):
    folder = tmp_path / "vm_bos"
    shutil.copytree(folders["vocab_merges"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    n = load_tokenizer(folder).vocab_size
    config.update(add_bos_token=True, added_tokens_decoder={
        str(n): {"content": "<tool>", "special": False, "normalized": False, "lstrip": False,
                 "rstrip": False, "single_word": False}})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.vocab_size == n + 1 and tok.token_to_id("<tool>") == n
    for text in ("hello world", f"x {EOS} y", "", "call <tool> now"):
        ids = tok.encode(text, allowed_special=True, add_special_tokens=True)
        assert ids == hf_ids(folder, text, True) and ids[0] == tok.bos_token_id
    assert n in tok.encode("call <tool> now")  # an added non-special token is always read
    config["tokenizer_class"] = "Qwen2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer_class is 'Qwen2Tokenizer'.*tokenizer.json"):
        load_tokenizer(folder)


@pytest.mark.parametrize("source", ["json", "vocab_merges", "llama"])
def test_save_loads_in_transformers_with_the_same_ids(folders, llama_dir, tmp_path, source):
    path = llama_dir if source == "llama" else folders[source]
    tok = load_tokenizer(path)
    out = tok.save(tmp_path / "saved")
    assert sorted(os.listdir(out)) == ["special_tokens_map.json", "tokenizer.json",
                                       "tokenizer_config.json"]
    ref = transformers.AutoTokenizer.from_pretrained(str(out))
    again = load_tokenizer(out)
    assert again.special_tokens == tok.special_tokens and again.vocab_size == tok.vocab_size
    for text in TEXTS:
        for add in (False, True):
            ids = tok.encode(text, allowed_special=True, add_special_tokens=add)
            assert ref(text, add_special_tokens=add)["input_ids"] == ids
            assert again.encode(text, allowed_special=True, add_special_tokens=add) == ids
    assert ref.eos_token_id == tok.eos_token_id and ref.pad_token_id is None


def test_configs_are_read(folders, tmp_path):
    folder = tmp_path / "cfg"
    shutil.copytree(folders["json"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(chat_template="{{ messages }}", model_max_length=64)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.chat_template == "{{ messages }}" and tok.model_max_length == 64
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m }}{% endfor %}")
    assert load_tokenizer(folder).chat_template.startswith("{% for m")
    saved = load_tokenizer(load_tokenizer(folder).save(tmp_path / "out"))
    assert saved.chat_template.startswith("{% for m") and saved.model_max_length == 64
    assert load_tokenizer(folders["json"]).model_max_length is None  # transformers' 1e30
    # transformers (v5) ignores clean_up_tokenization_spaces for BPE, which it would corrupt
    config["clean_up_tokenization_spaces"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tok.encode("hello . world , don't ?")
    assert tok.clean_up_tokenization_spaces and tok.decode(ids) == ref.decode(ids)


def test_dataset_and_collator_mask_prompt_and_padding_but_train_eos(folders):
    tok = load_tokenizer(folders["json"])
    records = [{"instruction": "Say hi", "input": "", "output": "hi 😀"},
               {"instruction": "Quote", "input": "a b", "output": f"x {EOS} y and more words"}]
    calls = []
    real = tok.encode_batch
    tok.encode_batch = lambda texts, *a, **k: calls.append(len(texts)) or real(texts, *a, **k)
    ds = FinetuneDataset(records, tok, max_length=128)
    assert calls == [4]  # the fast batch path: one call for every prompt and output
    batch = DataCollator(pad_token_id=tok.pad_token_id)([ds[0], ds[1]])
    eos = tok.eos_token_id
    for b, record in enumerate(records):
        n, p = int(ds.lengths[b]), int(ds.prompt_lengths[b])
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        assert (labels[:p] == -100).all() and (labels[n:] == -100).all()
        assert (ids[n:] == tok.pad_token_id).all() and (batch["attention_mask"][b, n:] == 0).all()
        assert ids[n - 1] == eos and labels[n - 1] == eos  # the trained eos keeps its label
        assert list(ids[:n - 1]).count(eos) == 0  # the record's "<|endoftext|>" text ends nothing
        assert tok.decode(ids[p:n - 1]) == record["output"]
    assert batch["input_ids"].shape[1] == max(ds.lengths)


def test_generate_with_a_model_of_the_tokenizers_size(folders):
    from fastlora.nn import GPT
    tok = load_tokenizer(folders["json"])
    model = GPT(vocab_size=tok.vocab_size, embed_dim=16, num_heads=2, num_layers=1, max_seq_len=32)
    ids = np.asarray(tok.encode("hello"), dtype=np.int64)
    out = model.generate(ids, max_new_tokens=5, temperature=0, eos_token_id=tok.eos_token_id)
    assert isinstance(tok.decode([int(t) for t in out[len(ids):]]), str)


def test_encode_arguments_are_checked(folders):
    tok = load_tokenizer(folders["json"])
    assert tok.encode(f"a{EOS}", allowed_special={EOS}) == tok.encode(f"a{EOS}", True)
    assert tok.encode(f"a{EOS}", allowed_special=[]) == tok.encode(f"a{EOS}")
    with pytest.raises(ValueError, match=r"names \[.<eos>.\], which are not special"):
        tok.encode("a", allowed_special={"<eos>"})
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")
    n = tok.vocab_size
    with pytest.raises(ValueError, match=rf"ids\[1\] = {n} is outside \[0, {n}\)"):
        tok.decode([1, n])
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode_batch("one string")


def test_fastlora_json_still_loads_as_before(tmp_path):
    from fastlora import assets
    assert type(load_tokenizer(assets.TOKENIZER)) is BPETokenizer
    tok = BPETokenizer.train(_corpus(50), vocab_size=120)
    (tmp_path / "model").mkdir()
    tok.save(tmp_path / "model" / "tokenizer.json")  # the CLI's output folder layout
    loaded = load_tokenizer(tmp_path / "model")
    assert type(loaded) is BPETokenizer and loaded.encode("hello") == tok.encode("hello")


def test_bad_inputs_give_one_clear_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(missing)
    spm = tmp_path / "spm"
    spm.mkdir()
    (spm / "tokenizer.model").write_bytes(b"\x0a\x0b\x00binary")
    (spm / "tokenizer_config.json").write_text("{}")
    cases = [(spm, "no tokenizer found.*tokenizer.model.*sentencepiece")]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "no tokenizer found in this folder; it holds nothing"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    cases.append((corrupt, "not valid JSON"))
    unparsable = tmp_path / "unparsable"
    unparsable.mkdir()
    (unparsable / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"},
                                                           "added_tokens": []}))
    cases.append((unparsable, "tokenizers library cannot read this tokenizer"))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"vocab": {"a": 0}}))
    cases.append((unknown, "neither a fastlora tokenizer nor a Hugging Face tokenizer.json"))
    binary = tmp_path / "tokenizer.model"
    binary.write_bytes(b"\x0a\x05hello\x00\x01")
    cases.append((binary, "does not hold JSON"))
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes(b'{"model": "caf\xe9"}')
    cases.append((not_utf8, "does not hold JSON"))
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            load_tokenizer(path)
        assert str(path) in str(info.value), info.value
        assert "fastlora reads" in str(info.value)


def test_without_tokenizers_one_error_says_how_to_install(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastlora\[hf\]'"):
        load_tokenizer(folders["json"])


def test_importing_fastlora_does_not_import_tokenizers():
    code = "import sys, fastlora; assert 'tokenizers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
