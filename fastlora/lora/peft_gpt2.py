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

DoRA's magnitude is per output row, and W + s B A's rows are the same in c_attn as in q, k
and v, so c_attn's magnitude (3D,) splits into theirs exactly; going out, a part the adapter
does not cover gets its base rows' norms (m / n = 1 there). Biases (c_attn's is q, k and v's
concatenated) and modules_to_save weights map through fastlora.nn.hf_gpt2's names, Conv1D
weights transposed; layers_pattern "h" is the GPT's "blocks".
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


def qkv_block(path):
    """The block index of q_proj, k_proj or v_proj (rows of that block's c_attn in GPT-2), else None."""
    m = _OWN_PATH.fullmatch(path)
    return int(m.group(1)) if m and m.group(2) in ("attn.q_proj", "attn.k_proj", "attn.v_proj") else None


# --- in ---------------------------------------------------------------------------------------

def from_peft(model, weights, where):
    """A GPT-2 adapter read from files (AdapterWeights in GPT-2's names) -> AdapterWeights for `model`."""
    config, D = weights.config, model.config.embed_dim
    out, settings, magnitudes = {}, {}, {}
    for hf_path, (A, B) in weights.arrays.items():
        full = _full(hf_path)
        rank_alpha = (config.rank_for(full), config.alpha_for(full))
        if hf_path == "lm_head":
            paths = ["lm_head"]
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
                paths = [f"blocks.{block}.attn.{x}_proj" for x in "qkv"]
            else:
                paths = [f"blocks.{block}.{_TO_OWN[kind]}"]
        # c_attn's rows split into q, k and v: its B's rows and (DoRA) its magnitude's entries
        for j, path in enumerate(paths):
            rows = slice(j * D, (j + 1) * D) if len(paths) == 3 else slice(None)
            out[path] = (A, np.ascontiguousarray(B[rows]))
            settings[path] = rank_alpha
            if hf_path in weights.magnitudes:
                magnitudes[path] = np.ascontiguousarray(weights.magnitudes[hf_path][rows])
    (r, alpha), ranks, alphas = _common_and_exceptions(settings, re.escape)
    names = _own_names(model)
    biases = {}
    for hf, arr in weights.biases.items():
        biases.update(_to_own(names, _full(hf), arr, where, "bias"))
    modules = {}
    for hf_module, params in weights.modules.items():
        for pname, arr in params.items():
            for own, part in _to_own(names, f"{_full(hf_module)}.{pname}", arr, where, "modules_to_save").items():
                path, _, leaf = own.rpartition(".")
                modules.setdefault(path, {})[leaf] = part
    own = LoraConfig(r=r, lora_alpha=alpha, target_modules=None, lora_dropout=config.lora_dropout,
                     use_rslora=config.use_rslora, base_model_name_or_path=config.base_model_name_or_path,
                     rank_pattern=ranks, alpha_pattern=alphas, use_dora=config.use_dora, bias=config.bias,
                     init_lora_weights=config.init_lora_weights,
                     modules_to_save=sorted(modules) or None).validate()
    own.target_modules = compact_targets(list(out), _in_layers(_own_candidates(model), config.layers_to_transform),
                                         lambda p: p.rsplit(".", 1)[-1])
    own.layers_to_transform = config.layers_to_transform
    own.layers_pattern = _map_pattern(config.layers_pattern, {"h": "blocks"})
    return type(weights)(own, out, magnitudes, biases, modules)


def _full(hf):
    """A GPT2LMHeadModel path: GPT2Model's names get "transformer."."""
    return hf if hf.startswith(("transformer.", "lm_head")) else "transformer." + hf


def _map_pattern(pattern, mapping):
    if pattern is None:
        return None
    if isinstance(pattern, str):
        return mapping.get(pattern, pattern)
    return [mapping.get(p, p) for p in pattern]


def _own_names(model):
    """{GPT2LMHeadModel parameter name: [fastlora names]} (c_attn's: q, k and v's)."""
    from fastlora.nn.hf_gpt2 import name_map
    return {(hf if hf == "lm_head.weight" else "transformer." + hf): own for hf, own in name_map(model.config)}


def _to_own(names, hf, arr, where, what):
    """One GPT-2 parameter's array -> {fastlora name: array} (c_attn's bias split in three; Conv1D
    weights transposed)."""
    from fastlora.nn.hf_gpt2 import _is_conv1d
    own = names.get(hf)
    if own is None:
        raise ValueError(f"{where} has {what} weights for {hf!r}, which is not a parameter of this GPT-2")
    if len(own) > 1 and arr.ndim != 1:
        raise ValueError(f"{where}: {what} {hf} is c_attn's weight, which fastlora holds as q, k and v: "
                         "saving c_attn whole is not supported")
    arr = arr.T if _is_conv1d(hf) else arr
    if len(own) == 1:
        return {own[0]: np.ascontiguousarray(arr)}
    D = arr.shape[0] // 3
    return {name: np.ascontiguousarray(arr[j * D:(j + 1) * D]) for j, name in enumerate(own)}


def _in_layers(paths, layers):
    """The paths in layers_to_transform (all when None): the kinds' short names then cover the rest."""
    if layers is None:
        return paths
    from fastlora.lora.config import layer_index
    keep = {layers} if isinstance(layers, int) else set(layers)
    return [p for p in paths if layer_index(p) in keep]


