"""NF4 quantization: the code table and byte layout, the Cython kernels against their NumPy
twins (bit for bit), the accuracy and size figures of QLoRA, serialisation, and bad input.

Row tiles and the tiled matrix products are in test_nf4_matmul.py.
"""
import io
import json

import numpy as np
import pytest

from fastlora._ext import nf4 as kernel
from fastlora.lora import nf4
from fastlora.lora.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from fastlora.reference import nf4 as ref

DTYPES = [np.float32, np.float64]
# Odd sizes, sizes below/at/above one block, and enough blocks (> 256 at block 64) for
# several double-quantization blocks, the last one partial.
SHAPES = [(1,), (7,), (3, 5), (64,), (65,), (17, 33), (130, 70), (300, 257)]
BLOCK_SIZES = [1, 2, 64, 128]

# Written out here, not imported, so a typo in the library's table cannot pass unnoticed.
# bitsandbytes csrc/kernels.cu (dDequantizeNF4), the QLoRA paper's NF4 data type.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


@pytest.fixture
def rng():
    return np.random.default_rng(20230523)


def unpack(packed, n):
    """The n 4-bit codes, first one of each byte from the high nibble."""
    return np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)[:n]


# --- the format ------------------------------------------------------------------------------

def test_code_table_is_bitsandbytes_nf4():
    assert ref.NF4_CODE.dtype == np.float32
    np.testing.assert_array_equal(ref.NF4_CODE, np.array(BNB_NF4, dtype=np.float32))
    assert ref.NF4_CODE[ref.ZERO_CODE] == 0.0
    assert np.all(np.diff(ref.NF4_CODE) > 0)
    np.testing.assert_array_equal(ref.NF4_THRESHOLDS,
                                  (np.array(BNB_NF4[:-1]) + np.array(BNB_NF4[1:])) / 2)
    # bitsandbytes' dQuantizeNF4 decision tree uses these same midpoints
    assert ref.NF4_THRESHOLDS[7] == pytest.approx(0.03979014977812767, abs=1e-12)
    assert ref.NF4_THRESHOLDS[14] == pytest.approx(0.8614784181118011, abs=1e-12)


def test_packing_order_first_code_in_high_nibble():
    q = quantize_nf4(np.array([1.0, -1.0, 0.0], dtype=np.float32), double_quant=False)
    # codes 15, 0 | 7 and the padding nibble (the code of 0.0)
    assert q.packed.tolist() == [0xF0, 0x77]
    np.testing.assert_array_equal(q.dequantize(), [1.0, -1.0, 0.0])
    q = quantize_nf4(np.array([-2.0, 2.0 * BNB_NF4[12]], dtype=np.float32), double_quant=False)
    assert q.packed.tolist() == [0x0C]
    assert q.absmax.tolist() == [2.0]


