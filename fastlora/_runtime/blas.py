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
import functools
import itertools

from fastlora._runtime.threads import effective_threads

# Below this many multiply-adds a product runs on one thread (measured: see bench/README.md).
GEMM_MIN_FLOPS = 1 << 21

_current = None
_depth = 0  # open kept() blocks
_outer = None  # the count the outermost kept() block found, given back when it ends
_callers = None  # the count a call outside any kept() block found, given back by settle()


@functools.cache
def _openblas_dlls():
    """ctypes handles of the (pthreads-threaded) OpenBLAS libraries loaded in this process
    (NumPy's, loaded before fastlora is); inspected once, for the setter and the GEMMs both."""
    try:
        from threadpoolctl import ThreadpoolController
        controllers = ThreadpoolController().lib_controllers
    except Exception:  # noqa: BLE001 - no threadpoolctl, or it cannot inspect this process
        return ()
    return tuple(ctypes.CDLL(lib.filepath) for lib in controllers
                 if getattr(lib, "internal_api", None) == "openblas"
                 and getattr(lib, "threading_layer", "") != "openmp")


def _symbol(dll, name):
    """dll's function `name` under OpenBLAS's symbol spellings: (function, 64-bit ints) or None."""
    for prefix, suffix in itertools.product(("", "scipy_"), ("64_", "_64", "")):
        fn = getattr(dll, f"{prefix}{name}{suffix}", None)
        if fn is not None:
            return fn, bool(suffix)
    return None


@functools.cache
def _function(name, argtypes, restype):
    """OpenBLAS's C function `name` in the library NumPy uses, typed, or None (looked up once)."""
    for dll in _openblas_dlls():
        found = _symbol(dll, name)
        if found is not None:
            fn = found[0]
            fn.argtypes, fn.restype = list(argtypes), restype
            return fn
    return None


def _setter():
    return _function("openblas_set_num_threads", (ctypes.c_int,), None)


def _getter():
    """The openblas_get_num_threads function of the OpenBLAS that use() switches, or None."""
    return _function("openblas_get_num_threads", (), ctypes.c_int)


@functools.cache
def gemm_pointers():
    """(address of cblas_sgemm, of cblas_dgemm, 64-bit ints?) of NumPy's OpenBLAS, or None
    (looked up once: fastlora._runtime.openmp and .gemm both ask).

    The fused attention kernel calls these directly from its OpenMP threads. Only an OpenBLAS
    whose thread count this module controls qualifies (the kernel sets it to one first), and
    the integer width must be known: the "64_" symbols take 64-bit ints, plain ones take
    64-bit ints only when the library says USE64BITINT.
    """
    for dll in _openblas_dlls():
        if _symbol(dll, "openblas_set_num_threads") is None:
            continue
        sgemm, dgemm = _symbol(dll, "cblas_sgemm"), _symbol(dll, "cblas_dgemm")
        if sgemm is None or dgemm is None or sgemm[1] != dgemm[1]:
            continue
        int64 = sgemm[1]
        if not int64:
            config = _symbol(dll, "openblas_get_config")
            if config is None:
                continue
            config[0].restype = ctypes.c_char_p
            int64 = b"USE64BITINT" in (config[0]() or b"")
        address = [ctypes.cast(fn, ctypes.c_void_p).value for fn, _ in (sgemm, dgemm)]
        return address[0], address[1], int64
    return None


def use(n, force=False):
    """Make the next BLAS calls use n threads (no-op without OpenBLAS, and when this module
    set n last, unless force: the kernels that call BLAS from their own threads force 1, as
    anything, e.g. threadpoolctl, may have changed the count since; a call costs < 1 us).

    Outside a kept() block (a bare autograd op) the first call notes the caller's count, which
    settle() gives back when the op returns (fastlora.autograd.tensor.make_result calls it)."""
    global _current, _callers
    if _depth == 0 and _callers is None:
        getter = _getter()
        if getter is not None:
            _callers = _current = getter()
    if n == _current and not force:
        return
    _set(n)


def _set(n):
    global _current
    setter = _setter()
    if setter is not None:
        setter(int(n))
    _current = n


def settle():
    """Give BLAS back the count a call outside any kept() block found (see use); cheap when none."""
    global _callers
    if _callers is not None and _depth == 0:
        before, _callers = _callers, None
        if before != _current:
            _set(before)


class kept:
    """Run a block that may switch OpenBLAS's thread count, then put back the count it had.

    Blocks nest: only the outermost reads and restores the count (an inner one costs a few
    attribute reads). Module.__call__, Tensor.backward, the drop-in kernels and
    fastlora.runtime() (so Trainer.train) run inside one, so a user's own NumPy products
    afterwards get the threads they had, not the single thread the kernels leave behind.
    One process-wide count, as OpenBLAS's: not meant for fastlora calls from several threads."""
    __slots__ = ()

    def __enter__(self):
        global _depth, _outer, _current, _callers
        if _depth == 0:
            if _callers is not None:  # a bare call that has not settled (a kernel, or an op that raised)
                _outer, _callers = _callers, None
            else:
                getter = _getter()
                _outer = getter() if getter is not None else None
                if _outer is not None:
                    _current = _outer  # the count now, whatever changed it since this module last did
        _depth += 1
        return self

    def __exit__(self, *exc):
        global _depth
        _depth -= 1
        if _depth == 0 and _outer is not None and _current != _outer:
            _set(_outer)
        return False


def threads_for_gemm(m, n, k):
    return 1 if m * n * k < GEMM_MIN_FLOPS else effective_threads()


def reset():
    """Forget the cached count (after something else, e.g. threadpoolctl, changed it)."""
    global _current, _callers
    _current = _callers = None
