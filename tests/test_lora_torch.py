"""LoRA against PyTorch: a LoRA layer and a whole LoRA GPT, outputs and every LoRA gradient."""
import numpy as np
import pytest

import fastlora as fl
from fastlora.autograd.tensor import Tensor
from fastlora.lora import LoRALinear, LoRAModel

torch = pytest.importorskip("torch")
from fastlora.testing.torch_reference import (  # noqa: E402
    TorchLoRALinear, inject_torch_lora, torch_gpt_from, torch_loss)

TOL = {np.float64: (1e-9, 1e-11), np.float32: (2e-4, 2e-5)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_matches_torch(dtype, use_rslora):
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((6, 10)).astype(dtype), rng.standard_normal(6).astype(dtype)
    layer = LoRALinear(W, rank=3, alpha=5.0, bias=b, use_rslora=use_rslora)
    layer.lora_B["default"].data[...] = rng.standard_normal((6, 3))
    A, B = layer.lora_parameters()
    x = Tensor(rng.standard_normal((4, 7, 10)).astype(dtype), requires_grad=True)
    g = rng.standard_normal((4, 7, 6)).astype(dtype)
    layer(x).backward(g)

    base = torch.nn.Linear(10, 6).to(getattr(torch, np.dtype(dtype).name))
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(W))
        base.bias.copy_(torch.from_numpy(b))
    peer = TorchLoRALinear(base, A.data, B.data, 5.0 / (np.sqrt(3) if use_rslora else 3))
    tx = torch.from_numpy(x.data.copy()).requires_grad_(True)
    ty = peer(tx)
    ty.backward(torch.from_numpy(g))

    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(layer(x).data, ty.detach().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(A.grad, peer.lora_A.grad.numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(B.grad, peer.lora_B.grad.numpy(), rtol=rtol, atol=atol)
    assert layer.weight.grad is None and base.weight.grad is None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lora_gpt_matches_torch(model_path, dtype):
    """Logits, loss and the gradient of every LoRA matrix of a GPT with q/v/fc1 adapters."""
    rtol, atol = TOL[dtype]
    model = fl.GPT(vocab_size=41, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=12, seed=4, dtype=dtype)
    rng = np.random.default_rng(1)
    for p in model.parameters():
        p.data[...] = (rng.standard_normal(p.shape) * 0.3).astype(dtype)
    peer = torch_gpt_from(model)  # before injection: the plain GPT's weights

    lm = LoRAModel(model, target_modules=["q_proj", "v_proj", "fc1"], rank=4, alpha=8)
    lm.inject_lora()
    for p in lm.lora_parameters():  # B non-zero so the LoRA path shows in the output
        p.data[...] = (rng.standard_normal(p.shape) * 0.3).astype(dtype)
    ids = rng.integers(0, 41, size=(3, 12))
    labels = ids.copy()
    labels[:, :4] = -100
    logits = lm(ids)
    loss = fl.cross_entropy(logits, labels)
    loss.backward()

    t_layers = inject_torch_lora(peer, lm)
    assert len(t_layers) == 6
    t_logits = peer(torch.from_numpy(ids))
    t_loss = torch_loss(t_logits, torch.from_numpy(labels))
    t_loss.backward()

    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), rtol=rtol, atol=atol)
    assert loss.item() == pytest.approx(t_loss.item(), rel=rtol, abs=atol)
    for path, t_layer in t_layers.items():
        layer = lm.get_submodule(path)
        np.testing.assert_allclose(layer.lora_A["default"].grad, t_layer.lora_A.grad.numpy(),
                                   rtol=rtol * 10, atol=atol, err_msg=path + " A")
        np.testing.assert_allclose(layer.lora_B["default"].grad, t_layer.lora_B.grad.numpy(),
                                   rtol=rtol * 10, atol=atol, err_msg=path + " B")
    for p in lm.base_parameters():
        assert p.grad is None  # frozen: no gradient computed or stored
