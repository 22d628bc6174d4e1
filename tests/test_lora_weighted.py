"""Several active adapters (set_adapter([...]): their outputs add up) and add_weighted_adapter
("linear", "cat", "svd"), checked by hand and against real peft on a tiny GPT-2, and its bad input."""
import numpy as np
import pytest

import fastlora as fl
from fastlora.lora import LoRAModel

CFG = dict(vocab_size=40, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=12, seed=1)


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, 40, size=(2, 10))


def _three(dtype=np.float64):
    """A LoRAModel with adapters a (q, v; r 4), b (q, fc1; r 4, alpha 2), c (q; r 2), B non-zero."""
    lm = LoRAModel(fl.GPT(**CFG, dtype=dtype), ["q_proj", "v_proj"], rank=4, alpha=8, adapter_name="a").inject_lora()
    lm.add_adapter("b", rank=4, alpha=2, target_modules=["q_proj", "fc1"])
    lm.add_adapter("c", rank=2, alpha=4, target_modules=["q_proj"], use_rslora=True)
    rng = np.random.default_rng(5)
    for name in ("a", "b", "c"):
        for p in lm.lora_parameters(name):
            p.data[...] = rng.standard_normal(p.shape) * 0.3
    return lm.eval()


def _with_weights(lm, deltas):
    """The GPT's logits with W + delta at each path (computed apart from LoRA)."""
    plain = fl.GPT(**CFG, dtype=lm.dtype).eval()
    for path, delta in deltas.items():
        plain.get_submodule(path).weight.data += delta
    return plain(_ids()).data


def test_several_active_adapters_add_up_and_all_train():
    lm = _three()
    lm.set_adapter(["a", "b"])
    assert lm.active_adapter == ["a", "b"] and lm.active_adapters == ["a", "b"]
    q = lm.get_submodule("blocks.0.attn.q_proj")
    deltas = {}
    for name in ("a", "b"):
        for path in lm._targets[name]:
            deltas[path] = deltas.get(path, 0) + lm.get_submodule(path).delta_weight(name)
    np.testing.assert_allclose(lm(_ids()).data, _with_weights(lm, deltas), rtol=1e-10, atol=1e-12)
    params = lm.lora_parameters()
    assert len(params) == 2 * 4 + 2 * 4 and all(p.requires_grad for p in params)
    assert not q.lora_A["c"].requires_grad
    lm.train()
    fl.cross_entropy(lm(_ids()), _ids()).backward()
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in params)
    lm.eval()
    want = lm(_ids()).data
    lm.merge_adapter()  # both merged at once, and back
    assert q.merged_adapters == ["a", "b"]
    np.testing.assert_allclose(lm(_ids()).data, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="merged into the weights; unmerge before switching to 'a'"):
        lm.set_adapter("a")
    lm.unmerge_adapter()
    np.testing.assert_allclose(lm(_ids()).data, want, rtol=1e-10, atol=1e-12)
    lm.set_adapter("c")
    assert lm.active_adapter == "c" and not q.lora_A["a"].requires_grad


def test_several_active_adapters_with_dropout_train():
    lm = LoRAModel(fl.GPT(**CFG), ["q_proj"], rank=2, dropout=0.3, adapter_name="a").inject_lora()
    lm.add_adapter("b", rank=3, dropout=0.5)
    lm.set_adapter(["a", "b"])
    fl.cross_entropy(lm(_ids()), _ids()).backward()
    assert all(p.grad is not None for p in lm.lora_parameters())


def test_set_adapter_refusals_change_nothing():
    lm = _three()
    lm.add_adapter("d", rank=2, target_modules=["v_proj"], use_dora=True)
    for names, match in [(["a", "nope"], "no adapter named 'nope'"), (["a", "a"], "adapter names repeat"),
                         (["a", "d"], "adapter 'd' uses DoRA and cannot be active together"),
                         ([], "needs an adapter name")]:
        with pytest.raises(ValueError, match=match):
            lm.set_adapter(names)
        assert lm.active_adapters == ["a"]


