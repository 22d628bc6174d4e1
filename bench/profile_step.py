"""Where a fastlora training step spends its time, op by op (forward and backward apart).

    python bench/profile_step.py small lora [--steps 10]

Wraps each differentiable op with a wall-clock timer (no profiler overhead in the ops
themselves), runs the docs/DESIGN.md step of bench/steps.py and prints milliseconds per step;
"other" is the rest: Python glue, the engine, clipping and AdamW.
"""
import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastlora.autograd.ops as ops  # noqa: E402
import fastlora.lora.layer as lora_layer  # noqa: E402
import fastlora.lora.ops as lora_ops  # noqa: E402

SPENT = defaultdict(float)


def _timed(module, name):
    original = getattr(module, name)

    def op(*args, **kwargs):
        started = time.perf_counter()
        out = original(*args, **kwargs)
        SPENT[name] += time.perf_counter() - started
        backward = out._backward
        if backward is not None:
            def timed_backward(g):
                t = time.perf_counter()
                grads = backward(g)
                SPENT[name + " backward"] += time.perf_counter() - t
                return grads
            out._backward = timed_backward
        return out

    setattr(module, name, op)
    return op


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=["tiny", "small", "base", "gpt2", "smollm2", "tiny-llama"])
    parser.add_argument("mode", choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    for name in ("linear", "causal_attention", "layer_norm", "gelu", "cross_entropy", "linear_cross_entropy",
                 "embedding", "add", "rms_norm", "rope", "silu_mul"):
        _timed(ops, name)
    lora_layer.lora_linear = _timed(lora_ops, "lora_linear")
    from steps import make_step  # after wrapping, so the model's modules pick the wrapped ops up
    import fastlora.nn.causal_lm as causal_lm
    import fastlora.nn.gpt as gpt
    import fastlora.nn.layers as layers
    import fastlora.nn.llama as llama
    gpt.ops = layers.ops = llama.ops = causal_lm.ops = ops
    step, _ = make_step("fastlora", args.workload, args.mode)
    for _ in range(3):
        step()
    SPENT.clear()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    total = (time.perf_counter() - started) / args.steps
    print(f"{args.workload} {args.mode}: {total * 1e3:.1f} ms per step")
    for name, spent in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {spent / args.steps * 1e3:8.2f} ms")
    print(f"  {'other':28s} {(total - sum(SPENT.values()) / args.steps) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
