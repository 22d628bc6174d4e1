"""The OpenMP runtime the kernels share, loaded once with the spin count fastlora wants.

fastlora._ext calls load() before it imports any kernel module.
"""
import ctypes
import os

from fastlora._runtime.blas import gemm_pointers

# How long OpenMP's idle workers spin before they sleep. libgomp reads it once, from the
# environment, when it is loaded: so, when no OpenMP runtime is loaded yet and the user set
# neither variable, libgomp is loaded here (the kernels link the same libgomp.so.1) with
# GOMP_SPINCOUNT in the environment for that moment only, then removed again: os.environ is as
# the caller left it. Spinning a little is what a step wants (every product runs in this pool,
# fastlora._runtime.gemm; against sleeping workers a small LoRA step went 50 -> 71 ms); spinning long
# (libgomp's default, 300000 turns, milliseconds) is what made two fastlora jobs on two cores
# keep 6% of their speed, the waiting worker of one taking the core the other job's needed.
# Measured in bench/README.md ("Under load"). When NumPy's BLAS cannot be called from the
# kernels' threads, BLAS runs its own threads, which spinning workers fight (a tiny GPT forward
# took 18 ms instead of 2): then the workers sleep at once.
_SPIN_COUNT = "20000"


def load():
    """Load libgomp with a bounded spin count, unless the user set one or it is loaded already."""
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