def _own_candidates(model):
    from fastlora.lora.targets import adaptable_modules
    return [p for p, _ in adaptable_modules(model)]


# --- out --------------------------------------------------------------------------------------

def to_peft(model, weights, layer_configs, paths):
    """AdapterWeights of fastlora's GPT (each layer's settings in layer_configs) -> ({key in GPT-2's
    names: array}, config fields)."""
    D = model.config.embed_dim
    fused = {}  # block -> [(row block j, A, B, LoraConfig)]
    entries, settings, mags = {}, {}, {}
    for path in paths:
        (A, B), cfg = weights.arrays[path], layer_configs[path]
        m = _OWN_PATH.fullmatch(path)
        if path == "lm_head":
            hf_path = "lm_head"
        elif m is None:
            raise ValueError(f"the adapter adapts {path}, which has no counterpart in GPT-2")
        elif m.group(2) in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
            fused.setdefault(m.group(1), []).append(("qkv".index(m.group(2)[5]), A, B, cfg))
            continue
        else:
            hf_path = f"transformer.h.{m.group(1)}.{_TO_HF[m.group(2)]}"
        entries[hf_path] = (A, B)
        settings[hf_path] = (cfg.r, cfg.lora_alpha)
        if path in weights.magnitudes:
            mags[hf_path] = weights.magnitudes[path]
    for block, parts in fused.items():
        hf_path = f"transformer.h.{block}.attn.c_attn"
        entries[hf_path], settings[hf_path] = _fuse_qkv(parts, D)
        if weights.config.use_dora:  # c_attn's rows: q, k, v; a part without the adapter keeps its norm (m / n = 1)
            mags[hf_path] = np.concatenate([_part_magnitude(model, weights, f"blocks.{block}.attn.{x}_proj")
                                            for x in "qkv"])
    tensors = {}
    for hf_path, (A, B) in entries.items():
        tensors[f"base_model.model.{hf_path}.lora_A.weight"] = A
        tensors[f"base_model.model.{hf_path}.lora_B.weight"] = B
        if hf_path in mags:
            tensors[f"base_model.model.{hf_path}.lora_magnitude_vector"] = mags[hf_path]
    tensors.update(_hf_extras(model, weights, set(entries)))
    (r, alpha), ranks, alphas = _common_and_exceptions(settings, None)
    ranks, alphas = _by_kind(ranks, list(entries)), _by_kind(alphas, list(entries))
    config = weights.config
    modules = sorted(_saved_hf_modules(model, weights))
    fields = {"r": r, "lora_alpha": alpha, "rank_pattern": ranks, "alpha_pattern": alphas,
              "target_modules": compact_targets(list(entries), _in_layers(_hf_candidates(model),
                                                                          config.layers_to_transform), _hf_kind),
              "lora_dropout": config.lora_dropout, "use_rslora": config.use_rslora, "fan_in_fan_out": True,
              "layers_to_transform": config.layers_to_transform,
              "layers_pattern": _map_pattern(config.layers_pattern, {"blocks": "h"}),
              "modules_to_save": modules or None}
    return tensors, fields


def _part_magnitude(model, weights, path):
    """The magnitude of q, k or v's rows in c_attn: the adapter's, or the base rows' norms."""
    if path in weights.magnitudes:
        return weights.magnitudes[path]
    layer = model.get_submodule(path)
    w = layer.base_array() if hasattr(layer, "base_array") else layer.weight.data
    return np.linalg.norm(w, axis=1).astype(w.dtype)


def _saved_hf_modules(model, weights):
    """GPT-2 module paths of the adapter's modules_to_save."""
    out = set()
    names = _hf_names(model)
    for path, params in weights.modules.items():
        for pname in params:
            hf, _ = names[f"{path}.{pname}"]
            out.add(hf.rsplit(".", 1)[0])
    return out


def _hf_names(model):
    """{fastlora name: (GPT2LMHeadModel name, [its fastlora parts])}."""
    return {o: (hf, own) for hf, own in _own_names(model).items() for o in own}


def _hf_extras(model, weights, adapted):
    """The biases and modules_to_save weights in GPT-2's names (c_attn's from q, k and v's)."""
    from fastlora.nn.hf_gpt2 import _is_conv1d
    names, current = _hf_names(model), model.state_dict()
    out = {}
    wanted = [(n, "bias") for n in weights.biases] + [
        (f"{path}.{p}", "module") for path, params in weights.modules.items() for p in params]
    values = {**weights.biases, **{f"{path}.{p}": a for path, params in weights.modules.items()
                                   for p, a in params.items()}}
    for own, what in wanted:
        if own not in names:
            raise ValueError(f"the adapter saves {own}, which has no counterpart in GPT-2")
        hf, parts = names[own]
        if len(parts) > 1 and what == "module":
            raise ValueError(f"the adapter saves {own.rsplit('.', 1)[0]} whole (modules_to_save), which is part of "
                             "GPT-2's fused c_attn; save the other modules only")
        arr = np.concatenate([values.get(p, current[p]) for p in parts]) if len(parts) > 1 else values[own]
        arr = arr.T if _is_conv1d(hf) else arr
        module = hf.rsplit(".", 1)[0]
        key = f"{module}.base_layer.bias" if what == "bias" and module in adapted else hf
        out[f"base_model.model.{key}"] = np.ascontiguousarray(arr)
    return out


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
