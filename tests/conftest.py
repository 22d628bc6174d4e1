"""Shared test helpers: tolerances per dtype in one table, seeded RNG, finite differences."""
import numpy as np
import pytest

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
