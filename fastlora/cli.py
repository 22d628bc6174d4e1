"""The `fastlora` command.

  fastlora demo     train the tiny GPT on the built-in corpus for a few steps and print the loss
"""
import argparse
import sys
import time

import numpy as np


def _demo(args):
    import fastlora as fl
    from fastlora.autograd.ops import cross_entropy

    corpus = ("the quick brown fox jumps over the lazy dog. " * 40).encode("ascii")
    vocab = sorted(set(corpus))
    lookup = {b: i for i, b in enumerate(vocab)}
    ids = np.array([lookup[b] for b in corpus], dtype=np.int64)
    model = fl.GPT(vocab_size=len(vocab), embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64, seed=0)
    rng = np.random.default_rng(0)
    lr = 3e-3
    start = time.perf_counter()
    for step in range(args.steps):
        starts = rng.integers(0, len(ids) - 64, size=8)
        batch = np.stack([ids[s:s + 64] for s in starts])
        model.zero_grad()
        loss = cross_entropy(model(batch), batch)
        loss.backward()
        for p in model.parameters():  # plain SGD until fastlora.optim lands
            p.data -= lr * 30 * p.grad
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.2f}s")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastlora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on the bundled data")
    demo.add_argument("--steps", type=int, default=100)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
