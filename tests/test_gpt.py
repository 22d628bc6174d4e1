"""The GPT of docs/DESIGN.md: parameter names and shapes, tied head, state dicts, files, generation, bad input."""
import numpy as np
import pytest

import fastlora as fl
from fastlora.nn import Linear, Module, Parameter


def tiny(**kw):
    cfg = dict(vocab_size=100, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64)
    cfg.update(kw)
    return fl.GPT(**cfg)


def test_parameter_names_and_shapes_follow_the_design():
    model = tiny()
    shapes = {name: p.shape for name, p in model.named_parameters()}
    D, V = 32, 100
    expected = {"embed.weight": (V, D), "pos_embed.weight": (64, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    for i in range(2):
        pre = f"blocks.{i}."
        expected.update({pre + "ln1.weight": (D,), pre + "ln1.bias": (D,),
                         pre + "ln2.weight": (D,), pre + "ln2.bias": (D,),
                         pre + "mlp.fc1.weight": (4 * D, D), pre + "mlp.fc1.bias": (4 * D,),
                         pre + "mlp.fc2.weight": (D, 4 * D), pre + "mlp.fc2.bias": (D,)})
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected[pre + f"attn.{proj}.weight"] = (D, D)
            expected[pre + f"attn.{proj}.bias"] = (D,)
    assert shapes == expected
    assert list(model.state_dict()) == [n for n, _ in model.named_parameters()]
    assert sum(p.size for p in model.parameters()) == sum(np.prod(s) for s in expected.values())


def test_forward_shapes_dtypes_and_tied_head():
    model = tiny()
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 100) and logits.dtype == np.float32
    # the head is the token embedding: changing embed.weight changes logits through the head too
    model.embed.weight.data[5] += 1.0
    assert not np.allclose(model(ids).data, logits.data)
    loss = fl.cross_entropy(model(ids), ids)
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    m64 = tiny(dtype=np.float64)
    assert m64(ids).dtype == np.float64


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny()
    ids = np.random.default_rng(0).integers(0, 100, size=(1, 12))
    other = ids.copy()
    other[0, 8:] = (other[0, 8:] + 1) % 100
    np.testing.assert_allclose(model(ids).data[:, :8], model(other).data[:, :8], rtol=1e-6, atol=1e-7)


def test_gradients_accumulate_until_zero_grad():
    model = tiny()
    ids = np.arange(8)[None]
    fl.cross_entropy(model(ids), ids).backward()
    first = model.embed.weight.grad.copy()
    fl.cross_entropy(model(ids), ids).backward()
    np.testing.assert_allclose(model.embed.weight.grad, 2 * first, rtol=1e-6)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_no_grad_records_nothing():
    model = tiny()
    with fl.no_grad():
        out = model(np.arange(5)[None])
    assert not out.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        fl.cross_entropy(out, np.arange(5)[None]).backward()


@pytest.mark.parametrize("ids,match", [
    (np.array([[1, 100]]), r"token id 100, outside \[0, vocab_size=100\)"),
    (np.array([[-1, 2]]), r"token id -1"),
    (np.zeros((1, 65), dtype=np.int64), r"sequence length 65.*max_seq_len=64"),
    (np.zeros((1, 2, 3), dtype=np.int64), r"input_ids must be \(batch, seq_len\)"),
])
def test_forward_rejects_bad_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        tiny()(ids)


def test_forward_rejects_non_integer_ids():
    with pytest.raises(TypeError, match="input_ids must be an integer array"):
        tiny()(np.array([[0.5, 1.0]]))


@pytest.mark.parametrize("kw,match", [
    (dict(embed_dim=30, num_heads=4), "divisible"),
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_cross_entropy_with_nothing_to_score_is_an_error():
    logits = tiny()(np.arange(4)[None])
    with pytest.raises(ValueError, match="no position to score"):
        fl.cross_entropy(logits, np.array([[1, -100, -100, -100]]))


def test_load_state_dict_checks_keys_and_shapes_and_changes_nothing_on_error():
    model, other = tiny(seed=1), tiny(seed=2)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    bad = dict(other.state_dict())
    bad["blocks.0.attn.q_proj.weight"] = np.zeros((31, 32), dtype=np.float32)
    with pytest.raises(ValueError, match=r"blocks.0.attn.q_proj.weight has shape \(31, 32\).*\(32, 32\)"):
        model.load_state_dict(bad)
    missing = dict(other.state_dict())
    del missing["ln_f.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['ln_f.bias'\]"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        model.load_state_dict({**other.state_dict(), "extra": np.zeros(1)})
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    model.load_state_dict(other.state_dict())
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, other.state_dict()[k])


def test_save_and_load_round_trip(tmp_path):
    model = tiny(seed=4)
    path = tmp_path / "model.safetensors"
    model.save(path)
    loaded = fl.GPT.load(path)
    assert loaded.config == model.config
    ids = np.arange(10)[None]
    np.testing.assert_array_equal(loaded(ids).data, model(ids).data)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_load_refuses_pickles_and_garbage(tmp_path):
    model = tiny()
    path = tmp_path / "m.safetensors"
    model.save(path)
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 40)  # a pickle's opening bytes
    with pytest.raises(ValueError, match="never unpickles"):
        fl.GPT.load(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        fl.GPT.load(path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        fl.GPT.load(tmp_path / "nope.safetensors")


def test_generate_greedy_is_deterministic_and_respects_limits():
    model = tiny()
    prompt = np.array([3, 4, 5])
    out = model.generate(prompt, max_new_tokens=70, temperature=0)
    assert out.shape == (73,) and np.array_equal(out[:3], prompt)
    assert np.array_equal(out, model.generate(prompt, max_new_tokens=70, temperature=0))
    sampled = model.generate(np.stack([prompt, prompt]), 5, temperature=1.0, top_k=3, seed=0)
    assert sampled.shape == (2, 8) and sampled.max() < 100
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)


def test_generate_top_k_one_equals_greedy():
    model = tiny()
    prompt = np.array([1, 2])
    np.testing.assert_array_equal(model.generate(prompt, 6, temperature=0.7, top_k=1, seed=3),
                                  model.generate(prompt, 6, temperature=0))


def test_copy_is_deep_and_train_eval_propagate():
    model = tiny()
    clone = model.copy()
    clone.embed.weight.data[:] = 0
    assert model.embed.weight.data.any()
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_module_registration_order_and_shared_parameters():
    class Tied(Module):
        def __init__(self):
            super().__init__()
            self.a = Linear(2, 3, rng=np.random.default_rng(0))
            self.b = Linear(3, 2, rng=np.random.default_rng(0))
            self.shared = self.a.weight

    names = [n for n, _ in Tied().named_parameters()]
    assert names == ["shared", "a.bias", "b.weight", "b.bias"]  # a shared weight is listed once
    with pytest.raises(TypeError, match="floating"):
        Parameter(np.arange(3))


def test_replacing_a_submodule_keeps_its_place_in_the_parameter_order():
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    model.blocks[0].attn.q_proj = Linear(32, 32)
    assert [n for n, _ in model.named_parameters()] == names
