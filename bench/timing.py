"""Timing helpers shared by the benchmark suites (the reference side of a speed-up, and runs
with --benchmark-disable, where pytest-benchmark keeps no statistics)."""
import time

import numpy as np


def median_seconds(fn, repeats=5, warmup=True):
    """Median wall time of fn() over `repeats` calls, after one warm-up call (page faults, threads)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def benchmark_median(benchmark, fn, run=True, repeats=5):
    """pytest-benchmark's median for fn (timing it first when run=True), or our own timing when
    the plugin keeps no statistics (--benchmark-disable, or no benchmark fixture: None)."""
    if run and benchmark is not None:
        benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return median_seconds(fn, repeats=repeats, warmup=run)
    return float(stats.stats.median)
