"""BPE tokenizer speed: training on 1 MB of text to 4,096 tokens, and encode throughput (MB/s).

    python -m pytest bench/test_bench_tokenizer.py -s --benchmark-columns=median,ops

Corpora (1,000,000 characters each, all but a handful of them ASCII):
  synthetic    pseudo-English from a fixed seed: 20,000 made-up words drawn with Zipf
               frequencies, sentences, numbers, punctuation; the same on every machine
  python-docs  the English reference text that ships with CPython (pydoc_data.topics),
               repeated to length; real prose and code, a little different per Python version
  file         FASTLORA_BENCH_TEXT=path adds your own text (cut or repeated to 1 MB)

Before anything is timed the kernels are checked against the recounting twin in
fastlora/reference/bpe.py on a slice of the same text. Encoding is timed with a cold cache
(every distinct piece goes through the kernel) and a warm one (the steady state while
tokenizing a dataset). Hugging Face `tokenizers`, when installed, runs the same job with the
same pre-tokenizer regex as a peer; its ratio is printed and kept under extra_info.
"""
import os

import numpy as np
import pytest

from fastlora.data import BPETokenizer
from fastlora.data import bpe_kernels as fast
from fastlora.data.bpe import PIECE, piece_table
from fastlora.data.tokenizer import choose_alphabet, normalize_special_tokens
from fastlora.reference import bpe as slow
from timing import benchmark_median, median_seconds

SIZE = 1_000_000
VOCAB = 4096


