"""Tokens/s of a training step alone, beside a busy loop, and beside a second copy of the same job.

    python bench/under_load.py                                   # fastlora and torch, small and base, lora and full
    python bench/under_load.py --frameworks fastlora --workloads small --modes lora --rounds 5

Each cell runs in fresh processes (bench/steps.py's step: forward, masked cross-entropy,
backward, clip, AdamW), every one on the machine's default thread count. A round times the job
in three conditions back to back:
- alone: one process;
- busy: the same process beside `while True: pass` in another process (started first);
- twin: two processes of the same job, their timed windows started together (each warms up,
  says it is ready, and waits for the go); the figure is the mean of the two.
A process counts the tokens of the steps it finishes in a window of --seconds (at least
--min-steps steps) and divides by the time they took. Reported: tok/s alone (median of the
rounds), and for busy and twin the median of the rounds' own ratios to that round's alone
figure, with their min-max (a shared machine drifts; a round's three runs are seconds apart).
fastlora runs its steps inside `fastlora.runtime()`, as Trainer.train does.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BUSY = [sys.executable, "-c", "while True: pass"]


def worker(framework, workload, mode, seconds, min_steps):
    if framework == "torch":
        import torch
        torch.set_num_threads(os.cpu_count())
    import contextlib

    import fastlora as fl
    from steps import make_step
    step, tokens = make_step(framework, workload, mode)
    runtime = getattr(fl, "runtime", None)
    with (runtime() if framework == "fastlora" and runtime else contextlib.nullcontext()):
        step()
        step()
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.perf_counter()
        n = 0
        while n < min_steps or time.perf_counter() - start < seconds:
            step()
            n += 1
        elapsed = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": n * tokens / elapsed, "steps": n}), flush=True)


def _spawn(framework, workload, mode, seconds, min_steps):
    return subprocess.Popen([sys.executable, __file__, "--worker", "--frameworks", framework, "--workloads", workload,
                             "--modes", mode, "--seconds", str(seconds), "--min-steps", str(min_steps)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def run_jobs(count, framework, workload, mode, seconds, min_steps):
    """tok/s of each of `count` copies of the job, their timed windows started together."""
    procs = [_spawn(framework, workload, mode, seconds, min_steps) for _ in range(count)]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"{framework} {workload} {mode} failed to start: {line!r}")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"{framework} {workload} {mode} failed")
            results.append(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def one_round(framework, workload, mode, seconds, min_steps):
    alone = run_jobs(1, framework, workload, mode, seconds, min_steps)[0]
    busy_proc = subprocess.Popen(BUSY)
    try:
        busy = run_jobs(1, framework, workload, mode, seconds, min_steps)[0]
    finally:
        busy_proc.kill()
        busy_proc.wait()
    twin = statistics.mean(run_jobs(2, framework, workload, mode, seconds, min_steps))
    return alone, busy, twin


DEFAULT_SECONDS = {"tiny": 2.0, "small": 3.0, "base": 6.0}
DEFAULT_MIN_STEPS = {"tiny": 10, "small": 5, "base": 3}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default="fastlora,torch")
    parser.add_argument("--workloads", default="small,base")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=None,
                        help="timed window per process (default: 3 s small, 6 s base)")
    parser.add_argument("--min-steps", type=int, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.frameworks, args.workloads, args.modes, args.seconds, args.min_steps)
        return 0
    print(f"{os.cpu_count()} cores, {args.rounds} rounds; busy and twin as the median (min-max) of "
          f"each round's tok/s over that round's alone", flush=True)
    header = f"{'framework':9} {'workload':8} {'mode':5} {'alone tok/s':>11} {'busy':>17} {'twin':>17}"
    print(header)
    print("-" * len(header), flush=True)
    for workload in args.workloads.split(","):
        seconds = args.seconds or DEFAULT_SECONDS.get(workload, 6.0)
        min_steps = args.min_steps or DEFAULT_MIN_STEPS.get(workload, 3)
        for mode in args.modes.split(","):
            for framework in args.frameworks.split(","):
                rounds = [one_round(framework, workload, mode, seconds, min_steps) for _ in range(args.rounds)]
                alone = statistics.median(r[0] for r in rounds)
                cells = []
                for i in (1, 2):
                    ratios = [r[i] / r[0] for r in rounds]
                    cells.append(f"{statistics.median(ratios):5.0%} ({min(ratios):.0%}-{max(ratios):.0%})")
                print(f"{framework:9} {workload:8} {mode:5} {alone:11,.0f} {cells[0]:>17} {cells[1]:>17}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
