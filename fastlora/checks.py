"""Argument checks shared by the fast code and the NumPy twins in fastlora.reference.

Both sides call the same function, so a kernel's wrapper and its twin refuse the same input
with the same message, and neither depends on the other. Every error names the argument and
the bound it broke, e.g. "lr must be finite and > 0, got -1".
"""
import math
import numbers

import numpy as np

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def check_real(name, value, low=None, high=None, low_open=False, high_open=False):
    """`value` as a float, finite and within the bounds given (None: unbounded on that side)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high}")
        where = " and " + " and ".join(bounds) if bounds else ""
        raise ValueError(f"{name} must be finite{where}, got {value!r}")
    return v


def check_int(name, value, low=None):
    """`value` as an int (bools refused), >= low when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def check_grads(grads, writeable):
    """The gradient arrays as a list, or the error naming the first bad one (shared with the kernel wrapper)."""
    grads = list(grads)
    for i, g in enumerate(grads):
        if not isinstance(g, np.ndarray):
            raise TypeError(f"grads[{i}] must be a numpy.ndarray, got {type(g).__name__}")
        if g.dtype not in _FLOATS:
            raise TypeError(f"grads[{i}] must be float32 or float64, got {g.dtype}")
        if writeable and not g.flags.writeable:
            raise ValueError(f"grads[{i}] is read-only; it is scaled in place")
    return grads


# --- BPE: words end to end, merge lists (csrc/bpe.pyx and fastlora.reference.bpe) ---

MAX_ID = 2**31 - 1  # ids and positions are int32 in the kernel


def _int_array(name, a, ndim):
    a = np.asarray(a)
    if a.size == 0 and a.dtype.kind not in "iu":
        a = a.astype(np.int64)  # np.asarray([]) is float64; an empty list is still valid
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def check_words(sym, offsets, counts, id_limit):
    """Validate words given end to end; return (sym int32, offsets int64, counts int64 or None).

    Every symbol must lie in [0, id_limit); offsets start at 0, never decrease and end at
    len(sym); counts (if not None) has one entry >= 1 per word.
    """
    sym = _int_array("sym", sym, 1)
    offsets = _int_array("offsets", offsets, 1)
    if len(sym) >= MAX_ID:
        raise ValueError(f"sym has {len(sym)} symbols; at most {MAX_ID - 1} fit int32 positions")
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(sym):
        raise ValueError(f"offsets must start at 0 and end at len(sym) = {len(sym)}, got "
                         f"{offsets[:1].tolist()} ... {offsets[-1:].tolist()}")
    if np.any(np.diff(offsets) < 0):
        k = int(np.argmax(np.diff(offsets) < 0))
        raise ValueError(f"offsets must not decrease: offsets[{k}] = {int(offsets[k])} > "
                         f"offsets[{k + 1}] = {int(offsets[k + 1])}")
    if len(sym) and (sym.min() < 0 or sym.max() >= id_limit):
        i = int(np.argmax((sym < 0) | (sym >= id_limit)))
        raise ValueError(f"sym[{i}] = {int(sym[i])} is outside [0, {id_limit})")
    if counts is not None:
        counts = _int_array("counts", counts, 1)
        if len(counts) != len(offsets) - 1:
            raise ValueError(f"counts must have one entry per word ({len(offsets) - 1}), "
                             f"got {len(counts)}")
        if len(counts) and counts.min() < 1:
            k = int(np.argmin(counts))
            raise ValueError(f"counts[{k}] = {int(counts[k])} must be >= 1")
        counts = np.ascontiguousarray(counts, dtype=np.int64)
    return (np.ascontiguousarray(sym, dtype=np.int32),
            np.ascontiguousarray(offsets, dtype=np.int64), counts)


def check_merges(merges, n_base):
    """Validate a (M, 2) merge list: merge r may only join ids below n_base + r."""
    merges = _int_array("merges", np.asarray(merges).reshape(-1, 2) if np.size(merges) == 0
                        else merges, 2)
    if merges.shape[1] != 2:
        raise ValueError(f"merges must have shape (M, 2), got {merges.shape}")
    limit = n_base + np.arange(len(merges))
    bad = (merges < 0) | (merges >= limit[:, None])
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"merges[{r}, {c}] = {int(merges[r, c])} is outside [0, {n_base + r}): "
                         f"merge {r} may only join the alphabet and earlier merges")
    return np.ascontiguousarray(merges, dtype=np.int32)


def check_sizes(n_base, num_merges=0, min_count=1):
    for name, value, low in [("n_base", n_base, 1), ("num_merges", num_merges, 0),
                             ("min_count", min_count, 1)]:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if n_base + num_merges > MAX_ID:
        raise ValueError(f"n_base + num_merges = {n_base + num_merges} exceeds the int32 id range")
