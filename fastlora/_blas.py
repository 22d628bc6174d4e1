"""Per-call BLAS thread count: one thread for small matrix products, every core for big ones.

OpenBLAS splits a product over its threads once it passes a small size, and for the tiny and
small workloads that split costs more than it saves (the threads must wake and meet), while
on a busy machine a descheduled worker stalls the whole call. `threads_for_gemm(m, n, k)`
picks 1 below GEMM_MIN_FLOPS and the configured count above; `use(n)` switches OpenBLAS
through its own C entry point (a cheap call, unlike threadpoolctl's context manager),
and only when the count changes. Without OpenBLAS (another BLAS, or an OpenMP-threaded
build where the limit is per thread) this module does nothing.
"""
import ctypes
import itertools

from fastlora._threads import get_num_threads

# Below this many multiply-adds a product runs on one thread (measured: see bench/README.md).
GEMM_MIN_FLOPS = 1 << 21

_setter = None
_current = None
_searched = False


def _find_setter():
    """The openblas_set_num_threads function of the OpenBLAS that NumPy uses, or None."""
    try:
        from threadpoolctl import ThreadpoolController
        controllers = ThreadpoolController().lib_controllers
    except Exception:  # noqa: BLE001 - no threadpoolctl, or it cannot inspect this process
        return None
    for lib in controllers:
        if getattr(lib, "internal_api", None) != "openblas" or getattr(lib, "threading_layer", "") == "openmp":
            continue
        dll = ctypes.CDLL(lib.filepath)
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            fn = getattr(dll, f"{prefix}openblas_set_num_threads{suffix}", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn.restype = None
                return fn
    return None


def use(n):
    """Make the next BLAS calls use n threads (no-op when already so or without OpenBLAS)."""
    global _setter, _current, _searched
    if n == _current:
        return
    if not _searched:
        _setter, _searched = _find_setter(), True
    if _setter is not None:
        _setter(int(n))
    _current = n


def threads_for_gemm(m, n, k):
    return 1 if m * n * k < GEMM_MIN_FLOPS else get_num_threads()


def reset():
    """Forget the cached count (after something else, e.g. threadpoolctl, changed it)."""
    global _current
    _current = None
