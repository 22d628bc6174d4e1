"""fastlora vs PyTorch: tokens/s and peak memory of a training step, each run in its own process.

    python bench/compare_torch.py                      # every workload, LoRA and full
    python bench/compare_torch.py --workloads tiny,small --modes lora --rounds 7

For each (workload, mode) the two frameworks run alternately, `--rounds` times each, in fresh
processes, so both see the same machine and neither inherits the other's memory. A process
builds the model, warms up, then times `--steps` steps and reports the median step time and
its peak resident memory (ru_maxrss, imports included). The table gives the median over rounds
of each side, and the ratio fastlora / PyTorch of tokens per second (above 1: fastlora is
faster) as the median of the rounds' own ratios: each round pairs two processes run back to
back, so a slow spell of this shared machine that lasts a round or longer cancels out of its
ratio instead of moving one side's median.

Below the table: the base workload's achieved GFLOP/s (workloads.step_flops over the median
step time) against the float32 GEMM peak of this machine: the best of 10 products of 2048^3
in NumPy's OpenBLAS on the same threads, measured in its own process before and after the
table (the higher of the two: a slow spell only lowers it).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from workloads import step_flops  # noqa: E402


def gemm_peak(threads, n=2048, repeats=10):
    """GFLOP/s of the best of `repeats` float32 n^3 products in NumPy's BLAS on `threads`."""
    import time

    import numpy as np
    from threadpoolctl import threadpool_limits
    a, b = (np.random.default_rng(0).standard_normal((n, n)).astype(np.float32) for _ in range(2))
    best = float("inf")
    with threadpool_limits(threads, user_api="blas"):
        a @ b
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best / 1e9


def worker(framework, workload, mode, steps, threads):
    if framework == "peak":
        print(json.dumps({"gflops": gemm_peak(threads)}))
        return
    if framework == "torch":
        import torch
        torch.set_num_threads(threads)
    from steps import make_step
    from timing import median_seconds
    step, tokens = make_step(framework, workload, mode)
    step()  # a second warm-up step: median_seconds does one more
    median = median_seconds(step, repeats=steps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"step_s": median, "tokens_per_s": tokens / median, "peak_mb": peak_mb}))


def run_worker(framework, workload, mode, steps, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--worker", framework, "--workloads", workload,
                          "--modes", mode, "--steps", str(steps), "--threads", str(threads)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{framework} {workload} {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="tiny,small,base")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process "
                        "(default: 30 tiny, 10 small, 5 base)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", choices=["fastlora", "torch", "peak"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.workloads, args.modes, args.steps, args.threads)
        return 0

    default_steps = {"tiny": 30, "small": 10, "base": 5}
    workloads = args.workloads.split(",")
    peak_before = run_worker("peak", "base", "-", 0, args.threads)["gflops"] if "base" in workloads else None
    rows, base_steps = [], {}
    header = f"{'workload':8} {'mode':5} {'fastlora tok/s':>14} {'torch tok/s':>12} {'ratio':>6} " \
             f"{'fastlora MB':>11} {'torch MB':>9} {'MB ratio':>8}"
    print(f"{args.threads} threads, {args.rounds} alternating rounds per cell: medians of each side, "
          f"ratio = median of the rounds' ratios", flush=True)
    print(header)
    print("-" * len(header), flush=True)
    for workload in workloads:
        for mode in args.modes.split(","):
            steps = args.steps or default_steps.get(workload, 5)
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(run_worker("fastlora", workload, mode, steps, args.threads))
                theirs.append(run_worker("torch", workload, mode, steps, args.threads))
            if workload == "base":
                base_steps[mode] = statistics.median(r["step_s"] for r in ours)
            f_tps = statistics.median(r["tokens_per_s"] for r in ours)
            t_tps = statistics.median(r["tokens_per_s"] for r in theirs)
            ratio = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, theirs))
            f_mb = statistics.median(r["peak_mb"] for r in ours)
            t_mb = statistics.median(r["peak_mb"] for r in theirs)
            row = f"{workload:8} {mode:5} {f_tps:14,.0f} {t_tps:12,.0f} {ratio:6.2f} " \
                  f"{f_mb:11.0f} {t_mb:9.0f} {f_mb / t_mb:8.2f}"
            rows.append(row)
            print(row, flush=True)
    if base_steps:
        peak = max(peak_before, run_worker("peak", "base", "-", 0, args.threads)["gflops"])
        print(f"\nbase workload, fastlora: GEMM peak {peak:.0f} GFLOP/s (2048^3 float32, {args.threads} threads)")
        for mode, step_s in base_steps.items():
            rate = step_flops("base", mode) / step_s / 1e9
            print(f"  {mode:5} step {step_flops('base', mode) / 1e9:.1f} GFLOP in {step_s:.3f} s: "
                  f"{rate:.0f} GFLOP/s, {100 * rate / peak:.0f}% of the peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
