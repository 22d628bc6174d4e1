"""LoRA adapters of a Hugging Face GPT-2 both ways, checked against real peft, and the merged export."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora as fl  # noqa: E402
from fastlora.lora import LoRAModel  # noqa: E402
from fastlora.testing.hf_models import logits, make_gpt2  # noqa: E402

ATOL = 1e-5


def ids(seed=1):
    return np.random.default_rng(seed).integers(0, 61, size=(2, 20))


def _randomize(lm, seed=1):
    rng = np.random.default_rng(seed)
    for p in lm.lora_parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.3
    return lm.eval()


def _peft_model(base_dir, adapter_dir):
    base = transformers.GPT2LMHeadModel.from_pretrained(base_dir)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.fixture
def base_dir(tmp_path):
    make_gpt2(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("targets,rslora", [
    (["q_proj", "v_proj"], False),
    (["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], True),
    (["q_proj", "fc2"], False),
    ("all-linear", False),
])
def test_adapter_out_loads_in_peft_with_the_same_logits(tmp_path, base_dir, targets, rslora):
    lm = _randomize(LoRAModel(fl.from_pretrained(base_dir), targets, rank=4, alpha=8, use_rslora=rslora).inject_lora())
    x = ids()
    want = lm(x).data
    lm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["use_rslora"] is rslora
    got = logits(_peft_model(base_dir, tmp_path / "adapter"), x)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    back = LoRAModel.from_pretrained(fl.from_pretrained(base_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(back(x).data, want, rtol=0, atol=ATOL)


def test_q_and_v_become_one_fused_c_attn_adapter(tmp_path, base_dir):
    lm = _randomize(LoRAModel(fl.from_pretrained(base_dir), ["q_proj", "v_proj"], rank=4, alpha=8).inject_lora())
    lm.save_pretrained(tmp_path)
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    A = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
    B = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    q, v = (lm.get_submodule(f"blocks.1.attn.{p}_proj") for p in "qv")
    np.testing.assert_array_equal(A, np.concatenate([q.lora_A["default"].data, v.lora_A["default"].data]))
    assert B.shape == (48, 8)
    np.testing.assert_array_equal(B[:16, :4], q.lora_B["default"].data)
    np.testing.assert_array_equal(B[32:, 4:], v.lora_B["default"].data)
    assert not B[16:32].any() and not B[:16, 4:].any() and not B[32:, :4].any()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16.0, ["c_attn"])  # scaling 2 kept


@pytest.mark.parametrize("options", [
    dict(target_modules=["c_attn", "c_proj", "c_fc"]),
    dict(target_modules=["c_attn", "mlp.c_proj"], use_rslora=True, lora_alpha=12),
    dict(target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2}, alpha_pattern={"h.1.attn.c_attn": 3}),
])
def test_adapter_trained_by_peft_loads_with_the_same_logits(tmp_path, base_dir, options):
    options = {"r": 4, "lora_alpha": 8, "fan_in_fan_out": True, **options}
    model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base_dir), peft.LoraConfig(**options))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.tensor(ids())
    for _ in range(3):  # a few real steps, so B is not zero
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    model.eval().save_pretrained(tmp_path / "adapter")
    want = logits(model, ids(2))
    lm = LoRAModel.from_pretrained(fl.from_pretrained(base_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(lm(ids(2)).data, want, rtol=0, atol=ATOL)
    lm.save_pretrained(tmp_path / "again")  # and out again: peft reads what fastlora wrote
    np.testing.assert_allclose(logits(_peft_model(base_dir, tmp_path / "again"), ids(2)), want, rtol=0, atol=ATOL)
    merged = lm.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(logits(hf, ids(2)), want, rtol=0, atol=ATOL)


def test_pissa_adapter_is_refused_not_loaded_wrong(tmp_path, base_dir):
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"], init_lora_weights="pissa",
                             fan_in_fan_out=True)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base_dir), config)
    model.save_pretrained(tmp_path / "pissa")
    base = fl.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="init_lora_weights='pissa' changed the base model's weights"):
        LoRAModel.from_pretrained(base, tmp_path / "pissa")


def test_adapters_for_other_layers_are_refused(tmp_path, base_dir):
    model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base_dir),
                                peft.LoraConfig(r=2, target_modules=["wte"]))
    model.save_pretrained(tmp_path / "emb")
    base = fl.from_pretrained(base_dir)
    with pytest.raises(ValueError, match=r"unexpected key 'base_model\.model\.transformer\.wte\.lora_embedding_"):
        LoRAModel.from_pretrained(base, tmp_path / "emb")
    from safetensors.numpy import load_file, save_file
    lm = LoRAModel(base, ["q_proj"], rank=2).inject_lora()
    lm.save_pretrained(tmp_path / "moved")
    path = str(tmp_path / "moved" / "adapter_model.safetensors")
    save_file({k.replace("attn.c_attn", "attn.c_zzz"): v for k, v in load_file(path).items()}, path)
    with pytest.raises(ValueError, match=r"'transformer\.h\.[01]\.attn\.c_zzz', which fastlora cannot adapt in GPT-2"):
        LoRAModel.from_pretrained(fl.from_pretrained(base_dir), tmp_path / "moved")


def test_own_gpt_keeps_its_own_adapter_layout(tmp_path):
    lm = LoRAModel(fl.GPT(vocab_size=30, embed_dim=8, num_heads=2, num_layers=1, max_seq_len=8),
                   ["q_proj"], rank=2).inject_lora()
    lm.save_pretrained(tmp_path)
    from safetensors.numpy import load_file
    assert sorted(load_file(str(tmp_path / "adapter_model.safetensors"))) == [
        "base_model.model.blocks.0.attn.q_proj.lora_A.weight", "base_model.model.blocks.0.attn.q_proj.lora_B.weight"]


def test_merged_lora_and_qlora_export_as_plain_gpt2(tmp_path, base_dir):
    x = ids()
    lm = _randomize(LoRAModel(fl.from_pretrained(base_dir), ["q_proj", "v_proj", "fc1"], rank=4, alpha=8).inject_lora())
    want = lm(x).data
    lm.merge_and_unload().save_pretrained(tmp_path / "lora")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lora").eval()
    np.testing.assert_allclose(logits(hf, x), want, rtol=0, atol=ATOL)

    qlm = fl.apply_qlora(fl.from_pretrained(base_dir), rank=4, alpha=8, block_size=16)
    _randomize(qlm)
    want = qlm(x).data
    merged = qlm.merge_and_unload()
    merged.save_pretrained(tmp_path / "qlora")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qlora").eval()
    np.testing.assert_allclose(logits(hf, x), merged(x).data, rtol=0, atol=ATOL)
    np.testing.assert_allclose(merged(x).data, want, rtol=0, atol=1e-4 * np.abs(want).max())
