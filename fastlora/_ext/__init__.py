"""Compiled Cython kernels, built by setup.py from csrc/*.pyx (one module per kernel family).

Do not call these directly: they trust their inputs. fastlora.kernels validates and allocates.
"""
import os

from fastlora._blas import gemm_pointers

# OpenMP worker threads busy-wait a little after a parallel region (libgomp's default), which
# is what a training step wants when every product runs in that same pool (fastlora._gemm:
# a small LoRA step went 71 -> 50 ms against sleeping workers). When NumPy's BLAS cannot be
# called that way, BLAS runs its own threads and spinning OpenMP workers fight them for the
# cores (a tiny GPT forward took 18 ms instead of 2), so then the workers sleep at once.
# libgomp reads this when it is loaded, i.e. with the first kernel module; a value the user
# set is kept.
if "OMP_WAIT_POLICY" not in os.environ and gemm_pointers() is None:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
