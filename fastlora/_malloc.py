"""Keep big NumPy buffers in the malloc heap so a training step reuses memory instead of faulting it in.

glibc hands out every allocation above 128 KiB as a fresh mmap and returns it to the kernel on
free, so each step's activations and gradients (all above that) were page-faulted in anew:
a small-workload LoRA step took 150 ms that way and 89 ms with the heap kept. Raising the mmap
threshold to its maximum (32 MiB on 64-bit) and the trim threshold keeps freed blocks for the
next step, the job PyTorch's caching allocator does. The resident peak is unchanged (it is
the high-water mark either way); memory freed after training is kept by the process.
Set FASTLORA_DEFAULT_MALLOC=1 to leave malloc alone. Non-glibc platforms are untouched.
"""
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit: HEAP_MAX_SIZE / 2
_TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_heap():
    """Apply the settings above; returns True when glibc accepted them."""
    if os.environ.get("FASTLORA_DEFAULT_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
