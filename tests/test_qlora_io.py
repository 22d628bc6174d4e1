"""The quantized base on disk: save/load round trip (with an adapter on top), file size, bad files."""
import json
import os

import numpy as np
import pytest

import fastlora as fl
from fastlora.io import load_safetensors, save_safetensors
from fastlora.lora import LoRAModel
from fastlora.lora.qlora import QLoRAModel, apply_qlora
from fastlora.lora.qlora_io import load_quantized_base, save_quantized_base


def _gpt(dtype=np.float32):
    return fl.GPT(vocab_size=97, embed_dim=64, num_heads=4, num_layers=2, max_seq_len=32, seed=0, dtype=dtype)


def _ids():
    return np.random.default_rng(0).integers(0, 97, (2, 12))


def _trained_qlora(dtype=np.float32, **kw):
    lm = apply_qlora(_gpt(dtype), rank=4, alpha=8.0, **kw)
    rng = np.random.default_rng(5)
    for p in lm.lora_parameters():
        p.data[...] = rng.normal(0, 0.05, p.shape)
    lm.model.ln_f.bias.data[...] = 0.01  # a non-quantized parameter that differs from a fresh GPT's
    return lm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_with_the_adapter_on_top(tmp_path, dtype):
    lm = _trained_qlora(dtype, target_modules=["q_proj", "v_proj", "fc2"])
    expected = lm(_ids()).data
    save_quantized_base(lm, tmp_path / "base.safetensors")
    lm.save_adapter(tmp_path / "adapter")
    loaded = load_quantized_base(tmp_path / "base.safetensors", rank=4, alpha=8.0)
    assert isinstance(loaded, QLoRAModel) and loaded.model.dtype == dtype
    assert [p for p, _ in loaded.quantized_weights()] == [p for p, _ in lm.quantized_weights()]
    for (_, a), (_, b) in zip(loaded.quantized_weights(), lm.quantized_weights()):
        for k, v in b.quantized.to_arrays()[0].items():
            np.testing.assert_array_equal(a.quantized.to_arrays()[0][k], v)
    loaded.load_adapter(tmp_path / "adapter")
    np.testing.assert_array_equal(loaded(_ids()).data, expected)
    assert loaded.peft_config["default"].target_modules == ["q_proj", "v_proj", "fc2"]


def test_the_file_holds_no_float_copy_of_the_quantized_weights(tmp_path):
    lm = apply_qlora(_gpt(), rank=4)
    save_quantized_base(lm, tmp_path / "q.safetensors")
    keys = load_safetensors(tmp_path / "q.safetensors")
    assert not any(k.endswith("q_proj.weight") or k.endswith("fc1.weight") for k in keys)
    assert "blocks.0.attn.q_proj.weight.nf4.packed" in keys and "blocks.0.attn.q_proj.bias" in keys
    assert not any("lora_" in k for k in keys)
    _gpt().save(tmp_path / "f.safetensors")
    quantized_share = sum(w.size for _, w in lm.quantized_weights()) / sum(p.size for p in _gpt().parameters())
    expected = 1 - quantized_share * (1 - 0.52 / 4)  # float32 everywhere else
    ratio = os.path.getsize(tmp_path / "q.safetensors") / os.path.getsize(tmp_path / "f.safetensors")
    assert ratio == pytest.approx(expected, abs=0.03)


def test_what_cannot_be_saved():
    with pytest.raises(TypeError, match="QLoRAModel"):
        save_quantized_base(LoRAModel(_gpt(), ["q_proj"], rank=2).inject_lora(), "x.safetensors")
    with pytest.raises(RuntimeError, match="inject_lora"):
        save_quantized_base(QLoRAModel(_gpt()), "x.safetensors")
    lm = _trained_qlora()
    with pytest.warns(UserWarning):
        lm.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        save_quantized_base(lm, "x.safetensors")


def _saved(tmp_path):
    path = tmp_path / "base.safetensors"
    save_quantized_base(_trained_qlora(), path)
    with open(str(path) + ".json") as fh:
        return path, load_safetensors(path), json.load(fh)


def _rewrite(path, arrays=None, config=None):
    if arrays is not None:
        save_safetensors(path, arrays)
    if config is not None:
        with open(str(path) + ".json", "w") as fh:
            json.dump(config, fh)


def test_bad_files_give_clear_errors(tmp_path):
    path, arrays, config = _saved(tmp_path)
    _gpt().save(tmp_path / "float.safetensors")
    with pytest.raises(ValueError, match="not a quantized base"):
        load_quantized_base(tmp_path / "float.safetensors")

    short = dict(arrays)
    short["blocks.1.mlp.fc1.weight.nf4.packed"] = short["blocks.1.mlp.fc1.weight.nf4.packed"][:-1]
    _rewrite(path, arrays=short)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight: NF4Tensor\.packed must be"):
        load_quantized_base(path)

    gone = {k: v for k, v in arrays.items() if not k.startswith("blocks.0.attn.k_proj.weight.nf4")}
    _rewrite(path, arrays=gone)
    with pytest.raises(ValueError, match="NF4 arrays for"):
        load_quantized_base(path)

    _rewrite(path, arrays={k: v for k, v in arrays.items() if k != "ln_f.bias"})
    with pytest.raises(ValueError, match=r"missing \['ln_f\.bias'\]"):
        load_quantized_base(path)

    _rewrite(path, arrays=arrays, config={**config, "quantization": {**config["quantization"], "version": 9}})
    with pytest.raises(ValueError, match="version"):
        load_quantized_base(path)

    _rewrite(path, config={**config, "quantization": {**config["quantization"], "target_modules": ["q_proj"]}})
    with pytest.raises(ValueError, match="select"):
        load_quantized_base(path)


def test_given_nf4_weights_must_fit_their_layers():
    from fastlora.lora.qlora import NF4Weight
    lm = QLoRAModel(_gpt(), ["q_proj"], rank=2)
    with pytest.raises(ValueError, match=r"weights\['blocks\.0\.attn\.q_proj'\] must be an NF4Weight of shape"):
        lm.inject_lora(weights={"blocks.0.attn.q_proj": NF4Weight.quantize(np.ones((3, 64)))})
    assert not lm.get_submodule("blocks.0.attn.q_proj").__class__.__name__.startswith("QLoRA")
