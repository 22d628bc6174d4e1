"""Compiled Cython kernels, built by setup.py from csrc/*.pyx (one module per kernel family).

Do not call these directly: they trust their inputs. fastlora.kernels validates and allocates.

`from fastlora._ext import gelu` gives the AVX2 + FMA build of a kernel (gelu_avx2, see
setup.py) where there is one and the CPU has both, else the portable build;
FASTLORA_SIMD=0 forces the portable builds.
"""
import importlib
import os

from fastlora._runtime import openmp

openmp.load()  # before any kernel module links libgomp: its spin count is read at load


def _cpu_has_avx2_fma():
    if os.environ.get("FASTLORA_SIMD", "1") == "0":
        return False
    try:  # NumPy's own runtime CPU detection (its SIMD dispatch uses the same table)
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        return False
    return bool(features.get("AVX2")) and bool(features.get("FMA3"))


SIMD = _cpu_has_avx2_fma()


def __getattr__(name):
    """Load kernel module `name` on first use: its AVX2 build when SIMD, else the portable one."""
    if name.startswith("_"):
        raise AttributeError(name)
    module = None
    if SIMD:
        try:
            module = importlib.import_module(f"{__name__}.{name}_avx2")
        except ImportError:
            module = None
    if module is None:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no kernel {name!r}") from None
    globals()[name] = module
    return module
