"""layers_to_transform / layers_pattern, bias and modules_to_save on a Hugging Face GPT-2, both ways
against real peft: adapters peft trained load here with the same logits and go back out to peft;
adapters made here load in peft with the same logits; gradients of the trained biases and copies."""
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
    return np.random.default_rng(seed).integers(0, 61, size=(2, 16))


@pytest.fixture
def base_dir(tmp_path):
    make_gpt2(tmp_path / "base")
    return tmp_path / "base"


def _gpt2(base_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(base_dir)


@pytest.mark.parametrize("options", [
    dict(target_modules=["c_attn"], bias="all", modules_to_save=["ln_f"], layers_to_transform=[1]),
    dict(target_modules=["c_attn", "c_fc"], bias="lora_only", modules_to_save=["ln_1"]),
    dict(target_modules=["c_attn", "c_proj"], layers_to_transform=0, layers_pattern="h"),
])
def test_trained_by_peft_in_and_out_again(tmp_path, base_dir, options):
    model = peft.get_peft_model(_gpt2(base_dir), peft.LoraConfig(r=2, lora_alpha=4, fan_in_fan_out=True, **options))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.tensor(ids())
    for _ in range(3):  # the biases and the copies move too
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    model.eval().save_pretrained(tmp_path / "adapter")
    want = logits(model, ids(2))
    lm = LoRAModel.from_pretrained(fl.from_pretrained(base_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(lm(ids(2)).data, want, rtol=0, atol=ATOL)
    config = lm.peft_config["default"]
    assert config.bias == options.get("bias", "none")
    lm.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again.get("layers_to_transform") == options.get("layers_to_transform")
    back = peft.PeftModel.from_pretrained(_gpt2(base_dir), tmp_path / "again").eval()
    np.testing.assert_allclose(logits(back, ids(2)), want, rtol=0, atol=ATOL)


def test_made_here_loads_in_peft_with_the_same_logits_and_gradients(tmp_path, base_dir):
    lm = LoRAModel(fl.from_pretrained(base_dir), ["q_proj", "v_proj", "fc2"], rank=2, alpha=4, bias="lora_only",
                   modules_to_save=["ln_f", "blocks.1.ln2"], layers_to_transform=[1]).inject_lora()
    opt = fl.SGD(lm.lora_parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        fl.cross_entropy(lm(ids()), ids()).backward()
        opt.step()
    lm.eval()
    want = lm(ids(2)).data
    lm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["transformer.h.1.ln_2", "transformer.ln_f"]
    assert config["target_modules"] == ["c_attn", "mlp.c_proj"] and config["layers_to_transform"] == [1]
    model = peft.PeftModel.from_pretrained(_gpt2(base_dir), tmp_path / "adapter", is_trainable=True).eval()
    np.testing.assert_allclose(logits(model, ids(2)), want, rtol=0, atol=ATOL)

    # one backward each: the trained biases and the ln_f copy get the same gradients
    model.zero_grad()
    model(torch.tensor(ids(3)), labels=torch.tensor(ids(3))).loss.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    for p in lm.lora_parameters():
        p.grad = None
    fl.cross_entropy(lm(ids(3)), ids(3)).backward()
    ln_f = lm.get_submodule("ln_f").modules_to_save["default"]
    theirs = grads["base_model.model.transformer.ln_f.modules_to_save.default.weight"]
    np.testing.assert_allclose(ln_f.weight.grad, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())
    theirs = grads["base_model.model.transformer.h.1.mlp.c_proj.base_layer.bias"]
    np.testing.assert_allclose(lm.get_submodule("blocks.1.mlp.fc2").bias.grad, theirs, rtol=0,
                               atol=1e-4 * np.abs(theirs).max())
    theirs = grads["base_model.model.transformer.h.1.attn.c_attn.base_layer.bias"]  # q, k, v rows
    q, v = (lm.get_submodule(f"blocks.1.attn.{p}_proj").bias.grad for p in "qv")
    np.testing.assert_allclose(np.concatenate([q, v]), np.concatenate([theirs[:16], theirs[32:]]), rtol=0,
                               atol=1e-4 * np.abs(theirs).max())
