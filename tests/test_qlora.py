"""QLoRA layers: forward equals LoRA on the dequantized weights, float64 gradcheck through the NF4
base, the float weights are really gone (~0.52 bytes/weight held), and bad input gives clear errors."""
import gc
import weakref

import numpy as np
import pytest

import fastlora as fl
from conftest import numerical_grad
from fastlora.autograd.tensor import Tensor
from fastlora.lora import LoRAModel
from fastlora.lora.nf4 import quantize_nf4
from fastlora.lora.ops import lora_linear
from fastlora.lora.qlora import (QLORA_TARGETS, NF4Weight, QLoRALinear, QLoRAModel, apply_qlora,
                                 get_qlora_parameters, nf4_linear)


def _gpt(dtype=np.float32, seed=0, D=64, layers=2):
    return fl.GPT(vocab_size=97, embed_dim=D, num_heads=4, num_layers=layers, max_seq_len=32, seed=seed,
                  dtype=dtype)


def _ids(seed=0, shape=(2, 12)):
    return np.random.default_rng(seed).integers(0, 97, shape)


def _randomize_adapters(lm, seed=0, scale=0.05):
    """Give every B (and A) of the active adapter random values, so the LoRA branch is not zero."""
    rng = np.random.default_rng(seed)
    for p in lm.lora_parameters():
        p.data[...] = rng.normal(0.0, scale, p.shape)


def _lora_twin(qlm, gpt_copy, rank, alpha, targets=QLORA_TARGETS):
    """A float LoRAModel over `gpt_copy` whose targeted weights are the QLoRA model's dequantized ones
    and whose adapters are copies of its adapters."""
    for path, w in qlm.quantized_weights():
        gpt_copy.get_submodule(path).weight.data[...] = w.dequantize()
    twin = LoRAModel(gpt_copy, list(targets), rank=rank, alpha=alpha).inject_lora()
    for a, b in zip(twin.lora_parameters(), qlm.lora_parameters()):
        a.data[...] = b.data
    return twin


@pytest.mark.parametrize("dtype,rtol,atol", [(np.float32, 2e-5, 2e-6), (np.float64, 1e-12, 1e-13)])
def test_forward_and_backward_equal_lora_on_the_dequantized_weights(dtype, rtol, atol):
    base = _gpt(dtype)
    qlm = apply_qlora(base.copy(), rank=4, alpha=8.0)
    _randomize_adapters(qlm)
    twin = _lora_twin(qlm, base.copy(), rank=4, alpha=8.0)
    ids = _ids()
    out_q, out_l = qlm(ids), twin(ids)
    assert out_q.dtype == dtype
    np.testing.assert_allclose(out_q.data, out_l.data, rtol=rtol, atol=atol)
    for out in (out_q, out_l):
        fl.cross_entropy(out, ids).backward()
    for (n, a), b in zip(((n, p) for n, p in qlm.named_parameters() if p.requires_grad), twin.lora_parameters()):
        np.testing.assert_allclose(a.grad, b.grad, rtol=rtol * 10, atol=atol * 10, err_msg=n)


