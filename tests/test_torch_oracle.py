"""The whole GPT against the same architecture in PyTorch: logits, loss and every gradient;
and the GELU kernels against torch's F.gelu."""
import numpy as np
import pytest

import fastlora as fl
from fastlora import kernels
from fastlora.autograd import Tensor, ops

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



# float32 against torch's float64: the tanh backward's 1 - tanh^2 cancels in float32 as tanh
# nears +-1 (torch's float32 too), which costs it a few 1e-6 around |x| = 5..7
GELU_TOLERANCES = {(np.float64, "none"): (1e-12, 1e-14), (np.float64, "tanh"): (1e-12, 1e-14),
                   (np.float32, "none"): (1e-5, 2e-6), (np.float32, "tanh"): (1e-5, 1e-5)}


@pytest.mark.parametrize("dtype,approximate", list(GELU_TOLERANCES))
@pytest.mark.parametrize("shape", [(1,), (5, 7), (3, 4, 129)])
def test_gelu_matches_torch(dtype, approximate, shape):
    """kernels.gelu_forward/backward and ops.gelu against F.gelu(approximate=...) and its autograd
    in float64, over the body and the tails: +-10 and +-1e4, where erf and tanh round to +-1."""
    rtol, atol = GELU_TOLERANCES[dtype, approximate]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    x.flat[:4] = (-1e4, -10.0, 10.0, 1e4)[:x.size]
    g = rng.standard_normal(shape).astype(dtype)
    tx = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    t_out = torch.nn.functional.gelu(tx, approximate=approximate)
    t_out.backward(torch.from_numpy(g.astype(np.float64)))
    want, want_dx = t_out.detach().numpy(), tx.grad.numpy()

    np.testing.assert_allclose(kernels.gelu_forward(x, approximate), want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(kernels.gelu_backward(g, x, approximate), want_dx, rtol=rtol, atol=atol)
    xt = Tensor(x, requires_grad=True)
    out = ops.gelu(xt, approximate=approximate)
    out.backward(g)
    assert out.data.dtype == xt.grad.dtype == dtype
    np.testing.assert_allclose(out.data, want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(xt.grad, want_dx, rtol=rtol, atol=atol)
