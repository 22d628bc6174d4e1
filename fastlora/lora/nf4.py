"""NF4 4-bit weights for QLoRA: quantize and dequantize (the matrix products that never hold the
whole float weight are in fastlora.lora.nf4_matmul).

    q = quantize_nf4(w, block_size=64, double_quant=True)   # NF4Tensor, ~0.516 bytes/weight
    w_hat = q.dequantize()                                  # == dequantize_nf4(q)
    arrays, meta = q.to_arrays(); q2 = NF4Tensor.from_arrays(arrays, meta)   # safetensors + JSON

The format (bitsandbytes' NF4 code table, absmax per block, first code in the high nibble,
int8 double quantization of the absmax values) is documented in fastlora.reference.nf4, which
also holds the NumPy twins of the kernels in csrc/nf4.pyx. The array-level functions here
(quantize_blocks, dequantize_blocks, quantize_absmax, dequantize_absmax) have the same
signatures as those twins; they validate, allocate and call the kernels.

Dimension letters: N elements of the weight, NB = ceil(N / block_size) blocks.
"""
from __future__ import annotations

import json
import operator

import numpy as np

from fastlora._ext import nf4 as _k
from fastlora._runtime.threads import threads_for
from fastlora._typing import ArrayLike
from fastlora.spec import (
    DQ_BLOCK_SIZE,
    DQ_MAX_CODE,
    NF4_CODE,
    NF4_THRESHOLDS,
    num_blocks,
)

__all__ = ["NF4Tensor", "quantize_nf4", "dequantize_nf4", "NF4_CODE"]

FORMAT = "fastlora.nf4"
FORMAT_VERSION = 1
DQ_SCHEME = "int8-symmetric"      # see fastlora.reference.nf4; bitsandbytes uses a dynamic 8-bit map

_WEIGHT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_THRESHOLDS = {dt: np.ascontiguousarray(NF4_THRESHOLDS, dtype=dt) for dt in _COMPUTE_DTYPES}
_CODE32 = np.ascontiguousarray(NF4_CODE, dtype=np.float32)
# Placeholders for the kernel's unused scale arguments (it takes the address of element 0).
_NO_F32 = np.zeros(1, dtype=np.float32)
_NO_I8 = np.zeros(1, dtype=np.int8)


def _check_block_size(block_size, name="block_size"):
    if isinstance(block_size, bool):
        raise ValueError(f"{name} must be a positive power of two, got {block_size!r}")
    try:
        bs = operator.index(block_size)
    except TypeError:
        raise ValueError(f"{name} must be a positive power of two (an int), got {block_size!r}") from None
    if bs <= 0 or bs & (bs - 1):
        raise ValueError(f"{name} must be a positive power of two (1, 2, 4, ..., 64, ...), got {bs}")
    return bs


def _describe(a):
    if not isinstance(a, np.ndarray):
        return type(a).__name__
    return f"{a.dtype} array of shape {a.shape}"


def _shift(block_size):
    return int(block_size).bit_length() - 1


# --- array-level fast twins of fastlora.reference.nf4 ----------------------------------------

def quantize_blocks(x, block_size):
    """x (N,) float32/float64 -> (packed (ceil(N/2),) uint8, absmax (NB,) float32)."""
    bs = _check_block_size(block_size)
    x = np.asarray(x)
    if x.dtype not in _COMPUTE_DTYPES or x.ndim != 1 or x.size == 0:
        raise ValueError(f"x must be a non-empty 1-D float32/float64 array, got {x.dtype} {x.shape}")
    x = np.ascontiguousarray(x)
    n = x.shape[0]
    nb = num_blocks(n, bs)
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(nb, dtype=np.float32)
    amax = np.empty(nb, dtype=x.dtype)
    _k.nf4_quantize(packed, absmax, amax, x, _THRESHOLDS[x.dtype], _shift(bs), threads_for(n))
    return packed, absmax


