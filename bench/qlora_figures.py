"""QLoRA vs float32 LoRA: bytes per weight, resident memory, step time, and eval loss.

    python bench/qlora_figures.py                          # everything (a few minutes on 2 cores)
    python bench/qlora_figures.py --workloads base --skip-eval --threads 1

Both modes adapt every Linear (q/k/v/out_proj, fc1, fc2: the QLoRA setting, where every
targeted weight is quantized) with rank 8, alpha 16; a step is docs/DESIGN.md's (forward, masked
CE, backward, clip to 1.0, AdamW). Mode "qlora-whole" is QLoRA with one tile per weight (the
whole float W dequantized per product): the baseline for the cost of the bounded default tile.
- Step time: one process per workload builds every mode and runs their steps in turn, step by
  step (`--steps` each after two warm-ups), so a busy machine's load drifts onto all modes
  alike; median per mode.
- Memory: a fresh process per (workload, mode) builds the model and runs three steps:
  build_peak_mb is ru_maxrss once the model is built (QLoRA quantizes a float GPT, so this
  includes the float weights it then frees), peak_mb ru_maxrss after the steps (imports, model,
  activations, optimizer), base_mb the bytes the targeted base weights hold (float32 arrays,
  or NF4 codes and scales).
- Eval: fine-tunes the bundled base (fastlora.demo.prepare) with LoRA and with QLoRA for the
  same steps, data order and settings, and reports the eval loss of each.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
RANK, ALPHA = 8, 16.0
MODES = ("lora", "qlora", "qlora-whole")


def adapted(model, mode):
    """A LoRAModel (mode "lora") or QLoRAModel over `model`, targets TARGETS, rank 8, alpha 16."""
    from fastlora.lora import LoRAModel, apply_qlora
    if mode == "lora":
        return LoRAModel(model, list(TARGETS), rank=RANK, alpha=ALPHA).inject_lora()
    whole = 1 << 30 if mode == "qlora-whole" else None  # one tile covers any weight
    return apply_qlora(model, rank=RANK, alpha=ALPHA, target_modules=TARGETS, tile_rows=whole, tile_cols=whole)


def base_bytes(lm):
    """Bytes held by the adapted layers' base weights."""
    from fastlora.lora import NF4Weight, lora_layers
    return sum(m.weight.nbytes if isinstance(m.weight, NF4Weight) else m.weight.data.nbytes
               for _, m in lora_layers(lm.model))


def make_step(workload, mode, seed=0):
    """(step function returning the loss, tokens per step, the adapted model) of a workload."""
    import fastlora as fl
    from steps import step_of
    from workloads import model_config
    lm = adapted(fl.GPT(**model_config(workload), seed=seed), mode)
    step, tokens = step_of(lm, lm.lora_parameters(), workload, seed)
    return step, tokens, lm


def memory_worker(workload, mode):
    import gc
    step, _, lm = make_step(workload, mode)
    gc.collect()
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    for _ in range(3):
        step()
    print(json.dumps({"build_peak_mb": build_peak, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "base_mb": base_bytes(lm) / 2 ** 20}))


