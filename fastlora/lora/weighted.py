"""add_weighted_adapter: a new adapter mixing existing ones, computed as PEFT's LoraModel does.

Per layer, over the adapters that layer has (w_i the weights, s_i the scalings):

    "linear"  A = sum sign(w_i s_i) sqrt|w_i s_i| A_i,  B = sum sqrt|w_i s_i| B_i   (equal ranks; the
              delta B A has cross terms, so it is only the weighted sum when one adapter is given)
    "cat"     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]            (exact: B A = sum w_i s_i B_i A_i)
    "svd"     delta = sum w_i s_i B_i A_i, truncated to its top svd_rank singular triplets:
              B = U_r diag(S_r), A = Vh_r                                          (rank svd_rank or the largest)

The new adapter has rank r (the common rank, the sum of ranks, or the SVD rank) and alpha = r,
so its scaling is 1. Over a GPT loaded from GPT-2, q, k and v are rows of one c_attn in PEFT,
so "svd" decomposes each block's q/k/v deltas stacked, as PEFT decomposes c_attn's, and gives
q, k and v one shared A (the adapter then saves as c_attn's exactly). Every argument is checked
before the model changes.
"""
import math
from dataclasses import replace

import numpy as np

from fastlora.lora import peft_gpt2
from fastlora.lora.config import check_adapter_name, check_rank

COMBINATIONS = ("linear", "cat", "svd")
# PEFT's other combination types (TIES, DARE, magnitude pruning) are not implemented here
_PEFT_ONLY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
              "magnitude_prune_svd")


def _check(lm, adapters, weights, adapter_name, combination_type, svd_rank):
    check_adapter_name(adapter_name)
    where = f"add_weighted_adapter({adapter_name!r})"
    if adapter_name in lm.peft_config:
        raise ValueError(f"{where}: adapter {adapter_name!r} already exists (adapters: {list(lm.peft_config)}); "
                         "pick another name or delete_adapter() it first")
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError(f"{where}: adapters must be a non-empty list of adapter names, got {adapters!r}")
    for name in adapters:
        if name not in lm.peft_config:
            raise ValueError(f"{where}: adapter {name!r} does not exist (adapters: {list(lm.peft_config)})")
    if not isinstance(weights, (list, tuple, np.ndarray)) or len(weights) != len(adapters):
        raise ValueError(f"{where}: weights must be a list with one number per adapter ({len(adapters)}), "
                         f"got {weights!r}")
    for name, w in zip(adapters, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not math.isfinite(w):
            raise ValueError(f"{where}: the weight of adapter {name!r} must be a finite number, got {w!r}")
    if combination_type in _PEFT_ONLY:
        raise ValueError(f"{where}: combination_type {combination_type!r} is not implemented by fastlora "
                         f"(it has {list(COMBINATIONS)})")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"{where}: invalid combination_type {combination_type!r}; use one of {list(COMBINATIONS)}")
    for name in adapters:
        config = lm.peft_config[name]
        if config.use_dora:
            raise ValueError(f"{where}: adapter {name!r} uses DoRA, whose output is not a sum of low-rank deltas; "
                             "only LoRA adapters can be combined")
        if config.rewrites_base:
            raise ValueError(f"{where}: adapter {name!r} was made with init_lora_weights="
                             f"{config.init_lora_weights!r}, which moved part of the base weights into it; "
                             "save and load it (converted to plain LoRA) first, then combine")
    if svd_rank is not None:
        check_rank(svd_rank)
    if len(adapters) == 1:  # as PEFT: one adapter is only scaled
        combination_type = "linear"
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in (lm.peft_config[n] for n in adapters)]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"{where}: combination_type 'linear' needs adapters of one rank, got "
                             f"{dict(zip(adapters, ranks))}; use 'cat' or 'svd'")
        rank = ranks[0]
    elif combination_type == "cat":
        rank = sum(ranks)
    else:
        rank = svd_rank or max(ranks)
    kinds = {isinstance(lm.peft_config[n].target_modules, str) for n in adapters}
    if len(kinds) > 1:
        raise ValueError(f"{where}: the adapters' target_modules mix a str and lists; PEFT cannot combine those")
    paths = [p for p, _ in lm.model.named_modules() if any(p in lm._targets[n] for n in adapters)]
    for path in paths:
        m = lm.get_submodule(path)
        check_rank(rank, m.in_features, m.out_features, where=f"{path} ({where}, combination_type "
                                                              f"{combination_type!r})")
    return combination_type, rank, paths


