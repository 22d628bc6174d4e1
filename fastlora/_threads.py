"""How many threads the OpenMP kernels use.

The default is every core, or OMP_NUM_THREADS when set; `set_num_threads` overrides it for
the kernels (and for BLAS through threadpoolctl). Small arrays run on one thread because
waking a thread team costs more than the work.
"""
import os

_MIN_WORK_PER_THREAD = 16384

_num_threads = None


def get_num_threads() -> int:
    global _num_threads
    if _num_threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        try:
            _num_threads = max(1, int(env.split(",")[0]))
        except ValueError:
            _num_threads = os.cpu_count() or 1
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use `n` threads in the kernels and in BLAS."""
    global _num_threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads must be a positive int, got {n!r}")
    _num_threads = n
    from fastlora import _blas
    _blas.reset()
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n, user_api="blas")
    except ImportError:  # threadpoolctl is a dependency, but BLAS control is best-effort
        pass


def threads_for(work: int) -> int:
    """Threads for a kernel touching `work` elements: 1 for small jobs, else the configured count."""
    n = get_num_threads()
    if n == 1 or work < 2 * _MIN_WORK_PER_THREAD:
        return 1
    return int(min(n, work // _MIN_WORK_PER_THREAD))
