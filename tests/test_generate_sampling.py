"""generate(): top_p, repetition_penalty, stop strings and a list of eos ids, each by its defining
property, and the logits processors against transformers' own where it is installed."""
from types import SimpleNamespace

import numpy as np
import pytest

import fastlora as fl
from fastlora.autograd.tensor import Tensor
from fastlora.data import CharTokenizer
from fastlora.nn.causal_lm import CausalLM, Sampler, nucleus, penalize_repetition

V = 12


class TableLM(CausalLM):
    """A causal LM whose next-token logits are a fixed function of the last token: table[last]."""

    def __init__(self, table):
        super().__init__()
        self.table = np.asarray(table, dtype=np.float64)
        self.config = SimpleNamespace(vocab_size=self.table.shape[1], max_seq_len=64)

    def forward(self, ids):
        return Tensor(self.table[np.asarray(ids)])


def test_top_p_samples_only_from_the_nucleus_in_its_renormalised_proportions():
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.05] + [0.0] * (V - 6)) + 1e-30)
    model = TableLM(np.tile(logits, (V, 1)))
    out = model.generate(np.zeros((4000, 1), dtype=np.int64), 1, temperature=1.0, top_p=0.75, seed=0)[:, 1]
    # the smallest set of most likely tokens whose probability reaches 0.75: {0, 1, 2} (0.8)
    assert set(out.tolist()) == {0, 1, 2}
    freq = np.bincount(out, minlength=3)[:3] / len(out)
    np.testing.assert_allclose(freq, np.array([0.4, 0.25, 0.15]) / 0.8, atol=0.03)
    # top_p=1 changes nothing; a tiny top_p leaves the most likely token alone (greedy)
    assert set(model.generate(np.zeros((300, 1), dtype=np.int64), 1, top_p=1.0, seed=1)[:, 1].tolist()) > {0, 1, 2}
    assert set(model.generate(np.zeros((50, 1), dtype=np.int64), 1, top_p=1e-6, seed=2)[:, 1].tolist()) == {0}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = np.array([[2.0, -1.0, 0.5, -3.0, 1.0]])
    seen = np.array([[0, 1, 1, 4]])
    out = penalize_repetition(logits, seen, 2.0)
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, -3.0, 0.5]])  # 2 and 3 unseen: unchanged
    # greedy with a strong penalty: the favourite token (always the same) is not repeated once seen
    table = np.zeros((V, V))
    table[:, 5] = 3.0
    table[:, 7] = 2.0
    model = TableLM(table)
    assert model.generate(np.array([0]), 3, temperature=0).tolist() == [0, 5, 5, 5]
    assert model.generate(np.array([0]), 2, temperature=0, repetition_penalty=2.0).tolist() == [0, 5, 7]


def test_stop_strings_end_a_row_at_the_token_that_completes_the_first_occurrence():
    tok = CharTokenizer.from_texts(["abcdefgh"])
    rng = np.random.default_rng(0)
    model = TableLM(rng.normal(size=(tok.vocab_size, tok.vocab_size)) * 3)
    prompt = np.array(tok.encode("ab"))
    free = model.generate(prompt, 40, temperature=0)
    text = tok.decode(free[len(prompt):])

    def stopped_at(stop):  # the free run's text up to the first occurrence of `stop`, inclusive
        return text[:text.index(stop) + len(stop)] if stop in text else text

    for stop in (text[5:7], "ab"):  # one the run produces; one in the prompt, which does not count
        out = model.generate(prompt, 40, temperature=0, stop_strings=[stop], tokenizer=tok)
        assert tok.decode(out[len(prompt):]) == stopped_at(stop)
    # rows stop on their own; a finished row is filled with the tokenizer's pad (no eos given)
    stop = text[5:7]
    batch = model.generate(np.stack([prompt, prompt]), 40, temperature=0, stop_strings=stop, tokenizer=tok)
    n = len(stopped_at(stop))
    assert tok.decode(batch[0, 2:2 + n]) == stopped_at(stop) and (batch[:, 2 + n:] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        model.generate(prompt, 2, stop_strings=["x"])


def test_a_list_of_eos_ids_stops_at_any_of_them_and_fills_with_the_first():
    table = np.full((V, V), -5.0)
    for last, nxt in ((0, 3), (3, 9), (9, 4), (4, 1), (2, 4)):  # 0 -> 3 -> 9 -> 4 ...; 2 -> 4 -> 1
        table[last, nxt] = 5.0
    model = TableLM(table)
    assert model.generate(np.array([0]), 6, temperature=0, eos_token_id=[9, 4]).tolist() == [0, 3, 9]
    out = model.generate(np.array([[0], [2]]), 6, temperature=0, eos_token_id=[9, 4])
    assert out.tolist() == [[0, 3, 9], [2, 4, 9]]  # row 1 stopped at 4 and was filled with 9; then row 0
    assert model.generate(np.array([0]), 6, temperature=0, eos_token_id=np.int64(4)).tolist() == [0, 3, 9, 4]
    with pytest.raises(ValueError, match="eos_token_id must be a token id or a list"):
        model.generate(np.array([0]), 2, eos_token_id=[V])


@pytest.mark.parametrize("bad, message", [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                          ({"repetition_penalty": 0.0}, "repetition_penalty"),
                                          ({"temperature": -1}, "temperature")])
def test_bad_sampling_options_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Sampler(**bad)


def test_the_processors_equal_transformers():
    torch = pytest.importorskip("torch")
    generation = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 50)) * 2
    seen = rng.integers(0, 50, size=(3, 9))
    for penalty in (1.3, 0.7):
        theirs = generation.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(seen), torch.tensor(logits))
        np.testing.assert_allclose(penalize_repetition(logits, seen, penalty), theirs.numpy(), rtol=1e-12)
    for top_p in (0.3, 0.9):
        theirs = generation.TopPLogitsWarper(top_p)(torch.tensor(seen), torch.tensor(logits)).numpy()
        ours = nucleus(logits, top_p)
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
        np.testing.assert_allclose(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)])


def test_gpt_generate_takes_every_option_together():
    model = fl.GPT(vocab_size=V, embed_dim=8, num_heads=2, num_layers=1, max_seq_len=16, seed=0)
    out = model.generate(np.array([1, 2]), 5, temperature=0.8, top_k=6, top_p=0.9, repetition_penalty=1.2,
                         eos_token_id=[0, 3], seed=0)
    assert out.shape[0] <= 7 and out[:2].tolist() == [1, 2]
