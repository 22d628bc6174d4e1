"""fastlora's generate vs transformers' generate: greedy tokens/s at a real model's shape, same weights.

    python bench/compare_generate.py                           # gpt2: 32-token prompt, 128 new tokens, batch 1
    python bench/compare_generate.py --workloads gpt2,smollm2 --rounds 3 --new-tokens 64

The workload's model is made once by fastlora (random weights, seed 0) and written as a
Hugging Face folder; each round loads it in two fresh processes, fastlora (fl.from_pretrained,
generate with its key/value cache) and transformers (AutoModelForCausalLM.from_pretrained,
generate with do_sample=False, its own cache), each generating `--new-tokens` tokens after
the same random prompt (eos never stops either side: transformers gets min_new_tokens). A
process warms up with a short generation first, then times one whole generate call. The table
gives each side's median tokens/s, the median of the rounds' paired ratios, and how many of
the new tokens the two sides agree on (the same weights, so the same greedy tokens but for
float rounding at a near-tie).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _prompt(vocab_size, length, batch, seed=0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length))


def worker(framework, folder, prompt_len, new_tokens, batch, threads):
    import numpy as np
    if framework == "hf":
        import torch
        import transformers
        torch.set_num_threads(threads)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = torch.from_numpy(_prompt(model.config.vocab_size, prompt_len, batch))

        def generate(n):
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=0, attention_mask=torch.ones_like(ids))
            return out.numpy()
    else:
        import fastlora as fl
        model = fl.from_pretrained(folder)
        ids = _prompt(model.config.vocab_size, prompt_len, batch)

        def generate(n):
            return model.generate(ids, max_new_tokens=n, temperature=0)
    generate(4)  # warm-up: first calls, buffers
    started = time.perf_counter()
    out = generate(new_tokens)
    seconds = time.perf_counter() - started
    new = np.asarray(out)[:, prompt_len:]
    print(json.dumps({"seconds": seconds, "tokens_per_s": new.size / seconds, "tokens": new.tolist()}))


def run_worker(framework, folder, args):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run([sys.executable, __file__, "--worker", framework, "--folder", folder,
                          "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                          "--batch", str(args.batch), "--threads", str(args.threads)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{framework} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="gpt2")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", choices=["fastlora", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.folder, args.prompt_tokens, args.new_tokens, args.batch, args.threads)
        return 0

    from workloads import build_model
    print(f"{args.threads} threads, greedy, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"batch {args.batch}, {args.rounds} rounds: medians, ratio = median of the rounds' ratios")
    header = f"{'workload':8} {'fastlora tok/s':>14} {'HF tok/s':>9} {'ratio':>6} {'same tokens':>12}"
    print(header)
    print("-" * len(header), flush=True)
    for workload in args.workloads.split(","):
        with tempfile.TemporaryDirectory() as folder:
            build_model(workload, seed=0).save_pretrained(folder)
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(run_worker("fastlora", folder, args))
                theirs.append(run_worker("hf", folder, args))
        ratio = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, theirs))
        a, b = ours[0]["tokens"], theirs[0]["tokens"]
        same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        total = sum(len(r) for r in a)
        print(f"{workload:8} {statistics.median(r['tokens_per_s'] for r in ours):14.1f} "
              f"{statistics.median(r['tokens_per_s'] for r in theirs):9.1f} {ratio:6.2f} "
              f"{f'{same}/{total}':>12}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
