"""fastlora vs PyTorch: tokens/s and peak memory of a training step, each run in its own process.

    python bench/compare_torch.py                      # tiny, small, base; LoRA and full
    python bench/compare_torch.py --workloads tiny,small --modes lora --rounds 7
    python bench/compare_torch.py --workloads gpt2,smollm2 --rounds 3   # real model sizes (minutes)

Peers (bench/steps.py): "torch", the same GPT in PyTorch eager, and "HF+PEFT", transformers'
GPT2LMHeadModel / LlamaForCausalLM with PEFT's LoRA (what a PyTorch user would run), for gpt2
and the Llama workloads (smollm2: SmolLM2-135M's shape). For each (workload, mode) fastlora and
its peers run in turn, `--rounds` times each, in fresh processes, so all see the same machine
and none inherits another's memory. A process builds its model, warms up, then times `--steps`
steps and reports the median step time and its peak resident memory (ru_maxrss, imports
included). The table gives the median over rounds of each side, and each ratio fastlora / peer
of tokens per second (above 1: fastlora is faster) as the median of the rounds' own ratios:
each round runs the processes back to back, so a slow spell of this shared machine that lasts
a round or longer cancels out of its ratio instead of moving one side's median.

Below the table: the achieved GFLOP/s of fastlora's base, gpt2 and smollm2 steps
(workloads.step_flops over the median step time) against the float32 GEMM peak of this
machine: the best of 10 products of 2048^3 in NumPy's OpenBLAS on the same threads, measured in
its own process before and after the table (the higher of the two: a slow spell only lowers it).
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
    if framework in ("torch", "hf"):
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


DEFAULT_STEPS = {"tiny": 30, "small": 10, "base": 5, "gpt2": 3, "smollm2": 3}
PEER_NAMES = {"torch": "torch", "hf": "HF+PEFT"}
RATE_WORKLOADS = ("base", "gpt2", "smollm2")  # whose GFLOP/s is printed under the table


def _cells(peer, rounds_ours, rounds_peer):
    """(peer tok/s, paired ratio, peer MB, MB ratio) from the rounds, or None without the peer."""
    if not rounds_peer:
        return None
    t_tps = statistics.median(r["tokens_per_s"] for r in rounds_peer)
    ratio = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rounds_ours, rounds_peer))
    t_mb = statistics.median(r["peak_mb"] for r in rounds_peer)
    f_mb = statistics.median(r["peak_mb"] for r in rounds_ours)
    return t_tps, ratio, t_mb, f_mb / t_mb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="tiny,small,base",
                        help="comma-separated: tiny, small, base, gpt2, smollm2, tiny-llama")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--peers", default=None, help="comma-separated subset of torch,hf (default: "
                        "each workload's own, bench/steps.peers: torch for the GPTs, hf too for gpt2 "
                        "and the Llamas)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process "
                        "(default: 30 tiny, 10 small, 5 base, 3 gpt2 and smollm2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", choices=["fastlora", "torch", "hf", "peak"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.workloads, args.modes, args.steps, args.threads)
        return 0

    from steps import peers as default_peers
    workloads = args.workloads.split(",")
    wanted = None if args.peers is None else set(args.peers.split(","))
    rated = [w for w in workloads if w in RATE_WORKLOADS]
    peak_before = run_worker("peak", "base", "-", 0, args.threads)["gflops"] if rated else None
    step_s = {}
    header = f"{'workload':8} {'mode':5} {'fastlora tok/s':>14} {'torch tok/s':>12} {'ratio':>6} " \
             f"{'fastlora MB':>11} {'torch MB':>9} {'MB ratio':>8} {'HF+PEFT tok/s':>13} {'ratio':>6} " \
             f"{'HF MB':>7} {'MB ratio':>8}"
    print(f"{args.threads} threads, {args.rounds} alternating rounds per cell: medians of each side, "
          f"ratio = median of the rounds' ratios (fastlora / peer)", flush=True)
    print(header)
    print("-" * len(header), flush=True)
    for workload in workloads:
        peers = [p for p in default_peers(workload) if wanted is None or p in wanted]
        for mode in args.modes.split(","):
            steps = args.steps or DEFAULT_STEPS.get(workload, 5)
            ours, theirs = [], {p: [] for p in peers}
            for _ in range(args.rounds):
                ours.append(run_worker("fastlora", workload, mode, steps, args.threads))
                for p in peers:
                    theirs[p].append(run_worker(p, workload, mode, steps, args.threads))
            step_s[workload, mode] = statistics.median(r["step_s"] for r in ours)
            f_tps = statistics.median(r["tokens_per_s"] for r in ours)
            f_mb = statistics.median(r["peak_mb"] for r in ours)
            row = f"{workload:8} {mode:5} {f_tps:14,.0f} "
            torch_cells = _cells("torch", ours, theirs.get("torch"))
            row += "{:>12} {:>6} ".format(*(("-", "-") if torch_cells is None else
                                           (f"{torch_cells[0]:,.0f}", f"{torch_cells[1]:.2f}")))
            row += f"{f_mb:11.0f} "
            row += "{:>9} {:>8} ".format(*(("-", "-") if torch_cells is None else
                                          (f"{torch_cells[2]:.0f}", f"{torch_cells[3]:.2f}")))
            hf_cells = _cells("hf", ours, theirs.get("hf"))
            row += "{:>13} {:>6} {:>7} {:>8}".format(*(("-",) * 4 if hf_cells is None else
                                                       (f"{hf_cells[0]:,.0f}", f"{hf_cells[1]:.2f}",
                                                        f"{hf_cells[2]:.0f}", f"{hf_cells[3]:.2f}")))
            print(row, flush=True)
    if rated:
        peak = max(peak_before, run_worker("peak", "base", "-", 0, args.threads)["gflops"])
        print(f"\nGEMM peak {peak:.0f} GFLOP/s (2048^3 float32, {args.threads} threads); fastlora's steps "
              "(workloads.step_flops: the head on the scored rows only):")
        for (workload, mode), seconds in step_s.items():
            if workload not in RATE_WORKLOADS:
                continue
            flops = step_flops(workload, mode)
            rate = flops / seconds / 1e9
            print(f"  {workload:8} {mode:5} step {flops / 1e9:.1f} GFLOP in {seconds:.3f} s: "
                  f"{rate:.0f} GFLOP/s, {100 * rate / peak:.0f}% of the peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
