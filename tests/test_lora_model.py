"""LoRAModel: the seed's level-3 test as written, targets, names, freezing, adapters, bad input."""
import re

import numpy as np
import pytest

import fastlora as fl
from fastlora import GPT
from fastlora.lora import LoRALinear, LoRAModel
from fastlora.nn import Linear

from fastlora.optim import SGD


def _batch(seed=0, V=100, B=4, T=16):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T))
    return ids, ids.copy()


def _snapshot(params):
    return [p.data.copy() for p in params]


def test_seed_level3_as_written():
    model = GPT(vocab_size=100, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64)
    total_params = sum(p.size for p in model.parameters())

    lora_model = LoRAModel(model, target_modules=["q_proj", "v_proj"], rank=4)
    lora_model.inject_lora()

    trainable = len(lora_model.lora_parameters())
    pct = lora_model.trainable_percentage()
    assert pct < 10.0  # less than 10% of params are trainable
    assert trainable == 2 * 2 * 2  # A and B for q and v in 2 blocks
    lora_size = sum(p.size for p in lora_model.lora_parameters())
    assert lora_size == 2 * 2 * (4 * 32 + 32 * 4)
    assert pct == pytest.approx(100 * lora_size / (total_params + lora_size))

    optimizer = SGD(lora_model.lora_parameters(), lr=0.01)
    base_before = _snapshot(lora_model.base_parameters())
    lora_before = _snapshot(lora_model.lora_parameters())
    ids, labels = _batch()
    losses = []
    for _ in range(20):
        loss = fl.cross_entropy(lora_model(ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for before, p in zip(base_before, lora_model.base_parameters()):
        np.testing.assert_array_equal(p.data, before)  # base weights did not change
        assert p.grad is None
    # LoRA weights changed. B starts at zero, so A moves only once B has; on a fresh GPT
    # (std 0.02, tiny attention scores) a q_proj A moves ~1e-10 per step at lr=0.01, below
    # float32 resolution, so for A the check is that it is being trained (a gradient).
    lora_after = lora_model.lora_parameters()
    for before, p in zip(lora_before[1::2], lora_after[1::2]):  # every B
        assert not np.array_equal(p.data, before)
    assert any(not np.array_equal(p.data, before) for before, p in zip(lora_before[::2], lora_after[::2]))
    assert all(np.abs(p.grad).max() > 0 for p in lora_after[::2])


def _gpt(**kw):
    cfg = dict(vocab_size=50, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=16, seed=0)
    cfg.update(kw)
    return GPT(**cfg)


def _lora_paths(lm):
    return [p for p, m in lm.named_modules() if isinstance(m, LoRALinear)]


@pytest.mark.parametrize("targets,expected", [
    (["q_proj"], ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]),
    ("q_proj", ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]),
    (["blocks.1.mlp.fc2"], ["blocks.1.mlp.fc2"]),
    (["attn.out_proj"], ["blocks.0.attn.out_proj", "blocks.1.attn.out_proj"]),
    ([r"blocks\.0\.attn\.(q|v)_proj"], ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"]),
    (r".*\.fc\d", ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]),
])
def test_target_forms(targets, expected):
    lm = LoRAModel(_gpt(), targets, rank=2).inject_lora()
    assert _lora_paths(lm) == expected


def test_all_linear_and_base_names_unchanged():
    model = _gpt()
    names = [n for n, _ in model.named_parameters()]
    lm = LoRAModel(model, "all-linear", rank=2).inject_lora()
    assert len(_lora_paths(lm)) == 2 * 6  # q, k, v, out, fc1, fc2 per block
    after = [n for n, _ in lm.named_parameters()]
    assert [n for n in after if ".lora_" not in n] == names  # same names, same order
    assert "blocks.0.attn.q_proj.lora_A.default" in after and "blocks.1.mlp.fc2.lora_B.default" in after
    assert set(lm.state_dict()) == set(after)
    assert all(not p.requires_grad for p in lm.base_parameters())


