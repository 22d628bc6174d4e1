"""The whole GPT against the same architecture in PyTorch: logits, loss and every gradient."""
import numpy as np
import pytest

import fastlora as fl

torch = pytest.importorskip("torch")
from fastlora.testing.torch_reference import torch_gpt_from, torch_loss  # noqa: E402


@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-9, 1e-11), (np.float32, 2e-4, 2e-5)])
def test_gpt_matches_torch(model_path, dtype, rtol, atol):
    model = fl.GPT(vocab_size=53, embed_dim=24, num_heads=3, num_layers=2, max_seq_len=16, seed=1, dtype=dtype)
    rng = np.random.default_rng(2)
    for p in model.parameters():  # bigger than init so every path matters
        p.data[...] = (rng.standard_normal(p.shape) * 0.3).astype(dtype)
    ids = rng.integers(0, 53, size=(3, 16))
    labels = ids.copy()
    labels[:, :5] = -100
    labels[2, 10:] = -100

    logits = model(ids)
    loss = fl.cross_entropy(logits, labels)
    model.zero_grad()
    loss.backward()

    peer = torch_gpt_from(model)
    t_logits = peer(torch.from_numpy(ids))
    t_loss = torch_loss(t_logits, torch.from_numpy(labels))
    t_loss.backward()

    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), rtol=rtol, atol=atol)
    assert loss.item() == pytest.approx(t_loss.item(), rel=rtol, abs=atol)
    t_grads = dict(peer.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names == list(t_grads)  # same names, same order
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, t_grads[name].grad.numpy(), rtol=rtol * 10, atol=atol,
                                   err_msg=name)
