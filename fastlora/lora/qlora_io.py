"""Saving and loading a QLoRA model's quantized base (NF4 codes, not float weights), without pickle.

    save_quantized_base(lm, "base-nf4.safetensors")          # + "base-nf4.safetensors.json"
    lm = load_quantized_base("base-nf4.safetensors", rank=8)  # a QLoRAModel with a fresh adapter
    lm.load_adapter("adapter/")                               # a trained adapter, if any

The safetensors file holds the float parameters that are not quantized (embeddings, LayerNorms,
biases) under their usual names, and each quantized weight's NF4 arrays (NF4Tensor.to_arrays)
as `<module path>.weight.nf4.<array>`, e.g. `blocks.0.attn.q_proj.weight.nf4.packed`. The JSON
sidecar holds the GPT config (as GPT.save writes it) plus a "quantization" entry: the target
modules and each weight's NF4 meta. Adapters are not part of it; they are saved as for LoRA.
Everything is checked on load (NF4Tensor.from_arrays validates every array), before the
returned model is built.
"""
import os
from dataclasses import asdict

import numpy as np

from fastlora.io import load_safetensors, read_json, save_safetensors, write_json_atomic
from fastlora.lora.nf4 import NF4Tensor
from fastlora.lora.qlora import NF4Weight, QLoRAModel

FORMAT = "fastlora.qlora-base"
FORMAT_VERSION = 1
_NF4 = ".weight.nf4."


def _sidecar(path):
    return os.fspath(path) + ".json"


def save_quantized_base(lm, path):
    """Write the base of the QLoRAModel `lm` to `path` (safetensors) and `path`.json; both atomic."""
    if not isinstance(lm, QLoRAModel):
        raise TypeError(f"save_quantized_base needs a QLoRAModel (from apply_qlora), got {type(lm).__name__}")
    quantized = lm.quantized_weights()  # refuses a model that is not injected
    if lm.merged:
        raise ValueError("an adapter is merged into the NF4 weights; unmerge_adapter() before saving the base")
    lora_ids = {id(p) for p in lm.parameters()} - {id(p) for p in lm.base_parameters()}
    arrays = {name: np.ascontiguousarray(p.data) for name, p in lm.named_parameters() if id(p) not in lora_ids}
    layers = {}
    for module_path, w in quantized:
        parts, meta = w.quantized.to_arrays()
        arrays.update({f"{module_path}{_NF4}{k}": v for k, v in parts.items()})
        layers[module_path] = meta
    targets = next(iter(lm.peft_config.values())).target_modules
    config = {"model_type": "fastlora-gpt", **asdict(lm.model.config),
              "quantization": {"format": FORMAT, "version": FORMAT_VERSION,
                               "target_modules": targets if isinstance(targets, str) else list(targets),
                               "layers": layers}}
    save_safetensors(path, arrays)
    write_json_atomic(_sidecar(path), config)
    return os.fspath(path)


def _read(path):
    """-> (GPT config fields, target_modules, {module path: NF4Tensor}, {name: float array})."""
    from fastlora.nn.gpt import GPTConfig
    cfg_file = _sidecar(path)
    cfg = read_json(cfg_file)
    quant = cfg.get("quantization") if isinstance(cfg, dict) else None
    if not isinstance(quant, dict) or quant.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: not a quantized base (no 'quantization' entry of format {FORMAT!r}); "
                         "a float model loads with GPT.load")
    if quant.get("version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: quantization version {quant.get('version')!r}, expected {FORMAT_VERSION}")
    layers = quant.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{cfg_file}: quantization.layers must name at least one quantized layer")
    fields = {k: cfg[k] for k in GPTConfig.__dataclass_fields__ if k in cfg}
    state = load_safetensors(path)
    parts = {}
    for key in [k for k in state if _NF4 in k]:
        module_path, name = key.split(_NF4, 1)
        parts.setdefault(module_path, {})[name] = state.pop(key)
    if set(parts) != set(layers):
        raise ValueError(f"{path}: NF4 arrays for {sorted(parts)} but {cfg_file} lists {sorted(layers)}")
    tensors = {}
    for module_path, meta in layers.items():
        try:
            tensors[module_path] = NF4Tensor.from_arrays(parts[module_path], meta)
        except ValueError as exc:
            raise ValueError(f"{path}: {module_path}.weight: {exc}") from None
    return fields, quant.get("target_modules"), tensors, state


def load_quantized_base(path, rank=8, alpha=16.0, dropout=0.0, use_rslora=False, adapter_name="default",
                        seed=0, tile_rows=None, tile_cols=None):
    """A QLoRAModel on the base saved at `path`, with a fresh adapter on the saved quantized layers.

    The float weights of those layers are never read from disk (the file has none); the GPT is
    built, the NF4 weights put in place of its targeted Linears, and the other parameters loaded.
    """
    from fastlora.nn.gpt import GPT
    fields, targets, tensors, state = _read(path)
    dtypes = {a.dtype for a in state.values()}
    model = GPT(**fields, dtype=np.float64 if dtypes == {np.dtype(np.float64)} else np.float32)
    first = next(iter(tensors.values()))
    lm = QLoRAModel(model, targets, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                    adapter_name=adapter_name, seed=seed, block_size=first.block_size,
                    double_quant=first.double_quant, tile_rows=tile_rows, tile_cols=tile_cols)
    resolved = lm._targets[adapter_name]
    if set(resolved) != set(tensors):
        raise ValueError(f"{path}: target_modules {targets!r} select {sorted(resolved)} in this GPT, "
                         f"but the file quantizes {sorted(tensors)}")
    dtype = model.dtype
    lm.inject_lora(weights={p: NF4Weight(t, dtype, tile_rows, tile_cols) for p, t in tensors.items()})
    result = model.load_state_dict(state, strict=False)
    lora_names = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    missing = [k for k in result["missing_keys"] if k not in lora_names]
    if missing or result["unexpected_keys"]:
        raise ValueError(f"{path}: parameters missing {missing[:5]}, unexpected {result['unexpected_keys'][:5]}")
    return lm
