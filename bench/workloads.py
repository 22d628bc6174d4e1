"""The benchmark workloads (model shapes) of DESIGN.md.

Read from shared/bench_workloads.json beside the repository when it is there (the contract),
else from the copy in bench/workloads.json.
"""
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_SHARED = os.path.join(_HERE, "..", "..", "shared", "bench_workloads.json")


def load_workloads():
    path = _SHARED if os.path.exists(_SHARED) else os.path.join(_HERE, "workloads.json")
    with open(path) as fh:
        return json.load(fh)


WORKLOADS = load_workloads()


def model_config(name):
    """GPT keyword arguments of a workload (everything but batch_size)."""
    return {k: v for k, v in WORKLOADS[name].items() if k != "batch_size"}


def batch(name, seed=0):
    """A (batch_size, max_seq_len) batch of token ids and labels with the first quarter masked."""
    import numpy as np
    w = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, w["vocab_size"], size=(w["batch_size"], w["max_seq_len"]))
    labels = ids.copy()
    labels[:, : w["max_seq_len"] // 4] = -100
    return ids, labels


def step_flops(name, mode):
    """Floating-point operations of one DESIGN.md training step (multiply-add = 2), counted as
    the dense math a framework does: every linear's forward and input gradient, the weight
    gradients too for full fine-tuning (LoRA's rank-8 products are under 0.1% and left out),
    and the attention's four score/value products of the backward and two of the forward,
    over the whole T x T square."""
    w = WORKLOADS[name]
    tokens, D, L, V = w["batch_size"] * w["max_seq_len"], w["embed_dim"], w["num_layers"], w["vocab_size"]
    linear_forward = 2 * tokens * (12 * D * D * L + V * D)  # q, k, v, out, fc1, fc2 and the tied head
    attention_forward = 2 * 2 * tokens * w["max_seq_len"] * D * L  # q k^T and p v, all heads
    passes = 3 if mode == "full" else 2  # forward, input gradient, and weight gradient when trained
    return passes * linear_forward + 3 * attention_forward
