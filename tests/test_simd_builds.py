"""The AVX2 + FMA builds of the kernels (setup.py's <name>_avx2) against the portable
builds of the same source: the same results up to float rounding (FMA contracts a*b + c)."""
import importlib

import numpy as np
import pytest

import fastlora._ext as ext
from fastlora import kernels
from fastlora._runtime import attention as _attention, gemm as _gemm
from fastlora.optim import kernels as optim_kernels


def _both(name):
    """(portable module, AVX2 module), or skip where this build or CPU has no AVX2 copy."""
    if not ext.SIMD:
        pytest.skip("the CPU lacks AVX2/FMA or FASTLORA_SIMD=0: only the portable builds load")
    try:
        simd = importlib.import_module(f"fastlora._ext.{name}_avx2")
    except ImportError:
        pytest.skip(f"no AVX2 build of {name} (not x86-64, or built with FASTLORA_NATIVE=1)")
    return importlib.import_module(f"fastlora._ext.{name}"), simd


def _run_with(monkeypatch, owner, attr, module, fn):
    monkeypatch.setattr(owner, attr, module)
    out = fn()
    monkeypatch.undo()
    return out if isinstance(out, tuple) else (out,)


def _compare(monkeypatch, name, owner, attr, fn, rtol=1e-5, atol=1e-5):
    portable, simd = _both(name)
    assert getattr(owner, attr) is simd  # what fastlora uses by default on this CPU
    for a, b in zip(_run_with(monkeypatch, owner, attr, portable, fn),
                    _run_with(monkeypatch, owner, attr, simd, fn)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    return {n: rng.standard_normal(s).astype(np.float32)
            for n, s in {"x": (37, 129), "g": (37, 129), "w": (129,), "scores": (6, 45, 45),
                         "q": (2, 45, 24), "k": (2, 45, 24), "v": (2, 45, 24), "logits": (3, 20, 50)}.items()}


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu(monkeypatch, data, approximate):
    x = data["x"] * 4
    x[0, :6] = (-1e4, -10.0, -5.5, 5.5, 10.0, 1e4)  # around and past where erf/tanh round to +-1
    _compare(monkeypatch, "gelu", kernels, "_gelu",
             lambda: (kernels.gelu_forward(x, approximate), kernels.gelu_backward(data["g"], x, approximate)))


def test_layernorm(monkeypatch, data):
    def run():
        out, mean, rstd = kernels.layernorm_forward(data["x"], data["w"], data["w"])
        return (out, mean, rstd) + tuple(kernels.layernorm_backward(data["g"], data["x"], mean, rstd, data["w"]))
    _compare(monkeypatch, "layernorm", kernels, "_ln", run, atol=1e-5)


def test_rmsnorm(monkeypatch, data):
    def run():
        out, rstd = kernels.rmsnorm_forward(data["x"], data["w"])
        return (out, rstd) + kernels.rmsnorm_backward(data["g"], data["x"], rstd, data["w"])
    _compare(monkeypatch, "rmsnorm", kernels, "_rms", run)


def test_silu_mul(monkeypatch, data):
    gate = data["x"] * 8
    gate[0, :6] = (-1e4, -100.0, -30.0, 30.0, 100.0, 1e4)  # past exp's range and where sigmoid rounds to 0/1
    _compare(monkeypatch, "swiglu", kernels, "_swiglu",
             lambda: (kernels.silu_mul_forward(gate, data["w"] * data["x"]),)
             + kernels.silu_mul_backward(data["g"], gate, data["w"] * data["x"]))


def test_rope(monkeypatch, data):
    x = data["q"]  # (2, 45, 24): 3 heads of 8
    cos, sin = np.cos(data["scores"][0, :, :4]), np.sin(data["scores"][0, :, :4])
    _compare(monkeypatch, "rope", kernels, "_rope",
             lambda: (kernels.rope_forward(x, cos, sin, 3), kernels.rope_backward(x, cos, sin, 3)))


def test_causal_softmax(monkeypatch, data):
    def run():
        probs = kernels.causal_softmax_forward(data["scores"], 0.3)
        return probs, kernels.causal_softmax_backward(probs, data["scores"], 0.3)
    _compare(monkeypatch, "attention_softmax", kernels, "_softmax", run)


def test_cross_entropy(monkeypatch, data):
    labels = np.random.default_rng(1).integers(0, 50, size=(3, 20))

    def run():
        loss, _, dlogits = kernels.cross_entropy_forward(data["logits"], labels)
        return np.float32(loss), dlogits
    _compare(monkeypatch, "cross_entropy", kernels, "_ce", run)


def test_fused_attention(monkeypatch, data):
    if not _gemm.fused_available():
        pytest.skip("the fused attention needs NumPy's OpenBLAS")

    def run():
        out, probs = kernels.causal_attention_forward(data["q"], data["k"], data["v"], 3)
        gqa_out, gqa_probs = kernels.causal_attention_forward(data["q"], data["k"][..., :8], data["v"][..., :8], 3, 1)
        return (out, probs, gqa_out, gqa_probs) \
            + kernels.causal_attention_backward(data["q"], probs, data["q"], data["k"], data["v"], 3) \
            + kernels.causal_attention_backward(data["q"], gqa_probs, data["q"], data["k"][..., :8], data["v"][..., :8], 3, 1)
    _compare(monkeypatch, "attention", _attention, "_fused", run, atol=1e-5)


def test_adamw(monkeypatch, data):
    def run():
        p, m, v = data["x"].copy(), np.zeros_like(data["x"]), np.zeros_like(data["x"])
        for step in (1, 2, 3):
            optim_kernels.adamw_update(p, data["g"], m, v, step=step, lr=1e-2, beta1=0.9, beta2=0.999,
                                       eps=1e-8, weight_decay=0.01)
        return p, m, v
    _compare(monkeypatch, "adamw", optim_kernels, "_adamw", run)


def test_lora_linear(monkeypatch, data):
    if not _gemm.fused_available():
        pytest.skip("the fused LoRA kernel needs NumPy's OpenBLAS")
    import fastlora.lora.ops as lora_ops
    from fastlora.autograd.tensor import Tensor
    rng = np.random.default_rng(3)
    W, A, B = (rng.standard_normal(s).astype(np.float32) for s in ((40, 129), (8, 129), (40, 8)))

    def run():
        x, At, Bt = Tensor(data["x"], requires_grad=True), Tensor(A, requires_grad=True), Tensor(B, requires_grad=True)
        out = lora_ops.lora_linear(x, Tensor(W), Tensor(data["w"][:40]), At, Bt, 2.0)
        out.backward(np.ones_like(out.data))
        return out.data, x.grad, At.grad, Bt.grad
    _compare(monkeypatch, "lora_linear", lora_ops, "_lora_linear", run, rtol=1e-4, atol=1e-4)
