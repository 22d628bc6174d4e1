"""Llama-family models (llama, qwen2, mistral) against transformers: logits, every gradient, files."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastlora as fl  # noqa: E402
from fastlora.testing.hf_models import backward_both, logits, make_llama  # noqa: E402

RTOL = 1e-4  # float32, relative to the largest magnitude of each compared array
CONFIGS = {
    "llama_gqa": dict(model_type="llama"),
    "llama_mqa_tied": dict(model_type="llama", num_key_value_heads=1, tie_word_embeddings=True),
    "llama_biases_head_dim": dict(model_type="llama", attention_bias=True, mlp_bias=True, head_dim=8),
    "llama_mha_linear_rope": dict(model_type="llama", num_key_value_heads=4,
                                  rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    "llama3_rope": dict(model_type="llama", rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0}),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral"),
}


def ids(B=2, T=32, V=67, seed=1):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def close(ours, theirs, what):
    scale = max(np.abs(theirs).max(), 1e-12)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=RTOL * scale, err_msg=what)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_every_gradient_match_transformers(tmp_path, name):
    hf = make_llama(tmp_path, **CONFIGS[name])
    model = fl.from_pretrained(tmp_path)
    assert isinstance(model, fl.Llama)
    x = ids()
    close(model(x).data, logits(hf, x), "logits")
    ours, theirs = backward_both(model, hf, x, masked=7)
    assert abs(ours - theirs) < 1e-5 * theirs
    hf_params = dict(hf.named_parameters())
    for name_, p in model.named_parameters():
        close(p.grad, hf_params[name_].grad.numpy(), name_)
    assert sorted(n for n, _ in model.named_parameters()) == sorted(hf_params)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_pretrained_loads_in_transformers(tmp_path, name):
    make_llama(tmp_path / "in", **CONFIGS[name])
    model = fl.from_pretrained(tmp_path / "in")
    model.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == type(make_llama(None, **CONFIGS[name])).__name__
    x = ids()
    close(logits(back, x), model(x).data, "logits")


def test_a_llama_made_here_exports(tmp_path):
    model = fl.Llama(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=16, seed=2)
    for p in model.parameters():
        p.data += np.random.default_rng(0).normal(0, 0.05, p.shape).astype(p.dtype)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(V=50, T=16)
    close(logits(hf, x), model(x).data, "logits")


def test_old_style_rope_config_reads_the_same(tmp_path):
    hf = make_llama(tmp_path, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})  # transformers 4's fields
    (tmp_path / "config.json").write_text(json.dumps(config))
    x = ids()
    close(fl.from_pretrained(tmp_path)(x).data, logits(hf, x), "logits")


def _edit(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,match", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}),
     r"rope_scaling type 'yarn' is not supported; supported: \['default', 'linear', 'llama3'\]"),
    (dict(num_key_value_heads=3), r"num_heads=4 must be divisible by num_kv_heads=3"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    (dict(model_type="mistral", sliding_window=8), r"sliding_window=8 is shorter than the context"),
    (dict(tie_word_embeddings=False, _drop_head=True), r"missing \['lm_head\.weight'\]"),
])
def test_bad_configs_get_one_clear_error(tmp_path, changes, match):
    make_llama(tmp_path, tie_word_embeddings=bool(changes.pop("_drop_head", False)))
    _edit(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        fl.from_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_peft_adapters_both_ways(tmp_path, name):
    peft = pytest.importorskip("peft")
    from fastlora.lora import LoRAModel
    make_llama(tmp_path / "base", **CONFIGS[name])
    x = ids()
    # in: trained by peft on all seven projections
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                    rank_pattern={"down_proj": 2}))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.tensor(x), labels=torch.tensor(x)).loss.backward()
        opt.step()
    model.eval().save_pretrained(tmp_path / "theirs")
    want = logits(model, x)
    lm = LoRAModel.from_pretrained(fl.from_pretrained(tmp_path / "base"), tmp_path / "theirs").eval()
    close(lm(x).data, want, "peft -> fastlora")
    # out: fastlora's own adapter onto transformers' model
    ours = LoRAModel(fl.from_pretrained(tmp_path / "base"), "all-linear", rank=4, alpha=16, use_rslora=True)
    ours.inject_lora()
    rng = np.random.default_rng(3)
    for p in ours.lora_parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.2
    ours.eval().save_pretrained(tmp_path / "ours")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    close(logits(peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval(), x), ours(x).data, "fastlora -> peft")
    merged = ours.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    close(logits(back, x), merged(x).data, "merged export")


def test_qlora_and_training_run_on_a_llama(tmp_path):
    make_llama(tmp_path)
    model = fl.from_pretrained(tmp_path)
    qlm = fl.apply_qlora(model, rank=4, alpha=8, target_modules="all-linear", block_size=8)
    x = ids()
    labels = x.copy()
    opt = fl.AdamW(qlm.lora_parameters(), lr=1e-2)
    first = None
    for _ in range(5):
        loss = fl.cross_entropy(qlm(x), labels)
        first = float(loss.data) if first is None else first
        qlm.zero_grad()
        loss.backward()
        opt.step()
    assert float(fl.cross_entropy(qlm(x), labels).data) < first


def test_num_parameters_is_what_the_models_hold():
    from fastlora.nn.gpt import GPTConfig
    from fastlora.nn.llama import LlamaConfig
    for kw in (dict(), dict(tie_word_embeddings=False, mlp_hidden=21)):
        cfg = GPTConfig(vocab_size=30, embed_dim=8, num_heads=2, num_layers=3, max_seq_len=9, **kw)
        model = fl.GPT(**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
        assert cfg.num_parameters() == model.num_parameters()
    for kw in (dict(), dict(qkv_bias=True, o_bias=True, mlp_bias=True, head_dim=6, tie_word_embeddings=True)):
        cfg = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=20, num_layers=2, num_heads=4,
                          num_kv_heads=2, max_seq_len=9, **kw)
        assert cfg.num_parameters() == fl.Llama(cfg).num_parameters()


def test_a_config_larger_than_its_weights_is_refused_before_building(tmp_path):
    make_llama(tmp_path)
    _edit(tmp_path, intermediate_size=10 ** 9)
    with pytest.raises(ValueError, match=r"describes a model of [\d,]+ weights, but .* holds [\d,]+"):
        fl.from_pretrained(tmp_path)
