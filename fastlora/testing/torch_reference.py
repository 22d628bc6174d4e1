"""The GPT of docs/DESIGN.md written in PyTorch, loadable from a fastlora state_dict.

Used as the oracle in tests and the peer in benchmarks; torch is imported here only, and
only when this module is used. Parameter names match fastlora's exactly.
"""
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class TorchAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        H = self.num_heads

        def heads(t):
            return t.view(B, T, H, D // H).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(B, T, D))


class TorchMLP(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ratio * dim), nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TorchBlock(nn.Module):
    def __init__(self, dim, num_heads, ratio):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim, eps=1e-5), TorchAttention(dim, num_heads)
        self.ln2, self.mlp = nn.LayerNorm(dim, eps=1e-5), TorchMLP(dim, ratio)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    def __init__(self, vocab_size, embed_dim, num_heads, num_layers, max_seq_len, mlp_ratio=4, **_):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.pos_embed = nn.Embedding(max_seq_len, embed_dim)
        self.blocks = nn.ModuleList([TorchBlock(embed_dim, num_heads, mlp_ratio) for _ in range(num_layers)])
        self.ln_f = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.embed(ids) + self.pos_embed(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.embed.weight.T


def torch_gpt_from(model, dtype=None):
    """A TorchGPT with the same config and weights as the fastlora GPT `model`."""
    from dataclasses import asdict
    cfg = asdict(model.config)
    peer = TorchGPT(**cfg).to(dtype or getattr(torch, str(model.dtype)))  # cast before loading: no rounding
    state = {k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}
    peer.load_state_dict(state, strict=True)
    return peer


def torch_loss(logits, labels):
    """The docs/DESIGN.md loss in torch: shift inside, -100 ignored, mean over the rest."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


class TorchLoRALinear(nn.Module):
    """PEFT's LoRA forward written out, base(x) + scaling * (x A^T) B^T, with the base frozen."""

    def __init__(self, base, lora_A, lora_B, scaling):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.from_numpy(np.array(lora_A)))
        self.lora_B = nn.Parameter(torch.from_numpy(np.array(lora_B)))
        self.scaling = scaling
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


def inject_torch_lora(peer, lora_model, adapter="default"):
    """Give the torch GPT `peer` (made by torch_gpt_from from the same base weights) the active
    adapters of the fastlora LoRAModel `lora_model`, each layer at the same path with the same
    A, B and scaling; returns {path: TorchLoRALinear}."""
    from fastlora.lora import LoRALinear
    layers = {}
    for path, layer in lora_model.named_modules():
        if isinstance(layer, LoRALinear):
            parent, _, name = path.rpartition(".")
            holder = peer.get_submodule(parent)
            layers[path] = TorchLoRALinear(getattr(holder, name), layer.lora_A[adapter].data,
                                           layer.lora_B[adapter].data, layer.scaling(adapter))
            setattr(holder, name, layers[path])
    return layers
