"""BPETokenizer and CharTokenizer: id bounds, round trips, special tokens, unk, JSON files."""
import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlora.data import BPETokenizer, CharTokenizer, InstructionFormatter, load_tokenizer
from fastlora.data.bpe import split_pieces
from fastlora.data.tokenizer import check_tokenizer

FMT = InstructionFormatter()
RECORDS = [
    ("Translate to French", "Hello", "Bonjour"),
    ("Summarize", "Long text here...", "Short summary"),
    ("Add the numbers", "12 and 30", "The sum is 42."),
    ("Name a colour", "", "Blue, like the sky; it's calm & cool!"),
    ("Reverse the word", "stressed", "desserts"),
]
CORPUS = [FMT.format(*r) for r in RECORDS] * 3


@pytest.fixture(scope="module")
def bpe100():
    return BPETokenizer.train(CORPUS, vocab_size=100)


@pytest.fixture(scope="module")
def alphabet(bpe100):
    assert bpe100.alphabet == sorted(set("".join(CORPUS)))
    return "".join(bpe100.alphabet)


def test_ids_are_laid_out_specials_first(bpe100):
    assert (bpe100.pad_token_id, bpe100.eos_token_id, bpe100.unk_token_id) == (0, 1, 2)
    assert bpe100.bos_token_id is None
    assert bpe100.special_tokens == {"pad": "<pad>", "eos": "<eos>", "unk": "<unk>"}
    assert bpe100.vocab_size == len(bpe100) == 100


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_every_id_is_below_vocab_size_and_unseen_characters_never_crash(bpe100, text):
    ids = bpe100.encode(text)
    assert all(isinstance(i, int) and 0 <= i < 100 for i in ids)
    assert bpe100.unk_token_id not in ids or any(ch not in "".join(CORPUS) for ch in text)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_decode_inverts_encode_on_the_training_alphabet(bpe100, alphabet, data):
    text = data.draw(st.text(alphabet=alphabet, max_size=200))
    assert bpe100.decode(bpe100.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_pieces_cover_the_text_exactly(text):
    assert "".join(split_pieces(text)) == text


def test_merges_compress_and_reach_the_requested_size(bpe100):
    char = CharTokenizer.from_texts(CORPUS)
    text = CORPUS[0]
    assert len(bpe100.encode(text)) < 0.6 * len(char.encode(text))
    assert bpe100.vocab_size == 100  # the corpus repeats 3 times: enough pairs for every merge


def test_merged_tokens_stay_inside_one_piece(bpe100):
    for i in range(bpe100.vocab_size - len(bpe100.merges), bpe100.vocab_size):
        assert len(split_pieces(bpe100.id_to_token(i))) == 1, bpe100.id_to_token(i)


def test_training_is_deterministic():
    a = BPETokenizer.train(CORPUS, vocab_size=80)
    b = BPETokenizer.train(list(reversed(CORPUS)), vocab_size=80)
    np.testing.assert_array_equal(a.merges, b.merges)


def test_training_stops_at_min_frequency():
    tok = BPETokenizer.train(["abcd"], vocab_size=50)  # every pair occurs once
    assert tok.vocab_size == 3 + 4 and len(tok.merges) == 0
    tok = BPETokenizer.train(["abcd"], vocab_size=50, min_frequency=1)
    assert len(tok.merges) == 3 and tok.encode("abcd") == [tok.vocab_size - 1]


def test_unseen_characters_encode_as_unk_and_decode_as_its_text(bpe100):
    ids = bpe100.encode("Hello 世界")
    assert ids.count(bpe100.unk_token_id) == 2
    assert bpe100.decode(ids) == "Hello <unk><unk>"
    assert bpe100.decode(ids, skip_special_tokens=True) == "Hello "


def test_alphabet_larger_than_the_vocabulary_keeps_the_most_frequent_characters():
    texts = ["aaaa bbbb cccc dddd", "xyz"]
    with pytest.warns(UserWarning, match="3 of 8 distinct characters do not fit"):
        tok = BPETokenizer.train(texts, vocab_size=8)
    assert tok.vocab_size == 8
    ids = tok.encode("abcd xyz")
    assert max(ids) < 8 and ids.count(tok.unk_token_id) == 3
    assert tok.decode(tok.encode("abcd dcba")) == "abcd dcba"


def test_special_tokens_are_plain_text_unless_allowed(bpe100):
    text = "Hello<eos>"
    assert bpe100.eos_token_id not in bpe100.encode(text)
    assert bpe100.encode(text, allowed_special=True)[-1] == bpe100.eos_token_id
    assert bpe100.encode(text, allowed_special={"<eos>"}) == bpe100.encode(text, allowed_special=True)
    assert bpe100.encode(text, allowed_special="<eos>") == bpe100.encode(text, allowed_special=True)
    assert bpe100.encode(text, allowed_special=["<pad>"]) == bpe100.encode(text)
    assert bpe100.decode(bpe100.encode(text, allowed_special=True)) == text
    with pytest.raises(ValueError, match="not special tokens"):
        bpe100.encode(text, allowed_special={"<nope>"})


def test_custom_special_tokens():
    special = {"pad": "[PAD]", "eos": "</s>", "unk": "[UNK]", "bos": "<s>", "sep": "[SEP]"}
    tok = BPETokenizer.train(CORPUS, vocab_size=60, special_tokens=special)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    assert tok.special_token_id("sep") == 4
    assert tok.encode("<s>Hi</s>", allowed_special=True)[0] == 3
    with pytest.raises(ValueError, match=r"missing \['unk'\]"):
        BPETokenizer.train(CORPUS, 60, special_tokens={"pad": "a", "eos": "b"})
    with pytest.raises(ValueError, match="must be distinct"):
        BPETokenizer.train(CORPUS, 60, special_tokens={"pad": "x", "eos": "x", "unk": "u"})


def test_decode_refuses_ids_outside_the_vocabulary(bpe100):
    with pytest.raises(ValueError, match=r"ids\[1\] = 100 is outside \[0, 100\)"):
        bpe100.decode([5, 100])
    with pytest.raises(ValueError, match="outside"):
        bpe100.decode([-1])
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        bpe100.decode([1.5])
    assert bpe100.decode([]) == ""
    assert bpe100.decode(np.array(bpe100.encode("Hello"), dtype=np.int32)) == "Hello"


def test_bad_training_arguments():
    with pytest.raises(TypeError, match="list of strings, not a single str"):
        BPETokenizer.train("just one string", 100)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        BPETokenizer.train(["ok", 3], 100)
    with pytest.raises(ValueError, match="vocab_size must be an int > 3"):
        BPETokenizer.train(CORPUS, 3)
    with pytest.raises(ValueError, match="min_frequency"):
        BPETokenizer.train(CORPUS, 100, min_frequency=0)
    with pytest.raises(ValueError, match="texts hold no characters"):
        BPETokenizer.train(["", ""], 100)
    with pytest.raises(ValueError, match="texts hold no characters"):
        CharTokenizer.from_texts([])
    with pytest.raises(TypeError, match="encode.. takes a str"):
        BPETokenizer.train(CORPUS, 100).encode(b"bytes")


@pytest.mark.parametrize("cls", [BPETokenizer, CharTokenizer])
def test_save_load_round_trip(tmp_path, bpe100, cls):
    tok = bpe100 if cls is BPETokenizer else CharTokenizer.from_texts(CORPUS)
    path = tmp_path / "tok.json"
    tok.save(path)
    for loaded in (cls.load(path), load_tokenizer(path)):
        assert type(loaded) is cls and loaded.vocab_size == tok.vocab_size
        assert loaded.special_tokens == tok.special_tokens
        for text in CORPUS[:5] + ["unseen ✓ text"]:
            assert loaded.encode(text) == tok.encode(text)
    assert json.loads(path.read_text())["type"] == cls.kind


def _write(tmp_path, obj, name="tok.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(type="wordpiece"), "field 'type' is 'wordpiece'"),
    (lambda s: s.update(version=99), "field 'version' must be 1"),
    (lambda s: s.update(pre_tokenizer="gpt4"), "field 'pre_tokenizer'"),
    (lambda s: s.update(alphabet=["a", "a"]), r"field 'alphabet' repeats \['a'\]"),
    (lambda s: s.update(alphabet=["ab"]), r"field 'alphabet'\[0\] must be a single character"),
    (lambda s: s["special_tokens"].pop("eos"), "field 'special_tokens'.*missing"),
    (lambda s: s.update(merges=[[1, 2, 3]]), "field 'merges' must be a list of"),
    (lambda s: s.update(merges=[["a", "b"]]), "field 'merges' must be a list of"),
    (lambda s: s["merges"].append([10**6, 0]), r"field 'merges'.*merges\[\d+, 0\] = 1000000"),
    (lambda s: s["merges"].append(s["merges"][0]), r"field 'merges'.*repeats an earlier merge"),
    (lambda s: s["merges"].append([2, 5]), r"field 'merges'.*joins a special token"),
])
def test_load_names_the_file_and_the_bad_field(tmp_path, bpe100, edit, message):
    bpe100.save(tmp_path / "good.json")
    state = json.loads((tmp_path / "good.json").read_text())
    edit(state)
    path = _write(tmp_path, state)
    with pytest.raises(ValueError, match=message) as info:
        BPETokenizer.load(path)
    assert str(path) in str(info.value)


