"""Fit the float32 erf of csrc/gelu.pyx: erf(x) ~= x P(x^2) / Q(x^2) on [0, ERF_CLAMP], Q(0) = 1.

    python scripts/fit_erf.py

P has degree 4 and Q degree 6 in x^2 (an odd 9/12 rational, the shape Eigen uses for float
erf), fitted for the least maximum *relative* error, so the smallest inputs keep their ulp
accuracy too. ERF_CLAMP is where erf(x) rounds to 1 in float32 (erfc(x) = 2^-25); the kernel
returns +-1 beyond it. Lawson's iteration of weighted least squares (the denominator
linearised, Loeb's way) approaches the minimax fit; float64 and math.erf are exact enough
for a float32 target. Prints the coefficients rounded to float32, as the kernel writes them.
Deterministic.
"""
import math

import numpy as np

NUM_DEGREE, DEN_DEGREE = 4, 6  # in u = x^2
ITERATIONS = 500


def erf_clamp():
    """The x where erfc(x) = 2^-25: beyond it erf(x) rounds to 1.0 in float32."""
    lo, hi = 3.0, 5.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if math.erfc(mid) > 2.0 ** -25 else (lo, mid)
    return lo


def fit(clamp):
    """-> (max relative error, P's and Q's coefficients in powers of x^2) of the float64 fit."""
    n = 4000  # Chebyshev points crowd the ends, where the error of a minimax fit peaks
    x = np.concatenate([clamp / 2 * (1 - np.cos(np.linspace(0, np.pi, n))), np.linspace(0, clamp, n)])
    x = np.unique(x[x > 0])
    f = np.array([math.erf(v) for v in x])
    u = (x / clamp) ** 2  # in [0, 1]: keeps the least-squares system well conditioned
    num_basis = x[:, None] * u[:, None] ** np.arange(NUM_DEGREE + 1)
    den_basis = f[:, None] * u[:, None] ** np.arange(1, DEN_DEGREE + 1)
    weight, den, best = np.ones_like(x), np.ones_like(x), None
    for _ in range(ITERATIONS):
        # x P(u) - f Q(u) = 0 with Q = 1 + ..., divided by f Q_previous: the relative error
        scale = np.sqrt(weight) / (f * den)
        a = np.hstack([num_basis, -den_basis]) * scale[:, None]
        coef = np.linalg.lstsq(a, f * scale, rcond=None)[0]
        p, q = coef[:NUM_DEGREE + 1], np.concatenate([[1.0], coef[NUM_DEGREE + 1:]])
        den = np.polynomial.polynomial.polyval(u, q)
        err = x * np.polynomial.polynomial.polyval(u, p) / den / f - 1.0
        if best is None or np.abs(err).max() < best[0]:
            best = (np.abs(err).max(), p, q)
        weight = weight * np.abs(err)
        weight /= weight.sum()
    worst, p, q = best
    # back from powers of u = x^2 / clamp^2 to powers of x^2
    return (worst, p / clamp ** (2 * np.arange(NUM_DEGREE + 1)),
            q / clamp ** (2 * np.arange(DEN_DEGREE + 1)))


def main():
    clamp = erf_clamp()
    worst, p, q = fit(clamp)
    print(f"ERF_CLAMP = {str(np.float32(clamp))}  (float64 {clamp!r})")
    print(f"max relative error of the float64 fit: {worst:.3g} (float32 rounds to {2.0 ** -24:.3g})")
    print("P:", ", ".join(str(np.float32(c)) for c in p))
    print("Q:", ", ".join(str(np.float32(c)) for c in q))


if __name__ == "__main__":
    main()