def test_every_code_maps_to_itself():
    w = np.array(BNB_NF4, dtype=np.float32) * 3.5
    q = quantize_nf4(w, block_size=16, double_quant=False)
    np.testing.assert_array_equal(unpack(q.packed, 16), np.arange(16))
    np.testing.assert_array_equal(q.dequantize(), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_weight_gets_the_nearest_code(rng, dtype):
    w = rng.standard_normal((37, 41)).astype(dtype)
    bs = 64
    q = quantize_nf4(w, block_size=bs, double_quant=False)
    x = w.reshape(-1)
    padded = np.zeros(q.num_blocks * bs, dtype=dtype)
    padded[:x.size] = x
    amax = np.abs(padded.reshape(-1, bs)).max(1)
    v = (padded.reshape(-1, bs) / amax[:, None]).reshape(-1)[:x.size].astype(np.float64)
    nearest = np.abs(v[:, None] - ref.NF4_CODE.astype(np.float64)[None, :]).argmin(1)
    np.testing.assert_array_equal(unpack(q.packed, x.size), nearest)
    # hence each error is at most half the widest gap between codes, times the block scale
    err = np.abs(q.dequantize().reshape(-1) - x)
    half_gap = np.diff(ref.NF4_CODE.astype(np.float64)).max() / 2
    assert np.all(err <= np.repeat(amax, bs)[:x.size] * half_gap * (1 + 1e-6))


def test_zero_and_tiny_blocks():
    w = np.zeros(200, dtype=np.float32)
    w[150] = 3.0
    q = quantize_nf4(w, block_size=64)
    out = q.dequantize()
    np.testing.assert_array_equal(out[:128], 0.0)      # all-zero blocks: code of 0.0, no NaN
    assert out[150] == pytest.approx(3.0, rel=2e-3)    # only double-quant rounding of its absmax
    # subnormal absmax: 1 / absmax would overflow float32; the kernel divides instead
    tiny = np.array([1e-40, -5e-41, 0.0, 2e-41], dtype=np.float32)
    out = quantize_nf4(tiny, block_size=4, double_quant=False).dequantize()
    assert np.all(np.isfinite(out)) and out[0] == tiny[0]
    np.testing.assert_array_equal(np.sign(out), np.sign(tiny))


# --- kernels against their NumPy twins ------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_kernels_match_reference_bit_for_bit(rng, dtype, shape, block_size):
    w = (rng.standard_normal(shape) * 0.02).astype(dtype)
    x = w.reshape(-1)
    packed, absmax = nf4.quantize_blocks(x, block_size)
    ref_packed, ref_absmax = ref.quantize_blocks(x, block_size)
    np.testing.assert_array_equal(packed, ref_packed)
    np.testing.assert_array_equal(absmax, ref_absmax)
    q8, step, mean = nf4.quantize_absmax(absmax)
    for got, want in zip((q8, step, mean), ref.quantize_absmax(absmax)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    scales = nf4.dequantize_absmax(q8, step, mean)
    np.testing.assert_array_equal(scales, ref.dequantize_absmax(q8, step, mean))
    for out_dtype in DTYPES:
        np.testing.assert_array_equal(
            nf4.dequantize_blocks(packed, absmax, x.size, block_size, out_dtype),
            ref.dequantize_blocks(packed, absmax, x.size, block_size, out_dtype))
    # the whole-tensor path computes the double-quantized scales inside the kernel
    for double_quant, s in ((True, scales), (False, absmax)):
        q = quantize_nf4(w, block_size=block_size, double_quant=double_quant)
        out = q.dequantize()
        assert out.dtype == dtype and out.shape == shape
        want = ref.dequantize_blocks(ref_packed, s, x.size, block_size, dtype).reshape(shape)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(dequantize_nf4(q), out)


@pytest.mark.parametrize("start, stop", [(0, 1), (1, 2), (3, 130), (63, 65), (129, 4001), (5000, 5001)])
def test_dequantize_blocks_subranges(rng, start, stop):
    x = rng.standard_normal(5001).astype(np.float32)
    packed, absmax = nf4.quantize_blocks(x, 64)
    np.testing.assert_array_equal(nf4.dequantize_blocks(packed, absmax, 5001, 64, np.float32, start, stop),
                                  ref.dequantize_blocks(packed, absmax, 5001, 64, np.float32, start, stop))


def test_non_contiguous_and_float16_weights(rng):
    big = rng.standard_normal((40, 90)).astype(np.float32)
    view = big[:, ::3]
    np.testing.assert_array_equal(quantize_nf4(view).packed,
                                  quantize_nf4(np.ascontiguousarray(view)).packed)
    half = big.astype(np.float16)
    q = quantize_nf4(half)
    assert q.dtype == np.float16 and q.dequantize().dtype == np.float16
    np.testing.assert_array_equal(q.packed, quantize_nf4(half.astype(np.float32)).packed)
    assert q.dequantize(dtype=np.float32).dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_threaded_kernels_match_one_thread(rng, dtype):
    """The prange paths (num_threads > 1) and the plain loops give identical bytes and values."""
    x = rng.standard_normal(70001).astype(dtype)
    th = nf4._THRESHOLDS[np.dtype(dtype)]
    nb = ref.num_blocks(x.size, 64)
    results = []
    for threads in (1, 2, 3):
        packed = np.empty((x.size + 1) // 2, np.uint8)
        absmax = np.empty(nb, np.float32)
        kernel.nf4_quantize(packed, absmax, np.empty(nb, dtype), x, th, 6, threads)
        q8, step, mean = nf4.quantize_absmax(absmax)
        out = np.empty(x.size - 7, dtype)
        kernel.nf4_dequantize(out, packed, nf4._CODE32, nf4._NO_F32, q8, step, float(mean[0]),
                              True, 7, 6, threads)
        results.append((packed, absmax, out))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)


# --- accuracy and size ----------------------------------------------------------------------

def _relative_error(w, w_hat):
    return float(np.linalg.norm(w_hat.astype(np.float64) - w) / np.linalg.norm(w.astype(np.float64)))


def test_reconstruction_error_on_gaussian_weights(rng):
    w = (rng.standard_normal((512, 1024)) * 0.02).astype(np.float32)
    err = _relative_error(w, quantize_nf4(w).dequantize())
    err_fp32_scales = _relative_error(w, quantize_nf4(w, double_quant=False).dequantize())
    # NF4 with blocks of 64 on N(0, s^2): ~0.092 (QLoRA's optimum is "about 0.09")
    assert 0.085 < err < 0.097, err
    # double quantization of the scales barely adds error
    assert abs(err - err_fp32_scales) < 1e-3
    # and NF4 beats a uniform 4-bit absmax grid (levels k/7, k = -7..7) on the same blocks
    blocks = w.reshape(-1, 64).astype(np.float64)
    amax = np.abs(blocks).max(1, keepdims=True)
    uniform = np.rint(blocks / amax * 7) / 7 * amax
    assert err < 0.9 * _relative_error(w, uniform.reshape(w.shape).astype(np.float32))
    # larger blocks: fewer scales, more error, as in the paper
    assert _relative_error(w, quantize_nf4(w, block_size=256).dequantize()) > err


def test_double_quantized_scales_error(rng):
    w = rng.standard_normal((256, 4096)).astype(np.float32)
    q, qf = quantize_nf4(w), quantize_nf4(w, double_quant=False)
    exact, approx = qf.absmax, q.scales()
    # symmetric int8: at most half a step off, step = max|absmax - mean| / 127 per 256 values
    half_step = np.repeat(q.absmax_step, 256)[:exact.size] / 2
    assert np.all(np.abs(approx - exact) <= half_step * (1 + 1e-5) + 1e-7)
    rel = np.abs(approx - exact) / exact
    assert rel.max() < 0.01 and rel.mean() < 0.002


def test_bytes_per_weight():
    w = np.ones((4096, 1024), dtype=np.float32)
    n = w.size
    q = quantize_nf4(w)
    assert q.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert q.nbytes == q.packed.nbytes + q.absmax_q.nbytes + q.absmax_step.nbytes + q.absmax_mean.nbytes
    assert q.nbytes / n == pytest.approx(0.516, abs=1e-3)        # ~4.127 bits per weight
    assert q.nbytes / n < 0.52
    assert 8 * q.nbytes / n == pytest.approx(4.127, abs=1e-3)
    qf = quantize_nf4(w, double_quant=False)
    assert qf.nbytes / n == 0.5625                                # 4.5 bits
    assert qf.nbytes == qf.packed.nbytes + qf.absmax.nbytes
    # an odd count with a partial last block stores ceil(n / 2) code bytes
    q = quantize_nf4(np.ones(1001, np.float64))
    assert q.packed.shape == (501,) and q.absmax_q.shape == (16,) and q.absmax_step.shape == (1,)
    assert q.nbytes == 501 + 16 + 4 + 4


# --- serialisation --------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_to_arrays_from_arrays_round_trip(rng, double_quant, dtype):
    w = rng.standard_normal((33, 77)).astype(dtype)
    q = quantize_nf4(w, block_size=32, double_quant=double_quant)
    arrays, meta = q.to_arrays()
    meta = json.loads(json.dumps(meta))                        # JSON-able
    from safetensors.numpy import load, save
    blob = save({f"w.{k}": v for k, v in arrays.items()}, metadata={"w": json.dumps(meta)})
    loaded = load(io.BytesIO(blob).getvalue())
    back = NF4Tensor.from_arrays({k[2:]: v for k, v in loaded.items()}, meta)
    assert (back.shape, back.dtype, back.block_size, back.double_quant, back.nbytes) == \
        (q.shape, q.dtype, q.block_size, q.double_quant, q.nbytes)
    np.testing.assert_array_equal(back.dequantize(), q.dequantize())
    # from_arrays copies: the caller's arrays stay writable and independent
    arrays["packed"][0] ^= 0xFF
    np.testing.assert_array_equal(NF4Tensor.from_arrays(arrays, json.dumps(meta)).packed[1:], q.packed[1:])
    assert back.packed[0] == q.packed[0]


def test_stored_arrays_are_read_only():
    q = quantize_nf4(np.ones(100, np.float32))
    with pytest.raises(ValueError):
        q.packed[0] = 0
    with pytest.raises(ValueError):
        q.absmax_q[0] = -128


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [0, -64, 48, 3, 100, 64.0, True, "64", None])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(np.ones(10, np.float32), block_size=block_size)


@pytest.mark.parametrize("w, match", [
    (np.arange(10), "floating"),
    (np.ones(4, dtype=np.complex64), "floating"),
    (np.ones(4, dtype=bool), "floating"),
    (np.array(["a"]), "floating"),
    (np.zeros((3, 0), np.float32), "at least one element"),
    (np.array([1.0, np.nan], np.float32), r"finite; w\[1\]"),
    (np.array([[1.0, 2.0], [np.inf, 0.0]]), r"finite; w\[1, 0\]"),
    (np.array([1e300, 1.0]), "float32"),
])
def test_bad_weights(w, match):
    with pytest.raises(ValueError, match=match):
        quantize_nf4(w)


def test_bad_double_quant_flag():
    with pytest.raises(ValueError, match="double_quant"):
        quantize_nf4(np.ones(4, np.float32), double_quant="yes")


def _corrupt(double_quant, **changes):
    q = quantize_nf4(np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 100),
                     double_quant=double_quant)
    arrays, meta = q.to_arrays()
    for key, value in changes.items():
        if key.startswith("meta_"):
            meta[key[5:]] = value
        elif value is None:
            del arrays[key]
        else:
            arrays[key] = value(arrays[key]) if callable(value) else value
    return arrays, meta


