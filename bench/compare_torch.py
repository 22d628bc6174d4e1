"""fastlora vs PyTorch: tokens/s and peak memory of a training step, each run in its own process.

    python bench/compare_torch.py                      # every workload, LoRA and full
    python bench/compare_torch.py --workloads tiny,small --modes lora --rounds 3

For each (workload, mode) the two frameworks run alternately, `--rounds` times each, in fresh
processes, so both see the same machine and neither inherits the other's memory. A process
builds the model, warms up, then times `--steps` steps and reports the median step time and
its peak resident memory (ru_maxrss, imports included). The table gives the median over rounds
and the ratio fastlora / PyTorch of tokens per second (above 1: fastlora is faster).
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


def worker(framework, workload, mode, steps, threads):
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", choices=["fastlora", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.workloads, args.modes, args.steps, args.threads)
        return 0

    default_steps = {"tiny": 30, "small": 10, "base": 5}
    rows = []
    header = f"{'workload':8} {'mode':5} {'fastlora tok/s':>14} {'torch tok/s':>12} {'ratio':>6} " \
             f"{'fastlora MB':>11} {'torch MB':>9} {'MB ratio':>8}"
    print(f"{args.threads} threads, {args.rounds} alternating rounds per cell, median of each", flush=True)
    print(header)
    print("-" * len(header), flush=True)
    for workload in args.workloads.split(","):
        for mode in args.modes.split(","):
            steps = args.steps or default_steps.get(workload, 5)
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(run_worker("fastlora", workload, mode, steps, args.threads))
                theirs.append(run_worker("torch", workload, mode, steps, args.threads))
            f_tps = statistics.median(r["tokens_per_s"] for r in ours)
            t_tps = statistics.median(r["tokens_per_s"] for r in theirs)
            f_mb = statistics.median(r["peak_mb"] for r in ours)
            t_mb = statistics.median(r["peak_mb"] for r in theirs)
            row = f"{workload:8} {mode:5} {f_tps:14,.0f} {t_tps:12,.0f} {f_tps / t_tps:6.2f} " \
                  f"{f_mb:11.0f} {t_mb:9.0f} {f_mb / t_mb:8.2f}"
            rows.append(row)
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
