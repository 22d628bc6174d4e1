"""init_lora_weights: True, False, "gaussian", "pissa", "pissa_niter_K" (randomised SVD), "olora";
PiSSA/OLoRA adapters saved converted to plain LoRA of the original base by default, and bad input."""
import json

import numpy as np
import pytest

import fastlora as fl
from lora_helpers import token_ids, train_steps
from fastlora.lora import LoRALinear, LoRAModel
from fastlora.lora.init import svd_lowrank

CFG = dict(vocab_size=40, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=12, seed=4)


def _ids(seed=0):
    return token_ids(seed)


def _train(lm, steps=4):
    return train_steps(lm, _ids(), steps, lr=0.02)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rewriting_inits_keep_the_layer_and_take_the_top_part(init, dtype):
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((12, 9)) * np.linspace(3, 0.1, 9)).astype(dtype)
    layer = LoRALinear(W, rank=3, alpha=5, init_lora_weights=init)
    A, B = layer.lora_A["default"].data, layer.lora_B["default"].data
    s = layer.scaling()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer.weight.data + s * B @ A, W, atol=tol * np.abs(W).max())  # unchanged layer
    x = rng.standard_normal((4, 9))
    np.testing.assert_allclose(layer.forward(x), x @ W.T, rtol=tol * 10, atol=tol * 10)
    if init.startswith("pissa"):  # s B A is W's best rank-3 part
        U, S, Vh = np.linalg.svd(W.astype(np.float64))
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        if init == "pissa":
            np.testing.assert_allclose(s * B @ A, best, atol=tol * np.abs(W).max() * 10)
        else:  # randomised (no oversampling, as PEFT asks torch.svd_lowrank): nearly the best residual
            assert np.linalg.norm(W - s * B @ A) < 1.05 * np.linalg.norm(W - best)
        np.testing.assert_allclose(A @ A.T, B.T @ B, rtol=1e-4, atol=1e-5)  # the sqrt(S) split: balanced factors
    else:  # OLoRA: B orthonormal columns, W's first r QR factors
        np.testing.assert_allclose(B.T @ B, np.eye(3), atol=tol * 10)
    assert layer.initial_weights["default"][0].shape == (3, 9)


def test_randomised_svd_is_close_to_the_svd():
    rng = np.random.default_rng(1)
    M = (rng.standard_normal((60, 40)) * np.logspace(0, -3, 40)) @ rng.standard_normal((40, 40))
    for m in (M, M.T):  # tall and wide
        U, S, Vh = svd_lowrank(m, 5, 4, np.random.default_rng(0))
        exact = np.linalg.svd(m, compute_uv=False)[:5]
        np.testing.assert_allclose(S, exact, rtol=1e-3)
        assert U.shape == (m.shape[0], 5) and Vh.shape == (5, m.shape[1])
        np.testing.assert_allclose(U.T @ U, np.eye(5), atol=1e-10)


def test_plain_inits():
    W = np.zeros((64, 40))
    gauss = LoRALinear(W, rank=8, init_lora_weights="gaussian")
    A, B = gauss.lora_parameters()
    assert abs(A.data.std() - 1 / 8) < 0.02 and not B.data.any()
    random_b = LoRALinear(W, rank=8, init_lora_weights=False)  # PEFT: nn.Linear's own init on B
    bound = 1 / np.sqrt(8)
    assert np.abs(random_b.lora_B["default"].data).max() <= bound and random_b.lora_B["default"].data.any()
    assert not gauss.initial_weights and np.array_equal(gauss.weight.data, W)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_converted_loads_on_the_untouched_base(tmp_path, init):
    lm = LoRAModel(fl.GPT(**CFG), ["q_proj", "fc1"], rank=2, alpha=4, init_lora_weights=init).inject_lora()
    np.testing.assert_allclose(lm.eval()(_ids(1)).data, fl.GPT(**CFG).eval()(_ids(1)).data, atol=2e-6)
    _train(lm)
    want = lm(_ids(1)).data
    lm.save_pretrained(tmp_path / "converted")
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0) and "init_lora_weights" not in config  # plain LoRA
    back = LoRAModel.from_pretrained(fl.GPT(**CFG), tmp_path / "converted").eval()  # the original base
    np.testing.assert_allclose(back(_ids(1)).data, want, rtol=1e-5, atol=2e-6)
    lm.save_pretrained(tmp_path / "raw", convert_to_lora=False)
    assert json.loads((tmp_path / "raw" / "adapter_config.json").read_text())["init_lora_weights"] == init
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' changed the base model's weights"):
        LoRAModel.from_pretrained(fl.GPT(**CFG), tmp_path / "raw")


