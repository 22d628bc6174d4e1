"""fastlora's process settings, applied around its own work only and undone after it.

    with fastlora.runtime():        # what Trainer.train and the fastlora command run inside
        for batch in loader: ...    # your own training loop

Inside the block:
- malloc keeps freed big blocks in its heap, so each step reuses the last step's buffers
  instead of page-faulting them in (fastlora._runtime.malloc: a small LoRA step 150 -> 89 ms); glibc's
  defaults are set back at the end of the outermost block;
- NumPy's BLAS gets back, at the end, the thread count it had (fastlora._runtime.blas.kept; a model
  call, an autograd op or a drop-in kernel does the same on its own).

Nothing of this happens at `import fastlora`, and no environment variable is written. Two
things are process-wide because they cannot be otherwise, both limited to fastlora's kernels:
- OpenMP's waiting workers spin for a bounded time (GOMP_SPINCOUNT, read by libgomp once
  when it loads, so set only while fastlora._runtime.openmp loads it, and removed at once);
- the kernels use fewer threads while other programs keep cores busy
  (fastlora._runtime.threads.effective_threads; off with set_num_threads(n) or OMP_NUM_THREADS).
"""
from fastlora._runtime import blas as _blas
from fastlora._runtime import malloc as _malloc
from fastlora._runtime import threads as _threads


def set_num_threads(n: int) -> None:
    """Use `n` threads in the kernels and in BLAS (process-wide, as asked: not undone)."""
    _threads.set_count(n)
    _blas.reset()
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n, user_api="blas")
    except ImportError:  # threadpoolctl is a dependency, but BLAS control is best-effort
        pass


class runtime:
    """Context manager: fastlora's malloc tuning and BLAS thread bookkeeping for a block (see above).
    Blocks nest; re-entering an instance is allowed."""
    __slots__ = ("_heap", "_blas")

    def __enter__(self):
        self._heap, self._blas = _malloc.kept_heap(), _blas.kept()
        self._heap.__enter__()
        self._blas.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._blas.__exit__(*exc)
        finally:
            self._heap.__exit__(*exc)
        return False