def _check_packed_scales(packed, scales, n, block_size):
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.shape != ((n + 1) // 2,):
        raise ValueError(f"packed must be a uint8 array of shape ({(n + 1) // 2},) for n={n}, "
                         f"got {_describe(packed)}")
    nb = num_blocks(n, block_size)
    if not isinstance(scales, np.ndarray) or scales.dtype != np.float32 or scales.shape != (nb,):
        raise ValueError(f"scales must be a float32 array of shape ({nb},) for n={n}, "
                         f"block_size={block_size}, got {_describe(scales)}")


def dequantize_blocks(packed, scales, n, block_size, dtype, start=0, stop=None):
    """Elements [start, stop) of the flattened weight as `dtype` (float32/float64).

    packed ((N+1)//2,) uint8, scales (NB,) float32 per-block absmax.
    """
    bs = _check_block_size(block_size)
    n = operator.index(n)
    stop = n if stop is None else operator.index(stop)
    start = operator.index(start)
    if n < 1 or not 0 <= start <= stop <= n:
        raise ValueError(f"need 0 <= start <= stop <= n with n >= 1, got start={start}, stop={stop}, n={n}")
    _check_packed_scales(packed, scales, n, bs)
    dtype = np.dtype(dtype)
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    out = np.empty(stop - start, dtype=dtype)
    _k.nf4_dequantize(out, np.ascontiguousarray(packed), _CODE32, np.ascontiguousarray(scales),
                      _NO_I8, _NO_F32, 0.0, False, start, _shift(bs), threads_for(stop - start))
    return out


def quantize_absmax(absmax):
    """absmax (NB,) float32 -> (q (NB,) int8, step (ceil(NB/256),) float32, mean (1,) float32)."""
    absmax = np.asarray(absmax)
    if absmax.dtype != np.float32 or absmax.ndim != 1 or absmax.size == 0:
        raise ValueError(f"absmax must be a non-empty 1-D float32 array, got {absmax.dtype} {absmax.shape}")
    absmax = np.ascontiguousarray(absmax)
    # The same NumPy expression as the twin: np.mean(a, dtype=np.float64) may sum in another order.
    mean = np.float32(absmax.astype(np.float64).mean())
    q = np.empty(absmax.shape[0], dtype=np.int8)
    step = np.empty(num_blocks(absmax.shape[0], DQ_BLOCK_SIZE), dtype=np.float32)
    _k.absmax_quantize(q, step, absmax, float(mean))
    return q, step, np.array([mean], dtype=np.float32)


def dequantize_absmax(q, step, mean):
    """-> absmax (NB,) float32 = float32(q * step + mean)."""
    if not (isinstance(q, np.ndarray) and q.dtype == np.int8 and q.ndim == 1 and q.size):
        raise ValueError("q must be a non-empty 1-D int8 array")
    nd = num_blocks(q.shape[0], DQ_BLOCK_SIZE)
    if not (isinstance(step, np.ndarray) and step.dtype == np.float32 and step.shape == (nd,)):
        raise ValueError(f"step must be a float32 array of shape ({nd},)")
    if not (isinstance(mean, np.ndarray) and mean.dtype == np.float32 and mean.shape == (1,)):
        raise ValueError("mean must be a float32 array of shape (1,)")
    out = np.empty(q.shape[0], dtype=np.float32)
    _k.absmax_dequantize(out, np.ascontiguousarray(q), np.ascontiguousarray(step), float(mean[0]))
    return out


# --- the quantized tensor ----------------------------------------------------------------------

class NF4Tensor:
    """A weight stored as NF4 codes plus per-block scales. Immutable: its arrays are read-only.

    Attributes: shape, dtype (the original float dtype, which dequantize() returns),
    block_size, double_quant, size, ndim, num_blocks, nbytes (every stored byte: codes,
    scales, the double-quantization steps and mean; not the Python object), and the stored
    arrays packed, absmax (None with double_quant), absmax_q, absmax_step, absmax_mean
    (None without). Build one with quantize_nf4() or NF4Tensor.from_arrays().
    """

    def __init__(self, packed, shape, dtype, block_size, absmax=None, absmax_q=None,
                 absmax_step=None, absmax_mean=None):
        self._shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
        self._dtype = dtype
        self._block_size = block_size
        self._double_quant = absmax is None
        self._packed, self._absmax = packed, absmax
        self._absmax_q, self._absmax_step, self._absmax_mean = absmax_q, absmax_step, absmax_mean
        self._check()
        for a in (packed, absmax, absmax_q, absmax_step, absmax_mean):
            if a is not None:
                a.setflags(write=False)

    # Validation runs at construction and again before every use (dequantize, products), since
    # a corrupted object would otherwise make the kernels, which trust their inputs, read out
    # of bounds. It is O(NB), a 64th of the weight.
    def _check(self):
        shape = self._shape
        if not isinstance(shape, tuple) or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            raise ValueError(f"NF4Tensor.shape must be a tuple of non-negative ints, got {shape!r}")
        n = int(np.prod(shape, dtype=np.int64))
        if n < 1:
            raise ValueError(f"NF4Tensor.shape must have at least one element, got {shape}")
        try:
            dtype = np.dtype(self._dtype)
        except TypeError:
            dtype = None
        if dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"NF4Tensor.dtype must be float16, float32 or float64, got {self._dtype!r}")
        bs = _check_block_size(self._block_size, "NF4Tensor.block_size")
        nb = num_blocks(n, bs)
        p = self._packed
        if not (isinstance(p, np.ndarray) and p.dtype == np.uint8 and p.shape == ((n + 1) // 2,)):
            raise ValueError(f"NF4Tensor.packed must be a uint8 array of shape ({(n + 1) // 2},) = "
                             f"ceil({n} / 2) for shape {shape}, got {_describe(p)}")
        if not self._double_quant:
            a = self._absmax
            if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (nb,)):
                raise ValueError(f"NF4Tensor.absmax must be a float32 array of shape ({nb},) = "
                                 f"ceil({n} / {bs}), got {_describe(a)}")
            if not (np.isfinite(a).all() and (a >= 0).all()):
                raise ValueError("NF4Tensor.absmax must be finite and >= 0")
            if any(x is not None for x in (self._absmax_q, self._absmax_step, self._absmax_mean)):
                raise ValueError("NF4Tensor has both absmax and the double-quantized absmax_q/step/mean")
            return
        q, step, mean = self._absmax_q, self._absmax_step, self._absmax_mean
        nd = num_blocks(nb, DQ_BLOCK_SIZE)
        if not (isinstance(q, np.ndarray) and q.dtype == np.int8 and q.shape == (nb,)):
            raise ValueError(f"NF4Tensor.absmax_q must be an int8 array of shape ({nb},) = "
                             f"ceil({n} / {bs}), got {_describe(q)}")
        if int(q.min()) < -DQ_MAX_CODE:
            raise ValueError(f"NF4Tensor.absmax_q codes must be in [-{DQ_MAX_CODE}, {DQ_MAX_CODE}], "
                             f"got {int(q.min())}")
        if not (isinstance(step, np.ndarray) and step.dtype == np.float32 and step.shape == (nd,)):
            raise ValueError(f"NF4Tensor.absmax_step must be a float32 array of shape ({nd},) = "
                             f"ceil({nb} / {DQ_BLOCK_SIZE}), got {_describe(step)}")
        if not (np.isfinite(step).all() and (step >= 0).all()):
            raise ValueError("NF4Tensor.absmax_step must be finite and >= 0")
        if not (isinstance(mean, np.ndarray) and mean.dtype == np.float32 and mean.shape == (1,)):
            raise ValueError(f"NF4Tensor.absmax_mean must be a float32 array of shape (1,), got {_describe(mean)}")
        if not (np.isfinite(mean[0]) and mean[0] >= 0):
            raise ValueError(f"NF4Tensor.absmax_mean must be finite and >= 0, got {mean[0]}")

    shape = property(lambda self: self._shape)
    dtype = property(lambda self: np.dtype(self._dtype))
    block_size = property(lambda self: int(self._block_size))
    double_quant = property(lambda self: self._double_quant)
    packed = property(lambda self: self._packed)
    absmax = property(lambda self: self._absmax)
    absmax_q = property(lambda self: self._absmax_q)
    absmax_step = property(lambda self: self._absmax_step)
    absmax_mean = property(lambda self: self._absmax_mean)

    @property
    def size(self):
        return int(np.prod(self._shape, dtype=np.int64))

    @property
    def ndim(self):
        return len(self._shape)

    @property
    def num_blocks(self):
        return num_blocks(self.size, self.block_size)

    @property
    def nbytes(self):
        arrays = (self._packed, self._absmax, self._absmax_q, self._absmax_step, self._absmax_mean)
        return int(sum(a.nbytes for a in arrays if a is not None))

    def __repr__(self):
        dq = "double_quant" if self._double_quant else "float32 absmax"
        return (f"NF4Tensor(shape={self._shape}, dtype={self.dtype}, block_size={self.block_size}, "
                f"{dq}, {self.nbytes / self.size:.4f} bytes/weight)")

    def scales(self):
        """The per-block absmax values the dequantization uses, (NB,) float32."""
        self._check()
        if self._double_quant:
            return dequantize_absmax(self._absmax_q, self._absmax_step, self._absmax_mean)
        return self._absmax.copy()

    def _scale_args(self):
        if self._double_quant:
            return _NO_F32, self._absmax_q, self._absmax_step, float(self._absmax_mean[0])
        return self._absmax, _NO_I8, _NO_F32, 0.0

    def _fill(self, out, start):
        """Kernel call without checks: out (L,) float32/float64 <- flattened elements [start, start+L)."""
        absmax, q, step, mean = self._scale_args()
        _k.nf4_dequantize(out, self._packed, _CODE32, absmax, q, step, mean, self._double_quant,
                          start, _shift(self.block_size), threads_for(out.shape[0]))

    def _fill_cols(self, out, col_start, cols):
        """Kernel call without checks: out (O * cols,) <- W[:, col_start:col_start+cols] of a 2-D weight."""
        absmax, q, step, mean = self._scale_args()
        _k.nf4_dequantize_cols(out, self._packed, _CODE32, absmax, q, step, mean, self._double_quant,
                               0, col_start, cols, self._shape[1], _shift(self.block_size),
                               threads_for(out.shape[0]))

    def dequantize(self, dtype=None):
        """The float weight, shape self.shape, as `dtype` (default: the original dtype)."""
        self._check()
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"dtype must be float16, float32 or float64, got {dtype}")
        compute = np.float64 if dtype == np.float64 else np.float32
        out = np.empty(self.size, dtype=compute)
        self._fill(out, 0)
        return out.astype(dtype, copy=False).reshape(self._shape)

    # --- serialisation (safetensors-friendly: arrays + JSON meta, no pickle) -----------------

    def to_arrays(self):
        """-> (arrays {name: ndarray}, meta {JSON-able}). from_arrays(arrays, meta) rebuilds it."""
        self._check()
        if self._double_quant:
            arrays = {"packed": self._packed, "absmax_q": self._absmax_q,
                      "absmax_step": self._absmax_step, "absmax_mean": self._absmax_mean}
        else:
            arrays = {"packed": self._packed, "absmax": self._absmax}
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "shape": [int(d) for d in self._shape],
                "dtype": self.dtype.name, "block_size": self.block_size,
                "double_quant": self._double_quant}
        if self._double_quant:
            meta.update(double_quant_block_size=DQ_BLOCK_SIZE, double_quant_scheme=DQ_SCHEME)
        return {k: v.copy() for k, v in arrays.items()}, meta

    @classmethod
    def from_arrays(cls, arrays, meta):
        """Rebuild from to_arrays() output; `meta` may also be its JSON string. Checks everything."""
        if isinstance(meta, (str, bytes)):
            meta = json.loads(meta)
        if not isinstance(meta, dict):
            raise ValueError(f"meta must be a dict (or its JSON), got {type(meta).__name__}")
        for key in ("format", "version", "shape", "dtype", "block_size", "double_quant"):
            if key not in meta:
                raise ValueError(f"meta is missing {key!r}")
        if meta["format"] != FORMAT:
            raise ValueError(f"meta['format'] must be {FORMAT!r}, got {meta['format']!r}")
        if meta["version"] != FORMAT_VERSION:
            raise ValueError(f"meta['version'] must be {FORMAT_VERSION}, got {meta['version']!r}")
        dq = meta["double_quant"]
        if not isinstance(dq, bool):
            raise ValueError(f"meta['double_quant'] must be true or false, got {dq!r}")
        if dq:
            if meta.get("double_quant_block_size") != DQ_BLOCK_SIZE:
                raise ValueError(f"meta['double_quant_block_size'] must be {DQ_BLOCK_SIZE}, "
                                 f"got {meta.get('double_quant_block_size')!r}")
            if meta.get("double_quant_scheme") != DQ_SCHEME:
                raise ValueError(f"meta['double_quant_scheme'] must be {DQ_SCHEME!r}, "
                                 f"got {meta.get('double_quant_scheme')!r}")
        names = ("packed", "absmax_q", "absmax_step", "absmax_mean") if dq else ("packed", "absmax")
        missing = [k for k in names if k not in arrays]
        extra = [k for k in arrays if k not in names]
        if missing or extra:
            raise ValueError(f"arrays must hold exactly {list(names)} for double_quant={dq}; "
                             f"missing {missing}, unexpected {extra}")
        shape = meta["shape"]
        if not isinstance(shape, (list, tuple)):
            raise ValueError(f"meta['shape'] must be a list of ints, got {shape!r}")
        try:
            dtype = np.dtype(meta["dtype"])
        except TypeError:
            raise ValueError(f"meta['dtype'] must be float16, float32 or float64, got {meta['dtype']!r}") from None
        # Own, contiguous copies: the caller's arrays (e.g. a safetensors buffer) stay theirs.
        own = {k: np.array(v, copy=True, order="C") if isinstance(v, np.ndarray) else v
               for k, v in arrays.items()}
        if dq:
            return cls(own["packed"], tuple(shape), dtype, meta["block_size"], absmax_q=own["absmax_q"],
                       absmax_step=own["absmax_step"], absmax_mean=own["absmax_mean"])
        return cls(own["packed"], tuple(shape), dtype, meta["block_size"], absmax=own["absmax"])


