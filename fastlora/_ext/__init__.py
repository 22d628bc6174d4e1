"""Compiled Cython kernels, built by setup.py from csrc/*.pyx (one module per kernel family).

Do not call these directly: they trust their inputs. fastlora.kernels validates and allocates.

`from fastlora._ext import gelu` gives the AVX2 + FMA build of a kernel (gelu_avx2, see
setup.py) where there is one and the CPU has both, else the portable build;
FASTLORA_SIMD=0 forces the portable builds.
"""
import ctypes
import importlib
import os

from fastlora._blas import gemm_pointers

# How long OpenMP's idle workers spin before they sleep. libgomp reads it once, from the
# environment, when it is loaded: so, when no OpenMP runtime is loaded yet and the user set
# neither variable, libgomp is loaded here (the kernels link the same libgomp.so.1) with
# GOMP_SPINCOUNT in the environment for that moment only, then removed again: os.environ is as
# the caller left it. Spinning a little is what a step wants (every product runs in this pool,
# fastlora._gemm; against sleeping workers a small LoRA step went 50 -> 71 ms); spinning long
# (libgomp's default, 300000 turns, milliseconds) is what made two fastlora jobs on two cores
# keep 6% of their speed, the waiting worker of one taking the core the other job's needed.
# Measured in bench/README.md ("Under load"). When NumPy's BLAS cannot be called from the
# kernels' threads, BLAS runs its own threads, which spinning workers fight (a tiny GPT forward
# took 18 ms instead of 2): then the workers sleep at once.
_SPIN_COUNT = "20000"


def _load_openmp():
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    try:
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        return  # loaded already (by another library): its settings stand
    except OSError:
        pass
    name, value = ("GOMP_SPINCOUNT", _SPIN_COUNT) if gemm_pointers() is not None else ("OMP_WAIT_POLICY", "PASSIVE")
    os.environ[name] = value
    try:
        ctypes.CDLL("libgomp.so.1")
    except OSError:  # another OpenMP runtime (clang's libomp): the kernels load it themselves
        pass
    finally:
        del os.environ[name]


_load_openmp()


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
