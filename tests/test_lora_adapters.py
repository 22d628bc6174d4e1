"""Adapter files in the PEFT layout: keys, config, sub-folders, round trips, refusals that change nothing."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fastlora import GPT
from fastlora.lora import LoRAModel

CFG = dict(vocab_size=40, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=12, seed=5)


def _lora(targets=("q_proj", "v_proj"), rank=4, alpha=8, seed=0, **kw):
    lm = LoRAModel(GPT(**{**CFG, **kw}), list(targets), rank=rank, alpha=alpha, dropout=0.05).inject_lora()
    rng = np.random.default_rng(seed)
    for p in lm.lora_parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.3
    return lm


def _ids():
    return np.random.default_rng(9).integers(0, 40, size=(2, 10))


def _state(lm):
    return {k: v.copy() for k, v in lm.state_dict().items()}


def _assert_same_state(lm, state):
    now = lm.state_dict()
    assert list(now) == list(state)
    for k, v in now.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_peft_layout_keys_shapes_and_config(tmp_path):
    lm = _lora()
    folder = lm.save_adapter(tmp_path)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(f"base_model.model.blocks.{i}.attn.{m}.lora_{ab}.weight"
                                     for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB")
    assert tensors["base_model.model.blocks.0.attn.q_proj.lora_A.weight"].shape == (4, 16)
    assert tensors["base_model.model.blocks.0.attn.q_proj.lora_B.weight"].shape == (16, 4)
    np.testing.assert_array_equal(tensors["base_model.model.blocks.1.attn.v_proj.lora_B.weight"],
                                  lm.get_submodule("blocks.1.attn.v_proj").lora_B["default"].data)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"],
                      "lora_dropout": 0.05, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
                      "base_model_name_or_path": None, "task_type": "CAUSAL_LM"}
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # atomic writes leave no temp files


def test_round_trip_into_a_fresh_model(tmp_path):
    lm = _lora(seed=1)
    ids = _ids()
    lm.eval()
    want = lm(ids).data
    lm.save_adapter(tmp_path)

    fresh = LoRAModel(GPT(**CFG), ["q_proj", "v_proj"], rank=4, alpha=1).inject_lora()
    fresh.load_adapter(tmp_path)
    fresh.eval()
    np.testing.assert_array_equal(fresh(ids).data, want)
    assert fresh.peft_config["default"].lora_alpha == 8.0  # the file's config is adopted

    built = LoRAModel.from_pretrained(GPT(**CFG), tmp_path)
    built.eval()
    np.testing.assert_array_equal(built(ids).data, want)
    assert built.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    assert built.active_adapter == "default" and len(built.lora_parameters()) == 8


def test_named_adapters_go_in_sub_folders(tmp_path):
    lm = _lora()
    lm.add_adapter("summarize", rank=2, alpha=2, target_modules=["fc1"])
    lm.set_adapter("summarize")
    for p in lm.lora_parameters():
        p.data[...] = 0.1
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "summarize" / "adapter_model.safetensors").is_file()
    keys = load_file(str(tmp_path / "summarize" / "adapter_model.safetensors"))
    assert sorted(keys) == sorted(f"base_model.model.blocks.{i}.mlp.fc1.lora_{ab}.weight"
                                  for i in (0, 1) for ab in "AB")

    other = _lora(seed=7)
    other.load_adapter(tmp_path, name="summarize")
    assert other.adapters == ["default", "summarize"] and other.active_adapter == "default"  # as PEFT
    other.set_adapter("summarize")
    lm.eval(), other.eval()
    np.testing.assert_array_equal(other(_ids()).data, lm(_ids()).data)
    with pytest.raises(ValueError, match="adapter name must be"):
        other.load_adapter(tmp_path, name="../x")


def test_rank8_base_workload_adapter_is_small(tmp_path):
    base = dict(vocab_size=4096, embed_dim=384, num_heads=6, num_layers=6, max_seq_len=256)
    lm = LoRAModel(GPT(**base), ["q_proj", "v_proj"], rank=8, alpha=16).inject_lora()
    lm.save_adapter(tmp_path)
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert size < 400_000  # 6 layers * 2 modules * 2 * 8 * 384 float32 = 295 KB plus header
    assert size >= 6 * 2 * 2 * 8 * 384 * 4


def test_unknown_config_keys_that_are_off_warn_and_are_ignored(tmp_path):
    lm = _lora()
    lm.save_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update({"inference_mode": True, "shiny_new_option": None, "use_dora": False,
                   "init_lora_weights": "gaussian", "rank_pattern": {}})
    path.write_text(json.dumps(config))
    fresh = _lora(seed=4)
    with pytest.warns(UserWarning, match=r"ignoring unknown adapter_config keys \['shiny_new_option'\]"):
        fresh.load_adapter(tmp_path)
    np.testing.assert_array_equal(fresh.lora_parameters()[0].data, lm.lora_parameters()[0].data)


def _edit_config(tmp_path, **changes):
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes,match", [
    ({"peft_type": "IA3"}, r"peft_type is 'IA3'; only 'LORA'"),
    ({"use_dora": True}, r"q_proj has no lora_magnitude_vector, but use_dora is true"),
    ({"r": 0}, r"rank must be >= 1"),
    ({"lora_alpha": -1}, r"alpha must be > 0"),
    ({"bias": "some"}, r"bias must be one of \['none', 'lora_only', 'all'\]"),
    ({"init_lora_weights": "pissa_niter_4"}, r"init_lora_weights='pissa_niter_4' changed the base model's weights"),
    ({"lora_bias": True}, r"\['lora_bias'\] is not supported"),
    # options that would change the adapter's outputs
    ({"shiny_new_option": 3}, r"shiny_new_option=3 is an adapter option fastlora does not know"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' changed the base model's weights"),
    ({"init_lora_weights": "olora"}, r"init_lora_weights='olora'"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, r"\['loftq_config'\] is not supported"),
    ({"alora_invocation_tokens": [1, 2]}, r"\['alora_invocation_tokens'\] is not supported"),
    ({"fan_in_fan_out": True}, r"fan_in_fan_out is true, so the adapter was made for GPT-2's Conv1D"),
])
def test_bad_configs_are_refused_and_change_nothing(tmp_path, changes, match):
    _lora().save_adapter(tmp_path)
    _edit_config(tmp_path, **changes)
    target = _lora(seed=3)
    state = _state(target)
    with pytest.raises(ValueError, match=match):
        target.load_adapter(tmp_path)
    _assert_same_state(target, state)
    assert target.peft_config["default"].lora_alpha == 8.0


def test_shape_mismatch_names_the_module_and_both_shapes(tmp_path):
    _lora().save_adapter(tmp_path)
    wider = _lora(embed_dim=24, seed=2)  # a base model of another width
    state = _state(wider)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj\.lora_A has shape \(4, 16\), "
                                         r"the model expects \(4, 24\)"):
        wider.load_adapter(tmp_path)
    _assert_same_state(wider, state)
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 16\), the model expects \(4, 24\)"):
        LoRAModel.from_pretrained(GPT(**{**CFG, "embed_dim": 24}), tmp_path)


def test_other_refusals_change_nothing(tmp_path):
    lm = _lora()
    lm.save_adapter(tmp_path / "a")
    target = _lora(targets=("q_proj",), seed=6)
    state = _state(target)
    with pytest.raises(ValueError, match="covers other modules"):
        target.load_adapter(tmp_path / "a")  # the file's "default" has v_proj too
    rank2 = _lora(rank=2, seed=6)
    with pytest.raises(ValueError, match="has rank 2, the file rank 4"):
        rank2.load_adapter(tmp_path / "a")
    shallow = _lora(num_layers=1, seed=6)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.q_proj, which is not a Linear layer of this model"):
        shallow.load_adapter(tmp_path / "a", name="more")
    assert shallow.adapters == ["default"]
    _assert_same_state(target, state)

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    del tensors["base_model.model.blocks.0.attn.q_proj.lora_B.weight"]
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj has no lora_B\.weight"):
        target.load_adapter(tmp_path / "a", name="x")
    tensors["base_model.model.blocks.0.attn.q_proj.lora_B.weight"] = np.full((16, 4), np.nan, np.float32)
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        target.load_adapter(tmp_path / "a", name="x")
    tensors["base_model.model.blocks.0.attn.q_proj.lora_B.weight"] = np.zeros((16, 4), np.float32)
    tensors["base_model.model.blocks.0.attn.q_proj.weight"] = np.zeros((16, 16), np.float32)
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected key 'base_model.model.blocks.0.attn.q_proj.weight'"):
        target.load_adapter(tmp_path / "a", name="x")
    assert target.adapters == ["default"]
    _assert_same_state(target, state)
    with pytest.raises(FileNotFoundError):
        target.load_adapter(tmp_path / "missing")


def test_merged_adapter_cannot_be_overwritten(tmp_path):
    lm = _lora()
    lm.save_adapter(tmp_path)
    lm.merge_adapter()
    with pytest.raises(ValueError, match="unmerge before loading"):
        lm.load_adapter(tmp_path)
