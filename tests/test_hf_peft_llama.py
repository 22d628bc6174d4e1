"""PEFT's options on a Hugging Face Llama, both ways against real peft: DoRA (logits and A, B and
magnitude gradients), modules_to_save with PEFT's suffix rule ("norm" is every norm),
layers_to_transform with a converted PiSSA adapter. Llama keeps Hugging Face's module names, so
the adapter files are peft's own layout with no renaming."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora as fl  # noqa: E402
from fastlora.lora import LoRAModel  # noqa: E402
from fastlora.testing.hf_models import logits, make_llama  # noqa: E402

ATOL = 1e-5
OPTIONS = [
    dict(target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=True),
    dict(target_modules="all-linear", modules_to_save=["norm"]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], init_lora_weights="pissa"),
]


def ids(seed=0):
    return np.random.default_rng(seed).integers(0, 67, size=(2, 12))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama") / "base"
    make_llama(folder)
    return folder


def _plain(name):
    """A trained parameter's name without peft's or fastlora's wrapping: model.layers.0.mlp.gate_proj.lora_A."""
    for part in ("base_model.model.", "modules_to_save.", ".default", ".weight"):
        name = name.replace(part, "")
    return name


def _hf(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir)


@pytest.mark.parametrize("options", OPTIONS)
def test_trained_by_peft_loads_here_and_goes_back(tmp_path, base_dir, options):
    model = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(r=2, lora_alpha=4, **options))
    model.save_pretrained(tmp_path / "init")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.tensor(ids())
    for _ in range(3):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    model.eval()
    convert = {"path_initial_model_for_weight_conversion": str(tmp_path / "init")} \
        if "init_lora_weights" in options else {}
    model.save_pretrained(tmp_path / "adapter", **convert)
    want = logits(model, ids(1))
    lm = LoRAModel.from_pretrained(fl.from_pretrained(base_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(lm(ids(1)).data, want, rtol=0, atol=ATOL)
    lm.save_pretrained(tmp_path / "again")
    back = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path / "again").eval()
    np.testing.assert_allclose(logits(back, ids(1)), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("options", OPTIONS)
def test_made_here_loads_in_peft_with_the_same_logits_and_gradients(tmp_path, base_dir, options):
    options = dict(options)
    targets = options.pop("target_modules")
    lm = LoRAModel(fl.from_pretrained(base_dir), targets, rank=2, alpha=4, **options).inject_lora()
    rng = np.random.default_rng(1)
    for p in lm.lora_parameters():
        p.data += rng.standard_normal(p.shape).astype(p.dtype) * 0.1
    lm.eval()
    lm.save_pretrained(tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path / "adapter", is_trainable=True).eval()
    np.testing.assert_allclose(logits(model, ids(1)), lm(ids(1)).data, rtol=0, atol=ATOL)
    model.zero_grad()
    model(torch.tensor(ids(2)), labels=torch.tensor(ids(2))).loss.backward()
    theirs = {_plain(n): p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    for p in lm.lora_parameters():
        p.grad = None
    fl.cross_entropy(lm(ids(2)), ids(2)).backward()
    named = {_plain(n): p for n, p in lm.named_parameters() if p.requires_grad}
    assert sorted(named) == sorted(theirs)
    for name, p in named.items():
        want = theirs[name]
        if want.shape != p.grad.shape:  # PiSSA saved converted: [A; A0] and [B, -B0], ours the leading part
            want = want[:p.shape[0]] if name.endswith("lora_A") else want[:, :p.shape[1]]
        np.testing.assert_allclose(p.grad, want, rtol=0, atol=2e-4 * np.abs(want).max() + 1e-8, err_msg=name)