@pytest.mark.parametrize("double_quant, changes, match", [
    (True, {"packed": lambda a: a[:-1]}, r"packed must be a uint8 array of shape \(500,\)"),
    (True, {"packed": lambda a: a.astype(np.int16)}, "packed must be a uint8"),
    (True, {"absmax_q": lambda a: np.append(a, 0).astype(np.int8)}, r"absmax_q .* shape \(16,\)"),
    (True, {"absmax_q": lambda a: np.where(np.arange(a.size) == 3, -128, a).astype(np.int8)},
     r"absmax_q codes must be in \[-127, 127\]"),
    (True, {"absmax_step": lambda a: np.full(2, 1.0, np.float32)}, r"absmax_step .* shape \(1,\)"),
    (True, {"absmax_step": lambda a: np.full_like(a, np.nan)}, "absmax_step must be finite"),
    (True, {"absmax_mean": lambda a: np.float32([-1.0])}, "absmax_mean must be finite and >= 0"),
    (True, {"absmax_mean": lambda a: np.float64([1.0])}, "absmax_mean must be a float32"),
    (True, {"absmax_mean": None}, "missing"),
    (True, {"absmax": np.ones(16, np.float32)}, "unexpected"),
    (False, {"absmax": lambda a: -a}, "absmax must be finite and >= 0"),
    (False, {"absmax": lambda a: a.astype(np.float64)}, "absmax must be a float32"),
    (True, {"meta_block_size": 48}, "block_size"),
    (True, {"meta_block_size": 32}, r"absmax_q .* shape \(32,\)"),
    (True, {"meta_shape": [10, 101]}, r"packed .* shape \(505,\)"),
    (True, {"meta_shape": [10, 0]}, "at least one element"),
    (True, {"meta_shape": "10x100"}, "shape"),
    (True, {"meta_dtype": "int32"}, "dtype must be float16, float32 or float64"),
    (True, {"meta_dtype": "nonsense"}, "dtype"),
    (True, {"meta_format": "bnb"}, "format"),
    (True, {"meta_version": 2}, "version"),
    (True, {"meta_double_quant": "yes"}, "double_quant"),
    (True, {"meta_double_quant_block_size": 128}, r"double_quant_block_size.\] must be 256"),
    (True, {"meta_double_quant_scheme": "dynamic"}, "double_quant_scheme"),
])
def test_corrupted_arrays_are_rejected(double_quant, changes, match):
    arrays, meta = _corrupt(double_quant, **changes)
    with pytest.raises(ValueError, match=match):
        NF4Tensor.from_arrays(arrays, meta)