def test_no_match_lists_the_names_and_changes_nothing():
    model = _gpt()
    with pytest.raises(ValueError) as err:
        LoRAModel(model, ["q_proj", "query"], rank=2)
    msg = str(err.value)
    assert "'query' matches no Linear layer" in msg
    for name in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "blocks.0.attn.q_proj"):
        assert name in msg
    with pytest.raises(ValueError, match="ln1 is a LayerNorm"):
        LoRAModel(model, ["ln1"], rank=2)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs,error,match", [
    ({"target_modules": []}, ValueError, "target_modules must not be empty"),
    ({"target_modules": None}, TypeError, "target_modules must be a str or a list"),
    ({"rank": 0}, ValueError, r"rank must be >= 1, got 0"),
    ({"rank": 17}, ValueError, r"rank must be <= min\(in_features, out_features\) = 16 for blocks.0.attn.q_proj"),
    ({"alpha": 0.0}, ValueError, r"alpha must be > 0"),
    ({"alpha": -4}, ValueError, r"alpha must be > 0"),
    ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\)"),
    ({"adapter_name": ""}, ValueError, r"adapter name must be"),
    ({"target_modules": ["all-linear", "q_proj"]}, ValueError, "must be the only target"),
])
def test_bad_arguments_change_nothing(kwargs, error, match):
    model = _gpt()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    args = {"target_modules": ["q_proj"], "rank": 2, **kwargs}
    with pytest.raises(error, match=match):
        LoRAModel(model, **args)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_fresh_lora_model_gives_the_base_logits_and_passes_through():
    model = _gpt()
    ids, _ = _batch(V=50, T=8)
    base_logits = model(ids).data.copy()
    lm = LoRAModel(model, ["q_proj", "fc1"], rank=4, alpha=8)
    assert lm.inject_lora() is lm and lm.inject_lora() is lm  # a second call changes nothing
    assert len(_lora_paths(lm)) == 4
    np.testing.assert_array_equal(lm(ids).data, base_logits)
    assert lm.config is model.config and lm.dtype == np.float32
    assert lm.eval() is lm and not model.training and not lm.get_submodule("blocks.0.attn.q_proj").training
    lm.train()
    assert model.get_submodule("blocks.0.mlp.fc1").training
    out = lm.generate(ids[0, :4], max_new_tokens=3, temperature=0)
    np.testing.assert_array_equal(out, model.generate(ids[0, :4], max_new_tokens=3, temperature=0))
    state = {k: v.copy() for k, v in lm.state_dict().items()}
    state["blocks.0.attn.q_proj.lora_B.default"][...] = 1.0
    lm.load_state_dict(state)
    assert np.all(lm.get_submodule("blocks.0.attn.q_proj").lora_B["default"].data == 1.0)
    with pytest.raises(AttributeError, match="save_adapter"):
        lm.save("x")


def test_print_trainable_parameters(capsys):
    lm = LoRAModel(_gpt(), ["q_proj", "v_proj"], rank=2).inject_lora()
    trainable, total = lm.get_nb_trainable_parameters()
    lm.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                    f"trainable%: {100 * trainable / total:.4f}")
    assert trainable == 2 * 2 * (2 * 16 + 16 * 2)


def test_uses_before_injection_are_refused():
    lm = LoRAModel(_gpt(), ["q_proj"], rank=2)
    with pytest.raises(RuntimeError, match=re.escape("call inject_lora() first")):
        lm.lora_parameters()
    with pytest.raises(RuntimeError, match=re.escape("call inject_lora() first")):
        lm.add_adapter("b")