def test_load_missing_broken_and_mismatched_files(tmp_path, bpe100):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        BPETokenizer.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BPETokenizer.load(_write(tmp_path, "{broken"))
    with pytest.raises(ValueError, match="holds a JSON object, got list"):
        BPETokenizer.load(_write(tmp_path, [1, 2]))
    bpe100.save(tmp_path / "bpe.json")
    with pytest.raises(ValueError, match="CharTokenizer reads 'char' files"):
        CharTokenizer.load(tmp_path / "bpe.json")
    with pytest.raises(ValueError, match="field 'type' must be one of"):
        load_tokenizer(_write(tmp_path, {"type": None}))


def test_char_tokenizer():
    tok = CharTokenizer.from_texts(["hello", "world"])
    assert tok.vocab_size == 3 + len(set("helloworld"))
    assert tok.decode(tok.encode("hello world")) == "hello<unk>world"
    assert tok.decode(tok.encode("lower")) == "lower"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = CharTokenizer.from_texts(["aaab"], vocab_size=4)
    assert small.encode("ab") == [3, small.unk_token_id]


def test_check_tokenizer_accepts_duck_types_and_names_what_is_missing():
    class Wrapped:  # e.g. around a Hugging Face tokenizer
        vocab_size, pad_token_id, eos_token_id = 10, 0, 1

        def encode(self, text):
            return [2] * len(text)

        def decode(self, ids):
            return "x" * len(ids)

    assert check_tokenizer(Wrapped()) is not None

    class NoEos:
        vocab_size, pad_token_id = 10, 0
        encode = decode = None

    with pytest.raises(TypeError, match=r"lacks \['eos_token_id'\]"):
        check_tokenizer(NoEos())
    bad = Wrapped()
    bad.eos_token_id = 10
    with pytest.raises(ValueError, match="eos_token_id = 10 is outside"):
        check_tokenizer(bad)
