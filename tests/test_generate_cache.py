"""generate with the key/value cache (fastlora.nn.kv_cache): the same tokens as running the whole
context every step, greedy and sampled, past max_seq_len, through LoRA, and batches of prompts of
different lengths (left padding) giving each prompt the tokens it gets alone."""
import numpy as np
import pytest

import fastlora as fl
from fastlora.nn import kv_cache


def _spread(model, seed=3, scale=0.3):
    """Weights far from init, so every token is a clear winner and every path matters."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = (rng.standard_normal(p.shape) * scale).astype(p.data.dtype)
    return model


def _models(dtype=np.float64, max_seq_len=24):
    return [
        _spread(fl.GPT(vocab_size=61, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=max_seq_len, seed=1,
                       dtype=dtype)),
        _spread(fl.GPT(vocab_size=61, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=max_seq_len, seed=1,
                       dtype=dtype, tie_word_embeddings=False)),
        _spread(fl.Llama(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=max_seq_len, dtype=dtype)),
        _spread(fl.Llama(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=1, max_seq_len=max_seq_len, dtype=dtype, tie_word_embeddings=True)),
    ]


def _uncached(model, monkeypatch):
    """Make generate run the whole (cropped) context every step, as it did before the cache."""
    def whole_context(self, out):
        return self.model.forward(out[:, -self.window:]).data[:, -1, :].astype(np.float64)

    monkeypatch.setattr(kv_cache.Decoder, "next_logits", whole_context)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("new_tokens", [1, 9, 30])  # 7 + 30 > max_seq_len 24: the context is cropped
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_k=20, top_p=0.9, seed=5),
                                      dict(temperature=0.7, repetition_penalty=1.3, seed=2)])
def test_cached_generation_gives_the_uncached_tokens(dtype, new_tokens, sampling, monkeypatch):
    ids = np.random.default_rng(0).integers(0, 61, size=(3, 7))
    for model in _models(dtype):
        cached = model.generate(ids, new_tokens, **sampling)
        with monkeypatch.context() as patch:
            _uncached(model, patch)
            whole = model.generate(ids, new_tokens, **sampling)
        assert cached.shape == (3, 7 + new_tokens)
        np.testing.assert_array_equal(cached, whole, err_msg=type(model).__name__)


def test_a_decode_step_runs_only_the_new_token(monkeypatch):
    model = _models()[2]
    seen = []
    original = type(model).decode_hidden

    def spy(self, ids, cache, positions):
        seen.append((ids.shape, positions[0].tolist()))
        return original(self, ids, cache, positions)

    monkeypatch.setattr(type(model), "decode_hidden", spy)
    model.generate(np.arange(5)[None], 3, temperature=0)
    assert seen == [((1, 5), [0, 1, 2, 3, 4]), ((1, 1), [5]), ((1, 1), [6])]


def test_lora_models_generate_through_the_cache(monkeypatch):
    ids = np.random.default_rng(1).integers(0, 61, size=(2, 5))
    for model in _models()[::2]:
        targets = ["q_proj", "v_proj"] if isinstance(model, fl.GPT) else "all-linear"
        lm = fl.LoRAModel(model, target_modules=targets, rank=4, alpha=8)
        lm.inject_lora()
        for p in lm.lora_parameters():
            p.data[...] = np.random.default_rng(4).standard_normal(p.shape) * 0.3
        cached = lm.generate(ids, 12, temperature=0)
        _uncached(model, monkeypatch)
        np.testing.assert_array_equal(cached, lm.generate(ids, 12, temperature=0))
        monkeypatch.undo()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_prompts_of_different_lengths_get_the_tokens_they_get_alone(dtype):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 61, size=n) for n in (3, 9, 1, 6)]
    for model in _models(dtype):
        batch = model.generate(prompts, 20, temperature=0)  # 9 + 20 > 24: cropped past max_seq_len too
        assert isinstance(batch, list) and [len(r) for r in batch] == [n + 20 for n in (3, 9, 1, 6)]
        for prompt, row in zip(prompts, batch):
            np.testing.assert_array_equal(row, model.generate(prompt, 20, temperature=0), err_msg=type(model).__name__)


def test_an_attention_mask_left_pads_as_transformers_takes_it():
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 61, size=n) for n in (4, 2)]
    model = _models()[2]
    ids = np.array([prompts[0], [7, 7, *prompts[1]]])  # any token may sit under the padding
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = model.generate(ids, 6, temperature=0, attention_mask=mask)
    assert out.shape == (2, 10)
    np.testing.assert_array_equal(out[:, :4], ids)
    for prompt, row, pad in zip(prompts, out, (0, 2)):
        np.testing.assert_array_equal(row[pad:], model.generate(prompt, 6, temperature=0))


def test_padded_rows_stop_at_eos_like_the_others():
    model = _models()[0]
    prompts = [np.array([5, 6, 7]), np.array([9])]
    alone = [model.generate(p, 8, temperature=0) for p in prompts]
    eos = int(alone[1][3])  # the second row's third new token ends it
    batch = model.generate(prompts, 8, temperature=0, eos_token_id=eos)
    row = batch[1]
    stop = list(row[1:]).index(eos) + 1
    np.testing.assert_array_equal(row[: stop + 1], alone[1][: stop + 1])
    assert np.all(row[stop:] == eos)  # finished: filled with eos


def test_bad_attention_masks_are_refused():
    model = _models()[0]
    ids = np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="pad on the left only"):
        model.generate(ids, 2, attention_mask=np.array([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="pad on the left only"):
        model.generate(ids, 2, attention_mask=np.array([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="must have the ids' shape"):
        model.generate(ids, 2, attention_mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="0 .padding. and 1 .tokens. only"):
        model.generate(ids, 2, attention_mask=np.full((2, 4), 2))
    with pytest.raises(ValueError, match="not both"):
        model.generate([np.array([1, 2]), np.array([3])], 2, attention_mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([np.array([1, 2]), np.array([], dtype=np.int64)], 2)


def test_left_padded_batches_match_transformers_generate(tmp_path):
    """A GPT-2 and a Llama from transformers, loaded by fastlora: greedy generation of a
    left-padded batch gives transformers' tokens (its attention mask and position ids)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from fastlora.testing.hf_models import make_gpt2, make_llama
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 61, size=n) for n in (6, 2, 4)]
    ids, mask = kv_cache.left_pad(prompts, pad_id=0)
    for name, make in (("gpt2", make_gpt2), ("llama", make_llama)):
        hf = make(tmp_path / name, spread=0.3)
        ours = fl.from_pretrained(tmp_path / name, dtype=np.float64)
        with torch.no_grad():
            want = hf.double().generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                                        max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0).numpy()
        got = ours.generate(ids, 8, temperature=0, attention_mask=mask)
        np.testing.assert_array_equal(got[:, ids.shape[1]:], want[:, ids.shape[1]:], err_msg=name)
