"""Matrix products with an NF4 weight that never hold the whole float weight (QLoRA's linears).

    y = nf4_matmul(x, q)              # x @ W.T, W = q.dequantize() as (out_features, in_features)
    dx = nf4_matmul_backward(g, q)    # g @ W, the input gradient of the product above
    dequantize_rows(q, r0, r1, out)   # W[r0:r1] into a caller's buffer (what nf4_matmul tiles)
    dequantize_cols(q, c0, c1, out)   # W[:, c0:c1] (what nf4_matmul_backward tiles)

Dimension letters: for the 2-D weight O = out_features rows and K = in_features columns; M rows
of the input. q is a fastlora.lora.nf4.NF4Tensor.
"""
import operator

import numpy as np

from fastlora._runtime import gemm
from fastlora.lora.nf4 import _COMPUTE_DTYPES, NF4Tensor, _describe

__all__ = ["nf4_matmul", "nf4_matmul_backward", "dequantize_rows", "dequantize_cols"]

# Tiles default to about this many elements (1 MiB of float32, a core's L2 here). Measured on
# the base workload's shapes and 2048 x 2048 with 1024 input rows: 2^18 runs as fast as one
# dense matmul; 2^15-2^16 cost up to 2x (thin BLAS products re-read the whole input per tile).
DEFAULT_TILE_ELEMENTS = 1 << 18


def _check_2d(q, name="q"):
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"{name} must be an NF4Tensor, got {type(q).__name__}")
    q._check()
    if q.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (out_features, in_features) weight, got shape {q.shape}")
    return q.shape


def dequantize_rows(q, row_start, row_stop, out):
    """Rows [row_start, row_stop) of the 2-D weight into `out`, a C-contiguous float32 (or
    float64) array of shape (row_stop - row_start, in_features). Returns out."""
    O, K = _check_2d(q)
    row_start, row_stop = operator.index(row_start), operator.index(row_stop)
    if not 0 <= row_start <= row_stop <= O:
        raise ValueError(f"need 0 <= row_start <= row_stop <= {O} (out_features), "
                         f"got row_start={row_start}, row_stop={row_stop}")
    _check_out(out, (row_stop - row_start, K))
    q._fill(out.reshape(-1), row_start * K)
    return out


def dequantize_cols(q, col_start, col_stop, out):
    """Columns [col_start, col_stop) of the 2-D weight, all rows, into `out`, a C-contiguous
    float32 (or float64) array of shape (out_features, col_stop - col_start). Returns out."""
    O, K = _check_2d(q)
    col_start, col_stop = operator.index(col_start), operator.index(col_stop)
    if not 0 <= col_start <= col_stop <= K:
        raise ValueError(f"need 0 <= col_start <= col_stop <= {K} (in_features), "
                         f"got col_start={col_start}, col_stop={col_stop}")
    _check_out(out, (O, col_stop - col_start))
    q._fill_cols(out.reshape(-1), col_start, col_stop - col_start)
    return out


def _check_out(out, shape):
    if not isinstance(out, np.ndarray) or out.dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"out must be a float32 or float64 ndarray, got {_describe(out)}")
    if out.shape != shape or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous array of shape {shape}, "
                         f"got shape {out.shape}")


def _tile(name, tile, per_line, lines):
    """Lines (rows or columns) per tile: `tile` if given, else about DEFAULT_TILE_ELEMENTS."""
    if tile is None:
        return max(1, min(lines, DEFAULT_TILE_ELEMENTS // per_line))
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"{name} must be a positive int, got {tile!r}")
    return int(min(tile, lines))


def _check_operand(name, a, last, out, out_shape):
    if not isinstance(a, np.ndarray) or a.dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"{name} must be a float32 or float64 ndarray, got {_describe(a)}")
    if a.ndim < 1 or a.shape[-1] != last:
        raise ValueError(f"{name} must have last dimension {last}, got shape {a.shape}")
    if out is None:
        return np.empty(out_shape, dtype=a.dtype)
    if not isinstance(out, np.ndarray) or out.dtype != a.dtype or out.shape != out_shape \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous {a.dtype} array of shape {out_shape}, "
                         f"got {_describe(out)}")
    return out


def nf4_matmul(x, q, out=None, tile_rows=None):
    """x @ W.T for x (..., K) and W the (O, K) dequantized weight -> (..., O), in x's dtype.

    W is dequantized `tile_rows` rows at a time into one reused buffer, and each tile's product
    goes straight into its columns of `out` through BLAS; the whole float W is never built.
    """
    O, K = _check_2d(q)
    out = _check_operand("x", x, K, out, x.shape[:-1] + (O,))
    tr = _tile("tile_rows", tile_rows, K, O)
    x2, out2 = x.reshape(-1, K), out.reshape(-1, O)
    buf = np.empty(tr * K, dtype=x.dtype)
    for r0 in range(0, O, tr):
        r1 = min(r0 + tr, O)
        tile = buf[:(r1 - r0) * K]
        q._fill(tile, r0 * K)
        gemm.matmul(x2, tile.reshape(r1 - r0, K), trans_b=True, out=out2[:, r0:r1])
    return out


def nf4_matmul_backward(g, q, out=None, tile_cols=None):
    """g @ W for g (..., O) and W the (O, K) dequantized weight -> (..., K): the input gradient
    of nf4_matmul, written (not accumulated) into `out`.

    Tiled over W's COLUMNS: each strip W[:, c0:c1] gives out[:, c0:c1] = g @ strip in one BLAS
    call. (Row tiles would need the partial products summed, i.e. an (M, K) scratch and an
    extra pass over it per tile.)
    """
    O, K = _check_2d(q)
    out = _check_operand("g", g, O, out, g.shape[:-1] + (K,))
    tc = _tile("tile_cols", tile_cols, O, K)
    g2, out2 = g.reshape(-1, O), out.reshape(-1, K)
    buf = np.empty(O * tc, dtype=g.dtype)
    for c0 in range(0, K, tc):
        c1 = min(c0 + tc, K)
        strip = buf[:O * (c1 - c0)]
        q._fill_cols(strip, c0, c1 - c0)
        gemm.matmul(g2, strip.reshape(O, c1 - c0), out=out2[:, c0:c1])
    return out
