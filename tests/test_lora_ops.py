"""The fused LoRA op and its dropout kernel: finite differences, the NumPy twin, bad input."""
import numpy as np
import pytest

from conftest import assert_close, numerical_grad
from fastlora.autograd.tensor import Tensor, no_grad
from fastlora.lora import kernels
from fastlora.lora.ops import lora_linear
from fastlora.nn import Parameter
from fastlora.reference import lora as reference

DTYPES = [np.float32, np.float64]


def _operands(rng, dtype, lead=(2, 3), I=5, O=4, R=2, scale=1.0):
    x = Parameter(rng.standard_normal(lead + (I,)) * scale, dtype=dtype)
    W = Parameter(rng.standard_normal((O, I)), requires_grad=False, dtype=dtype)
    b = Parameter(rng.standard_normal(O), dtype=dtype)
    A = Parameter(rng.standard_normal((R, I)), dtype=dtype)
    B = Parameter(rng.standard_normal((O, R)), dtype=dtype)  # non-zero so every path carries signal
    return x, W, b, A, B


# --- float64 central finite differences ------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_x_A_B_bias(rng, p, with_bias):
    x, W, b, A, B = _operands(rng, np.float64)
    bias = b if with_bias else None
    weights = rng.standard_normal((2, 3, 4))
    scaling = 1.7

    def loss():  # the seed fixes the dropout mask, so the function is deterministic
        return (lora_linear(x, W, bias, A, B, scaling, p, seed=12345) * weights).sum()

    tensors = [x, A, B] + ([b] if with_bias else [])
    for t in tensors:
        t.grad = None
    loss().backward()
    assert W.grad is None  # the frozen base weight gets no gradient
    for t in tensors:
        expected = numerical_grad(lambda: float(loss().data), t.data)
        np.testing.assert_allclose(t.grad, expected, rtol=1e-6, atol=1e-8, err_msg=f"shape {t.shape}")


def test_gradcheck_unfrozen_base_weight(rng):
    """A caller who unfreezes W on purpose gets dW too."""
    x, W, b, A, B = _operands(rng, np.float64)
    W.requires_grad = True
    weights = rng.standard_normal((2, 3, 4))

    def loss():
        return (lora_linear(x, W, b, A, B, 0.5) * weights).sum()

    loss().backward()
    np.testing.assert_allclose(W.grad, numerical_grad(lambda: float(loss().data), W.data), rtol=1e-6, atol=1e-8)


def test_fresh_adapter_is_the_base_layer(rng):
    x, W, b, A, _ = _operands(rng, np.float64)
    B = Parameter(np.zeros((4, 2)))
    out = lora_linear(x, W, b, A, B, 2.0)
    np.testing.assert_array_equal(out.data, x.data @ W.data.T + b.data)


# --- the op against its NumPy twin --------------------------------------------------------------

# (N, I, O, R): N around csrc/lora_linear.pyx's 32-row chunks and two threads' blocks (1, 3,
# 64, 70, 97); R of 8 and 17 for small_gemm.h's 8-column block and its tail
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 5, 2), (2, 17, 33, 8), (64, 96, 40, 4), (70, 40, 50, 8),
                                   (97, 24, 36, 17)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_op_matches_reference(rng, model_path, dtype, shape, p, contiguous):
    N, I, O, R = shape
    x = rng.standard_normal((N, I)).astype(dtype)
    W, b = rng.standard_normal((O, I)).astype(dtype), rng.standard_normal(O).astype(dtype)
    A, B = rng.standard_normal((R, I)).astype(dtype), rng.standard_normal((O, R)).astype(dtype)
    g = rng.standard_normal((N, O)).astype(dtype)
    xin = x if contiguous else np.asfortranarray(x)  # same values, another memory layout
    xt = Tensor(xin, requires_grad=True)
    At, Bt, bt = Parameter(A), Parameter(B), Parameter(b)
    out = lora_linear(xt, Tensor(W), bt, At, Bt, 0.75, p, seed=99)
    out.backward(g)
    assert out.dtype == dtype and xt.grad.dtype == dtype
    scale = 10 * max(1, np.sqrt(I * O) / 8)  # float32 sums of many products round more
    assert_close(out.data, reference.lora_linear_forward(x, W, b, A, B, 0.75, p, 99), scale=scale)
    dx, dA, dB, db = reference.lora_linear_backward(g, x, W, A, B, 0.75, p, 99)
    for got, want, name in [(xt.grad, dx, "dx"), (At.grad, dA, "dA"), (Bt.grad, dB, "dB"), (bt.grad, db, "db")]:
        assert_close(got, want, scale=scale * 10, err_msg=name)