def _train_a_little(lm, seed, steps=3):
    ids, labels = _batch(seed, V=50, T=8)
    opt = SGD(lm.lora_parameters(), lr=0.5)
    for _ in range(steps):
        loss = fl.cross_entropy(lm(ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_several_adapters():
    model = _gpt()
    ids, _ = _batch(V=50, T=8)
    base_logits = model(ids).data.copy()
    lm = LoRAModel(model, ["q_proj", "v_proj"], rank=2).inject_lora()
    lm.add_adapter("task2", rank=4, alpha=4.0, target_modules=["fc1"])
    assert lm.adapters == ["default", "task2"] and lm.active_adapter == "default"
    assert len(_lora_paths(lm)) == 6
    _train_a_little(lm, seed=1)
    logits_default = lm(ids).data.copy()
    assert not np.allclose(logits_default, base_logits)

    lm.set_adapter("task2")
    assert {p.shape for p in lm.lora_parameters()} == {(4, 16), (64, 4)}
    assert all(not p.requires_grad for p in lm.lora_parameters("default"))
    np.testing.assert_array_equal(lm(ids).data, base_logits)  # task2 is untrained: B = 0
    _train_a_little(lm, seed=2)
    logits_task2 = lm(ids).data.copy()
    lm.set_adapter("default")
    np.testing.assert_array_equal(lm(ids).data, logits_default)  # default untouched by task2's training
    with lm.disable_adapter():
        np.testing.assert_allclose(lm(ids).data, base_logits, rtol=1e-6)
    np.testing.assert_array_equal(lm(ids).data, logits_default)
    lm.disable_lora()
    np.testing.assert_allclose(lm(ids).data, base_logits, rtol=1e-6)
    lm.enable_lora()

    with pytest.raises(ValueError, match="already exists"):
        lm.add_adapter("task2")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        lm.set_adapter("nope")
    lm.delete_adapter("default")
    assert lm.active_adapter == "task2" and lm.adapters == ["task2"]
    assert _lora_paths(lm) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert type(lm.get_submodule("blocks.0.attn.q_proj")) is Linear
    assert not lm.get_submodule("blocks.0.attn.q_proj").weight.requires_grad  # still a frozen base
    np.testing.assert_array_equal(lm(ids).data, logits_task2)
    with pytest.raises(ValueError, match="only adapter"):
        lm.delete_adapter("task2")
    assert "blocks.0.attn.q_proj.lora_A.default" not in dict(lm.named_parameters())


def test_wrapping_twice_is_refused():
    model = _gpt()
    lm = LoRAModel(model, ["q_proj"], rank=2).inject_lora()
    with pytest.raises(TypeError, match="already a LoRAModel"):
        LoRAModel(lm, ["q_proj"])
    with pytest.raises(ValueError, match="already holds LoRA layers"):
        LoRAModel(model, ["v_proj"])


def test_dropout_in_training_and_deterministic_in_eval():
    model = _gpt()
    lm = LoRAModel(model, ["q_proj", "v_proj"], rank=2, dropout=0.5).inject_lora()
    for p in lm.lora_parameters():
        p.data[...] = np.random.default_rng(0).standard_normal(p.shape)
    ids, labels = _batch(V=50, T=8)
    assert not np.allclose(lm(ids).data, lm(ids).data)
    lm.eval()
    np.testing.assert_array_equal(lm(ids).data, lm(ids).data)
    lm.train()
    fl.cross_entropy(lm(ids), labels).backward()  # dropout's mask is recomputed in backward
    assert all(np.isfinite(p.grad).all() for p in lm.lora_parameters())


def test_copy_is_independent():
    lm = LoRAModel(_gpt(), ["q_proj"], rank=2).inject_lora()
    twin = lm.copy()
    twin.lora_parameters()[1].data[...] = 1.0
    assert np.all(lm.lora_parameters()[1].data == 0)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in lm.named_parameters()]


def test_lora_gpt_gradcheck_float64():
    """d loss / d (every LoRA matrix) of a whole tiny LoRA GPT against central differences."""
    from conftest import numerical_grad
    model = GPT(vocab_size=11, embed_dim=8, num_heads=2, num_layers=1, max_seq_len=6, seed=3, dtype=np.float64)
    rng = np.random.default_rng(5)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.5
    lm = LoRAModel(model, ["q_proj", "out_proj", "fc2"], rank=2, alpha=3.0).inject_lora()
    for p in lm.lora_parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.5
    ids = rng.integers(0, 11, size=(2, 6))
    lm.zero_grad()
    fl.cross_entropy(lm(ids), ids).backward()
    for name, p in lm.named_parameters():
        if ".lora_" in name:
            expected = numerical_grad(lambda: float(fl.cross_entropy(lm(ids), ids).data), p.data)
            np.testing.assert_allclose(p.grad, expected, rtol=1e-5, atol=1e-8, err_msg=name)
        else:
            assert p.grad is None, name
