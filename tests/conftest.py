"""Shared test helpers: tolerances per dtype in one table, seeded RNG, finite differences."""
import numpy as np
import pytest

from fastlora import _blas, _gemm
from fastlora._threads import get_num_threads, set_num_threads

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


@pytest.fixture(params=["fused", "fused-split", "numpy"])
def model_path(request, monkeypatch):
    """The model on the fused kernels (as sized), on them with every product split over 2
    threads (the size threshold off), and on NumPy's matmul (what a non-OpenBLAS NumPy gets)."""
    fused = request.param != "numpy"
    if fused and not _gemm.fused_available():
        pytest.skip("no callable OpenBLAS: only NumPy's path exists here")
    previous, threads = _gemm.set_enabled(fused), get_num_threads()
    if request.param == "fused-split":
        set_num_threads(2)
        monkeypatch.setattr(_blas, "GEMM_MIN_FLOPS", 0)
    yield request.param
    _gemm.set_enabled(previous)
    set_num_threads(threads)