def test_converted_rslora_with_patterns_keeps_each_scaling(tmp_path):
    lm = LoRAModel(fl.GPT(**CFG), ["q_proj", "v_proj"], rank=2, alpha=3, use_rslora=True, rank_pattern={"v_proj": 3},
                   alpha_pattern={"blocks.1.attn.q_proj": 5}, init_lora_weights="pissa_niter_2").inject_lora()
    _train(lm)
    lm.save_pretrained(tmp_path)
    back = LoRAModel.from_pretrained(fl.GPT(**CFG), tmp_path).eval()
    assert back.get_submodule("blocks.0.attn.v_proj").adapter_configs["default"].r == 6
    np.testing.assert_allclose(back(_ids(2)).data, lm(_ids(2)).data, rtol=1e-5, atol=2e-6)


def test_bad_inits_are_refused_and_change_nothing():
    gpt = fl.GPT(**CFG)
    before = {n: p.data.copy() for n, p in gpt.named_parameters()}
    with pytest.raises(ValueError, match=r"adapter 'default': init_lora_weights must be one of .* got 'pisa'"):
        LoRAModel(gpt, ["q_proj"], init_lora_weights="pisa")
    with pytest.raises(ValueError, match=r"init_lora_weights must be one of"):
        LoRAModel(gpt, ["q_proj"], init_lora_weights="loftq")
    with pytest.raises(ValueError, match="init_lora_weights='olora' rewrites the base weights, which are quantized"):
        fl.lora.QLoRAModel(gpt, ["q_proj"], init_lora_weights="olora")
    lm = LoRAModel(gpt, ["q_proj"], rank=2).inject_lora()
    lm.merge_adapter()
    merged = lm.get_submodule("blocks.0.attn.q_proj").weight.data.copy()
    with pytest.raises(ValueError, match="rewrites the base weight, which holds the merged adapters"):
        lm.add_adapter("p", rank=2, init_lora_weights="pissa")
    np.testing.assert_array_equal(lm.get_submodule("blocks.0.attn.q_proj").weight.data, merged)
    lm.unmerge_adapter()
    for n, p in gpt.named_parameters():
        if n in before:
            np.testing.assert_allclose(p.data, before[n], atol=1e-6, err_msg=n)


# --- against real peft ----------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_init_matches_peft_on_a_linear(init, rslora):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self, W):
            super().__init__()
            self.lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
            with torch.no_grad():
                self.lin.weight.copy_(torch.from_numpy(W))

        def forward(self, x):
            return self.lin(x)

    W = np.random.default_rng(0).standard_normal((12, 9)).astype(np.float32)
    pm = peft.get_peft_model(Net(W.copy()), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["lin"],
                                                            init_lora_weights=init, use_rslora=rslora))
    lin = pm.base_model.model.lin
    layer = LoRALinear(W, rank=3, alpha=5, use_rslora=rslora, init_lora_weights=init)
    np.testing.assert_allclose(layer.lora_A["default"].data, lin.lora_A["default"].weight.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(layer.lora_B["default"].data, lin.lora_B["default"].weight.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(layer.weight.data, lin.base_layer.weight.detach().numpy(), atol=1e-5)


def test_pissa_both_ways_with_peft_on_gpt2(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from fastlora.testing.hf_models import logits, make_gpt2
    make_gpt2(tmp_path / "base")
    ids = np.random.default_rng(3).integers(0, 61, (2, 12))
    # out: trained here, saved converted, loaded by peft onto the untouched GPT-2
    lm = LoRAModel(fl.from_pretrained(tmp_path / "base"), ["q_proj", "v_proj", "fc2"], rank=2, alpha=4,
                   init_lora_weights="pissa").inject_lora()
    rng = np.random.default_rng(0)
    for p in lm.lora_parameters():
        p.data += rng.standard_normal(p.shape).astype(p.dtype) * 0.05
    lm.eval().save_pretrained(tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    np.testing.assert_allclose(logits(peft.PeftModel.from_pretrained(hf, tmp_path / "out"), ids), lm(ids).data,
                               rtol=0, atol=1e-5)
    # in: made by peft with PiSSA, trained, saved with its own conversion, loaded here on the untouched base
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             init_lora_weights="pissa")
    pm = peft.get_peft_model(hf, config)
    pm.save_pretrained(tmp_path / "init")  # PEFT's recipe: the initial adapter first
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        pm(torch.tensor(ids), labels=torch.tensor(ids)).loss.backward()
        opt.step()
    pm.eval()
    want = logits(pm, ids)
    pm.save_pretrained(tmp_path / "in", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    back = LoRAModel.from_pretrained(fl.from_pretrained(tmp_path / "base"), tmp_path / "in").eval()
    np.testing.assert_allclose(back(ids).data, want, rtol=0, atol=1e-5)
