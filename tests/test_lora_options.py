"""PEFT's layer and training options on fastlora's GPT: layers_to_transform / layers_pattern, bias
("none", "lora_only", "all") and modules_to_save - what trains, what forward uses, save and load
in PEFT's layout, merge_and_unload, and clear refusals that change nothing."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import fastlora as fl
from lora_helpers import token_ids, train_steps
from fastlora.lora import LoRALinear, LoRAModel
from fastlora.lora.trainable import ModulesToSaveWrapper

CFG = dict(vocab_size=40, embed_dim=16, num_heads=2, num_layers=3, max_seq_len=12, seed=6)


def _ids(seed=0):
    return token_ids(seed)


def _train(lm, steps=3):
    return train_steps(lm, _ids(), steps, lr=0.2, optimizer=fl.SGD)


def _adapted(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("layers,pattern,want", [
    ([0, 2], None, ["blocks.0.attn.q_proj", "blocks.2.attn.q_proj"]),
    (1, "blocks", ["blocks.1.attn.q_proj"]),
    ([2], ["h", "blocks"], ["blocks.2.attn.q_proj"]),
])
def test_layers_to_transform(layers, pattern, want):
    lm = LoRAModel(fl.GPT(**CFG), ["q_proj"], layers_to_transform=layers, layers_pattern=pattern).inject_lora()
    assert _adapted(lm) == want


def test_bias_options_train_the_right_biases():
    for bias, want in [("none", set()), ("lora_only", {"blocks.0.attn.q_proj.bias", "blocks.1.attn.q_proj.bias",
                                                        "blocks.2.attn.q_proj.bias"})]:
        lm = LoRAModel(fl.GPT(**CFG), ["q_proj"], rank=2, bias=bias).inject_lora()
        assert {n for n, p in lm.named_parameters() if p.requires_grad and "lora_" not in n} == want
    lm = LoRAModel(fl.GPT(**CFG), ["q_proj"], rank=2, bias="all").inject_lora()
    trained = {n for n, p in lm.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == {n for n, _ in lm.named_parameters() if "bias" in n}  # every bias, LayerNorms' too
    before = {n: p.data.copy() for n, p in lm.named_parameters()}
    _train(lm)
    changed = {n for n, p in lm.named_parameters() if not np.array_equal(p.data, before[n])}
    assert {n for n in changed if "lora_" not in n} <= trained and "ln_f.bias" in changed
    assert len(lm.lora_parameters()) == 6 + len(trained)
    lm.unload()
    assert all(p.requires_grad for p in lm.model.parameters())  # as trainable as before wrapping


def test_modules_to_save_trains_a_copy_the_adapter_uses():
    gpt = fl.GPT(**CFG)
    original = gpt.ln_f.weight.data.copy()
    lm = LoRAModel(gpt, ["q_proj"], rank=2, modules_to_save=["ln_f"]).inject_lora()
    wrapper = lm.get_submodule("ln_f")
    assert isinstance(wrapper, ModulesToSaveWrapper) and wrapper.weight is wrapper.original_module.weight
    names = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert "ln_f.modules_to_save.default.weight" in names and "ln_f.weight" not in names
    assert [n for n, _ in lm.named_parameters()][:2] == ["embed.weight", "pos_embed.weight"]  # names kept
    _train(lm)
    np.testing.assert_array_equal(gpt.ln_f.weight.data, original)  # the original is untouched
    copy = wrapper.modules_to_save["default"].weight.data
    assert not np.array_equal(copy, original)
    want = lm(_ids(1)).data
    with lm.disable_adapter():  # the base model: the original ln_f, no LoRA
        np.testing.assert_allclose(lm(_ids(1)).data, fl.GPT(**CFG).eval()(_ids(1)).data, atol=1e-6)
    merged = lm.merge_and_unload()  # the trained copy stays in the merged model
    assert not isinstance(merged.ln_f, ModulesToSaveWrapper)
    np.testing.assert_array_equal(merged.ln_f.weight.data, copy)
    np.testing.assert_allclose(merged(_ids(1)).data, want, rtol=1e-5, atol=1e-6)


def test_all_options_save_and_load_in_peft_layout(tmp_path):
    lm = LoRAModel(fl.GPT(**CFG), ["q_proj", "fc1"], rank=2, bias="lora_only", modules_to_save=["ln_f"],
                   layers_to_transform=[0, 2]).inject_lora()
    _train(lm)
    want = lm(_ids(2)).data
    lm.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.blocks.0.attn.q_proj.base_layer.bias" in keys  # an adapted layer's bias
    assert {"base_model.model.ln_f.weight", "base_model.model.ln_f.bias"} <= keys  # the trained copy
    assert not any("blocks.1." in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["bias"], config["modules_to_save"], config["layers_to_transform"], config["layers_pattern"]) == (
        "lora_only", ["ln_f"], [0, 2], "blocks")
    back = LoRAModel.from_pretrained(fl.GPT(**CFG), tmp_path).eval()
    np.testing.assert_allclose(back(_ids(2)).data, want, rtol=1e-6, atol=1e-7)
    assert isinstance(back.get_submodule("ln_f"), ModulesToSaveWrapper)
    fresh = LoRAModel(fl.GPT(**CFG), ["q_proj"], rank=2, adapter_name="other").inject_lora()
    fresh.load_adapter(tmp_path, "default")
    fresh.set_adapter("default")
    np.testing.assert_allclose(fresh.eval()(_ids(2)).data, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("options,error,match", [
    (dict(layers_to_transform=[5]), ValueError, r"adapter 'default': target module 'q_proj' matches no Linear layer "
                                                r"in layers_to_transform=\[5\].*indices \[0, 1, 2\]"),
    (dict(layers_to_transform=[0], target="q_proj"), ValueError, r"layers_to_transform cannot be used when "
                                                                 r"target_modules is a str"),
    (dict(layers_pattern="blocks"), ValueError, r"layers_pattern needs layers_to_transform"),
    (dict(layers_to_transform=["0"]), TypeError, r"layers_to_transform must be a layer index"),
    (dict(bias="some"), ValueError, r"bias must be one of \['none', 'lora_only', 'all'\]"),
    (dict(modules_to_save=["nope"]), ValueError, r"modules_to_save: 'nope' matches no module"),
    (dict(modules_to_save=["embed"]), ValueError, r"embed is tied to the output head"),
    (dict(modules_to_save=["q_proj"]), ValueError, r"target module 'q_proj' matches no Linear layer"),
    (dict(rank_pattern={"fc9": 2}), ValueError, r"adapter 'default': rank_pattern key 'fc9' matches none of the"),
    (dict(alpha_pattern={"v_proj": 2}), ValueError, r"alpha_pattern key 'v_proj' matches none"),
    (dict(use_doras=True), TypeError, r"adapter 'default': LoRAModel got an unexpected keyword argument 'use_doras'"),
])
def test_bad_options_are_refused_and_change_nothing(options, error, match):
    gpt = fl.GPT(**CFG)
    state = {k: v.copy() for k, v in gpt.state_dict().items()}
    target = options.pop("target", ["q_proj"])
    with pytest.raises(error, match=match):
        LoRAModel(gpt, target, rank=2, **options)
    assert not _adapted(gpt) and list(gpt.state_dict()) == list(state)


def test_only_one_adapter_trains_biases_and_one_copy_per_module_is_active():
    lm = LoRAModel(fl.GPT(**CFG), ["q_proj"], rank=2, bias="all", modules_to_save=["ln_f"]).inject_lora()
    with pytest.raises(ValueError, match="adapter 'b': bias='lora_only', but adapter 'default' already trains biases"):
        lm.add_adapter("b", rank=2, bias="lora_only")
    assert lm.adapters == ["default"]
    lm.add_adapter("c", rank=2, modules_to_save=["ln_f"])
    with pytest.raises(ValueError, match=r"adapters \['default', 'c'\] each train their own copy of ln_f"):
        lm.set_adapter(["default", "c"])
    lm.set_adapter("c")
    assert lm.get_submodule("ln_f").active_adapter == "c"
    lm.delete_adapter("c")  # the wrapper stays while "default" has a copy
    assert isinstance(lm.get_submodule("ln_f"), ModulesToSaveWrapper)
    assert lm.get_submodule("ln_f").modules_to_save.keys() == ["default"] and lm.active_adapter == "default"
