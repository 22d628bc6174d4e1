"""Row tiles of an NF4 weight and the tiled products x @ W.T and g @ W, against the dense
result computed from the whole dequantized weight."""
import numpy as np
import pytest

from fastlora.lora.nf4 import dequantize_rows, nf4_matmul, nf4_matmul_backward, quantize_nf4

# (rtol, atol) of a tiled product against one dense np.matmul: same values, different BLAS
# blocking, so only summation order differs.
TOL = {np.float32: (1e-5, 1e-5), np.float64: (1e-12, 1e-12)}


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# (out_features, in_features): K = 33 and 100 make blocks of 64 straddle row boundaries and
# rows start at odd flat indices (so in the low nibble of a byte).
WEIGHT_SHAPES = [(1, 1), (5, 33), (37, 100), (96, 64), (130, 257)]


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
def test_dequantize_rows_equals_slices_of_the_whole(rng, shape, double_quant, out_dtype):
    q = quantize_nf4(rng.standard_normal(shape), block_size=64, double_quant=double_quant)
    dense = q.dequantize(dtype=out_dtype)
    O, K = shape
    for r0, r1 in {(0, O), (0, 1), (O - 1, O), (O // 3, O // 2 + 1), (2, 2)}:
        if not 0 <= r0 <= r1 <= O:
            continue
        out = np.full((r1 - r0, K), np.nan, dtype=out_dtype)
        assert dequantize_rows(q, r0, r1, out) is out
        np.testing.assert_array_equal(out, dense[r0:r1])


def test_dequantize_rows_into_a_reused_buffer_prefix(rng):
    q = quantize_nf4(rng.standard_normal((50, 33)).astype(np.float32))
    buf = np.empty((16, 33), np.float32)
    dense = q.dequantize()
    for r0 in range(0, 50, 16):
        r1 = min(r0 + 16, 50)
        np.testing.assert_array_equal(dequantize_rows(q, r0, r1, buf[:r1 - r0]), dense[r0:r1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("tile_rows", [None, 1, 7, 1000])
def test_matmul_forward_and_backward_match_dense(rng, dtype, shape, tile_rows):
    O, K = shape
    q = quantize_nf4((rng.standard_normal(shape) * 0.05).astype(dtype))
    W = q.dequantize()
    x = rng.standard_normal((3, 4, K)).astype(dtype)
    g = rng.standard_normal((3, 4, O)).astype(dtype)
    rtol, atol = TOL[dtype]
    y = nf4_matmul(x, q, tile_rows=tile_rows)
    assert y.dtype == dtype and y.shape == (3, 4, O)
    np.testing.assert_allclose(y, x @ W.T, rtol=rtol, atol=atol)
    dx = nf4_matmul_backward(g, q, tile_rows=tile_rows)
    assert dx.dtype == dtype and dx.shape == (3, 4, K)
    np.testing.assert_allclose(dx, g @ W, rtol=rtol, atol=atol)


def test_matmul_writes_into_out_and_accepts_strided_inputs(rng):
    q = quantize_nf4(rng.standard_normal((40, 24)).astype(np.float32))
    W = q.dequantize()
    x = rng.standard_normal((10, 48)).astype(np.float32)[:, ::2]     # not contiguous
    out = np.empty((10, 40), np.float32)
    assert nf4_matmul(x, q, out=out, tile_rows=9) is out
    np.testing.assert_allclose(out, x @ W.T, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal((10, 40)).astype(np.float32)
    dx = np.full((10, 24), np.nan, np.float32)                      # overwritten, not accumulated
    assert nf4_matmul_backward(g, q, out=dx, tile_rows=9) is dx
    np.testing.assert_allclose(dx, g @ W, rtol=1e-5, atol=1e-5)
    # an empty batch is fine
    assert nf4_matmul(np.empty((0, 24), np.float32), q).shape == (0, 40)


def test_matmul_never_builds_the_whole_weight(rng, monkeypatch):
    """Each kernel call fills at most tile_rows rows, and together they cover W once."""
    q = quantize_nf4(rng.standard_normal((100, 30)).astype(np.float32))
    calls = []
    real_fill = type(q)._fill

    def spy(self, out, start):
        calls.append((start, out.shape[0]))
        return real_fill(self, out, start)

    monkeypatch.setattr(type(q), "_fill", spy)
    nf4_matmul(rng.standard_normal((2, 30)).astype(np.float32), q, tile_rows=16)
    assert max(n for _, n in calls) == 16 * 30
    assert sum(n for _, n in calls) == 100 * 30
    assert [s for s, _ in calls] == list(range(0, 3000, 16 * 30))


def test_bad_rows_and_operands(rng):
    q = quantize_nf4(rng.standard_normal((8, 6)).astype(np.float32))
    buf = np.empty((2, 6), np.float32)
    with pytest.raises(ValueError, match="row_stop"):
        dequantize_rows(q, 7, 9, buf)
    with pytest.raises(ValueError, match="row_start"):
        dequantize_rows(q, -1, 1, buf)
    with pytest.raises(ValueError, match=r"shape \(2, 6\)"):
        dequantize_rows(q, 0, 2, np.empty((2, 5), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        dequantize_rows(q, 0, 2, np.empty((6, 2), np.float32).T)
    with pytest.raises(ValueError, match="float32 or float64"):
        dequantize_rows(q, 0, 2, np.empty((2, 6), np.float16))
    with pytest.raises(ValueError, match="2-D"):
        dequantize_rows(quantize_nf4(np.ones(12, np.float32)), 0, 1, buf)
    with pytest.raises(ValueError, match="last dimension 6"):
        nf4_matmul(np.ones((3, 5), np.float32), q)
    with pytest.raises(ValueError, match="last dimension 8"):
        nf4_matmul_backward(np.ones((3, 6), np.float32), q)
    with pytest.raises(ValueError, match="float32 or float64"):
        nf4_matmul(np.ones((3, 6), np.int64), q)
    with pytest.raises(ValueError, match="out must be"):
        nf4_matmul(np.ones((3, 6), np.float32), q, out=np.empty((3, 8), np.float64))
    with pytest.raises(ValueError, match="tile_rows"):
        nf4_matmul(np.ones((3, 6), np.float32), q, tile_rows=0)
    with pytest.raises(TypeError, match="NF4Tensor"):
        nf4_matmul(np.ones((3, 6), np.float32), np.ones((8, 6)))
    q._absmax_step = q._absmax_step[:0]             # corrupted: checked before any kernel call
    with pytest.raises(ValueError, match="absmax_step"):
        nf4_matmul(np.ones((3, 6), np.float32), q)
