"""Shared test helpers: tolerances per dtype in one table, seeded RNG, finite differences,
and the kernel path (fused or NumPy) and thread count a test runs on."""
import contextlib

import numpy as np
import pytest

from fastlora import get_num_threads, set_num_threads
from fastlora._runtime import blas as _blas, gemm as _gemm

# (rtol, atol) for comparing a fast kernel with its reference twin, per dtype.
TOLERANCES = {
    np.dtype(np.float32): (2e-5, 2e-6),
    np.dtype(np.float64): (1e-12, 1e-13),
}


def assert_close(actual, expected, dtype=None, scale=1.0, err_msg=""):
    dtype = np.dtype(dtype or np.asarray(actual).dtype)
    rtol, atol = TOLERANCES[dtype]
    np.testing.assert_allclose(actual, expected, rtol=rtol * scale, atol=atol * scale, err_msg=err_msg)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def numerical_grad(f, array, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of `array` (float64, in place)."""
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


@contextlib.contextmanager
def kernel_path(fused):
    """Run the block on the fused kernels (skipping the test where NumPy's BLAS cannot be called
    directly) or on NumPy's matmul, then restore the setting."""
    if fused and not _gemm.fused_available():
        pytest.skip("no callable OpenBLAS: only NumPy's path exists here")
    previous = _gemm.set_enabled(fused)
    try:
        yield
    finally:
        _gemm.set_enabled(previous)


@contextlib.contextmanager
def kernel_threads(n, monkeypatch):
    """Run the block on n threads; above 1, with the size threshold off, so that even small
    products and attention are split over the threads."""
    previous = get_num_threads()
    set_num_threads(n)
    if n > 1:
        monkeypatch.setattr(_blas, "GEMM_MIN_FLOPS", 0)
    try:
        yield
    finally:
        set_num_threads(previous)


@pytest.fixture(params=[True, False], ids=["fused", "numpy"])
def path(request):
    """Run the test on the fused kernels, then on NumPy's path."""
    with kernel_path(request.param):
        yield request.param


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """1 thread, or 2 with the size threshold off, so even these small cases are split."""
    with kernel_threads(request.param, monkeypatch):
        yield request.param


@pytest.fixture(params=["fused", "fused-split", "numpy"])
def model_path(request, monkeypatch):
    """The model on the fused kernels (as sized), on them with every product split over 2
    threads, and on NumPy's matmul (what a non-OpenBLAS NumPy gets)."""
    with kernel_path(request.param != "numpy"):
        if request.param == "fused-split":
            with kernel_threads(2, monkeypatch):
                yield request.param
        else:
            yield request.param
