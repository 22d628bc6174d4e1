"""PEFT adapters of Hugging Face GPT-2, in GPT-2's own module names, to and from fastlora's GPT.

A GPT loaded from a GPT-2 folder (its `hf_config` says model_type "gpt2") keeps q, k and v
apart, where GPT-2 has one fused c_attn (D -> 3D). Real peft adapts c_attn as one layer:
A (R, D), B (3D, R). Both directions are exact:

- in: c_attn's adapter becomes one adapter on each of q_proj, k_proj and v_proj, each with
  c_attn's A and its third of B's rows (rank R, c_attn's alpha);
- out: the q/k/v adapters of a block become c_attn's: their A stacked and their B placed
  block-diagonally (rank = the sum of theirs), or, when they share one A (an adapter
  that came in this way), that A and their B stacked (rank unchanged). alpha is set so
  the scaling is theirs; a part whose scaling differs has the ratio folded into its B.

attn.c_proj, mlp.c_fc and mlp.c_proj map one to one onto out_proj, fc1 and fc2 (lm_head onto
lm_head when the head is untied). PEFT keeps lora_A (R, in) and lora_B (out, R) for Conv1D
layers too; `fan_in_fan_out: true` only tells it how to merge them into (in, out) weights.
Ranks and alphas that differ between layers go into rank_pattern / alpha_pattern.
"""
import math
import re
from collections import Counter

import numpy as np

from fastlora.lora.config import LoraConfig