def synthetic_text(size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "th", "st", "pr", "ch", "sh", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "io", "y"]
    codas = ["", "", "n", "s", "t", "r", "l", "nd", "st", "ng", "ck", "m"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    words = []
    seen = set()
    while len(words) < 20000:
        word = "".join(syllables[i] for i in rng.integers(len(syllables), size=rng.integers(1, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    draws = rng.choice(len(words), size=size // 4, p=zipf / zipf.sum()).tolist()
    lengths = rng.integers(4, 20, size=len(draws)).tolist()
    numbers = rng.integers(0, 2000, size=len(draws)).tolist()
    ends = rng.choice([". ", ". ", "? ", "! ", ", ", ": ", ".\n", ".\n\n"], size=len(draws)).tolist()
    parts, pos, total, k = [], 0, 0, 0
    while total < size:
        sentence = [words[i] for i in draws[pos:pos + lengths[k]]]
        pos += lengths[k]
        sentence[0] = sentence[0].capitalize()
        if numbers[k] < 400:  # one sentence in five carries a number
            sentence.insert(len(sentence) // 2, str(numbers[k]))
        text = " ".join(sentence) + ends[k]
        parts.append(text)
        total += len(text)
        k += 1
    return "".join(parts)[:size]


def _repeat_to(text, size=SIZE):
    return (text * (size // max(len(text), 1) + 1))[:size]


def _python_docs():
    topics = pytest.importorskip("pydoc_data.topics", reason="this Python ships no pydoc_data")
    return _repeat_to("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))


CORPORA = {"synthetic": synthetic_text, "python-docs": _python_docs}
if os.environ.get("FASTLORA_BENCH_TEXT"):
    CORPORA["file"] = lambda: _repeat_to(open(os.environ["FASTLORA_BENCH_TEXT"],
                                              encoding="utf-8").read())

_texts, _tokenizers = {}, {}


def corpus(name):
    if name not in _texts:
        _texts[name] = CORPORA[name]()
    return _texts[name]


def trained(name):
    if name not in _tokenizers:
        _tokenizers[name] = BPETokenizer.train([corpus(name)], vocab_size=VOCAB)
    return _tokenizers[name]


def _check_training_against_reference(text):
    """The merge loop gives the twin's merges on a slice (the twin recounts: too slow for 1 MB)."""
    part = text[:20000]
    special = normalize_special_tokens(None)
    alphabet = choose_alphabet([part], None, special)
    char_ids = {ch: len(special) + i for i, ch in enumerate(alphabet)}
    words = piece_table([part], char_ids)
    n_base = len(special) + len(alphabet)
    got = fast.train_merges(*words, n_base, 150, 2)
    want = slow.train_merges(*words, n_base, 150, 2)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def _check_encoding_against_reference(tok, text):
    pieces = sorted(set(PIECE.findall(text[:50000])))[:150]
    sym = [tok._char_ids.get(ch, tok.unk_token_id) for p in pieces for ch in p]
    offsets = np.cumsum([0] + [len(p) for p in pieces])
    got = fast.encode_words(sym, offsets, tok.merges, tok._n_base)
    want = slow.encode_words(sym, offsets, tok.merges, tok._n_base)
    np.testing.assert_array_equal(got[0], want[0])
    assert [tok.encode(p) for p in pieces] == [
        got[0][got[1][k]:got[1][k + 1]].tolist() for k in range(len(pieces))]


@pytest.mark.parametrize("name", list(CORPORA))
def test_bpe_train_1mb_to_4096_tokens(benchmark, name):
    text = corpus(name)
    _check_training_against_reference(text)

    def run():
        return BPETokenizer.train([text], vocab_size=VOCAB)

    tok = benchmark.pedantic(run, rounds=3, iterations=1)
    assert tok.vocab_size == VOCAB
    assert tok.decode(tok.encode(text)) == text
    seconds = benchmark_median(benchmark, run, run=False, repeats=3)
    megabytes = len(text.encode("utf-8")) / 1e6
    benchmark.extra_info.update({"corpus_mb": megabytes, "vocab_size": VOCAB,
                                 "train_median_s": seconds})
    print(f"\nBPE train, {name}: {megabytes:.2f} MB -> {VOCAB} tokens in {seconds:.3f} s")


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("name", list(CORPORA))
def test_bpe_encode_throughput(benchmark, name, cache):
    text = corpus(name)
    tok = trained(name)
    _check_encoding_against_reference(tok, text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < VOCAB

    def setup():
        if cache == "cold":
            tok._cache.clear()

    result = benchmark.pedantic(tok.encode, args=(text,), setup=setup, rounds=5, iterations=1)
    assert result == ids

    def run():
        setup()
        tok.encode(text)

    seconds = benchmark_median(benchmark, run, run=False, repeats=3)
    megabytes = len(text.encode("utf-8")) / 1e6
    benchmark.extra_info.update({"corpus_mb": megabytes, "encode_median_s": seconds,
                                 "mb_per_s": megabytes / seconds,
                                 "chars_per_token": len(text) / len(ids)})
    print(f"\nBPE encode, {name}, {cache} cache: {megabytes / seconds:.1f} MB/s "
          f"({len(text) / len(ids):.2f} characters per token)")


def _hf_bpe(text):
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers is the peer")
    from tokenizers import Regex, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE.pattern), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=["<pad>", "<eos>", "<unk>"])
    tok.train_from_iterator([text], trainer)
    return tok


@pytest.mark.parametrize("name", list(CORPORA))
def test_peer_hf_tokenizers(benchmark, name):
    """Hugging Face tokenizers (Rust) on the same text, vocabulary size and pre-tokenizer.

    Also an outside check: both must learn the same vocabulary and cut the text into the
    same tokens. Encoding is timed on the whole text as one string and on its lines as a
    batch (HF's encode_batch runs on every core; fastlora's loop on one).
    """
    text = corpus(name)
    peer = _hf_bpe(text)
    ours = trained(name)
    assert sorted(peer.get_vocab()) == sorted(ours.id_to_token(i) for i in range(VOCAB))
    assert peer.encode(text).tokens == [ours.id_to_token(i) for i in ours.encode(text)]
    lines = text.split("\n")

    def ours_cold(fn):
        def run():
            ours._cache.clear()
            fn()
        return run

    timings = {
        "train_s": (median_seconds(repeats=3, warmup=False, fn=lambda: _hf_bpe(text)),
                    median_seconds(repeats=3, warmup=False, fn=lambda: BPETokenizer.train([text], vocab_size=VOCAB))),
        "encode_text_s": (median_seconds(repeats=3, warmup=False, fn=lambda: peer.encode(text)),
                          median_seconds(repeats=3, warmup=False, fn=ours_cold(lambda: ours.encode(text)))),
        "encode_lines_s": (median_seconds(repeats=3, warmup=False, fn=lambda: peer.encode_batch(lines)),
                           median_seconds(repeats=3, warmup=False, fn=ours_cold(lambda: ours.encode_batch(lines)))),
    }
    benchmark.pedantic(peer.encode_batch, args=(lines,), rounds=3, iterations=1)
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"\nHF tokenizers vs fastlora, {name} ({os.cpu_count()} cores):")
    for key, (hf, fl) in timings.items():
        benchmark.extra_info[f"hf_{key}"] = hf
        benchmark.extra_info[f"fastlora_{key}"] = fl
        rate = "" if key == "train_s" else f"  ({megabytes / hf:.1f} vs {megabytes / fl:.1f} MB/s)"
        print(f"  {key:15s} hf {hf:.3f} s, fastlora {fl:.3f} s: fastlora is {hf / fl:.2f}x{rate}")
