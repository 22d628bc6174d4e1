"""clip_grad_norm: the norm and the scaled gradients against torch.nn.utils.clip_grad_norm_ and
against the NumPy reference; non-finite norms reported and not applied; argument checks."""
import math
import warnings

import numpy as np
import pytest

from fastlora.nn import Parameter
from fastlora.optim import NonFiniteGradientWarning, clip_grad_norm, clip_grad_norm_
from fastlora.reference import optim as reference

SHAPES = [(3, 4), (17,), (), (40000,), (2, 3, 5)]


def _params(rng, dtype, scale):
    ps = [Parameter(np.zeros(s, dtype)) for s in SHAPES]
    for p in ps:
        p.grad = np.array(scale * rng.standard_normal(p.shape), dtype=dtype)
    return ps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale,max_norm", [(1.0, 1.0), (1e-3, 1.0), (5.0, 0.5), (1.0, math.inf)])
def test_clip_matches_reference(rng, dtype, scale, max_norm):
    ps = _params(rng, dtype, scale)
    grads = [p.grad.copy() for p in ps]
    expected_norm = reference.grad_norm(grads)
    norm = clip_grad_norm(ps, max_norm)
    assert norm == pytest.approx(expected_norm, rel=1e-12)
    coef = max_norm / (norm + 1e-6)  # the returned norm: its last bit may differ from the twin's
    if coef < 1.0:
        reference.scale_grads(grads, coef)
        assert reference.grad_norm([p.grad for p in ps]) == pytest.approx(max_norm, rel=1e-5)
    for p, g in zip(ps, grads):
        np.testing.assert_array_equal(p.grad, g)  # untouched, or scaled exactly as the twin


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale,max_norm", [(1.0, 1.0), (1e-3, 1.0), (5.0, 0.5)])
def test_clip_matches_torch(rng, dtype, scale, max_norm):
    torch = pytest.importorskip("torch")
    ps = _params(rng, dtype, scale)
    tps = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in ps]
    for p, t in zip(ps, tps):
        t.grad = torch.from_numpy(p.grad.copy())
    tnorm = float(torch.nn.utils.clip_grad_norm_(tps, max_norm))
    norm = clip_grad_norm(ps, max_norm)
    # torch sums float32 squares in float32; we accumulate in float64
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert norm == pytest.approx(tnorm, rel=rtol)
    for p, t in zip(ps, tps):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=rtol, atol=1e-30)


def test_skips_missing_grads_and_handles_none_at_all():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    assert clip_grad_norm([a, b], 1.0) == 0.0
    b.grad = np.array([3.0, 4.0])
    assert clip_grad_norm([a, b], 1.0) == 5.0
    np.testing.assert_allclose(b.grad, np.array([3.0, 4.0]) / (5.0 + 1e-6))
    assert a.grad is None
    assert clip_grad_norm_(b, 10.0) == pytest.approx(1.0, rel=1e-6)  # a single tensor is fine


def test_a_parameter_listed_twice_counts_once():
    p = Parameter(np.zeros(2))
    p.grad = np.array([3.0, 4.0])
    assert clip_grad_norm([p, p], 1.0) == 5.0
    np.testing.assert_allclose(p.grad, np.array([3.0, 4.0]) / (5.0 + 1e-6))


def test_generator_of_parameters():
    ps = [Parameter(np.zeros(1)) for _ in range(3)]
    for p in ps:
        p.grad = np.array([2.0])
    assert clip_grad_norm((p for p in ps), 1.0) == pytest.approx(math.sqrt(12.0))
    assert all(p.grad[0] < 1.0 for p in ps)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_norm_is_reported_and_not_applied(bad):
    a, b = Parameter(np.zeros(3, np.float32)), Parameter(np.zeros(2, np.float32))
    a.grad = np.array([1.0, bad, 2.0], np.float32)
    b.grad = np.array([10.0, 20.0], np.float32)
    before = [a.grad.copy(), b.grad.copy()]
    with pytest.warns(NonFiniteGradientWarning, match="left unscaled"):
        norm = clip_grad_norm([a, b], 1.0)
    assert not math.isfinite(norm)
    np.testing.assert_array_equal(a.grad, before[0])
    np.testing.assert_array_equal(b.grad, before[1])
    with pytest.raises(RuntimeError, match="gradient norm is"):
        clip_grad_norm([a, b], 1.0, error_if_nonfinite=True)
    np.testing.assert_array_equal(b.grad, before[1])


def test_finite_norm_does_not_warn():
    p = Parameter(np.zeros(2))
    p.grad = np.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_grad_norm([p], 1.0)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan"), "1", True])
def test_bad_max_norm(max_norm):
    p = Parameter(np.zeros(2))
    p.grad = np.ones(2)
    with pytest.raises(ValueError, match="max_norm must be a real number > 0"):
        clip_grad_norm([p], max_norm)
    np.testing.assert_array_equal(p.grad, np.ones(2))


def test_bad_params():
    with pytest.raises(TypeError, match=r"params\[1\] must be a fastlora Parameter"):
        clip_grad_norm([Parameter(np.zeros(1)), np.zeros(1)], 1.0)
    p = Parameter(np.zeros(2))
    p.grad = [1.0, 2.0]
    with pytest.raises(TypeError, match=r"params\[0\].grad must be a numpy.ndarray"):
        clip_grad_norm([p], 1.0)
