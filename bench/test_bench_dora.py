"""DoRA speed: the fused op (csrc/dora.pyx) against its general path (separate BLAS products), its
NumPy twin, plain LoRA's fused op, and PyTorch with PEFT's DoRA formula, on one layer.

    python -m pytest bench/test_bench_dora.py --benchmark-group-by=group --benchmark-columns=median,ops

The layer is a q_proj of the base workload (N = batch * seq_len rows, D = embed_dim), rank 8,
alpha 16; one step is forward + backward (dx, dA, dB, dm) with the row norm computed first, as
the layer does each call. Every fastlora variant is checked against the twin before it is timed.
"""
import numpy as np
import pytest

from fastlora.lora import dora as dora_ops
from fastlora.lora.dora import dora_linear, weight_norm
from fastlora.lora.ops import lora_linear
from fastlora.nn import Parameter
from fastlora.reference import dora as reference
from test_bench_lora import SCALING
from test_bench_lora import _layer as lora_layer


def _layer(seed=0):
    """bench/test_bench_lora.py's layer, plus a magnitude 10% above W's row norms."""
    x, W, b, A, B, g = lora_layer(seed)
    m = np.linalg.norm(W, axis=1).astype(np.float32) * 1.1
    return x, W, b, A, B, m, g


def _step(x, W, b, A, B, m, g, dora=True):
    xt, At, Bt, mt = Parameter(x), Parameter(A), Parameter(B), Parameter(m)
    Wt, bt = Parameter(W, requires_grad=False), Parameter(b, requires_grad=False)

    def step():
        xt.grad = At.grad = Bt.grad = mt.grad = None
        if dora:
            out = dora_linear(xt, Wt, bt, At, Bt, mt, SCALING, weight_norm(W, A, B, SCALING))
        else:
            out = lora_linear(xt, Wt, bt, At, Bt, SCALING)
        out.backward(g)
        return out, xt.grad, At.grad, Bt.grad, mt.grad

    return step


@pytest.mark.benchmark(group="dora-layer")
@pytest.mark.parametrize("variant", ["fused", "fused, kernel off", "numpy twin", "lora (no DoRA)"])
def test_dora_layer_forward_backward(benchmark, monkeypatch, variant):
    x, W, b, A, B, m, g = _layer()
    norm = reference.dora_weight_norm(W, A, B, SCALING)
    if variant == "numpy twin":
        def step():
            return (reference.dora_forward(x, W, b, A, B, m, SCALING, norm),
                    reference.dora_backward(g, x, W, A, B, m, SCALING, norm))
        benchmark(step)
        return
    if variant == "fused, kernel off":
        monkeypatch.setattr(dora_ops, "_fused", lambda dtype: False)
    step = _step(x, W, b, A, B, m, g, dora=variant != "lora (no DoRA)")
    if variant != "lora (no DoRA)":
        out, dx, dA, dB, dm = step()
        np.testing.assert_allclose(out.data, reference.dora_forward(x, W, b, A, B, m, SCALING, norm),
                                   rtol=1e-4, atol=1e-4)
        for got, want in zip((dx, dA, dB, dm), reference.dora_backward(g, x, W, A, B, m, SCALING, norm)):
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    benchmark(step)
    benchmark.extra_info["rows"] = x.shape[0]


@pytest.mark.benchmark(group="dora-layer")
def test_dora_layer_torch(benchmark):
    """PEFT's DoRA forward (DoraLinearLayer) written out in torch: norm detached, one step."""
    torch = pytest.importorskip("torch")
    x, W, b, A, B, m, g = (torch.from_numpy(a) for a in _layer())
    for t in (x, A, B, m):
        t.requires_grad_(True)

    def step():
        x.grad = A.grad = B.grad = m.grad = None
        norm = torch.linalg.norm(W + SCALING * (B @ A).detach(), dim=1).detach()
        scale = (m / norm).view(1, -1)
        base = torch.nn.functional.linear(x, W)
        out = base + b + (scale - 1) * base + scale * (SCALING * (x @ A.T) @ B.T)
        out.backward(g)

    benchmark(step)
