"""DoRA: the op's float64 finite differences, the kernels (csrc/dora.pyx) against their NumPy twin
(fastlora.reference.dora), the layer's forward, merge and unmerge, and bad input."""
import numpy as np
import pytest

from conftest import assert_close, kernel_path, kernel_threads, numerical_grad
import fastlora as fl
from fastlora.autograd.tensor import no_grad
from fastlora.lora import LoRALinear, LoRAModel
from fastlora.lora import dora as dora_ops
from fastlora.lora.dora import dora_linear, weight_norm
from fastlora.nn import Parameter
from fastlora.reference import dora as reference

DTYPES = [np.float32, np.float64]


def _operands(rng, dtype, lead=(2, 3), I=5, O=4, R=2):
    x = Parameter(rng.standard_normal(lead + (I,)), dtype=dtype)
    W = Parameter(rng.standard_normal((O, I)), requires_grad=False, dtype=dtype)
    b = Parameter(rng.standard_normal(O), dtype=dtype)
    A = Parameter(rng.standard_normal((R, I)), dtype=dtype)
    B = Parameter(rng.standard_normal((O, R)), dtype=dtype)
    m = Parameter(rng.uniform(0.5, 2.0, O), dtype=dtype)
    return x, W, b, A, B, m


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_x_A_B_magnitude_bias(rng, p, with_bias):
    x, W, b, A, B, m = _operands(rng, np.float64)
    bias = b if with_bias else None
    weights = rng.standard_normal((2, 3, 4))
    s = 1.3
    norm = weight_norm(W.data, A.data, B.data, s)  # a constant of the op, as PEFT detaches it

    def loss():
        return (dora_linear(x, W, bias, A, B, m, s, norm, p, seed=77) * weights).sum()

    tensors = [x, A, B, m] + ([b] if with_bias else [])
    loss().backward()
    assert W.grad is None
    for t in tensors:
        expected = numerical_grad(lambda: float(loss().data), t.data)
        np.testing.assert_allclose(t.grad, expected, rtol=1e-6, atol=1e-8, err_msg=f"shape {t.shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 3, 1), (7, 5, 4, 2), (70, 33, 65, 5), (129, 48, 40, 8)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_op_matches_reference(rng, model_path, dtype, shape, p, contiguous):
    N, I, O, R = shape
    x, W, b, A, B, m = _operands(rng, dtype, lead=(N,), I=I, O=O, R=R)
    if not contiguous:  # x a transposed view, as after a reshape of heads
        x = Parameter(np.ascontiguousarray(x.data.T).T, dtype=dtype)
        assert not x.data.flags.c_contiguous or N == 1
    norm = weight_norm(W.data, A.data, B.data, 0.8)
    assert_close(norm, reference.dora_weight_norm(W.data, A.data, B.data, 0.8), dtype)
    out = dora_linear(x, W, b, A, B, m, 0.8, norm, p, seed=3)
    assert_close(out.data, reference.dora_forward(x.data, W.data, b.data, A.data, B.data, m.data, 0.8, norm, p, 3),
                 dtype, scale=10)
    g = rng.standard_normal((N, O)).astype(dtype)
    out.backward(g)
    want = reference.dora_backward(g, x.data, W.data, A.data, B.data, m.data, 0.8, norm, p, 3)
    for t, w in zip((x, A, B, m, b), want):
        assert_close(t.grad, w, dtype, scale=20 * max(1.0, np.abs(w).max()))


def test_weight_norm_threads_agree(rng, monkeypatch):
    W, A, B = (rng.standard_normal(s).astype(np.float32) for s in ((300, 70), (4, 70), (300, 4)))
    with kernel_path(True):
        one = weight_norm(W, A, B, 2.0)
        with kernel_threads(2, monkeypatch):
            two = weight_norm(W, A, B, 2.0)
    np.testing.assert_array_equal(one, two)


def test_dropout_free_op_runs_the_kernels(rng, monkeypatch):
    with kernel_path(True):
        calls = []
        for name in ("dora_forward", "dora_backward"):
            original = getattr(dora_ops._dora, name)
            monkeypatch.setattr(dora_ops._dora, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a),
                                raising=False)
        x, W, b, A, B, m = _operands(rng, np.float32)
        norm = weight_norm(W.data, A.data, B.data, 1.0)
        dora_linear(x, W, b, A, B, m, 1.0, norm).sum().backward()
        assert calls == ["dora_forward", "dora_backward"]
        calls.clear()
        dora_linear(x, W, b, A, B, m, 1.0, norm, dropout_p=0.2, seed=1).sum().backward()
        assert calls == []


