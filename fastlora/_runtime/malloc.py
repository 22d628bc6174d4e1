"""Keep big NumPy buffers in the malloc heap so a training step reuses memory instead of faulting it in.

glibc hands out every allocation above 128 KiB as a fresh mmap and returns it to the kernel on
free, so each step's activations and gradients (all above that) were page-faulted in anew:
a small-workload LoRA step took 150 ms that way and 89 ms with the heap kept. Raising the mmap
threshold to its maximum (32 MiB on 64-bit) and the trim threshold keeps freed blocks for the
next step, the job PyTorch's caching allocator does. The resident peak is unchanged (it is
the high-water mark either way).

Only fastlora's own work runs so (`kept_heap()`, entered by fastlora.runtime(), so by
Trainer.train and the fastlora command); importing fastlora changes nothing. When the
outermost block ends, glibc's defaults (128 KiB each) are set back, so memory freed after
training goes back to the system (malloc_trim); one difference remains: glibc no longer raises the
mmap threshold by itself once a program has set it. Set FASTLORA_DEFAULT_MALLOC=1 to leave
malloc alone; a process whose environment tunes malloc (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES) is left alone too. Non-glibc platforms are untouched.
"""
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit: HEAP_MAX_SIZE / 2
# never trim inside a block: a step frees more than any fixed threshold at the heap's top (a
# SmolLM2-135M LoRA step's backward, over 256 MiB) and the next step's forward faulted it all in
# again: 74k page faults a step, 5.5-5.8 s a step against 4.7-4.9 s untrimmed, the same peak
# resident memory; the block's end gives it back (malloc_trim)
_TRIM_THRESHOLD = 2 ** 31 - 1
_GLIBC_DEFAULT = 128 * 1024  # both thresholds' default (DEFAULT_MMAP_THRESHOLD_MIN, DEFAULT_TRIM_THRESHOLD)
_USER_TUNING = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_depth = 0


def _mallopt():
    """glibc's mallopt, or None where malloc is to be left alone."""
    if os.environ.get("FASTLORA_DEFAULT_MALLOC") == "1" or not sys.platform.startswith("linux") \
            or any(name in os.environ for name in _USER_TUNING):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def _apply(mmap_threshold, trim_threshold):
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok


def keep_heap():
    """Apply the settings above for the rest of the process; returns True when glibc accepted them.
    (The CLI's process; a library caller uses kept_heap().)"""
    return _apply(_MMAP_THRESHOLD_MAX, _TRIM_THRESHOLD)


def default_heap():
    """glibc's default thresholds again, and the heap's free memory given back to the system
    (malloc_trim), as the defaults would have; returns True when glibc accepted them."""
    ok = _apply(_GLIBC_DEFAULT, _GLIBC_DEFAULT)
    if ok:
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    return ok


class kept_heap:
    """A block of fastlora's own work with the heap kept (see above); blocks nest, the outermost
    sets the thresholds and sets glibc's defaults back at its end."""
    __slots__ = ("_applied",)

    def __enter__(self):
        global _depth
        self._applied = _depth == 0 and keep_heap()
        _depth += 1
        return self

    def __exit__(self, *exc):
        global _depth
        _depth -= 1
        if self._applied:
            default_heap()
        return False