@pytest.mark.parametrize("trainable", ["A, B", "x, B", "B"])
def test_op_gradients_when_only_some_operands_train(rng, model_path, trainable):
    """The fused backward (A and B both train) skips dx for a frozen input; the other cases
    take the general path. Either way each trained operand gets the twin's gradient."""
    N, I, O, R = 45, 20, 30, 8
    x = rng.standard_normal((N, I)).astype(np.float32)
    W, b = rng.standard_normal((O, I)).astype(np.float32), rng.standard_normal(O).astype(np.float32)
    A, B = rng.standard_normal((R, I)).astype(np.float32), rng.standard_normal((O, R)).astype(np.float32)
    g = rng.standard_normal((N, O)).astype(np.float32)
    xt = Tensor(x, requires_grad="x" in trainable)
    At, Bt = Parameter(A, requires_grad="A" in trainable), Parameter(B)
    lora_linear(xt, Tensor(W), Tensor(b), At, Bt, 0.5).backward(g)
    dx, dA, dB, _ = reference.lora_linear_backward(g, x, W, A, B, 0.5)
    for t, want, name in [(xt, dx, "x"), (At, dA, "A"), (Bt, dB, "B")]:
        if name in trainable:
            assert_close(t.grad, want, scale=100, err_msg=name)
        else:
            assert t.grad is None, name


def test_dense_dropout_free_op_runs_the_fused_kernel(rng, monkeypatch):
    """The cases the fused kernel takes: dense, no dropout, with OpenBLAS callable."""
    import fastlora.lora.ops as lora_ops
    from fastlora._runtime import gemm as _gemm
    if not _gemm.fused_available():
        pytest.skip("no callable OpenBLAS: only NumPy's path exists here")
    calls = []
    for name in ("_fused_forward", "_fused_backward"):
        original = getattr(lora_ops, name)
        monkeypatch.setattr(lora_ops, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x, W, b, A, B = _operands(rng, np.float32)
    lora_linear(x, W, b, A, B, 1.0).sum().backward()
    assert calls == ["_fused_forward", "_fused_backward"]
    calls.clear()
    lora_linear(x, W, b, A, B, 1.0, dropout_p=0.2, seed=1).sum().backward()
    assert calls == []  # dropout: the general path


def test_op_keeps_leading_axes_and_no_graph_under_no_grad(rng):
    x, W, b, A, B = _operands(rng, np.float32, lead=(2, 3, 4))
    out = lora_linear(x, W, b, A, B, 1.0)
    assert out.shape == (2, 3, 4, 4) and out.requires_grad
    with no_grad():
        assert not lora_linear(x, W, b, A, B, 1.0).requires_grad


def test_gradients_accumulate(rng):
    x, W, b, A, B = _operands(rng, np.float64)
    lora_linear(x, W, b, A, B, 1.0).sum().backward()
    first = A.grad.copy()
    lora_linear(x, W, b, A, B, 1.0).sum().backward()
    np.testing.assert_allclose(A.grad, 2 * first)


class _ProductOnly:
    """A base weight known only through its products, as a quantized weight would be."""

    def __init__(self, W):
        self.W, self.shape, self.dtype = W, W.shape, W.dtype

    def matmul(self, x2):
        return x2 @ self.W.T

    def matmul_t(self, g2):
        return g2 @ self.W


def test_base_weight_can_be_any_object_with_the_two_products(rng):
    x, W, b, A, B = _operands(rng, np.float64)
    g = rng.standard_normal((2, 3, 4))
    dense = lora_linear(x, W, b, A, B, 0.5)
    dense.backward(g)
    grads = [t.grad.copy() for t in (x, A, B, b)]
    for t in (x, A, B, b):
        t.grad = None
    other = lora_linear(x, _ProductOnly(W.data), b, A, B, 0.5)
    other.backward(g)
    np.testing.assert_allclose(other.data, dense.data, rtol=1e-12)
    for t, want in zip((x, A, B, b), grads):
        np.testing.assert_allclose(t.grad, want, rtol=1e-12)


def test_op_rejects_bad_input(rng):
    x, W, b, A, B = _operands(rng, np.float32)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 5\)"):
        lora_linear(Tensor(np.zeros((2, 6), np.float32)), W, b, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, W, b, Parameter(np.zeros((2, 4), np.float32)), B, 1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, W, b, A, Parameter(np.zeros((4, 3), np.float32)), 1.0)
    with pytest.raises(TypeError, match="lora_A has dtype float64"):
        lora_linear(x, W, b, Parameter(A.data.astype(np.float64)), B, 1.0)
    with pytest.raises(ValueError, match=r"bias must be \(4,\)"):
        lora_linear(x, W, Parameter(np.zeros(3, np.float32)), A, B, 1.0)
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        lora_linear(x, W, b, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="x must be a Tensor"):
        lora_linear(x.data, W, b, A, B, 1.0)


