"""Row tiles and column strips of an NF4 weight, and the tiled products x @ W.T (row tiles)
and g @ W (column strips), against the dense result from the whole dequantized weight."""
import numpy as np
import pytest

from fastlora.lora import nf4, nf4_matmul as tiled
from fastlora.lora.nf4 import quantize_nf4
from fastlora.lora.nf4_matmul import dequantize_cols, dequantize_rows, nf4_matmul, nf4_matmul_backward

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


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
def test_dequantize_cols_equals_slices_of_the_whole(rng, shape, double_quant, out_dtype):
    q = quantize_nf4(rng.standard_normal(shape), block_size=32, double_quant=double_quant)
    dense = q.dequantize(dtype=out_dtype)
    O, K = shape
    for c0, c1 in {(0, K), (0, 1), (K - 1, K), (K // 3, K // 2 + 1), (1, 1)}:
        if not 0 <= c0 <= c1 <= K:
            continue
        out = np.full((O, c1 - c0), np.nan, dtype=out_dtype)
        assert dequantize_cols(q, c0, c1, out) is out
        np.testing.assert_array_equal(out, dense[:, c0:c1])


def test_column_strips_threaded_match_one_thread(rng):
    from fastlora._ext import nf4 as kernel
    q = quantize_nf4(rng.standard_normal((300, 129)).astype(np.float32))
    strips = []
    for threads in (1, 2):
        out = np.empty(300 * 50, np.float32)
        kernel.nf4_dequantize_cols(out, q.packed, nf4._CODE32, nf4._NO_F32, q.absmax_q, q.absmax_step,
                                   float(q.absmax_mean[0]), True, 0, 41, 50, 129, 6, threads)
        strips.append(out.reshape(300, 50))
    np.testing.assert_array_equal(strips[0], strips[1])
    np.testing.assert_array_equal(strips[0], q.dequantize()[:, 41:91])


def test_dequantize_rows_into_a_reused_buffer_prefix(rng):
    q = quantize_nf4(rng.standard_normal((50, 33)).astype(np.float32))
    buf = np.empty((16, 33), np.float32)
    dense = q.dequantize()
    for r0 in range(0, 50, 16):
        r1 = min(r0 + 16, 50)
        np.testing.assert_array_equal(dequantize_rows(q, r0, r1, buf[:r1 - r0]), dense[r0:r1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("tile", [None, 1, 7, 1000])
def test_matmul_forward_and_backward_match_dense(rng, dtype, shape, tile):
    O, K = shape
    q = quantize_nf4((rng.standard_normal(shape) * 0.05).astype(dtype))
    W = q.dequantize()
    x = rng.standard_normal((3, 4, K)).astype(dtype)
    g = rng.standard_normal((3, 4, O)).astype(dtype)
    rtol, atol = TOL[dtype]
    y = nf4_matmul(x, q, tile_rows=tile)
    assert y.dtype == dtype and y.shape == (3, 4, O)
    np.testing.assert_allclose(y, x @ W.T, rtol=rtol, atol=atol)
    dx = nf4_matmul_backward(g, q, tile_cols=tile)
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
    assert nf4_matmul_backward(g, q, out=dx, tile_cols=5) is dx
    np.testing.assert_allclose(dx, g @ W, rtol=1e-5, atol=1e-5)
    # an empty batch is fine
    assert nf4_matmul(np.empty((0, 24), np.float32), q).shape == (0, 40)


def test_products_never_build_the_whole_weight(rng, monkeypatch):
    """Each kernel call fills one tile, and together the tiles cover W exactly once."""
    q = quantize_nf4(rng.standard_normal((100, 30)).astype(np.float32))
    calls = []
    cls = type(q)
    real_fill, real_fill_cols = cls._fill, cls._fill_cols

    def spy_rows(self, out, start):
        calls.append(("rows", start, out.shape[0]))
        return real_fill(self, out, start)

    def spy_cols(self, out, col_start, cols):
        calls.append(("cols", col_start, out.shape[0]))
        return real_fill_cols(self, out, col_start, cols)

    monkeypatch.setattr(cls, "_fill", spy_rows)
    monkeypatch.setattr(cls, "_fill_cols", spy_cols)
    nf4_matmul(rng.standard_normal((2, 30)).astype(np.float32), q, tile_rows=16)
    assert calls == [("rows", s, min(16 * 30, 3000 - s)) for s in range(0, 3000, 16 * 30)]
    calls.clear()
    nf4_matmul_backward(rng.standard_normal((2, 100)).astype(np.float32), q, tile_cols=8)
    assert calls == [("cols", c, 100 * min(8, 30 - c)) for c in range(0, 30, 8)]
    # the default tile is a bounded number of elements, not the whole weight
    big = quantize_nf4(np.ones((2048, 1024), np.float32))
    calls.clear()
    nf4_matmul(np.ones((1, 1024), np.float32), big)
    assert len(calls) == 8 and max(n for _, _, n in calls) == tiled.DEFAULT_TILE_ELEMENTS


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
    with pytest.raises(ValueError, match="tile_cols"):
        nf4_matmul_backward(np.ones((3, 8), np.float32), q, tile_cols=2.5)
    with pytest.raises(ValueError, match="col_stop"):
        dequantize_cols(q, 0, 7, np.empty((8, 7), np.float32))
    with pytest.raises(ValueError, match=r"shape \(8, 2\)"):
        dequantize_cols(q, 0, 2, np.empty((2, 8), np.float32))
    with pytest.raises(TypeError, match="NF4Tensor"):
        nf4_matmul(np.ones((3, 6), np.float32), np.ones((8, 6)))
    q._absmax_step = q._absmax_step[:0]             # corrupted: checked before any kernel call
    with pytest.raises(ValueError, match="absmax_step"):
        nf4_matmul(np.ones((3, 6), np.float32), q)