_HF_PATH = re.compile(r"(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)")
_OWN_PATH = re.compile(r"blocks\.(\d+)\.(attn\.[qkv]_proj|attn\.out_proj|mlp\.fc1|mlp\.fc2)")
_TO_OWN = {"attn.c_proj": "attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TO_HF = {own: hf for hf, own in _TO_OWN.items()}
_KIND_KEYS = {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc",
              "mlp.c_proj": "mlp.c_proj", "lm_head": "lm_head"}


def applies_to(model):
    """True for a GPT that was loaded from a Hugging Face GPT-2 folder."""
    hf_config = getattr(model, "hf_config", None)
    return isinstance(hf_config, dict) and hf_config.get("model_type") == "gpt2"


# --- in ---------------------------------------------------------------------------------------

def from_peft(model, config, arrays, where):
    """A GPT-2 adapter read from files -> (LoraConfig, {fastlora module path: (A, B)}) for `model`."""
    D = model.config.embed_dim
    out, settings = {}, {}
    for hf_path, (A, B) in arrays.items():
        full = hf_path if hf_path.startswith(("transformer.", "lm_head")) else "transformer." + hf_path
        rank_alpha = (config.rank_for(full), config.alpha_for(full))
        if hf_path == "lm_head":
            parts = [("lm_head", B)]
        else:
            m = _HF_PATH.fullmatch(hf_path)
            if m is None:
                raise ValueError(f"{where} has weights for {hf_path!r}, which fastlora cannot adapt in GPT-2 "
                                 "(it adapts c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj and an untied lm_head)")
            block, kind = m.groups()
            if kind == "attn.c_attn":
                if B.ndim != 2 or B.shape[0] != 3 * D:
                    raise ValueError(f"{where}: {hf_path}.lora_B has shape {B.shape}, the model expects "
                                     f"({3 * D}, r): c_attn's q, k and v rows")
                parts = [(f"blocks.{block}.attn.{x}_proj", B[j * D:(j + 1) * D]) for j, x in enumerate("qkv")]
            else:
                parts = [(f"blocks.{block}.{_TO_OWN[kind]}", B)]
        for path, b in parts:
            out[path] = (A, np.ascontiguousarray(b))
            settings[path] = rank_alpha
    (r, alpha), ranks, alphas = _common_and_exceptions(settings, re.escape)
    own = LoraConfig(r=r, lora_alpha=alpha, target_modules=None, lora_dropout=config.lora_dropout,
                     use_rslora=config.use_rslora, base_model_name_or_path=config.base_model_name_or_path,
                     rank_pattern=ranks, alpha_pattern=alphas).validate()
    own.target_modules = compact_targets(list(out), _own_candidates(model), lambda p: p.rsplit(".", 1)[-1])
    return own, out


def _own_candidates(model):
    from fastlora.lora.targets import adaptable_modules
    return [p for p, _ in adaptable_modules(model)]


# --- out --------------------------------------------------------------------------------------

def to_peft(lm, name):
    """Adapter `name` of the LoRAModel `lm` -> ({module path in GPT2LMHeadModel: (A, B)}, config fields)."""
    D = lm.model.config.embed_dim
    fused = {}  # block -> [(row block j, A, B, LoraConfig)]
    entries, settings = {}, {}
    for path in lm._targets[name]:
        layer = lm.get_submodule(path)
        A, B, cfg = layer.lora_A[name].data, layer.lora_B[name].data, layer.adapter_configs[name]
        m = _OWN_PATH.fullmatch(path)
        if path == "lm_head":
            hf_path = "lm_head"
        elif m is None:
            raise ValueError(f"adapter {name!r} adapts {path}, which has no counterpart in GPT-2")
        elif m.group(2) in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
            fused.setdefault(m.group(1), []).append(("qkv".index(m.group(2)[5]), A, B, cfg))
            continue
        else:
            hf_path = f"transformer.h.{m.group(1)}.{_TO_HF[m.group(2)]}"
        entries[hf_path] = (A, B)
        settings[hf_path] = (cfg.r, cfg.lora_alpha)
    for block, parts in fused.items():
        hf_path = f"transformer.h.{block}.attn.c_attn"
        entries[hf_path], settings[hf_path] = _fuse_qkv(parts, D)
    (r, alpha), ranks, alphas = _common_and_exceptions(settings, None)
    ranks, alphas = _by_kind(ranks, list(entries)), _by_kind(alphas, list(entries))
    config = lm.peft_config[name]
    fields = {"r": r, "lora_alpha": alpha, "rank_pattern": ranks, "alpha_pattern": alphas,
              "target_modules": compact_targets(list(entries), _hf_candidates(lm.model), _hf_kind),
              "lora_dropout": config.lora_dropout, "use_rslora": config.use_rslora, "fan_in_fan_out": True}
    return entries, fields


def _fuse_qkv(parts, D):
    """[(row block, A, B, cfg)] of one block's q/k/v -> ((A, B), (rank, alpha)) of c_attn."""
    cfg0 = parts[0][3]
    target = cfg0.scaling
    dtype = parts[0][2].dtype
    shared_a = all(p[1].shape == parts[0][1].shape and np.array_equal(p[1], parts[0][1]) for p in parts)
    rank = cfg0.r if shared_a else sum(p[3].r for p in parts)
    A = parts[0][1] if shared_a else np.concatenate([p[1] for p in parts], axis=0)
    B = np.zeros((3 * D, rank), dtype=dtype)
    col = 0
    for j, _, b, cfg in parts:
        ratio = cfg.scaling / target
        cols = slice(0, rank) if shared_a else slice(col, col + cfg.r)
        B[j * D:(j + 1) * D, cols] = b if ratio == 1.0 else b * ratio
        col += cfg.r
    alpha = target * (math.sqrt(rank) if cfg0.use_rslora else rank)
    return (np.ascontiguousarray(A), B), (rank, alpha)


def _by_kind(pattern, adapted):
    """Per-path pattern entries -> one entry per kind ("c_attn": 8) where every adapted layer of
    that kind has the same value."""
    kinds = {}
    for path in adapted:
        kinds.setdefault(_hf_kind(path), []).append(path)
    out = {}
    for kind, paths in kinds.items():
        values = {pattern.get(p) for p in paths}
        if len(values) == 1 and None not in values:
            out[_KIND_KEYS[kind]] = values.pop()
        else:
            out.update((p, pattern[p]) for p in paths if p in pattern)
    return out


def _hf_kind(hf_path):
    return "lm_head" if hf_path == "lm_head" else hf_path.split(".", 3)[3]


def _hf_candidates(model):
    paths = [f"transformer.h.{i}.{kind}" for i in range(model.config.num_layers)
             for kind in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    return paths + ([] if model.config.tie_word_embeddings else ["lm_head"])


# --- shared -------------------------------------------------------------------------------------

def _common_and_exceptions(settings, escape):
    """{path: (rank, alpha)} -> ((rank, alpha) most layers have, rank_pattern, alpha_pattern) for the rest.

    Pattern keys are the layers' paths (escaped with `escape` when given, for fastlora's own
    regex matching; plain for PEFT users to read, where a dot matching itself is enough).
    """
    (r, alpha), _ = Counter(settings.values()).most_common(1)[0]
    key = escape or (lambda p: p)
    ranks = {key(p): pr for p, (pr, _) in settings.items() if pr != r}
    alphas = {key(p): pa for p, (_, pa) in settings.items() if pa != alpha}
    return (r, alpha), ranks, alphas


def compact_targets(chosen, candidates, kind_of):
    """target_modules naming `chosen`: a kind's short name where every candidate of that kind is
    chosen, the full paths of the others."""
    chosen = set(chosen)
    kinds = {}
    for path in candidates:
        kinds.setdefault(kind_of(path), []).append(path)
    names = []
    for kind, paths in kinds.items():
        picked = [p for p in paths if p in chosen]
        if picked and len(picked) == len(paths):
            names.append(_KIND_KEYS.get(kind, kind))
        else:
            names.extend(picked)
    return names