# --- the dropout kernel against its twin ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 5), (3, 4, 129), (256, 300)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.95])
def test_dropout_kernel_matches_reference(rng, dtype, shape, p):
    x = rng.standard_normal(shape).astype(dtype)
    seed = int(rng.integers(2 ** 31, 2 ** 32))  # the top bit of the 32-bit seed too
    fast = kernels.lora_dropout_forward(x, p, seed)
    slow = reference.lora_dropout_forward(x, p, seed)
    np.testing.assert_array_equal(fast == 0, slow == 0)  # the very same mask
    assert_close(fast, slow)
    dx, t = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    want = reference.lora_dropout_backward(dx, t, p, seed)
    assert_close(kernels.lora_dropout_backward(dx.copy(), t, p, seed), want, scale=2)


def test_dropout_kernel_non_contiguous_input(rng):
    x = rng.standard_normal((40, 30))
    np.testing.assert_array_equal(kernels.lora_dropout_forward(x.T, 0.3, 5),
                                  reference.lora_dropout_forward(np.ascontiguousarray(x.T), 0.3, 5))


def test_dropout_mask_rate_scale_and_seeds(rng):
    x = np.ones(200_000)
    out = kernels.lora_dropout_forward(x, 0.25, 7)
    assert abs((out == 0).mean() - 0.25) < 0.005
    np.testing.assert_allclose(out[out != 0], 1 / 0.75)
    assert abs(out.mean() - 1.0) < 0.01  # inverted dropout keeps the expectation
    other = kernels.lora_dropout_forward(x, 0.25, 8)
    assert ((out == 0) != (other == 0)).mean() > 0.3  # another seed, another mask


def test_dropout_kernel_threads_agree(rng):
    from fastlora._ext import lora as ext
    x = rng.standard_normal(300_000).astype(np.float32)
    one, two = np.empty_like(x), np.empty_like(x)
    th = reference.dropout_threshold(0.3)
    ext.lora_dropout_forward(one, x, th, 1 / 0.7, 11, 1)
    ext.lora_dropout_forward(two, x, th, 1 / 0.7, 11, 2)
    np.testing.assert_array_equal(one, two)


def test_dropout_kernels_reject_bad_input():
    x = np.zeros((2, 3), np.float32)
    for fn in (kernels.lora_dropout_forward,):
        with pytest.raises(TypeError, match="x must be float32 or float64"):
            fn(x.astype(np.int32), 0.1, 0)
        with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
            fn(x, -0.1, 0)
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
            fn(x, 0.1, 2 ** 32)
    with pytest.raises(ValueError, match=r"t must have shape \(2, 3\)"):
        kernels.lora_dropout_backward(x, np.zeros((3, 2), np.float32), 0.1, 0)
    with pytest.raises(TypeError, match="t must have dtype float32"):
        kernels.lora_dropout_backward(x, np.zeros((2, 3)), 0.1, 0)
