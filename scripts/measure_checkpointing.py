"""Gradient checkpointing on the base workload at T = 1024: peak memory saved, time it costs.

    python scripts/measure_checkpointing.py [full|lora] [T]

A train step as docs/DESIGN.md defines it (forward, fused masked cross-entropy, backward, clipping
to norm 1.0, AdamW), batch 4, on shared/bench_workloads.json's base shape with max_seq_len T.
Prints, without and with checkpointing, the median seconds of 3 steps after a warm-up and the
peak of the step's allocations (tracemalloc, on one more step: NumPy's buffers are traced).
"""
import os
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

import fastlora as fl  # noqa: E402
from fastlora.lora import LoRAModel  # noqa: E402

BASE = {"vocab_size": 4096, "embed_dim": 384, "num_heads": 6, "num_layers": 6, "batch_size": 4}


def build(mode, T):
    model = fl.GPT(vocab_size=BASE["vocab_size"], embed_dim=BASE["embed_dim"], num_heads=BASE["num_heads"],
                   num_layers=BASE["num_layers"], max_seq_len=T, seed=0)
    if mode == "lora":
        model = LoRAModel(model, target_modules=["q_proj", "v_proj"], rank=8, alpha=16)
        model.inject_lora()
        params = model.lora_parameters()
    else:
        params = list(model.parameters())
    return model, params, fl.AdamW(params, lr=1e-4)


def step(model, params, optimizer, ids):
    optimizer.zero_grad()
    loss = model.loss(ids, ids)
    loss.backward()
    fl.clip_grad_norm(params, 1.0)
    optimizer.step()
    return float(loss.data)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "full"
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    ids = np.random.default_rng(0).integers(0, BASE["vocab_size"], size=(BASE["batch_size"], T))
    results = {}
    for checkpointed in (False, True):
        model, params, optimizer = build(mode, T)
        if checkpointed:
            model.gradient_checkpointing_enable()
        step(model, params, optimizer, ids)  # warm-up: the optimizer's state is allocated here
        times = []
        for _ in range(3):
            start = time.perf_counter()
            loss = step(model, params, optimizer, ids)
            times.append(time.perf_counter() - start)
        tracemalloc.start()
        step(model, params, optimizer, ids)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results[checkpointed] = (statistics.median(times), peak, loss)
        print(f"{mode} T={T} checkpointing={checkpointed}: {statistics.median(times):.2f} s/step "
              f"(steps {', '.join(f'{t:.2f}' for t in times)}), peak {peak / 2**20:.0f} MiB, loss {loss:.6f}",
              flush=True)
    (t0, m0, _), (t1, m1, _) = results[False], results[True]
    print(f"checkpointing saves {(m0 - m1) / 2**20:.0f} MiB of the step's peak ({100 * (1 - m1 / m0):.0f}%) "
          f"and costs {100 * (t1 / t0 - 1):.0f}% more time per step")


if __name__ == "__main__":
    main()