def test_op_rejects_bad_input(rng):
    x, W, b, A, B, m = _operands(rng, np.float32)
    norm = weight_norm(W.data, A.data, B.data, 1.0)
    with pytest.raises(ValueError, match=r"magnitude must be \(4,\) float32"):
        dora_linear(x, W, b, A, B, Parameter(np.ones(3, np.float32)), 1.0, norm)
    with pytest.raises(ValueError, match=r"magnitude must be \(4,\) float32"):
        dora_linear(x, W, b, A, B, Parameter(np.ones(4)), 1.0, norm)
    with pytest.raises(ValueError, match=r"weight_norm must be an ndarray \(4,\)"):
        dora_linear(x, W, b, A, B, m, 1.0, norm[:2])
    with pytest.raises(TypeError, match="DoRA needs a dense weight Tensor"):
        dora_linear(x, W.data, b, A, B, m, 1.0, norm)
    with pytest.raises(ValueError, match="lora_A must be"):
        dora_linear(x, W, b, Parameter(np.zeros((2, 4), np.float32)), B, m, 1.0, norm)
    with pytest.raises(TypeError, match="share one dtype"):
        weight_norm(W.data, A.data.astype(np.float64), B.data, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        weight_norm(W.data, A.data, B.data[:3], 1.0)
    with no_grad():
        assert not dora_linear(x, W, b, A, B, m, 1.0, norm).requires_grad


# --- the layer ---------------------------------------------------------------------------------

def test_layer_forward_is_the_rescaled_weight_and_merges_exactly():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 5))
    layer = LoRALinear(W, rank=2, alpha=3.0, bias=rng.standard_normal(6), use_dora=True)
    m = layer.lora_magnitude_vector["default"]
    np.testing.assert_allclose(m.data, np.linalg.norm(W, axis=1), rtol=1e-12)  # f = 1: a no-op at first
    x = rng.standard_normal((4, 5))
    np.testing.assert_allclose(layer.forward(x), x @ W.T + layer.bias.data, rtol=1e-12)
    layer.lora_B["default"].data[...] = rng.standard_normal((6, 2))
    m.data[...] = rng.uniform(0.5, 2, 6)
    adapted = W + 1.5 * layer.lora_B["default"].data @ layer.lora_A["default"].data
    W_dora = (m.data / np.linalg.norm(adapted, axis=1))[:, None] * adapted
    want = x @ W_dora.T + layer.bias.data
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12)
    np.testing.assert_allclose(layer.merged_weight(), W_dora, rtol=1e-12)
    assert [p.shape for p in layer.lora_parameters()] == [(2, 5), (6, 2), (6,)]
    layer.merge()
    np.testing.assert_allclose(layer.weight.data, W_dora, rtol=1e-12)
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data, W, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12)


def test_model_trains_magnitude_and_merges_in_float32():
    gpt = fl.GPT(vocab_size=30, embed_dim=16, num_heads=2, num_layers=1, max_seq_len=8, seed=2)
    lm = LoRAModel(gpt, ["q_proj", "fc1"], rank=2, alpha=4, use_dora=True).inject_lora()
    names = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert "blocks.0.attn.q_proj.lora_magnitude_vector.default" in names and len(names) == 6
    ids = np.random.default_rng(0).integers(0, 30, (2, 8))
    opt = fl.AdamW(lm.lora_parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        fl.cross_entropy(lm(ids), ids).backward()
        opt.step()
    m = lm.get_submodule("blocks.0.attn.q_proj").lora_magnitude_vector["default"]
    assert not np.allclose(m.data, np.linalg.norm(lm.get_submodule("blocks.0.attn.q_proj").weight.data, axis=1))
    lm.eval()
    want = lm(ids).data
    before = lm.get_submodule("blocks.0.mlp.fc1").weight.data.copy()
    lm.merge_adapter()
    np.testing.assert_allclose(lm(ids).data, want, rtol=1e-5, atol=1e-6)
    lm.unmerge_adapter()
    np.testing.assert_allclose(lm.get_submodule("blocks.0.mlp.fc1").weight.data, before, rtol=1e-5, atol=1e-6)
    merged = lm.merge_and_unload()
    np.testing.assert_allclose(merged(ids).data, want, rtol=1e-5, atol=1e-6)


def test_dora_on_a_quantized_base_is_refused_and_changes_nothing():
    gpt = fl.GPT(vocab_size=30, embed_dim=16, num_heads=2, num_layers=1, max_seq_len=8)
    with pytest.raises(ValueError, match="adapter 'default': use_dora is not supported on a quantized"):
        fl.lora.QLoRAModel(gpt, ["q_proj"], rank=2, use_dora=True)
    assert not any(isinstance(m, LoRALinear) for _, m in gpt.named_modules())
    qlm = fl.apply_qlora(gpt, rank=2, target_modules=["q_proj"], block_size=16)
    with pytest.raises(ValueError, match="adapter 'd': use_dora is not supported"):
        qlm.add_adapter("d", rank=2, use_dora=True)
    assert qlm.adapters == ["default"]
    with pytest.raises(TypeError, match="adapter 'default': use_dora must be a bool"):
        LoRAModel(fl.GPT(vocab_size=30, embed_dim=16, num_heads=2, num_layers=1, max_seq_len=8), ["fc1"],
                  use_dora="yes")


def test_avx2_build_matches_the_portable_one(rng, monkeypatch):
    """setup.py builds csrc/dora.pyx twice (see SIMD_KERNELS); both give the same numbers up to FMA rounding."""
    import importlib

    import fastlora._ext as ext
    if not ext.SIMD:
        pytest.skip("the CPU lacks AVX2/FMA or FASTLORA_SIMD=0: only the portable build loads")
    try:
        builds = [importlib.import_module(f"fastlora._ext.dora{suffix}") for suffix in ("", "_avx2")]
    except ImportError:
        pytest.skip("no AVX2 build of dora (not x86-64, or built with FASTLORA_NATIVE=1)")
    results = []
    with kernel_path(True):
        for build in builds:
            monkeypatch.setattr(dora_ops, "_dora", build)
            x, W, b, A, B, m = _operands(np.random.default_rng(3), np.float32, lead=(37,), I=29, O=41, R=4)
            norm = weight_norm(W.data, A.data, B.data, 0.5)
            out = dora_linear(x, W, b, A, B, m, 0.5, norm)
            out.backward(np.ones_like(out.data))
            results.append([norm, out.data] + [t.grad for t in (x, A, B, m)])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
