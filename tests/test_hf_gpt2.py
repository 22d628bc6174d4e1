"""Hugging Face GPT-2 in and out, checked against transformers itself: logits, gradients, files.

Every model here is a tiny random GPT-2 that transformers builds and saves at test time.
"""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastlora as fl  # noqa: E402
from fastlora.nn import hf_gpt2  # noqa: E402
from fastlora.testing.hf_models import backward_both, logits, make_gpt2  # noqa: E402

RTOL = 1e-4  # float32 logits, relative to their largest magnitude
CONFIGS = {
    "default": dict(),
    "n_inner_odd_heads": dict(n_embd=15, n_head=5, n_inner=23),  # head size 3, MLP not 4*D
    "exact_gelu": dict(n_embd=16, n_head=2, activation_function="gelu", layer_norm_epsilon=1e-3),
    "pytorch_tanh": dict(n_embd=12, n_head=3, activation_function="gelu_pytorch_tanh"),
    "untied_head": dict(n_embd=16, n_head=4, tie_word_embeddings=False),
}


def ids(B=2, T=20, V=61, seed=1):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def assert_close_logits(got, want):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_gradients_match_transformers(tmp_path, name):
    hf = make_gpt2(tmp_path, **CONFIGS[name])
    model = fl.from_pretrained(tmp_path)
    assert isinstance(model, fl.GPT) and model.hf_config["model_type"] == "gpt2"
    x = ids()
    assert_close_logits(model(x).data, logits(hf, x))

    ours, theirs = backward_both(model, hf, x, masked=5)
    assert abs(ours - theirs) < 1e-5 * max(1.0, theirs)
    t = hf.transformer
    qkv = np.concatenate([model.get_submodule(f"blocks.1.attn.{p}_proj").weight.grad for p in "qkv"], axis=0)
    pairs = [(model.embed.weight.grad, t.wte.weight.grad),
             (qkv.T, t.h[1].attn.c_attn.weight.grad),
             (model.blocks[0].mlp.fc1.weight.grad.T, t.h[0].mlp.c_fc.weight.grad),
             (model.blocks[0].ln1.weight.grad, t.h[0].ln_1.weight.grad)]
    if not model.config.tie_word_embeddings:
        pairs.append((model.lm_head.weight.grad, hf.lm_head.weight.grad))
    for ours, theirs in pairs:
        theirs = theirs.numpy()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path, name):
    make_gpt2(tmp_path / "in", **CONFIGS[name])
    model = fl.from_pretrained(tmp_path / "in")
    model.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = ids()
    assert_close_logits(logits(back, x), model(x).data)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((tmp_path / "in" / "config.json").read_text())
    assert saved["bos_token_id"] == original["bos_token_id"] and saved["resid_pdrop"] == original["resid_pdrop"]


def test_a_model_made_here_exports_as_gpt2(tmp_path):
    model = fl.GPT(vocab_size=50, embed_dim=24, num_heads=3, num_layers=2, max_seq_len=16, seed=3)
    for p in model.parameters():
        p.data += np.random.default_rng(0).normal(0, 0.05, p.shape).astype(p.dtype)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = ids(V=50, T=16)
    assert_close_logits(logits(hf, x), model(x).data)
    again = fl.from_pretrained(tmp_path)
    np.testing.assert_array_equal(again(x).data, model(x).data)


def test_sharded_half_precision_and_old_style_checkpoints(tmp_path):
    hf = make_gpt2(None)
    x = ids()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_close_logits(fl.from_pretrained(tmp_path / "sharded")(x).data, logits(hf, x))

    for dtype in (torch.float16, torch.bfloat16):
        half = make_gpt2(None).to(dtype)
        half.save_pretrained(tmp_path / str(dtype))
        model = fl.from_pretrained(tmp_path / str(dtype))
        assert model.dtype == np.float32
        t = half.transformer
        np.testing.assert_array_equal(model.embed.weight.data, t.wte.weight.detach().float().numpy())
        np.testing.assert_array_equal(model.blocks[1].mlp.fc2.weight.data,
                                      t.h[1].mlp.c_proj.weight.detach().float().numpy().T)

    # GPT2Model's names (no "transformer."), with the causal-mask buffers old checkpoints carry
    from safetensors.numpy import load_file, save_file
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "sharded", old)
    for f in os.listdir(old):
        if f.startswith("model"):
            os.unlink(old / f)
    state = {k[len("transformer."):]: v.detach().numpy() for k, v in hf.state_dict().items()
             if k.startswith("transformer.")}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 20, 20), dtype=np.float32))
    save_file(state, str(old / "model.safetensors"))
    assert_close_logits(fl.from_pretrained(old)(x).data, logits(hf, x))
    assert load_file(str(old / "model.safetensors"))  # the file is as written


