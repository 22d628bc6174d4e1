"""LoRA speed: the fused op against the same math from separate autograd ops and against PyTorch,
the dropout kernel against NumPy, and a LoRA GPT's forward + backward against PyTorch + LoRA.

    python -m pytest bench/test_bench_lora.py --benchmark-group-by=group --benchmark-columns=median,ops

The layer shape is a q_proj of the base workload: N = batch * seq_len rows, D = embed_dim,
rank 8, alpha 16 (docs/DESIGN.md). Every fastlora variant is checked against the NumPy reference
before it is timed.
"""
import numpy as np
import pytest

import fastlora as fl
from fastlora.autograd import ops
from fastlora.autograd.tensor import Tensor
from fastlora.lora import LoRAModel, kernels
from fastlora.lora.ops import lora_linear
from fastlora.nn import Parameter
from fastlora.reference import lora as reference
from workloads import WORKLOADS, batch, model_config

RANK, ALPHA = 8, 16.0
SCALING = ALPHA / RANK


def _layer(seed=0):
    w = WORKLOADS["base"]
    N, D = w["batch_size"] * w["max_seq_len"], w["embed_dim"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    W = (rng.standard_normal((D, D)) * 0.02).astype(np.float32)
    b = np.zeros(D, np.float32)
    A = (rng.standard_normal((RANK, D)) * 0.05).astype(np.float32)
    B = (rng.standard_normal((D, RANK)) * 0.05).astype(np.float32)
    g = rng.standard_normal((N, D)).astype(np.float32)
    return x, W, b, A, B, g


def _fused(x, W, b, A, B, g, p):
    xt, At, Bt = Tensor(x, requires_grad=True), Parameter(A), Parameter(B)
    Wt, bt = Parameter(W, requires_grad=False), Parameter(b, requires_grad=False)

    def step():
        xt.grad = At.grad = Bt.grad = None
        out = lora_linear(xt, Wt, bt, At, Bt, SCALING, p, seed=7)
        out.backward(g)
        return out, xt.grad, At.grad, Bt.grad

    return step


def _unfused(x, W, b, A, B, g, p):
    """The same layer composed from the generic autograd ops (linear, dropout, mul, add)."""
    xt, At, Bt = Tensor(x, requires_grad=True), Parameter(A), Parameter(B)
    Wt, bt = Parameter(W, requires_grad=False), Parameter(b, requires_grad=False)
    rng = np.random.default_rng(7)

    def step():
        xt.grad = At.grad = Bt.grad = None
        lora = ops.linear(ops.linear(ops.dropout(xt, p, True, rng), At), Bt)
        out = ops.linear(xt, Wt, bt) + lora * SCALING
        out.backward(g)
        return out, xt.grad, At.grad, Bt.grad

    return step


@pytest.mark.benchmark(group="lora-layer")
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("variant", ["fused", "fused, kernel off", "unfused"])
def test_lora_layer_forward_backward(benchmark, monkeypatch, variant, p):
    """"fused, kernel off" is the op's general path (separate BLAS products), which a dense,
    dropout-free layer leaves for csrc/lora_linear.pyx."""
    import fastlora.lora.ops as lora_ops
    if variant == "fused, kernel off":
        monkeypatch.setattr(lora_ops, "_fused_kernel_takes", lambda *args: False)
    x, W, b, A, B, g = _layer()
    step = (_unfused if variant == "unfused" else _fused)(x, W, b, A, B, g, p)
    out, dx, dA, dB = step()
    if variant != "unfused":  # same mask as the reference: validate before timing
        np.testing.assert_allclose(out.data, reference.lora_linear_forward(x, W, b, A, B, SCALING, p, 7),
                                   rtol=1e-4, atol=1e-4)
        for got, want in zip((dx, dA, dB), reference.lora_linear_backward(g, x, W, A, B, SCALING, p, 7)):
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    benchmark(step)
    benchmark.extra_info["rows"] = x.shape[0]


@pytest.mark.benchmark(group="lora-layer")
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_layer_torch(benchmark, p):
    torch = pytest.importorskip("torch")
    x, W, b, A, B, g = (torch.from_numpy(a) for a in _layer())
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)

    def step():
        x.grad = A.grad = B.grad = None
        xin = torch.nn.functional.dropout(x, p, True) if p else x
        out = torch.nn.functional.linear(x, W, b) + SCALING * (xin @ A.T) @ B.T
        out.backward(g)

    benchmark(step)


