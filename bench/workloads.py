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