def test_float64_on_request(tmp_path):
    hf = make_gpt2(tmp_path)
    model = fl.from_pretrained(tmp_path, dtype=np.float64)
    assert model.dtype == np.float64
    x = ids()
    np.testing.assert_allclose(model(x).data, logits(hf.double(), x), rtol=0, atol=1e-6)


def test_fastlora_saved_models_load_through_the_same_call(tmp_path):
    model = fl.GPT(vocab_size=30, embed_dim=8, num_heads=2, num_layers=1, max_seq_len=8, seed=4)
    model.save(tmp_path / "model.safetensors")
    x = ids(V=30, T=8)
    for path in (tmp_path / "model.safetensors", tmp_path):
        np.testing.assert_array_equal(fl.from_pretrained(path)(x).data, model(x).data)
        assert fl.GPT.from_pretrained(path).hf_config is None


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rewrite_weights(folder, edit):
    from safetensors.numpy import load_file, save_file
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("case,match", [
    ("no_config", r"no config\.json"),
    ("model_type", r"model_type 'bert' is not supported; fastlora loads \['gpt2', 'llama', 'mistral', 'qwen2'\]"),
    ("huge_config", r"describes a model of 1,000,[\d,]+ weights, but .* holds 7,888"),
    ("missing", r"missing \['h\.1\.mlp\.c_fc\.weight'\]"),
    ("extra", r"unexpected \['h\.0\.attn\.rotary\.weight'\]"),
    ("shape", r"'transformer\.wpe\.weight' has shape \(20, 16\), this config\.json needs \(32, 16\)"),
    ("shard", r"names shard 'model-\d+-of-\d+\.safetensors' \(for 'transformer\.h\.1\.[a-z_.]+'\), which is missing"),
    ("traversal", r"is not a file name in the folder"),
    ("pickle", r"pytorch_model\.bin: a pickled PyTorch checkpoint; fastlora never unpickles"),
    ("inverse_layer_idx", r"scale_attn_by_inverse_layer_idx=True is not supported"),
    ("activation", r"activation_function 'relu' is not supported"),
    ("nan", r"the weights of blocks\.0\.ln1\.weight hold NaN"),
    ("header", r"not a safetensors file \(header length"),
])
def test_bad_folders_get_one_clear_error(tmp_path, case, match):
    folder = tmp_path / "m"
    make_gpt2(folder)
    if case == "no_config":
        os.unlink(folder / "config.json")
    elif case == "model_type":
        _edit_config(folder, model_type="bert")
    elif case == "huge_config":  # refused before a model of that size is allocated
        _edit_config(folder, vocab_size=62_500_000)
    elif case == "missing":
        _rewrite_weights(folder, lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"))
    elif case == "extra":
        _rewrite_weights(folder, lambda s: s.update({"transformer.h.0.attn.rotary.weight": np.zeros(3, np.float32)}))
    elif case == "shape":
        _edit_config(folder, n_positions=32)
    elif case in ("shard", "traversal"):
        shutil.rmtree(folder)
        make_gpt2(None).save_pretrained(folder, max_shard_size="20KB")
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        if case == "shard":
            os.unlink(folder / index["weight_map"]["transformer.h.1.mlp.c_fc.weight"])
        else:
            index["weight_map"]["transformer.wte.weight"] = "../elsewhere.safetensors"
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif case == "pickle":
        os.unlink(folder / "model.safetensors")
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    elif case == "inverse_layer_idx":
        _edit_config(folder, scale_attn_by_inverse_layer_idx=True)
    elif case == "activation":
        _edit_config(folder, activation_function="relu")
    elif case == "nan":
        _rewrite_weights(folder, lambda s: s["transformer.h.0.ln_1.weight"].__setitem__(0, np.nan))
    elif case == "header":
        with open(folder / "model.safetensors", "r+b") as fh:
            fh.write((10 ** 12).to_bytes(8, "little"))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        fl.from_pretrained(folder)


def test_name_map_covers_every_parameter():
    model = fl.GPT(vocab_size=30, embed_dim=8, num_heads=2, num_layers=3, max_seq_len=8, tie_word_embeddings=False)
    mapped = [n for _, names in hf_gpt2.name_map(model.config) for n in names]
    assert sorted(mapped) == sorted(n for n, _ in model.named_parameters())


def test_a_fastlora_sidecar_larger_than_its_weights_is_refused_before_building(tmp_path):
    fl.GPT(vocab_size=30, embed_dim=8, num_heads=2, num_layers=1, max_seq_len=8).save(tmp_path / "m.safetensors")
    sidecar = tmp_path / "m.safetensors.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "vocab_size": 10 ** 9}))
    with pytest.raises(ValueError, match=r"describes a model of 8,[\d,]+ weights, but .* holds"):
        fl.GPT.load(tmp_path / "m.safetensors")
