"""One training step of DESIGN.md's benchmark workloads, in fastlora and in PyTorch.

A step: forward, masked cross-entropy, backward, gradient clipping to norm 1.0, AdamW update.
Full fine-tuning trains every parameter; LoRA adapts q_proj and v_proj with rank 8, alpha 16.
`make_step(framework, workload, mode)` returns (step function, tokens per step); both
frameworks start from the same weights and see the same batch.
"""
import numpy as np

import fastlora as fl
from workloads import batch, model_config

LORA = dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))


def fastlora_model(workload, mode, seed=0):
    """(model, trainable parameters) of a workload: the GPT, or a LoRAModel over it."""
    model = fl.GPT(**model_config(workload), seed=seed)
    if mode != "lora":
        return model, list(model.parameters())
    model = fl.LoRAModel(model, target_modules=list(LORA["targets"]), rank=LORA["rank"], alpha=LORA["alpha"])
    model.inject_lora()
    return model, model.lora_parameters()


def fastlora_step(workload, mode, seed=0):
    model, params = fastlora_model(workload, mode, seed)
    return step_of(model, params, workload, seed)


def step_of(model, params, workload, seed=0):
    """(the DESIGN.md step of `model` training `params` on the workload's batch, tokens per step)."""
    opt = fl.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids, labels = batch(workload, seed)

    def step():
        opt.zero_grad()
        loss = fl.cross_entropy(model(ids), labels)
        loss.backward()
        fl.clip_grad_norm(params, 1.0)
        opt.step()
        return float(loss.data)

    return step, ids.size


def torch_step(workload, mode, seed=0):
    import torch
    from fastlora.testing.torch_reference import inject_torch_lora, torch_gpt_from, torch_loss
    ours, _ = fastlora_model(workload, mode, seed)  # the same weights and adapter init as fastlora's
    peer = torch_gpt_from(fl.GPT(**model_config(workload), seed=seed))
    if mode == "lora":
        peer.requires_grad_(False)
        params = [p for layer in inject_torch_lora(peer, ours).values() for p in (layer.lora_A, layer.lora_B)]
    else:
        params = list(peer.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids, labels = (torch.from_numpy(a) for a in batch(workload, seed))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(peer(ids), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step, int(ids.numel())


def make_step(framework, workload, mode, seed=0):
    if framework == "fastlora":
        return fastlora_step(workload, mode, seed)
    if framework == "torch":
        return torch_step(workload, mode, seed)
    raise ValueError(f"framework must be 'fastlora' or 'torch', got {framework!r}")


def check_losses_agree(workload, mode, steps=3):
    """The two frameworks' first losses agree (they run the same model on the same batch)."""
    a, _ = make_step("fastlora", workload, mode)
    b, _ = make_step("torch", workload, mode)
    return [(a(), b()) for _ in range(steps)]


__all__ = ["make_step", "check_losses_agree", "np"]
