"""Argument checks shared by the optimizers, the schedule and the kernel wrappers.

Every error names the argument and the bound it broke, e.g. "lr must be finite and > 0, got -1".
"""
import math
import numbers


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