@pytest.mark.benchmark(group="lora-dropout")
@pytest.mark.parametrize("impl", ["kernel", "numpy-generator"])
def test_dropout_forward(benchmark, impl):
    x = _layer()[0]
    if impl == "kernel":
        np.testing.assert_array_equal(kernels.lora_dropout_forward(x, 0.1, 3),
                                      reference.lora_dropout_forward(x, 0.1, 3))
        benchmark(kernels.lora_dropout_forward, x, 0.1, 3)
    else:
        rng = np.random.default_rng(3)
        benchmark(lambda: x * ((rng.random(x.shape) >= 0.1).astype(np.float32) / np.float32(0.9)))


def _torch_lora(torch, linear, A, B):
    """Wrap a torch Linear as PEFT does: base(x) + scaling * B(A(x)), base frozen."""
    class LoRA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = linear.requires_grad_(False)
            self.A = torch.nn.Parameter(torch.from_numpy(A.copy()))
            self.B = torch.nn.Parameter(torch.from_numpy(B.copy()))

        def forward(self, x):
            return self.base(x) + SCALING * (x @ self.A.T) @ self.B.T

    return LoRA()


def _lora_gpt(workload):
    lm = LoRAModel(fl.GPT(**model_config(workload), seed=0), ["q_proj", "v_proj"], rank=RANK, alpha=ALPHA)
    lm.inject_lora()
    rng = np.random.default_rng(1)
    for p in lm.lora_parameters():  # B non-zero, as after some training
        p.data[...] = (rng.standard_normal(p.shape) * 0.02).astype(np.float32)
    return lm


@pytest.mark.benchmark(group="lora-gpt")
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_lora_gpt_forward_backward(benchmark, workload):
    lm = _lora_gpt(workload)
    ids, labels = batch(workload)

    def step():
        lm.zero_grad()
        loss = fl.cross_entropy(lm(ids), labels)
        loss.backward()
        return loss.item()

    assert np.isfinite(benchmark(step))
    benchmark.extra_info["tokens_per_step"] = ids.size


@pytest.mark.benchmark(group="lora-gpt")
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_lora_gpt_torch(benchmark, workload):
    torch = pytest.importorskip("torch")
    from fastlora.testing.torch_reference import torch_gpt_from, torch_loss
    lm = _lora_gpt(workload)
    peer = torch_gpt_from(fl.GPT(**model_config(workload), seed=0))  # the LoRA model's base weights
    peer.requires_grad_(False)
    for path, layer in lm.named_modules():
        if hasattr(layer, "lora_A"):
            parent, _, name = path.rpartition(".")
            holder = peer.get_submodule(parent)
            setattr(holder, name, _torch_lora(torch, getattr(holder, name), layer.lora_A["default"].data,
                                              layer.lora_B["default"].data))
    ids, labels = (torch.from_numpy(a) for a in batch(workload))
    with torch.no_grad():  # the peer computes the same loss: validate before timing
        want = torch_loss(peer(ids), labels).item()
    assert want == pytest.approx(fl.cross_entropy(lm(ids.numpy()), labels.numpy()).item(), rel=1e-4)

    def step():
        peer.zero_grad(set_to_none=True)
        loss = torch_loss(peer(ids), labels)
        loss.backward()
        return loss.item()

    assert np.isfinite(benchmark(step))
    benchmark.extra_info["tokens_per_step"] = int(ids.numel())