@pytest.mark.parametrize("tiles", [(1, 1), (3, 5), (7, 64), (1000, 1000)])
def test_tile_size_does_not_change_the_result(tiles):
    rng = np.random.default_rng(1)
    W = rng.normal(0, 0.1, (37, 23))  # odd shape: the last tile is short, blocks straddle rows
    x = rng.normal(size=(4, 5, 23))
    g = rng.normal(size=(4, 5, 37))
    dense = quantize_nf4(W, block_size=16).dequantize()
    w = NF4Weight.quantize(W, block_size=16, tile_rows=tiles[0], tile_cols=tiles[1])
    np.testing.assert_allclose(w.matmul(x.reshape(-1, 23)), x.reshape(-1, 23) @ dense.T, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(w.matmul_t(g.reshape(-1, 37)), g.reshape(-1, 37) @ dense, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_float64_gradcheck_of_x_A_B_through_the_nf4_base(rng, p):
    W = rng.normal(0, 0.3, (6, 10))
    w = NF4Weight.quantize(W, block_size=8, tile_rows=4, tile_cols=3)
    x = Tensor(rng.normal(size=(2, 3, 10)), requires_grad=True)
    A = Tensor(rng.normal(size=(3, 10)), requires_grad=True)
    B = Tensor(rng.normal(size=(6, 3)), requires_grad=True)
    bias = Tensor(rng.normal(size=6))
    probe = rng.normal(size=(2, 3, 6))

    def loss():  # the seed fixes the dropout mask, so the function is deterministic
        return float((lora_linear(x, w, bias, A, B, 0.7, p, seed=11).data * probe).sum())

    out = lora_linear(x, w, bias, A, B, 0.7, p, seed=11)
    out.backward(probe)
    for t in (x, A, B):
        np.testing.assert_allclose(t.grad, numerical_grad(loss, t.data), rtol=1e-6, atol=1e-8)


def test_float64_gradcheck_of_the_adapter_free_path(rng):
    w = NF4Weight.quantize(rng.normal(0, 0.3, (5, 7)), block_size=4, tile_rows=2, tile_cols=2)
    x = Tensor(rng.normal(size=(3, 7)), requires_grad=True)
    bias = Tensor(rng.normal(size=5), requires_grad=True)
    probe = rng.normal(size=(3, 5))
    nf4_linear(x, w, bias).backward(probe)
    loss = lambda: float((nf4_linear(x, w, bias).data * probe).sum())  # noqa: E731
    np.testing.assert_allclose(x.grad, numerical_grad(loss, x.data), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(bias.grad, numerical_grad(loss, bias.data), rtol=1e-6, atol=1e-8)
    with pytest.raises(TypeError, match="dtype"):
        nf4_linear(Tensor(x.data.astype(np.float32)), w, None)


def test_layer_without_adapter_and_disabled_lora_use_the_nf4_base(rng):
    lin = fl.nn.Linear(12, 8, rng=rng, dtype=np.float64)
    lin.bias.data[...] = rng.normal(size=8)
    layer = QLoRALinear.from_linear(lin, rank=2, alpha=4.0, block_size=4)
    layer.lora_B["default"].data[...] = 1.0
    x = rng.normal(size=(3, 12))
    base = x @ layer.weight.dequantize().T + lin.bias.data
    with layer.disable_adapter():
        np.testing.assert_allclose(layer(x), base, rtol=1e-12)
    assert not np.allclose(layer(x), base)
    np.testing.assert_allclose(layer(x), base + x @ layer.delta_weight().T, rtol=1e-12)


def _float_arrays(obj, seen=None):
    """Every float ndarray reachable from `obj` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, np.random.Generator)):
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj] if obj.dtype.kind == "f" else []
    children = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        for slot in getattr(type(obj), "__slots__", ()):
            children.append(getattr(obj, slot, None))
    return [a for c in children for a in _float_arrays(c, seen)]


def test_the_float_weights_are_gone_and_half_a_byte_per_weight_is_held():
    gpt = _gpt(D=128)
    targets = [(p, m) for p, m in gpt.named_modules() if p.rsplit(".", 1)[-1] in QLORA_TARGETS]
    refs = [weakref.ref(m.weight.data) for _, m in targets]
    shapes = {m.weight.shape for _, m in targets}
    del targets
    lm = apply_qlora(gpt, rank=4)
    gc.collect()
    assert all(r() is None for r in refs)  # nothing anywhere keeps the float weights alive
    left = [a.shape for a in _float_arrays(lm) if a.ndim == 2 and a.shape in shapes]
    assert left == []  # (the embeddings, V x D and T x D, are other shapes)
    quantized = lm.quantized_weights()
    assert len(quantized) == 6 * 2
    n = sum(w.size for _, w in quantized)
    held = sum(w.nbytes for _, w in quantized)
    assert 0.515 < held / n < 0.52  # 4 bits + an int8 scale per 64 + a float32 per 256 blocks
    assert n == sum(p.size for p in _gpt(D=128).parameters()) - sum(p.size for p in lm.base_parameters())
    assert lm.get_nb_trainable_parameters()[1] == sum(p.size for p in lm.parameters()) + n


def test_without_double_quant_it_is_4_5_bits():
    lm = apply_qlora(_gpt(), rank=2, double_quant=False, target_modules=["fc1"])
    (_, w), = lm.quantized_weights()[:1]
    assert w.nbytes / w.size == pytest.approx(0.5 + 4 / 64)
    assert w.quantized.absmax is not None


def test_only_the_targets_are_quantized_and_names_are_kept():
    gpt = _gpt()
    names = [n for n, _ in gpt.named_parameters()]
    lm = apply_qlora(gpt, rank=2, target_modules=["q_proj", "v_proj"])
    assert {p.rsplit(".", 1)[-1] for p, _ in lm.quantized_weights()} == {"q_proj", "v_proj"}
    kept = [n for n, p in lm.named_parameters() if "lora_" not in n]
    assert kept == [n for n in names if not (n.endswith("q_proj.weight") or n.endswith("v_proj.weight"))]
    assert all(not p.requires_grad for p in lm.base_parameters())
    assert get_qlora_parameters(gpt) == lm.lora_parameters() == get_qlora_parameters(lm)


@pytest.mark.parametrize("bad", [0, -64, 48, 3, 64.0, True, "64", None])
def test_block_size_must_be_a_positive_power_of_two(bad):
    gpt = _gpt()
    with pytest.raises(ValueError, match="power of two"):
        apply_qlora(gpt, block_size=bad)
    assert not any(isinstance(m, QLoRALinear) for m in gpt.modules())
    with pytest.raises(ValueError, match="power of two"):
        QLoRALinear(np.ones((4, 4)), rank=1, block_size=bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_before_anything_changes(value):
    gpt = _gpt()
    gpt.blocks[1].mlp.fc2.weight.data[3, 5] = value
    before = {n: p.data.copy() for n, p in gpt.named_parameters()}
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.weight: w must be finite; w\[3, 5\]"):
        apply_qlora(gpt)
    assert not any(isinstance(m, QLoRALinear) for m in gpt.modules())  # no half-quantized model
    for n, p in gpt.named_parameters():
        np.testing.assert_array_equal(p.data, before[n])
        assert p.requires_grad


def test_other_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="floating-point"):
        QLoRALinear(np.ones((4, 4), dtype=np.int64), rank=1)
    with pytest.raises(ValueError, match="2-D"):
        NF4Weight(quantize_nf4(np.ones(16)))
    with pytest.raises(TypeError, match="NF4Tensor"):
        NF4Weight(np.ones((4, 4)))
    with pytest.raises(ValueError, match="tile_rows"):
        apply_qlora(_gpt(), tile_rows=0)
    with pytest.raises(ValueError, match="double_quant"):
        apply_qlora(_gpt(), double_quant="yes")
    w = NF4Weight.quantize(np.ones((4, 4)))
    w.requires_grad = False  # what LoRALinear does to freeze it
    with pytest.raises(ValueError, match="frozen"):
        w.requires_grad = True
    with pytest.raises(ValueError, match="rank"):
        apply_qlora(_gpt(), rank=65)
    with pytest.raises(ValueError, match="get_qlora|apply_qlora"):
        get_qlora_parameters(_gpt())
    lm = QLoRAModel(_gpt(), rank=2)
    with pytest.raises(RuntimeError, match="inject_lora"):
        lm.quantized_weights()
