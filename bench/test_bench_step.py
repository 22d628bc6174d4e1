"""A whole training step (forward, masked CE, backward, clip, AdamW) per workload and mode,
fastlora vs PyTorch, with pytest-benchmark.

    python -m pytest bench/test_bench_step.py --benchmark-group-by=param:workload,param:mode

For a table of tokens/s ratios and peak memory in separate processes, run bench/compare_torch.py.
"""
import numpy as np
import pytest

from steps import check_losses_agree, make_step
from workloads import WORKLOADS


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("workload", [w for w in WORKLOADS if w != "gpt2"])  # gpt2: compare_torch.py
@pytest.mark.parametrize("framework", ["fastlora", "torch"])
def test_train_step(benchmark, framework, workload, mode):
    if framework == "torch":
        pytest.importorskip("torch", reason="PyTorch is the peer: pip install -e '.[torch]'")
    step, tokens = make_step(framework, workload, mode)
    step()  # warm-up: buffers, optimizer state
    loss = benchmark.pedantic(step, rounds=5 if workload == "base" else 20, warmup_rounds=1)
    assert np.isfinite(loss)
    benchmark.extra_info["tokens_per_step"] = tokens


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_frameworks_compute_the_same_step(mode):
    """Validated before timed: the same model, batch and optimizer give the same losses."""
    pytest.importorskip("torch", reason="PyTorch is the peer: pip install -e '.[torch]'")
    for ours, theirs in check_losses_agree("tiny", mode):
        assert ours == pytest.approx(theirs, rel=1e-4)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("workload", ["tiny", "tiny-llama"])
def test_transformers_peer_computes_the_same_loss(workload, mode):
    """transformers' GPT2LMHeadModel / LlamaForCausalLM (+ PEFT) on fastlora's weights start from
    fastlora's loss (PEFT's own adapters start at B = 0, so the first loss is the base model's;
    later steps differ by the adapters' random A)."""
    pytest.importorskip("peft", reason="the HF+PEFT peer needs transformers and peft")
    (ours, theirs), = check_losses_agree(workload, mode, steps=1, peer="hf")
    assert ours == pytest.approx(theirs, rel=1e-4)
