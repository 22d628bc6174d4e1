"""LoRALinear: the seed's level-3 API, initialisation, scaling, adapters on one layer, bad input."""
import numpy as np
import pytest

from fastlora.autograd.tensor import Tensor
from fastlora.lora import LoRALinear
from fastlora.nn import Linear


def test_seed_api_forward_parameters_merged_weight():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 6))
    layer = LoRALinear(W, rank=4, alpha=1.0)
    x = rng.standard_normal((5, 6))
    out = layer.forward(x)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, x @ W.T)  # B starts at zero: no change at all
    A, B = layer.lora_parameters()
    assert A.shape == (4, 6) and B.shape == (8, 4) and len(layer.lora_parameters()) == 2
    B.data[...] = rng.standard_normal((8, 4))
    expected = x @ W.T + (1.0 / 4) * x @ A.data.T @ B.data.T  # the seed's forward formula
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12)
    np.testing.assert_allclose(layer.merged_weight(), W + (1.0 / 4) * B.data @ A.data, rtol=1e-12)
    np.testing.assert_allclose(layer.delta_weight(), (1.0 / 4) * B.data @ A.data, rtol=1e-12)
    np.testing.assert_array_equal(layer.weight.data, W)  # merged_weight() does not touch W
    assert not layer.weight.requires_grad and A.requires_grad and B.requires_grad


def test_the_weight_is_copied_from_an_array_but_shared_from_a_linear():
    W = np.ones((3, 4), np.float32)
    layer = LoRALinear(W, rank=2)
    layer.weight.data += 1
    assert W[0, 0] == 1.0  # the caller's array is not modified by a merge
    lin = Linear(4, 3, rng=np.random.default_rng(0))
    wrapped = LoRALinear.from_linear(lin, rank=2, alpha=4)
    assert wrapped.weight is lin.weight and wrapped.bias is lin.bias
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert [n for n, _ in wrapped.named_parameters()] == ["weight", "bias", "lora_A.default", "lora_B.default"]


def test_kaiming_uniform_A_and_zero_B():
    layer = LoRALinear(np.zeros((64, 400)), rank=16, seed=3)
    A, B = layer.lora_parameters()
    bound = 1 / np.sqrt(400)
    assert np.all(np.abs(A.data) <= bound) and np.abs(A.data).max() > 0.9 * bound
    assert abs(A.data.std() - bound / np.sqrt(3)) < 0.05 * bound  # uniform on [-b, b]
    assert np.all(B.data == 0)
    again = LoRALinear(np.zeros((64, 400)), rank=16, seed=3)
    np.testing.assert_array_equal(again.lora_A["default"].data, A.data)  # seeded


@pytest.mark.parametrize("use_rslora,expected", [(False, 6.0 / 9), (True, 6.0 / 3)])
def test_scaling(use_rslora, expected):
    layer = LoRALinear(np.zeros((10, 12)), rank=9, alpha=6.0, use_rslora=use_rslora)
    assert layer.scaling() == pytest.approx(expected)


def test_tensor_in_tensor_out_with_bias_and_dtype():
    W = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    layer = LoRALinear(W, rank=2, bias=np.arange(3.0))
    assert layer.bias.dtype == np.float32 and layer.weight.dtype == np.float32
    y = layer(Tensor(np.ones((2, 4), np.float32), requires_grad=True))
    assert isinstance(y, Tensor) and y.requires_grad and y.dtype == np.float32
    np.testing.assert_allclose(y.data, np.ones((2, 4)) @ W.T + np.arange(3.0), rtol=1e-6)
    assert layer.forward(np.ones((2, 4))).dtype == np.float32  # arrays are cast to the weight dtype


