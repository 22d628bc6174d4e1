"""The seed's functional LoRA API (apply_lora, get_lora_parameters, merge/unmerge, disable/enable),
its save recipe with load_state_dict(strict=False), and "qkv_proj" standing for q, k and v."""
import numpy as np
import pytest

import fastlora as fl
from lora_helpers import token_ids, train_steps
from fastlora.lora import LoRALinear
from fastlora.nn import Linear
from fastlora.nn.module import Module

CFG = dict(vocab_size=60, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=16, seed=3)


def _ids(seed=0):
    return token_ids(seed, vocab=60, shape=(2, 12))


def _train(model, steps=3, lr=0.05):
    train_steps(model, _ids(), steps, lr)


def test_the_seed_page_as_written():
    model = fl.GPT(**CFG)
    base = {n: p.data.copy() for n, p in model.named_parameters()}
    out = fl.apply_lora(model, rank=8, alpha=16.0, dropout=0.1, target_modules=["qkv_proj", "out_proj"])
    assert out is model  # in place
    adapted = sorted(p for p, m in model.named_modules() if isinstance(m, LoRALinear))
    assert adapted == sorted(f"blocks.{i}.attn.{m}" for i in (0, 1) for m in ("q_proj", "k_proj", "v_proj", "out_proj"))
    params = fl.get_lora_parameters(model)
    assert len(params) == 16 and all(p.requires_grad for p in params)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.attn.{m}.lora_{ab}.default" for i in (0, 1) for m in ("q_proj", "k_proj", "v_proj", "out_proj")
        for ab in "AB"}
    _train(model)
    model.eval()
    ids = _ids(1)
    adapted_logits = model(ids).data
    fl.merge_lora(model)  # no extra latency: W holds the delta
    assert all(m.merged_adapters == ["default"] for _, m in model.named_modules() if isinstance(m, LoRALinear))
    np.testing.assert_allclose(model(ids).data, adapted_logits, rtol=1e-5, atol=1e-5)
    fl.unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in base:
            np.testing.assert_allclose(p.data, base[n], atol=1e-6, err_msg=n)
    np.testing.assert_allclose(model(ids).data, adapted_logits, rtol=1e-5, atol=1e-6)
    fl.disable_lora(model)
    plain = fl.GPT(**CFG).eval()
    np.testing.assert_allclose(model(ids).data, plain(ids).data, rtol=1e-5, atol=1e-6)
    fl.enable_lora(model)
    np.testing.assert_allclose(model(ids).data, adapted_logits, rtol=1e-5, atol=1e-6)


def test_the_seed_save_recipe_with_strict_false(tmp_path):
    from safetensors.numpy import load_file, save_file
    model = fl.apply_lora(fl.GPT(**CFG), rank=8, alpha=16.0)
    _train(model)
    model.eval()
    want = model(_ids(2)).data
    lora_state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    save_file({n: p.data for n, p in lora_state.items()}, str(tmp_path / "lora_weights.safetensors"))

    fresh = fl.apply_lora(fl.GPT(**CFG), rank=8, alpha=16)
    result = fresh.load_state_dict(load_file(str(tmp_path / "lora_weights.safetensors")), strict=False)
    assert result["unexpected_keys"] == []
    assert set(result["missing_keys"]) == {n for n, p in fresh.named_parameters() if not p.requires_grad}
    np.testing.assert_array_equal(fresh.eval()(_ids(2)).data, want)
    # the Parameters themselves (not arrays) load too, as a torch state dict would
    again = fl.apply_lora(fl.GPT(**CFG), rank=8, alpha=16)
    again.load_state_dict(lora_state, strict=False)
    np.testing.assert_array_equal(again.eval()(_ids(2)).data, want)


class _Fused(Module):
    """A block whose attention has one fused input projection called qkv_proj."""

    def __init__(self):
        super().__init__()
        self.qkv_proj = Linear(8, 24, rng=np.random.default_rng(0))
        self.out_proj = Linear(8, 8, rng=np.random.default_rng(1))

    def forward(self, x):
        return self.out_proj(self.qkv_proj(x)[..., :8])


def test_qkv_proj_is_q_k_and_v_unless_a_layer_has_that_name():
    model = fl.apply_lora(fl.GPT(**CFG), target_modules=["qkv_proj"])
    assert sorted(p for p, m in model.named_modules() if isinstance(m, LoRALinear)) == sorted(
        f"blocks.{i}.attn.{m}_proj" for i in (0, 1) for m in "qkv")
    fused = fl.apply_lora(_Fused(), rank=2, alpha=4, target_modules=["qkv_proj"])
    assert isinstance(fused.qkv_proj, LoRALinear) and not isinstance(fused.out_proj, LoRALinear)
    assert fl.get_lora_parameters(fused)[0].shape == (2, 8)


def test_functions_on_models_changed_elsewhere_and_bad_input():
    gpt = fl.GPT(**CFG)
    lm = fl.LoRAModel(gpt, ["q_proj"], rank=2).inject_lora()
    assert fl.get_lora_parameters(lm) == lm.lora_parameters()
    # a model apply_qlora changed: the functions find its layers
    q = fl.GPT(**CFG)
    qlm = fl.apply_qlora(q, rank=2, alpha=4, target_modules=["q_proj"], block_size=16)
    assert fl.get_lora_parameters(q) == qlm.lora_parameters()
    fl.disable_lora(q)
    np.testing.assert_array_equal(q.eval()(_ids()).data, qlm.eval().disable_lora() or q(_ids()).data)
    fl.enable_lora(q)

    model = fl.apply_lora(fl.GPT(**CFG), rank=2)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="already holds LoRA layers"):
        fl.apply_lora(model, rank=4)
    with pytest.raises(TypeError, match="takes the base model, not a LoRAModel"):
        fl.apply_lora(lm)
    with pytest.raises(ValueError, match="target module 'nope' matches no Linear layer"):
        fl.apply_lora(fl.GPT(**CFG), target_modules=["nope"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        fl.apply_lora(fl.GPT(**CFG), rank=0)
    with pytest.raises(ValueError, match="nothing is merged"):
        fl.unmerge_lora(model)
    fl.merge_lora(model)
    with pytest.raises(ValueError, match="merged into the weights"):
        fl.disable_lora(model)
    fl.unmerge_lora(model)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.data, before[n], atol=1e-6, err_msg=n)
    plain = fl.GPT(**CFG)
    for fn in (fl.get_lora_parameters, fl.merge_lora, fl.unmerge_lora, fl.disable_lora, fl.enable_lora):
        with pytest.raises(ValueError, match="has no LoRA layers"):
            fn(plain)


def test_the_readme_peft_options_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## PEFT's options", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["lora"].adapters == ["default", "converted", "mix"]
    assert namespace["lora"].peft_config["converted"].r == 16 and namespace["lora"].peft_config["mix"].r == 16
    assert namespace["dora"].get_submodule("blocks.1.attn.q_proj").lora_magnitude_vector["default"].shape == (32,)