def time_worker(workload, modes, steps):
    built = {m: make_step(workload, m) for m in modes}
    for step, _, _ in built.values():
        step(), step()  # warm-up: buffers, optimizer state
    times = {m: [] for m in modes}
    for _ in range(steps):
        for m, (step, _, _) in built.items():
            started = time.perf_counter()
            step()
            times[m].append(time.perf_counter() - started)
    tokens = next(iter(built.values()))[1]
    print(json.dumps({m: {"step_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t)}
                      for m, t in times.items()}))


def run_worker(threads, *args):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # fastlora's kernels and BLAS read it at start
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bytes_per_weight():
    """Stored bytes per weight and relative RMS reconstruction error of NF4 on the base workload's weights."""
    import numpy as np
    from fastlora.lora.nf4 import quantize_nf4
    from workloads import WORKLOADS
    D = WORKLOADS["base"]["embed_dim"]
    rows = []
    for shape in ((D, D), (4 * D, D)):
        w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.02
        for dq in (True, False):
            q = quantize_nf4(w, 64, dq)
            err = np.sqrt(np.mean((q.dequantize() - w) ** 2) / np.mean(w ** 2))
            rows.append({"shape": list(shape), "double_quant": dq, "bytes_per_weight": q.nbytes / q.size,
                         "relative_rms_error": float(err)})
    return rows


def eval_losses(steps, batch_size=16, lr=4e-3, seed=0):
    """Eval loss on the bundled data after `steps` steps of LoRA and of QLoRA (same data order)."""
    from fastlora.demo import prepare
    from fastlora.optim import AdamW
    from fastlora.train import Trainer
    base, _, train_ds, eval_ds = prepare()
    result = {"steps": steps, "batch_size": batch_size, "lr": lr}
    for mode in ("lora", "qlora"):
        lm = adapted(base.copy(), mode)
        trainer = Trainer(lm, AdamW(lm.lora_parameters(), lr=lr, weight_decay=0.0), train_ds,
                          batch_size=batch_size, epochs=1_000, max_steps=steps, warmup_ratio=0.05, seed=seed,
                          progress=False)
        with lm.disable_adapter():
            result[f"{mode}_before"] = trainer.evaluate(eval_ds)  # the base (rounded to NF4 for qlora)
        started = time.perf_counter()
        losses = trainer.train()
        result[f"{mode}_train_s"] = time.perf_counter() - started
        result[f"{mode}_last_train_loss"] = float(sum(losses[-5:]) / len(losses[-5:]))
        result[f"{mode}_eval"] = trainer.evaluate(eval_ds)
    result["qlora_over_lora"] = result["qlora_eval"] / result["lora_eval"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="tiny,small,base")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode "
                        "(default: 30 tiny, 10 small, 6 base)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--eval-steps", type=int, default=60)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.worker:
        kind, workload, *rest = args.worker
        if kind == "memory":
            memory_worker(workload, rest[0])
        else:
            time_worker(workload, rest[0].split(","), int(rest[1]))
        return
    results = {"bytes_per_weight": bytes_per_weight(), "threads": args.threads, "workloads": {}}
    for row in results["bytes_per_weight"]:
        print(f"NF4 {row['shape']} double_quant={row['double_quant']}: {row['bytes_per_weight']:.4f} "
              f"bytes/weight, relative RMS error {row['relative_rms_error']:.4f}")
    modes = args.modes.split(",")
    print(f"\n{args.threads} thread(s)\n{'workload':8} {'mode':12} {'step ms':>8} {'tok/s':>8} {'base MB':>8} "
          f"{'build pk':>9} {'peak MB':>8}")
    for workload in args.workloads.split(","):
        steps = args.steps or {"tiny": 30, "small": 10}.get(workload, 6)
        timed = run_worker(args.threads, "time", workload, ",".join(modes), str(steps))
        for mode in modes:
            row = {**timed[mode], **run_worker(args.threads, "memory", workload, mode)}
            results["workloads"][f"{workload}/{mode}"] = row
            print(f"{workload:8} {mode:12} {1e3 * row['step_s']:8.1f} {row['tokens_per_s']:8.0f} "
                  f"{row['base_mb']:8.2f} {row['build_peak_mb']:9.1f} {row['peak_mb']:8.1f}")
        if "lora" in timed and "qlora" in timed:
            print(f"{workload:8} qlora / lora step time: {timed['qlora']['step_s'] / timed['lora']['step_s']:.2f}x")
    if not args.skip_eval:
        ev = eval_losses(args.eval_steps)
        results["eval"] = ev
        print(f"\neval loss after {ev['steps']} steps (batch {ev['batch_size']}, lr {ev['lr']}): "
              f"LoRA {ev['lora_eval']:.4f}, QLoRA {ev['qlora_eval']:.4f} (ratio {ev['qlora_over_lora']:.3f}); "
              f"before training: base {ev['lora_before']:.4f}, NF4 base {ev['qlora_before']:.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