def test_missing_meta_key_and_bad_meta():
    arrays, meta = _corrupt(True)
    del meta["shape"]
    with pytest.raises(ValueError, match="missing 'shape'"):
        NF4Tensor.from_arrays(arrays, meta)
    with pytest.raises(ValueError, match="meta must be a dict"):
        NF4Tensor.from_arrays(arrays, [1, 2])


def test_corrupted_object_is_rejected_before_the_kernel_runs():
    q = quantize_nf4(np.ones((10, 100), np.float32))
    q._packed = q._packed[:-10]           # would make the kernel read past the end
    with pytest.raises(ValueError, match="packed"):
        q.dequantize()
    with pytest.raises(ValueError, match="packed"):
        dequantize_nf4(q)
    q = quantize_nf4(np.ones((10, 100), np.float32), double_quant=False)
    q._absmax = q._absmax[:3]
    with pytest.raises(ValueError, match="absmax"):
        q.to_arrays()
    with pytest.raises(TypeError, match="NF4Tensor"):
        dequantize_nf4(np.ones(3))


def test_array_level_wrappers_check_lengths():
    packed, absmax = nf4.quantize_blocks(np.ones(100, np.float32), 64)
    with pytest.raises(ValueError, match="scales"):
        nf4.dequantize_blocks(packed, absmax[:1], 100, 64, np.float32)
    with pytest.raises(ValueError, match="packed"):
        nf4.dequantize_blocks(packed, absmax, 102, 64, np.float32)
    with pytest.raises(ValueError, match="stop"):
        nf4.dequantize_blocks(packed, absmax, 100, 64, np.float32, 5, 101)
    with pytest.raises(ValueError, match="x must be"):
        nf4.quantize_blocks(np.ones((2, 2), np.float32), 64)
