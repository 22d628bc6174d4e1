"""Outside oracle: Hugging Face `tokenizers` trained the same way learns the same BPE.

Skipped unless `tokenizers` is installed (it is no dependency of fastlora). With the same
pre-tokenizer regex, vocabulary size and min_frequency, both must learn the same set of
tokens and cut text into the same token strings, unseen text included.
"""
import pytest

from fastlora.data import BPETokenizer
from fastlora.data.bpe import PIECE

tokenizers = pytest.importorskip("tokenizers")
topics = pytest.importorskip("pydoc_data.topics")


def _hf(texts, vocab_size):
    from tokenizers import Regex, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE.pattern), behavior="isolated")
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=["<pad>", "<eos>", "<unk>"]))
    return tok


@pytest.mark.parametrize("vocab_size", [300, 1000])  # the alphabet must fit: HF never drops a character
def test_same_vocabulary_and_tokens_as_hf_tokenizers(vocab_size):
    docs = [topics.topics[k] for k in sorted(topics.topics)]
    train, unseen = docs[:30], "\n".join(docs[30:40])
    ours, peer = BPETokenizer.train(train, vocab_size), _hf(train, vocab_size)
    assert sorted(peer.get_vocab()) == sorted(ours.id_to_token(i) for i in range(ours.vocab_size))
    for text in ["\n".join(train), unseen]:
        assert peer.encode(text).tokens == [ours.id_to_token(i) for i in ours.encode(text)]


def test_hf_tokenizer_wraps_a_tokenizers_object_to_feed_the_dataset():
    from fastlora.data import FinetuneDataset, HFTokenizer, InstructionFormatter

    data = [{"instruction": "Translate to French", "input": "Hello", "output": "Bonjour"},
            {"instruction": "Summarize", "input": "Long text here...", "output": "Short summary"}]
    fmt = InstructionFormatter()
    hf = _hf([fmt.format(d["instruction"], d["input"], d["output"]) for d in data] * 2, 100)
    wrapped = HFTokenizer(hf, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    dataset = FinetuneDataset(data, wrapped, max_length=64)
    item = dataset[0]
    n_prompt = len(hf.encode(fmt.prompt("Translate to French", "Hello")).ids)
    assert item["labels"][:n_prompt] == [-100] * n_prompt
    assert item["labels"][n_prompt:] == hf.encode("Bonjour").ids + [hf.token_to_id("<eos>")]
