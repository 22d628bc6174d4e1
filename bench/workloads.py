"""The benchmark workloads (model shapes) of docs/DESIGN.md, and their FLOP counts.

bench/workloads.json names every workload; shared/bench_workloads.json beside the repository,
when it is there, is the contract for the ones it names and wins for those. A workload is a
GPT (docs/DESIGN.md's model: vocab_size, embed_dim, num_heads, num_layers, max_seq_len) unless its
"arch" is "llama" (fastlora.Llama's fields: hidden_size, intermediate_size, num_kv_heads, ...,
e.g. "smollm2", SmolLM2-135M's shape). Every workload has a batch_size.

`WORKLOADS` holds the GPT workloads (the kernel and step suites read embed_dim from them),
`LLAMA_WORKLOADS` the Llama ones, `ALL_WORKLOADS` both.
"""
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_SHARED = os.path.join(_HERE, "..", "..", "shared", "bench_workloads.json")


def load_workloads():
    """Every workload: bench/workloads.json, updated with the shared contract's entries."""
    with open(os.path.join(_HERE, "workloads.json")) as fh:
        workloads = json.load(fh)
    if os.path.exists(_SHARED):
        with open(_SHARED) as fh:
            workloads.update(json.load(fh))
    return workloads


ALL_WORKLOADS = load_workloads()
WORKLOADS = {k: w for k, w in ALL_WORKLOADS.items() if w.get("arch", "gpt") == "gpt"}
LLAMA_WORKLOADS = {k: w for k, w in ALL_WORKLOADS.items() if w.get("arch") == "llama"}


def arch(name):
    """"gpt" or "llama"."""
    return ALL_WORKLOADS[name].get("arch", "gpt")


def model_config(name):
    """The model's keyword arguments (fl.GPT's, or fl.Llama's fields): all but batch_size and arch."""
    return {k: v for k, v in ALL_WORKLOADS[name].items() if k not in ("batch_size", "arch")}


def build_model(name, seed=0):
    """The fastlora model of a workload, float32."""
    import fastlora as fl
    if arch(name) == "llama":
        from fastlora.nn.llama import Llama
        return Llama(seed=seed, **model_config(name))
    return fl.GPT(**model_config(name), seed=seed)


def batch(name, seed=0):
    """A (batch_size, max_seq_len) batch of token ids and labels with the first quarter masked."""
    import numpy as np
    w = ALL_WORKLOADS[name]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, w["vocab_size"], size=(w["batch_size"], w["max_seq_len"]))
    labels = ids.copy()
    labels[:, : w["max_seq_len"] // 4] = -100
    return ids, labels


def scored_rows(name):
    """Positions of batch(name) that score (their next label is not -100): the head rows the
    fused loss computes (fastlora.nn.head)."""
    _, labels = batch(name)
    return int((labels[:, 1:] != -100).sum())


def _linear_macs_per_token(w):
    """Multiply-adds per token of every body linear (the head apart)."""
    if w.get("arch", "gpt") == "llama":
        D, I = w["hidden_size"], w["intermediate_size"]
        hd = w.get("head_dim") or D // w["num_heads"]
        attn = D * hd * (2 * w["num_heads"] + 2 * w["num_kv_heads"])  # q and o, k and v
        return w["num_layers"] * (attn + 3 * D * I)
    D = w["embed_dim"]
    return w["num_layers"] * 12 * D * D  # q, k, v, out (4 D^2), fc1 and fc2 (8 D^2)


def step_flops(name, mode):
    """Floating-point operations of one docs/DESIGN.md training step (multiply-add = 2), counted as
    the useful dense math: every linear's forward and input gradient, the weight gradients too
    for full fine-tuning (LoRA's rank-8 products are under 0.1% and left out), the attention's
    four score/value products of the backward and two of the forward over the whole T x T
    square, and the head on the rows that score only (scored_rows: a row whose label is -100
    needs no logits, and the fused loss computes none)."""
    w = ALL_WORKLOADS[name]
    tokens, T, L, V = w["batch_size"] * w["max_seq_len"], w["max_seq_len"], w["num_layers"], w["vocab_size"]
    D = w.get("hidden_size") or w["embed_dim"]
    width = D if "embed_dim" in w else (w.get("head_dim") or D // w["num_heads"]) * w["num_heads"]
    body_forward = 2 * tokens * _linear_macs_per_token(w)
    head_forward = 2 * scored_rows(name) * V * D
    attention_forward = 2 * 2 * tokens * T * width * L  # q k^T and p v, all heads
    passes = 3 if mode == "full" else 2  # forward, input gradient, and weight gradient when trained
    return passes * (body_forward + head_forward) + 3 * attention_forward