def quantize_nf4(w: ArrayLike, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a float weight (any shape) to NF4 in blocks of `block_size` along its flattened
    (C-order) elements. double_quant=True stores the block absmax values as int8 (~4.127 bits
    per weight in all); False stores them as float32 (4.5 bits)."""
    bs = _check_block_size(block_size)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
    w = np.asarray(w)
    if w.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"w must be a floating-point array (float16, float32 or float64), got dtype {w.dtype}")
    if w.size == 0:
        raise ValueError(f"w must have at least one element, got shape {w.shape}")
    finite = np.isfinite(w)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(f"w must be finite; w[{', '.join(map(str, where))}] = {w[where]}")
    big = np.abs(w).max()
    if big > np.finfo(np.float32).max:
        raise ValueError(f"w must satisfy |w| <= {np.finfo(np.float32).max:.4g} (the float32 absmax "
                         f"scales), got max |w| = {big:.4g}")
    x = np.ascontiguousarray(w, dtype=np.float32 if w.dtype == np.float16 else w.dtype).reshape(-1)
    packed, absmax = quantize_blocks(x, bs)
    if not double_quant:
        return NF4Tensor(packed, w.shape, w.dtype, bs, absmax=absmax)
    q, step, mean = quantize_absmax(absmax)
    return NF4Tensor(packed, w.shape, w.dtype, bs, absmax_q=q, absmax_step=step, absmax_mean=mean)


def dequantize_nf4(q: NF4Tensor) -> np.ndarray:
    """The float weight of an NF4Tensor, in its original shape and dtype."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    return q.dequantize()
