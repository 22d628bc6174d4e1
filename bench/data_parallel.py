"""Data-parallel training (issue 15): 2 MPI ranks x 1 thread against 1 process x 2 threads on this
machine, and a paper model of scaling to 8 and 64 hosts over 10 GbE.

    python bench/data_parallel.py                       # measure small and base, LoRA and full; then the model
    python bench/data_parallel.py --rounds 5 --workloads base
    python bench/data_parallel.py --paper               # the paper model alone (uses the numbers below)

A measured cell trains the workload's global batch (bench/workloads.json: small 8 x 128 tokens, base
4 x 256, a quarter of each row masked) through fastlora's Trainer: forward, masked loss, backward,
clip to 1.0, AdamW, as bench/README's step. Once as one process with OMP_NUM_THREADS=2, once under
`mpiexec -n 2` with one thread per rank, each rank on half of every batch and the gradients summed
by fastlora.train.distributed's Allreduce; and as one process with fastlora's default thread count
(no OMP_NUM_THREADS), which on a busy machine shrinks to the cores others leave free. Rounds
alternate the three, each in fresh processes; a process warms up 3 steps, then times `--steps`:
the median step (tokens/s = global tokens / step time) and, under MPI, the median time inside the gradient Allreduce per step: the transfer and the
wait for the slower rank (the ranks meet there). After training the ranks also time the same
Allreduce alone, after a Barrier (median of 20): the transfer by itself.

The paper model (`paper_model`): hosts like this one on a quiet day (150 GFLOP/s: bench/README's
base full step, 82.1 GFLOP in 0.540 s on 2 threads; `--gflops` sets another), or with 16 times
its compute, each doing a step of the workload's own batch (so the global batch grows with the hosts), then one Allreduce
of every trainable gradient in float32 over 10 GbE: the cheaper of a ring (2 (p-1) latencies,
2 (p-1)/p of the bytes through each link) and recursive doubling (log2 p latencies, log2 p times
the bytes), with latency 50 us and 1.1 GB/s per link; no overlap with the backward (none is done).
Efficiency = compute / (compute + allreduce); speed-up = hosts x efficiency.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from workloads import ALL_WORKLOADS, arch, step_flops  # noqa: E402

LATENCY_S = 50e-6          # one MPI message over 10 GbE TCP, both ends' software included
LINK_BYTES_S = 1.1e9       # 10 Gbit/s less Ethernet, IP and TCP framing
LORA_RANK = 8
QUIET_GFLOPS = 150.0       # bench/README: a base full step on this machine's 2 threads, nothing else running


def worker(workload, mode, steps, warmup=3):
    """One run (one process, or one rank of an mpiexec job); rank 0 prints a JSON line."""
    import numpy as np

    import fastlora as fl
    from fastlora.train import distributed
    from steps import fastlora_model
    from workloads import batch
    group = distributed.world()
    model, params = fastlora_model(workload, mode)
    ids, labels = batch(workload)
    records = [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))]
    trainer = fl.Trainer(model, fl.AdamW(params, lr=1e-4, weight_decay=0.0), records, batch_size=len(ids),
                         epochs=warmup + steps, warmup_ratio=0.0, progress=False)
    times, reduce_times, step = [], [], trainer._train_step

    def timed(group_, position):
        before = getattr(group, "allreduce_seconds", 0.0)
        started = time.perf_counter()
        out = step(group_, position)
        times.append(time.perf_counter() - started)
        reduce_times.append(getattr(group, "allreduce_seconds", 0.0) - before)
        return out
    trainer._train_step = timed
    trainer.train()
    result = {"step_s": statistics.median(times[warmup:]), "tokens": int(ids.size),
              "allreduce_s": statistics.median(reduce_times[warmup:]),
              "grad_bytes": int(sum(p.data.nbytes for p in params))}
    result["tok_s"] = result["tokens"] / result["step_s"]
    if group is not None:  # the same Allreduce by itself, the ranks lined up first
        from mpi4py import MPI
        buckets = distributed.GradBuckets(params).buckets
        alone = []
        for _ in range(20):
            group.comm.Barrier()
            started = time.perf_counter()
            for b in buckets:
                group.comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM)
            alone.append(time.perf_counter() - started)
        result["allreduce_alone_s"] = float(np.median(alone))
    if group is None or group.is_main:
        print(json.dumps(result), flush=True)


def run_cell(workload, mode, steps, ranks, threads):
    """The JSON result of one fresh run of `ranks` processes (mpiexec when more than one) with `threads`
    threads each (None: fastlora's default, which shrinks to the cores other programs leave free)."""
    me = [sys.executable, os.path.abspath(__file__), "--worker", workload, mode, str(steps)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = ["mpiexec", "-n", str(ranks), *me] if ranks > 1 else me
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(workloads, modes, rounds):
    rows = []
    for workload in workloads:
        steps = 30 if workload == "small" else 10
        for mode in modes:
            one, two, default = [], [], []
            for _ in range(rounds):
                one.append(run_cell(workload, mode, steps, 1, 2))
                two.append(run_cell(workload, mode, steps, 2, 1))
                default.append(run_cell(workload, mode, steps, 1, None))
            med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
            rows.append({"workload": workload, "mode": mode, "one_tok_s": med(one, "tok_s"),
                         "default_tok_s": med(default, "tok_s"),
                         "two_tok_s": med(two, "tok_s"),
                         "ratio": statistics.median(b["tok_s"] / a["tok_s"] for a, b in zip(one, two)),
                         "ratios": [round(b["tok_s"] / a["tok_s"], 2) for a, b in zip(one, two)],
                         "step_s": med(two, "step_s"), "allreduce_s": med(two, "allreduce_s"),
                         "alone_s": med(two, "allreduce_alone_s"), "grad_bytes": two[0]["grad_bytes"],
                         "one_step_s": med(one, "step_s")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| workload | mode | 1 process x 2 threads tok/s | 2 ranks x 1 thread tok/s | ratio (rounds) | "
          "1 process, default threads | gradient | allreduce in the step | allreduce alone |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['mode']} | {r['one_tok_s']:,.0f} | {r['two_tok_s']:,.0f} | {r['ratio']:.2f} "
              f"({', '.join(f'{x:.2f}' for x in r['ratios'])}) | {r['default_tok_s']:,.0f} | {_size(r['grad_bytes'])} | "
              f"{1e3 * r['allreduce_s']:.2f} ms, {100 * r['allreduce_s'] / r['step_s']:.1f}% | "
              f"{1e3 * r['alone_s']:.2f} ms, {100 * r['alone_s'] / r['step_s']:.1f}% |")
    return rows


# --- the paper model -------------------------------------------------------------------------------------

def trainable(workload, mode):
    """Trainable parameters of a workload: every weight (full), or LoRA rank 8 on bench/steps.py's
    targets (q_proj, v_proj of a GPT; all seven projections of a Llama)."""
    w = ALL_WORKLOADS[workload]
    if arch(workload) == "llama":
        from fastlora.nn.llama import LlamaConfig
        cfg = LlamaConfig(**{k: v for k, v in w.items() if k not in ("arch", "batch_size")})
        if mode == "full":
            return cfg.num_parameters()
        D, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
        q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
        shapes = [(D, q), (D, kv), (D, kv), (q, D), (D, I), (D, I), (I, D)]
        return cfg.num_layers * sum(LORA_RANK * (a + b) for a, b in shapes)
    from fastlora.nn.gpt import GPTConfig
    cfg = GPTConfig(**{k: v for k, v in w.items() if k != "batch_size"})
    if mode == "full":
        return cfg.num_parameters()
    return cfg.num_layers * 2 * LORA_RANK * 2 * cfg.embed_dim


def allreduce_s(nbytes, hosts):
    """Seconds of one Allreduce of `nbytes` over `hosts`: the cheaper of ring and recursive doubling."""
    ring = 2 * (hosts - 1) * LATENCY_S + 2 * (hosts - 1) / hosts * nbytes / LINK_BYTES_S
    doubling = math.ceil(math.log2(hosts)) * (LATENCY_S + nbytes / LINK_BYTES_S)
    return min(ring, doubling)


def paper_model(gflops_per_host, speedups=(1, 16)):
    """Rows of the scaling model: per workload, mode, host speed and host count."""
    rows = []
    for workload in ("base", "smollm2"):
        for mode in ("lora", "full"):
            nbytes = 4 * trainable(workload, mode)
            for speed in speedups:
                compute = step_flops(workload, mode) / (gflops_per_host * speed * 1e9)
                for hosts in (8, 64):
                    reduce_s = allreduce_s(nbytes, hosts)
                    efficiency = compute / (compute + reduce_s)
                    rows.append(dict(workload=workload, mode=mode, speed=speed, hosts=hosts, nbytes=nbytes,
                                     compute_s=compute, allreduce_s=reduce_s, efficiency=efficiency))
    print(f"\nPaper model: {gflops_per_host:.0f} GFLOP/s per host (x1: this machine, quiet; x16: a host "
          f"16 times faster), 10 GbE (latency {LATENCY_S * 1e6:.0f} us, {LINK_BYTES_S / 1e9:.1f} GB/s)\n")
    print("| workload | mode | gradient per step | host | compute per step | hosts | allreduce | efficiency | "
          "speed-up |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['mode']} | {_size(r['nbytes'])} | x{r['speed']} | "
              f"{_ms(r['compute_s'])} | {r['hosts']} | {_ms(r['allreduce_s'])} | {100 * r['efficiency']:.0f}% | "
              f"{r['hosts'] * r['efficiency']:.1f} |")
    return rows


def _size(nbytes):
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.0f} kB"


def _ms(seconds):
    return f"{seconds:.2f} s" if seconds >= 1 else f"{1e3 * seconds:.1f} ms"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("WORKLOAD", "MODE", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--workloads", default="small,base")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paper", action="store_true", help="print the paper model alone")
    parser.add_argument("--gflops", type=float, default=QUIET_GFLOPS,
                        help="a host's rate in the paper model (default: this machine's, quiet)")
    args = parser.parse_args()
    if args.worker:
        workload, mode, steps = args.worker
        worker(workload, mode, int(steps))
        return
    if not args.paper:
        rows = measure(args.workloads.split(","), args.modes.split(","), args.rounds)
        for r in rows:  # how busy the machine was: a quiet one runs base full at ~150 GFLOP/s
            print(f"{r['workload']} {r['mode']}: 1 process x 2 threads ran at "
                  f"{step_flops(r['workload'], r['mode']) / r['one_step_s'] / 1e9:.0f} GFLOP/s")
    paper_model(args.gflops)


if __name__ == "__main__":
    main()