def test_dropout_only_in_training():
    rng = np.random.default_rng(2)
    layer = LoRALinear(rng.standard_normal((5, 8)), rank=2, dropout=0.5)
    layer.lora_B["default"].data[...] = rng.standard_normal((5, 2))
    x = rng.standard_normal((30, 8))
    a, b = layer.forward(x), layer.forward(x)
    assert not np.allclose(a, b)  # a fresh mask per call
    layer.eval()
    np.testing.assert_allclose(layer.forward(x), x @ layer.merged_weight().T, rtol=1e-12)


def test_several_adapters_on_one_layer():
    rng = np.random.default_rng(3)
    layer = LoRALinear(rng.standard_normal((6, 5)), rank=2, alpha=2.0)
    layer.add_adapter("other", rank=3, alpha=6.0)
    assert layer.active_adapter == "default"
    assert not layer.lora_A["other"].requires_grad  # only the active adapter trains
    for name in ("default", "other"):
        layer.lora_B[name].data[...] = rng.standard_normal(layer.lora_B[name].shape)
    x = rng.standard_normal((4, 5))
    y_default = layer.forward(x)
    layer.set_adapter("other")
    assert layer.lora_A["other"].requires_grad and not layer.lora_A["default"].requires_grad
    np.testing.assert_allclose(layer.forward(x), x @ layer.merged_weight("other").T, rtol=1e-12)
    assert not np.allclose(layer.forward(x), y_default)
    with layer.disable_adapter():
        np.testing.assert_allclose(layer.forward(x), x @ layer.weight.data.T, rtol=1e-12)
    layer.delete_adapter("other")
    assert layer.active_adapter is None and "other" not in layer.lora_A
    np.testing.assert_allclose(layer.forward(x), x @ layer.weight.data.T, rtol=1e-12)


def test_layer_merge_unmerge():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((6, 5)).astype(np.float32)
    layer = LoRALinear(W, rank=2, alpha=3.0)
    layer.lora_B["default"].data[...] = rng.standard_normal((6, 2))
    x = rng.standard_normal((3, 5)).astype(np.float32)
    before = layer.forward(x)
    layer.merge()
    np.testing.assert_allclose(layer.forward(x), before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    with pytest.raises(ValueError, match="merged into the weight"):
        layer.disable_lora()
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data, W, atol=1e-6)
    with pytest.raises(ValueError, match="nothing to unmerge"):
        layer.unmerge()
    lin = layer.to_linear()
    assert isinstance(lin, Linear) and lin.weight is layer.weight


@pytest.mark.parametrize("kwargs,error,match", [
    ({"rank": 0}, ValueError, r"rank must be >= 1, got 0"),
    ({"rank": -2}, ValueError, r"rank must be >= 1, got -2"),
    ({"rank": 5}, ValueError, r"rank must be <= min\(in_features, out_features\) = 4"),
    ({"rank": 2.0}, TypeError, r"rank must be an int"),
    ({"alpha": 0}, ValueError, r"alpha must be > 0"),
    ({"alpha": -1.0}, ValueError, r"alpha must be > 0"),
    ({"alpha": float("nan")}, ValueError, r"alpha must be > 0 and finite"),
    ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
    ({"bias": np.zeros(5)}, ValueError, r"bias must have shape \(6,\)"),
    ({"adapter_name": "a.b"}, ValueError, r"adapter name must be"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRALinear(np.zeros((6, 4)), **{"rank": 2, **kwargs})


def test_bad_arguments_change_nothing():
    lin = Linear(4, 3, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        LoRALinear.from_linear(lin, rank=9)
    assert lin.weight.requires_grad and lin.bias.requires_grad  # not frozen by a refused wrap
    layer = LoRALinear.from_linear(lin, rank=2)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default")
    with pytest.raises(ValueError, match=r"rank must be <= min"):
        layer.add_adapter("big", rank=4)
    assert layer.lora_A.keys() == ["default"]
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        layer.set_adapter("nope")
    with pytest.raises(TypeError, match="from_linear needs a fastlora Linear"):
        LoRALinear.from_linear(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 4\)"):
        layer.forward(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="2-D"):
        LoRALinear(np.zeros(4))