def add_weighted_adapter(lm, adapters, weights, adapter_name, combination_type="svd", svd_rank=None):
    """Add adapter `adapter_name` to the LoRAModel `lm`, mixing `adapters` with `weights` (see the
    module docstring). It is not made active."""
    combination_type, rank, paths = _check(lm, adapters, weights, adapter_name, combination_type, svd_rank)
    first = lm.peft_config[adapters[0]]
    if isinstance(first.target_modules, str):
        targets = "|".join(f"({lm.peft_config[n].target_modules})" for n in adapters)
    else:
        targets = sorted({t for n in adapters for t in lm.peft_config[n].target_modules})
    # alpha = r: scaling 1. PEFT keeps use_rslora from the first adapter, which would scale the mix by
    # sqrt(r); the mix here is the one its docstring describes, so rsLoRA is off.
    config = replace(first, r=rank, lora_alpha=float(rank), target_modules=targets, rank_pattern={},
                     alpha_pattern={}, use_rslora=False, bias="none", modules_to_save=None,
                     layers_to_transform=None, layers_pattern=None, init_lora_weights=True)
    arrays = _combine(lm, adapters, [float(w) for w in weights], combination_type, rank, paths)
    lm._install(adapter_name, config, paths)
    for path, (A, B) in arrays.items():
        layer = lm.get_submodule(path)
        np.copyto(layer.lora_A[adapter_name].data, A, casting="same_kind")
        np.copyto(layer.lora_B[adapter_name].data, B, casting="same_kind")


def _present(layer, adapters, weights):
    return [(n, w) for n, w in zip(adapters, weights) if n in layer.adapter_configs]


def _combine(lm, adapters, weights, combination_type, rank, paths):
    """{path: (A (rank, I), B (O, rank))} of the new adapter."""
    out = {}
    if combination_type == "svd":
        for group in _svd_groups(lm, paths):
            out.update(_svd(lm, group, adapters, weights, rank))
        return out
    for path in paths:
        layer = lm.get_submodule(path)
        dtype = layer.weight.dtype
        A = np.zeros((rank, layer.in_features), np.float64)
        B = np.zeros((layer.out_features, rank), np.float64)
        row = 0
        for name, w in _present(layer, adapters, weights):
            a, b, s = layer.lora_A[name].data, layer.lora_B[name].data, layer.adapter_configs[name].scaling
            if combination_type == "cat":
                A[row:row + a.shape[0]] = a * (w * s)
                B[:, row:row + a.shape[0]] = b
                row += a.shape[0]
            else:  # linear: the sign on A's side only, so it is not squared away
                ws = w * s
                A[:a.shape[0]] += math.copysign(math.sqrt(abs(ws)), ws) * a
                B[:, :a.shape[0]] += math.sqrt(abs(ws)) * b
        out[path] = (A.astype(dtype), B.astype(dtype))
    return out


def _svd_groups(lm, paths):
    """Layers decomposed together: q, k and v of a block over a GPT from GPT-2 (c_attn's rows there),
    else each layer alone."""
    if not peft_gpt2.applies_to(lm.model):
        return [[p] for p in paths]
    groups, fused = [], {}
    for path in paths:
        block = peft_gpt2.qkv_block(path)
        if block is None:
            groups.append([path])
        else:
            if block not in fused:
                fused[block] = []
                groups.append(fused[block])
            fused[block].append(path)
    return groups


def _svd(lm, group, adapters, weights, rank):
    """The group's layers' weighted delta sums, stacked by rows, truncated to `rank` as PEFT does it."""
    deltas = []
    for path in group:
        layer = lm.get_submodule(path)
        present = _present(layer, adapters, weights)
        delta = sum(w * layer.delta_weight(name).astype(np.float64) for name, w in present)
        deltas.append(delta)
    U, S, Vh = np.linalg.svd(np.concatenate(deltas, axis=0), full_matrices=False)
    B_all, A = U[:, :rank] * S[:rank], Vh[:rank]
    out, row = {}, 0
    for path, delta in zip(group, deltas):
        dtype = lm.get_submodule(path).weight.dtype
        out[path] = (A.astype(dtype), B_all[row:row + delta.shape[0]].astype(dtype))
        row += delta.shape[0]
    return out
