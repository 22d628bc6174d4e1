"""Optimizer kernels (fastlora.optim.kernels) against their NumPy twins (fastlora.reference.optim):
float32/float64, odd shapes, non-contiguous arrays, both thread paths, and the same rejections."""
import numpy as np
import pytest

from conftest import assert_close
from fastlora._ext import adamw as _adamw_ext
from fastlora._ext import clip_grad as _clip_ext
from fastlora._ext import sgd as _sgd_ext
from fastlora.optim import kernels
from fastlora.reference import optim as reference

DTYPES = [np.float32, np.float64]
# () and (0,) are edge cases; 40000 elements crosses the kernels' chunk and threading sizes
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 129), (40000,)]

ADAMW_CASES = [
    dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
    dict(step=7, lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.0),
    # beta1 < 0.5 takes the other branch of torch's lerp
    dict(step=3, lr=0.02, beta1=0.3, beta2=0.5, eps=1e-8, weight_decay=0.1),
    dict(step=1000, lr=0.0, beta1=0.0, beta2=0.0, eps=1e-3, weight_decay=0.5),
]

SGD_CASES = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=False),
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.01, nesterov=False, first_step=True),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=True),
    dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, first_step=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, first_step=False),
]


def _noncontig(a):
    """The same values as `a`, as a strided view of a bigger array (a copy-back target)."""
    if a.ndim == 0:
        return a.copy()  # a 0-d array is always contiguous
    big = np.zeros(a.shape[:-1] + (a.shape[-1] * 2,), dtype=a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _adamw_inputs(rng, shape, dtype):
    # np.array, not .astype: for shape () the arithmetic gives NumPy scalars, not arrays
    p = np.array(rng.standard_normal(shape), dtype=dtype)
    g = np.array(rng.standard_normal(shape), dtype=dtype)
    m = np.array(0.1 * rng.standard_normal(shape), dtype=dtype)
    v = np.array(0.01 * rng.random(shape), dtype=dtype)
    return p, g, m, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", range(len(ADAMW_CASES)))
@pytest.mark.parametrize("contiguous", [True, False])
def test_adamw_update_matches_reference(rng, dtype, shape, case, contiguous):
    p, g, m, v = _adamw_inputs(rng, shape, dtype)
    fast = [a.copy() if contiguous else _noncontig(a) for a in (p, g, m, v)]
    slow = [a.copy() for a in (p, g, m, v)]
    kernels.adamw_update(*fast, **ADAMW_CASES[case])
    reference.adamw_update(*slow, **ADAMW_CASES[case])
    names = ["param", "grad", "exp_avg", "exp_avg_sq"]
    for name, got, want in zip(names, fast, slow):
        assert got.dtype == dtype and got.shape == shape
        assert_close(got, want, scale=1, err_msg=name)
    np.testing.assert_array_equal(fast[1], g, err_msg="the gradient must not change")
    if np.size(p) and ADAMW_CASES[case]["lr"] > 0:
        assert not np.array_equal(fast[0], p), "the parameter did not move"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", range(len(SGD_CASES)))
@pytest.mark.parametrize("contiguous", [True, False])
def test_sgd_update_matches_reference(rng, dtype, shape, case, contiguous):
    kw = SGD_CASES[case]
    p = np.array(rng.standard_normal(shape), dtype=dtype)
    g = np.array(rng.standard_normal(shape), dtype=dtype)
    b = np.array(rng.standard_normal(shape), dtype=dtype) if kw["momentum"] else None
    arrays = [p, g] + ([b] if b is not None else [])
    fast = [a.copy() if contiguous else _noncontig(a) for a in arrays]
    slow = [a.copy() for a in arrays]
    kernels.sgd_update(fast[0], fast[1], fast[2] if b is not None else None, **kw)
    reference.sgd_update(slow[0], slow[1], slow[2] if b is not None else None, **kw)
    for got, want in zip(fast, slow):
        assert_close(got, want, scale=1)
    if b is not None and kw["first_step"]:
        # the first momentum step stores the direction itself, undamped
        d = g.astype(np.float64) + kw["weight_decay"] * p
        assert_close(fast[2], np.array(d, dtype=dtype), scale=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_grad_norm_and_scale_match_reference(rng, dtype, contiguous):
    shapes = [(3,), (0,), (), (5, 7), (40000,), (16384,), (16385,)]
    grads = [np.array(rng.standard_normal(s), dtype=dtype) for s in shapes]
    fast = [g.copy() if contiguous else _noncontig(g) for g in grads]
    slow = [g.copy() for g in grads]
    norm = kernels.grad_norm(fast)
    assert isinstance(norm, float)
    np.testing.assert_allclose(norm, reference.grad_norm(slow), rtol=1e-13)
    expected = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    np.testing.assert_allclose(norm, expected, rtol=1e-13)
    kernels.scale_grads(fast, 0.37)
    reference.scale_grads(slow, 0.37)
    for got, want in zip(fast, slow):
        np.testing.assert_array_equal(got, want)  # one rounded multiply: exact in both


def test_grad_norm_mixed_dtypes_and_empty(rng):
    grads = [rng.standard_normal(9).astype(np.float32), rng.standard_normal((4, 4))]
    np.testing.assert_allclose(kernels.grad_norm(grads), reference.grad_norm(grads), rtol=1e-13)
    assert kernels.grad_norm([]) == reference.grad_norm([]) == 0.0
    assert kernels.grad_norm([np.zeros(0, np.float32)]) == 0.0


def test_grad_norm_float32_accumulates_in_float64():
    """4096**2 == 2**24, where float32 stops resolving +1: a float32 accumulator would lose the ones."""
    g = np.array([4096.0] + [1.0] * 8, dtype=np.float32)
    assert np.float32(2 ** 24) + np.float32(1) == np.float32(2 ** 24)  # the premise
    assert kernels.grad_norm([g]) == np.sqrt(2.0 ** 24 + 8)
    assert kernels.grad_norm([g[::-1].copy()]) == np.sqrt(2.0 ** 24 + 8)


def test_grad_norm_overflowing_float32_is_finite_in_float64():
    g = np.full(4, 3e38, dtype=np.float32)  # each square overflows float32, not float64
    np.testing.assert_allclose(kernels.grad_norm([g]), 6e38, rtol=1e-6)
    assert np.isnan(kernels.grad_norm([np.array([1.0, np.nan], np.float32)]))
    assert kernels.grad_norm([np.array([np.inf], np.float64)]) == np.inf


# --- both thread paths ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_kernel_threads_agree(rng, dtype):
    p, g, m, v = _adamw_inputs(rng, (50001,), dtype)
    one, two = [a.copy() for a in (p, m, v)], [a.copy() for a in (p, m, v)]
    args = (0.999, 0.1, 0.999, 0.01, 0.3, 1e-8)
    _adamw_ext.adamw_step(one[0], one[1], one[2], g, *args, 1)
    _adamw_ext.adamw_step(two[0], two[1], two[2], g, *args, 2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(one[0], p)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_kernel_threads_agree(rng, momentum):
    p = rng.standard_normal(50001)
    g = rng.standard_normal(50001)
    b = rng.standard_normal(50001)
    one, two = [p.copy(), b.copy()], [p.copy(), b.copy()]
    _sgd_ext.sgd_step(one[0], one[1], g, 0.1, momentum, 0.0, 0.01, False, False, 1)
    _sgd_ext.sgd_step(two[0], two[1], g, 0.1, momentum, 0.0, 0.01, False, False, 2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    if momentum == 0.0:
        np.testing.assert_array_equal(one[1], b)  # no momentum: the buffer is not touched


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_norm_kernel_is_bitwise_the_same_for_any_thread_count(rng, dtype):
    grads = [rng.standard_normal(s).astype(dtype) for s in [(70000,), (3,), (40000,)]]
    tables, _ = kernels._grad_table(grads, writeable=False)
    ptrs, sizes, offsets, _arrays = tables[np.dtype(dtype)]
    partial = np.empty(int(offsets[-1]))
    totals = [_clip_ext.sum_squares(partial, ptrs, sizes, offsets, dtype == np.float64, t)
              for t in (1, 2, 3)]
    assert totals[0] == totals[1] == totals[2]


# --- the same rejections ----------------------------------------------------------------------

def _bad_adamw_calls():
    p = np.zeros(4, np.float32)
    ok = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    yield "grad shape", (p, np.zeros(5, np.float32), p.copy(), p.copy()), ok, ValueError
    yield "grad dtype", (p, np.zeros(4), p.copy(), p.copy()), ok, TypeError
    yield "int param", (np.zeros(4, np.int64),) + (np.zeros(4, np.int64),) * 3, ok, TypeError
    yield "list param", ([0.0] * 4, p, p.copy(), p.copy()), ok, TypeError
    ro = p.copy()
    ro.flags.writeable = False
    yield "read-only exp_avg", (p, p.copy(), ro, p.copy()), ok, ValueError
    for key, value, exc in [("step", 0, ValueError), ("step", 1.5, TypeError),
                            ("lr", -1.0, ValueError), ("lr", float("nan"), ValueError),
                            ("beta1", 1.0, ValueError), ("beta2", -0.1, ValueError),
                            ("eps", 0.0, ValueError), ("weight_decay", -1e-3, ValueError),
                            ("lr", "0.1", TypeError)]:
        yield f"{key}={value!r}", (p, p.copy(), p.copy(), p.copy()), {**ok, key: value}, exc


@pytest.mark.parametrize("label,args,kwargs,exc", list(_bad_adamw_calls()),
                         ids=[c[0] for c in _bad_adamw_calls()])
def test_adamw_fast_and_reference_reject_the_same_input(label, args, kwargs, exc):
    for impl in (kernels.adamw_update, reference.adamw_update):
        copies = [a.copy() if isinstance(a, np.ndarray) and a.flags.writeable else a for a in args]
        with pytest.raises(exc):
            impl(*copies, **kwargs)


def _bad_sgd_calls():
    p = np.zeros(3)
    ok = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
              first_step=True)
    yield "no buffer with momentum", (p, p.copy(), None), ok, TypeError
    yield "buffer without momentum", (p, p.copy(), p.copy()), {**ok, "momentum": 0.0}, ValueError
    yield "buffer shape", (p, p.copy(), np.zeros(4)), ok, ValueError
    yield "nesterov with dampening", (p, p.copy(), p.copy()), {**ok, "nesterov": True,
                                                                "dampening": 0.5}, ValueError
    yield "dampening > 1", (p, p.copy(), p.copy()), {**ok, "dampening": 1.5}, ValueError
    yield "lr=-0.1", (p, p.copy(), p.copy()), {**ok, "lr": -0.1}, ValueError


@pytest.mark.parametrize("label,args,kwargs,exc", list(_bad_sgd_calls()),
                         ids=[c[0] for c in _bad_sgd_calls()])
def test_sgd_fast_and_reference_reject_the_same_input(label, args, kwargs, exc):
    for impl in (kernels.sgd_update, reference.sgd_update):
        with pytest.raises(exc):
            impl(*[a.copy() if isinstance(a, np.ndarray) else a for a in args], **kwargs)


@pytest.mark.parametrize("impl", [kernels, reference], ids=["fast", "reference"])
def test_grad_functions_reject_bad_input(impl):
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        impl.grad_norm([np.zeros(2), [1.0, 2.0]])
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        impl.grad_norm([np.zeros(2, np.int32)])
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"grads\[0\] is read-only"):
        impl.scale_grads([ro], 0.5)
    assert impl.grad_norm([ro]) == np.sqrt(3.0)  # reading a read-only gradient is fine
    with pytest.raises(ValueError, match="coef"):
        impl.scale_grads([np.ones(3)], float("inf"))
