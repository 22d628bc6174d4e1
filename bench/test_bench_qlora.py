"""QLoRA vs float32 LoRA with pytest-benchmark: a whole train step per workload, the NF4 base
product with the default bounded tile vs the whole weight as one tile, and quantizing a model.

    python -m pytest bench/test_bench_qlora.py -s --benchmark-group-by=func --benchmark-columns=median,ops

Both modes adapt every Linear with rank 8, alpha 16 (see bench/qlora_figures.py, which also
measures resident memory in separate processes and the eval loss on the bundled data).
Each timed path is first checked against its float counterpart.
"""
import numpy as np
import pytest

import fastlora as fl
from fastlora.lora import NF4Weight, apply_qlora
from fastlora.lora.qlora import DEFAULT_TILE_COLS, DEFAULT_TILE_ROWS
from qlora_figures import TARGETS, adapted, base_bytes, make_step
from workloads import WORKLOADS, batch, model_config

_D = WORKLOADS["base"]["embed_dim"]
_N = WORKLOADS["base"]["batch_size"] * WORKLOADS["base"]["max_seq_len"]  # rows of x in a base batch
SHAPES = {"attn": (_D, _D), "fc1": (4 * _D, _D), "fc2": (_D, 4 * _D)}


@pytest.mark.parametrize("mode", ["lora", "qlora"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_train_step(benchmark, workload, mode):
    step, tokens, lm = make_step(workload, mode)
    step()  # warm-up: buffers, optimizer state
    loss = benchmark.pedantic(step, rounds=5 if workload == "base" else 20, warmup_rounds=1)
    assert np.isfinite(loss)
    benchmark.extra_info.update(tokens_per_step=tokens, base_weight_bytes=base_bytes(lm))


def test_qlora_step_is_lora_on_the_dequantized_weights():
    """Validated before timed: QLoRA's steps are LoRA's steps on the weights NF4 rounds to."""
    step_q, _, q = make_step("tiny", "qlora")
    gpt = fl.GPT(**model_config("tiny"), seed=0)
    for path, w in q.quantized_weights():
        gpt.get_submodule(path).weight.data[...] = w.dequantize()
    lm = adapted(gpt, "lora")
    for a, b in zip(lm.lora_parameters(), q.lora_parameters()):
        np.testing.assert_array_equal(a.data, b.data)  # same seed, same adapter init
    opt = fl.AdamW(lm.lora_parameters(), lr=1e-4, weight_decay=0.0)
    ids, labels = batch("tiny", 0)
    for _ in range(3):
        opt.zero_grad()
        loss = fl.cross_entropy(lm(ids), labels)
        loss.backward()
        fl.clip_grad_norm(lm.lora_parameters(), 1.0)
        opt.step()
        assert step_q() == pytest.approx(float(loss.data), rel=1e-5)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("tile", ["default", "whole", "dense"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_base_product_tile_cost(benchmark, shape, tile, direction):
    """x W^T (forward) and g W (backward) at the base workload: bounded tiles vs one whole-weight tile
    vs a dense float32 matmul (what float LoRA runs)."""
    O, I = SHAPES[shape]
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((O, I)) * 0.02).astype(np.float32)
    a = rng.standard_normal((_N, I if direction == "forward" else O)).astype(np.float32)
    whole = None if tile == "default" else max(O, I)
    w = NF4Weight.quantize(W, tile_rows=whole, tile_cols=whole)
    dense = w.dequantize()
    if tile == "dense":
        fn = (lambda: a @ dense.T) if direction == "forward" else (lambda: a @ dense)
    else:
        fn = (lambda: w.matmul(a)) if direction == "forward" else (lambda: w.matmul_t(a))
    expected = a @ dense.T if direction == "forward" else a @ dense
    np.testing.assert_allclose(fn(), expected, rtol=1e-4, atol=1e-5)
    benchmark(fn)
    rows = DEFAULT_TILE_ROWS if direction == "forward" else DEFAULT_TILE_COLS
    benchmark.extra_info["scratch_floats"] = (min(rows, O) * I if direction == "forward" else O * min(rows, I)) \
        if tile == "default" else O * I


def test_quantize_base_model_bytes_per_weight(benchmark):
    """apply_qlora on the base workload's GPT; records the stored bytes per quantized weight."""
    def build():
        return apply_qlora(fl.GPT(**model_config("base"), seed=0), rank=8, alpha=16.0, target_modules=TARGETS)

    lm = benchmark.pedantic(build, rounds=3, warmup_rounds=0)
    weights = [w for _, w in lm.quantized_weights()]
    per_weight = sum(w.nbytes for w in weights) / sum(w.size for w in weights)
    assert 0.515 < per_weight < 0.517
    benchmark.extra_info.update(bytes_per_weight=per_weight, float32_bytes=4 * sum(w.size for w in weights),
                                nf4_bytes=sum(w.nbytes for w in weights))
    print(f"\nbase workload: {sum(w.size for w in weights):,} quantized weights, {per_weight:.4f} bytes/weight")
