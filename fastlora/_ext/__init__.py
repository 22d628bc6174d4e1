"""Compiled Cython kernels, built by setup.py from csrc/*.pyx (one module per kernel family).

Do not call these directly: they trust their inputs. fastlora.kernels validates and allocates.
"""
import os

# OpenMP worker threads that busy-wait after a parallel region fight OpenBLAS's threads for
# the same cores and made a tiny GPT step ~9x slower here (18 ms vs 2 ms per forward).
# libgomp reads this when it is loaded, i.e. with the first kernel module below; a value the
# user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
