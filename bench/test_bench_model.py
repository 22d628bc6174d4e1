"""Forward + backward of the whole GPT at each workload, fastlora vs PyTorch (same weights, same batch).

    python -m pytest bench/test_bench_model.py --benchmark-group-by=param:workload

Ratios are what to read: both run in the same process on the same machine, one after another.
"""
import numpy as np
import pytest

import fastlora as fl
from workloads import WORKLOADS, batch, model_config


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_fastlora_forward_backward(benchmark, workload):
    model = fl.GPT(**model_config(workload), seed=0)
    ids, labels = batch(workload)

    def step():
        model.zero_grad()
        loss = fl.cross_entropy(model(ids), labels)
        loss.backward()
        return loss.item()

    loss = benchmark(step)
    assert np.isfinite(loss)
    benchmark.extra_info["tokens_per_step"] = ids.size


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_torch_forward_backward(benchmark, workload):
    torch = pytest.importorskip("torch", reason="PyTorch is the peer; pip install -e '.[torch]'")
    from fastlora.testing.torch_reference import torch_gpt_from, torch_loss
    peer = torch_gpt_from(fl.GPT(**model_config(workload), seed=0))
    ids, labels = (torch.from_numpy(a) for a in batch(workload))

    def step():
        peer.zero_grad(set_to_none=True)
        loss = torch_loss(peer(ids), labels)
        loss.backward()
        return loss.item()

    loss = benchmark(step)
    assert np.isfinite(loss)
    benchmark.extra_info["tokens_per_step"] = int(ids.numel())