def test_add_weighted_adapter_by_hand():
    lm = _three()
    q = lm.get_submodule("blocks.1.attn.q_proj")
    sa, sb, sc = (q.scaling(n) for n in "abc")
    lm.add_weighted_adapter(["a", "b", "c"], [0.5, -1.0, 2.0], "cat3", combination_type="cat")
    cfg = lm.peft_config["cat3"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (10, 10.0, False)
    assert lm.active_adapter == "a"  # not activated
    exact = 0.5 * q.delta_weight("a") - 1.0 * q.delta_weight("b") + 2.0 * q.delta_weight("c")
    np.testing.assert_allclose(q.delta_weight("cat3"), exact, rtol=1e-10, atol=1e-12)
    fc1 = lm.get_submodule("blocks.0.mlp.fc1")  # only b there: its A and B first, zeros after
    np.testing.assert_allclose(fc1.delta_weight("cat3"), -1.0 * fc1.delta_weight("b"), rtol=1e-10, atol=1e-12)

    lm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "lin", combination_type="linear")
    A = np.sqrt(0.7 * sa) * q.lora_A["a"].data - np.sqrt(0.4 * sb) * q.lora_A["b"].data
    B = np.sqrt(0.7 * sa) * q.lora_B["a"].data + np.sqrt(0.4 * sb) * q.lora_B["b"].data
    np.testing.assert_allclose(q.delta_weight("lin"), B @ A, rtol=1e-10, atol=1e-12)

    lm.add_weighted_adapter(["a", "c"], [1.0, 0.5], "svd", svd_rank=3)  # "svd" is the default
    target = q.delta_weight("a") + 0.5 * q.delta_weight("c")
    U, S, Vh = np.linalg.svd(target)
    np.testing.assert_allclose(q.delta_weight("svd"), (U[:, :3] * S[:3]) @ Vh[:3], rtol=1e-9, atol=1e-12)
    assert lm.peft_config["svd"].r == 3 and sc > 0


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((["a", "b"], [1.0, 1.0], "x"), {"combination_type": "mean"}, ValueError, r"invalid combination_type 'mean'"),
    ((["a", "b"], [1.0, 1.0], "x"), {"combination_type": "ties"}, ValueError, r"'ties' is not implemented"),
    ((["a", "c"], [1.0, 1.0], "x"), {"combination_type": "linear"}, ValueError,
     r"'linear' needs adapters of one rank, got \{'a': 4, 'c': 2\}"),
    ((["a", "b"], [1.0], "x"), {}, ValueError, r"one number per adapter \(2\)"),
    ((["a", "b"], [1.0, float("nan")], "x"), {}, ValueError, r"the weight of adapter 'b' must be a finite number"),
    ((["a", "zz"], [1.0, 1.0], "x"), {}, ValueError, r"adapter 'zz' does not exist"),
    ((["a", "b"], [1.0, 1.0], "b"), {}, ValueError, r"adapter 'b' already exists"),
    (("a", [1.0], "x"), {}, TypeError, r"adapters must be a non-empty list"),
    ((["a", "b", "c"], [1.0, 1.0, 1.0], "x"), {"combination_type": "cat"}, ValueError,
     r"rank must be <= min\(in_features, out_features\) = 16 for blocks.0.attn.q_proj"),
    ((["a", "b"], [1.0, 1.0], "x"), {"svd_rank": 0}, ValueError, r"rank must be >= 1"),
])
def test_add_weighted_adapter_refusals_change_nothing(args, kwargs, error, match):
    lm = LoRAModel(fl.GPT(**CFG), ["q_proj", "v_proj"], rank=4, adapter_name="a").inject_lora()
    lm.add_adapter("b", rank=4, target_modules=["q_proj"])
    lm.add_adapter("c", rank=2 if "cat" not in kwargs.values() else 10, target_modules=["q_proj"])
    state = {k: v.copy() for k, v in lm.state_dict().items()}
    with pytest.raises(error, match=match):
        lm.add_weighted_adapter(*args, **kwargs)
    assert lm.adapters == ["a", "b", "c"]
    now = lm.state_dict()
    assert list(now) == list(state) and all(np.array_equal(now[k], v) for k, v in state.items())


def test_dora_adapters_are_not_combined():
    lm = LoRAModel(fl.GPT(**CFG), ["q_proj"], rank=2, adapter_name="a", use_dora=True).inject_lora()
    lm.add_adapter("b", rank=2)
    with pytest.raises(ValueError, match="adapter 'a' uses DoRA"):
        lm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x")
    assert lm.adapters == ["a", "b"]


# --- against real peft on a tiny GPT-2 ------------------------------------------------------------

def test_against_peft(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from fastlora.testing.hf_models import logits, make_gpt2
    make_gpt2(tmp_path / "base")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    options = dict(fan_in_fan_out=True, init_lora_weights=False)  # B random: every adapter does something
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], **options),
                             adapter_name="ad1")
    pm.add_adapter("ad2", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"], **options))
    pm.add_adapter("ad3", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], **options))
    pm.save_pretrained(tmp_path / "adapters")
    pm.eval()
    ids = np.random.default_rng(0).integers(0, 61, (2, 10))
    lm = LoRAModel.from_pretrained(fl.from_pretrained(tmp_path / "base"), tmp_path / "adapters", adapter_name="ad1")
    lm.load_adapter(tmp_path / "adapters", "ad2")
    lm.load_adapter(tmp_path / "adapters", "ad3")
    lm.eval()
    for names in (["ad1", "ad2"], ["ad1", "ad2", "ad3"]):
        pm.base_model.set_adapter(names)
        lm.set_adapter(names)
        np.testing.assert_allclose(lm(ids).data, logits(pm, ids), rtol=0, atol=1e-5)
    for name, (adapters, weights, kind, kw) in {
            "lin": (["ad1", "ad2"], [0.7, -0.4], "linear", {}), "cat": (["ad1", "ad2", "ad3"], [0.5, 1.0, -2.0], "cat", {}),
            "svd": (["ad1", "ad2", "ad3"], [1.0, 0.5, 0.3], "svd", {}), "svd3": (["ad1", "ad3"], [1.0, 0.5], "svd", {"svd_rank": 3}),
            "one": (["ad3"], [2.0], "svd", {})}.items():
        pm.base_model.add_weighted_adapter(adapters, weights, name, combination_type=kind, **kw)
        lm.add_weighted_adapter(adapters, weights, name, combination_type=kind, **kw)
        pm.base_model.set_adapter(name)
        lm.set_adapter(name)
        np.testing.assert_allclose(lm(ids).data, logits(pm, ids), rtol=0, atol=1e-5, err_msg=name)
    lm.save_adapter(tmp_path / "mix", "svd")  # the SVD mix shares one A over q, k, v: c_attn's exactly
    back = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                          tmp_path / "mix" / "svd").eval()
    lm.set_adapter("svd")
    np.testing.assert_allclose(logits(back, ids), lm(ids).data, rtol=0, atol=1e-5)
