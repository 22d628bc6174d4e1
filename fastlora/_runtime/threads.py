"""How many threads the OpenMP kernels use.

The default is every core, or OMP_NUM_THREADS when set; `set_count` (fastlora.set_num_threads)
overrides it. Small arrays run on one thread because waking a thread team costs more than the
work.

On a busy machine the default count shrinks to the cores the rest of the machine leaves free
(`effective_threads`): an OpenMP team is as slow as its slowest thread, and a thread that
waits for a core stalls every other one at the next barrier (two fastlora jobs on 2 cores
each kept 6% of their solo speed with two threads apiece). Every 0.25 s at most, the kernels
read how many threads the machine has runnable (/proc/loadavg's 4th field), take away this
process's own (/proc/self/task/*/stat) and average the rest over the last second; the count
is the cores minus that, rounded, between 1 and the configured count. A count set by
`set_num_threads` or OMP_NUM_THREADS is used as given, as is the default with
FASTLORA_ADAPTIVE_THREADS=0. See bench/README.md ("Under load") for the figures.
"""
import collections
import os
import time

_MIN_WORK_PER_THREAD = 16384
_SAMPLE_EVERY_S = 0.25
_SAMPLES = 4  # averaged: one second of the machine's load

_num_threads = None
_explicit = None  # True when the count was asked for (set_num_threads, OMP_NUM_THREADS)
_cap = None
_next_sample = 0.0
_others = collections.deque(maxlen=_SAMPLES)


def get_num_threads() -> int:
    global _num_threads, _explicit
    if _num_threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        try:
            _num_threads = max(1, int(env.split(",")[0]))
            _explicit = True
        except ValueError:
            _num_threads = os.cpu_count() or 1
            _explicit = os.environ.get("FASTLORA_ADAPTIVE_THREADS", "1") == "0"
    return _num_threads


def _running_elsewhere():
    """Threads runnable on the machine now, less this process's own; None where unknown."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
        mine = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:  # the thread ended meanwhile
                continue
            if stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"R":
                mine += 1
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - mine)


def effective_threads() -> int:
    """The kernels' thread count now: the configured one, less the cores others keep busy."""
    global _cap, _next_sample
    n = get_num_threads()
    if n == 1 or _explicit:
        return n
    now = time.monotonic()
    if now >= _next_sample:
        _next_sample = now + _SAMPLE_EVERY_S
        others = _running_elsewhere()
        if others is None:
            _cap = None
        else:
            _others.append(others)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else n
            free = min(cores, os.cpu_count() or cores) - sum(_others) / len(_others)
            _cap = max(1, min(n, int(free + 0.5)))
    return n if _cap is None else _cap


def set_count(n: int) -> None:
    """Use `n` threads in the kernels, as asked (fastlora.set_num_threads also tells BLAS)."""
    global _num_threads, _explicit
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads must be a positive int, got {n!r}")
    _num_threads, _explicit = n, True


def threads_for(work: int) -> int:
    """Threads for a kernel touching `work` elements: 1 for small jobs, else the configured count."""
    if work < 2 * _MIN_WORK_PER_THREAD:
        return 1
    n = effective_threads()
    if n == 1:
        return 1
    return int(min(n, work // _MIN_WORK_PER_THREAD))
