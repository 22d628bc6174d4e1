"""LoRA adapter files in the PEFT layout (DESIGN.md), read and written without pickle.

    <dir>/adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, ...
    <dir>/adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  (R, I)
                                       base_model.model.<module path>.lora_B.weight  (O, R)

The adapter called "default" lives in <dir> itself, any other in <dir>/<name>/. Both files
are written atomically (fastlora.io). Loading reads and checks everything - config values,
key names, that every module exists and every shape fits - before touching the model, so
a refused load changes nothing.
"""
import os
import re
import warnings

import numpy as np

from fastlora.io import load_safetensors, read_json, save_safetensors, write_json_atomic
from fastlora.lora.config import LoraConfig, check_adapter_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")

# Config keys this loader understands; PEFT keys that do not change the math are accepted
# silently, PEFT features it does not implement are refused unless left at their default.
_USED = {"peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "bias",
         "fan_in_fan_out", "base_model_name_or_path", "task_type"}
_HARMLESS = {"inference_mode", "revision", "init_lora_weights", "auto_mapping", "peft_version"}
_MUST_BE_OFF = {"use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                "layers_pattern", "layer_replication", "lora_bias"}


def adapter_folder(directory, name):
    directory = os.fspath(directory)
    return directory if name == "default" else os.path.join(directory, name)


def save_adapter(model, directory, name):
    """Write adapter `name` of the LoRAModel `model`; returns the folder written."""
    folder = adapter_folder(directory, name)
    config = model.peft_config[name]
    tensors = {}
    for path in model._targets[name]:
        layer = model.get_submodule(path)
        tensors[f"base_model.model.{path}.lora_A.weight"] = np.ascontiguousarray(layer.lora_A[name].data)
        tensors[f"base_model.model.{path}.lora_B.weight"] = np.ascontiguousarray(layer.lora_B[name].data)
    targets = config.target_modules
    save_safetensors(os.path.join(folder, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    write_json_atomic(os.path.join(folder, CONFIG_NAME), {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": config.base_model_name_or_path,
        "task_type": "CAUSAL_LM",
    })
    return folder


def _find_folder(directory, name):
    """<dir>/<name> when it holds an adapter, else <dir> (a folder saved on its own)."""
    sub = os.path.join(os.fspath(directory), name)
    if name != "default" and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
        return sub
    return os.fspath(directory)


def parse_config(raw, where):
    """adapter_config.json contents -> a validated LoraConfig; ValueError naming the file otherwise."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {raw.get('peft_type')!r}; only 'LORA' adapters can be loaded")
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise ValueError(f"{where}: missing required key {key!r}")
    on = [k for k in _MUST_BE_OFF if raw.get(k) not in (None, False, {}, [])]
    if raw.get("fan_in_fan_out") not in (None, False):
        on.append("fan_in_fan_out")
    if on:
        raise ValueError(f"{where}: {sorted(on)} {'is' if len(on) == 1 else 'are'} not supported by fastlora")
    unknown = sorted(set(raw) - _USED - _HARMLESS - _MUST_BE_OFF)
    if unknown:
        warnings.warn(f"{where}: ignoring unknown adapter_config keys {unknown}", UserWarning, stacklevel=2)
    try:
        return LoraConfig(r=raw["r"], lora_alpha=raw["lora_alpha"], target_modules=raw.get("target_modules"),
                          lora_dropout=raw.get("lora_dropout", 0.0), use_rslora=raw.get("use_rslora", False),
                          bias=raw.get("bias", "none") or "none",
                          base_model_name_or_path=raw.get("base_model_name_or_path")).validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def read_adapter(directory, name="default"):
    """Read and check one adapter's files -> (LoraConfig, {module path: (A, B)}); the model is not involved."""
    check_adapter_name(name)
    folder = _find_folder(directory, name)
    config_file = os.path.join(folder, CONFIG_NAME)
    config = parse_config(read_json(config_file), config_file)
    weights_file = os.path.join(folder, WEIGHTS_NAME)
    tensors = load_safetensors(weights_file)
    parts = {}
    for key, arr in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{weights_file}: unexpected key {key!r} (expected "
                             "'base_model.model.<module path>.lora_A.weight' or '....lora_B.weight')")
        if arr.dtype.kind != "f":
            raise ValueError(f"{weights_file}: {key} has non-floating dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{weights_file}: {key} holds NaN or infinite values")
        parts.setdefault(m.group(1), {})[m.group(2)] = arr
    if not parts:
        raise ValueError(f"{weights_file}: holds no LoRA weights")
    for path, ab in parts.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ValueError(f"{weights_file}: {path} has no {missing}.weight")
    return config, {path: (ab["A"], ab["B"]) for path, ab in parts.items()}


def check_fits(base_model, config, arrays, where="adapter"):
    """Every module exists in base_model as a Linear/LoRALinear and every shape fits; ValueError otherwise.

    Returns the adapter's module paths in tree order.
    """
    from fastlora.lora.targets import adaptable_modules
    modules = dict(adaptable_modules(base_model))
    unknown = sorted(p for p in arrays if p not in modules)
    if unknown:
        raise ValueError(f"{where} has weights for {unknown[0]}, which is not a Linear layer of this model"
                         + (f" (nor are {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    paths = [p for p in modules if p in arrays]  # tree order, so the first error is the first layer
    for path in paths:
        A, B = arrays[path]
        m = modules[path]
        want_a, want_b = (config.r, m.in_features), (m.out_features, config.r)
        if A.shape != want_a:
            raise ValueError(f"{where}: {path}.lora_A has shape {A.shape}, the model expects {want_a} "
                             f"(r={config.r}, in_features={m.in_features})")
        if B.shape != want_b:
            raise ValueError(f"{where}: {path}.lora_B has shape {B.shape}, the model expects {want_b} "
                             f"(out_features={m.out_features}, r={config.r})")
    return paths


def apply_adapter(model, name, config, arrays):
    """Copy checked arrays into adapter `name` (present in every arrays path) and adopt its config."""
    for path, (A, B) in arrays.items():
        layer = model.get_submodule(path)
        np.copyto(layer.lora_A[name].data, A, casting="same_kind")
        np.copyto(layer.lora_B[name].data, B, casting="same_kind")
        layer.adapter_configs[name] = LoraConfig(r=config.r, lora_alpha=config.lora_alpha,
                                                 lora_dropout=config.lora_dropout,
                                                 use_rslora=config.use_rslora).validate()
    model.peft_config[name] = config


def describe(directory, name):
    return f"adapter {name!r} from {_find_folder(directory, name)}"


def load_adapter(model, directory, name="default"):
    """Load into the LoRAModel `model`: a new adapter is added (not activated); an existing one is overwritten."""
    config, arrays = read_adapter(directory, name)
    where = describe(directory, name)
    paths = check_fits(model.model, config, arrays, where)
    if name in model.peft_config:
        have = set(model._targets[name])
        if have != set(arrays):
            extra, lacking = sorted(set(arrays) - have), sorted(have - set(arrays))
            raise ValueError(f"{where}: the model's adapter {name!r} covers other modules (file only: "
                             f"{extra}, model only: {lacking}); delete_adapter({name!r}) first or load "
                             "under another name")
        rank = model.peft_config[name].r
        if rank != config.r:
            raise ValueError(f"{where}: the model's adapter {name!r} has rank {rank}, the file rank "
                             f"{config.r}; load it under another name, or build the model with "
                             "LoRAModel.from_pretrained")
        if model._merged_name() == name:
            raise ValueError(f"{where}: adapter {name!r} is merged into the weights; unmerge before loading")
    else:
        model._install(name, config, paths)
    apply_adapter(model, name, config, arrays)
