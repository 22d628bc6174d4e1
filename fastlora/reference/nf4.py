"""Plain-NumPy twins of the NF4 kernels in csrc/nf4.pyx: the oracle the tests compare against.

The format (QLoRA, Dettmers et al. 2023; the bitsandbytes NF4 layout):

- The weight is flattened (C order) and cut into blocks of `block_size` elements; the last
  block may be short (it is treated as zero-padded, which leaves its absmax unchanged).
- Each element is divided by its block's absmax and mapped to the nearest of the 16 NF4 code
  values (`NF4_CODE`); an all-zero block maps to the code of 0.0.
- Two 4-bit codes per byte, the element with the even flat index in the HIGH nibble. An odd
  element count leaves the last low nibble as padding holding the code of 0.0 (7).
- Double quantization of the per-block absmax values (float32): subtract their mean, then in
  blocks of `DQ_BLOCK_SIZE` = 256 store int8 codes q in [-127, 127] with one float32 step per
  block, step = max|absmax - mean| / 127, q = round(c / step); absmax ~= q * step + mean.
  (Symmetric linear int8. bitsandbytes uses its 8-bit "dynamic" map here instead.)

The fast twins in fastlora.lora.nf4 take the same arguments and must give bit-identical codes
and values, so every float operation here is spelled out in the precision the kernel uses.
Dimension letters: N elements of the flattened weight, NB = ceil(N / block_size) blocks.
"""
import numpy as np

from fastlora.spec import (  # noqa: F401 - the format's constants, re-exported beside its twins
    DQ_BLOCK_SIZE,
    DQ_MAX_CODE,
    NF4_CODE,
    NF4_THRESHOLDS,
    ZERO_CODE,
    num_blocks,
)


def quantize_blocks(x, block_size):
    """x (N,) float32/float64 -> (packed (ceil(N/2),) uint8, absmax (NB,) float32).

    Codes are chosen in x's own precision: v = x / absmax, in x.dtype.
    """
    n = x.shape[0]
    nb = num_blocks(n, block_size)
    padded = np.zeros(nb * block_size, dtype=x.dtype)
    padded[:n] = x
    blocks = padded.reshape(nb, block_size)
    amax = np.abs(blocks).max(axis=1)
    safe = np.where(amax > 0, amax, x.dtype.type(1))        # an all-zero block gives v = 0
    v = (blocks / safe[:, None]).reshape(-1)[:n]
    codes = np.searchsorted(NF4_THRESHOLDS.astype(x.dtype), v, side="left").astype(np.uint8)
    if n % 2:
        codes = np.append(codes, np.uint8(ZERO_CODE))
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.astype(np.uint8), amax.astype(np.float32)


def dequantize_blocks(packed, scales, n, block_size, dtype, start=0, stop=None):
    """Elements [start, stop) of the flattened weight, as `dtype` (float32 or float64).

    packed ((N+1)//2,) uint8; scales (NB,) float32, the per-block absmax (already
    double-dequantized if need be). value = NF4_CODE[code] * scale, multiplied in `dtype`
    (exact in float64, one rounding in float32).
    """
    dtype = np.dtype(dtype)
    stop = n if stop is None else stop
    idx = np.arange(start, stop)
    byte = packed[idx >> 1]
    codes = np.where(idx & 1, byte & 0x0F, byte >> 4)
    code_vals = NF4_CODE[codes].astype(dtype)
    return code_vals * scales[idx // block_size].astype(dtype)


def quantize_absmax(absmax):
    """absmax (NB,) float32 -> (q (NB,) int8, step (ceil(NB/256),) float32, mean (1,) float32)."""
    mean = np.float32(absmax.astype(np.float64).mean())
    centered = absmax - mean                                   # float32 subtraction
    nb = absmax.shape[0]
    ndq = num_blocks(nb, DQ_BLOCK_SIZE)
    padded = np.zeros(ndq * DQ_BLOCK_SIZE, dtype=np.float32)
    padded[:nb] = centered
    step = np.abs(padded.reshape(ndq, DQ_BLOCK_SIZE)).max(axis=1) / np.float32(DQ_MAX_CODE)
    step_each = np.repeat(step, DQ_BLOCK_SIZE)[:nb].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(step_each > 0, centered.astype(np.float64) / step_each, 0.0)
    q = np.clip(np.rint(ratio), -DQ_MAX_CODE, DQ_MAX_CODE).astype(np.int8)
    return q, step.astype(np.float32), np.array([mean], dtype=np.float32)


def dequantize_absmax(q, step, mean):
    """-> absmax (NB,) float32 = float32(q * step + mean), computed in float64 (q * step is exact)."""
    step_each = np.repeat(step, DQ_BLOCK_SIZE)[:q.shape[0]].astype(np.float64)
    return (q.astype(np.float64) * step_each + np.float64(mean[0])).astype(np.float32)
