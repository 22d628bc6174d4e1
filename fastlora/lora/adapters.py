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
from fastlora.lora import peft_gpt2
from fastlora.lora.config import LoraConfig, check_adapter_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")

# adapter_config.json keys, as PEFT writes them. Loading a trained adapter never silently
# changes its result: keys fastlora implements are used; keys that provably change nothing
# here (bookkeeping, or options that only decide which modules get an adapter, which the
# weights file already says) are accepted; features fastlora lacks are refused unless off;
# an unknown key is refused unless its value switches nothing on.
_USED = {"peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "bias",
         "fan_in_fan_out", "base_model_name_or_path", "task_type", "rank_pattern", "alpha_pattern",
         "init_lora_weights"}
_HARMLESS = {"inference_mode", "revision", "auto_mapping", "peft_version", "exclude_modules",
             "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying"}
_MUST_BE_OFF = {"use_dora", "modules_to_save", "layers_to_transform", "layers_pattern", "layer_replication",
                "lora_bias", "megatron_config", "trainable_token_indices", "loftq_config", "eva_config",
                "corda_config", "lora_ga_config", "velora_config", "alora_invocation_tokens", "use_qalora",
                "monteclora_config", "target_parameters", "use_bdlora", "arrow_config", "kasa_config"}
_OFF_VALUES = (None, False, {}, [], "none", "")
# init_lora_weights values that only drew A and B: the saved weights are the whole adapter.
# Any other (pissa, olora, loftq, eva, corda, ...) also rewrote the base weights.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")


def adapter_folder(directory, name):
    directory = os.fspath(directory)
    return directory if name == "default" else os.path.join(directory, name)


def save_adapter(model, directory, name):
    """Write adapter `name` of the LoRAModel `model`; returns the folder written.

    Over a GPT loaded from a Hugging Face GPT-2 folder, the adapter takes GPT-2's module names
    (fastlora.lora.peft_gpt2), so real peft loads it onto transformers' GPT2LMHeadModel.
    """
    folder = adapter_folder(directory, name)
    config = model.peft_config[name]
    if peft_gpt2.applies_to(model.model):
        modules, fields = peft_gpt2.to_peft(model, name)
    else:
        modules = {path: (model.get_submodule(path).lora_A[name].data, model.get_submodule(path).lora_B[name].data)
                   for path in model._targets[name]}
        targets = config.target_modules
        fields = {"r": config.r, "lora_alpha": config.lora_alpha,
                  "target_modules": targets if isinstance(targets, str) else list(targets),
                  "lora_dropout": config.lora_dropout, "use_rslora": config.use_rslora, "fan_in_fan_out": False,
                  "rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern}
    tensors = {}
    for path, (A, B) in modules.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = np.ascontiguousarray(A)
        tensors[f"base_model.model.{path}.lora_B.weight"] = np.ascontiguousarray(B)
    for key in ("rank_pattern", "alpha_pattern"):  # PEFT's defaults ({}) need not be written
        if not fields[key]:
            del fields[key]
    save_safetensors(os.path.join(folder, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    write_json_atomic(os.path.join(folder, CONFIG_NAME), {
        "peft_type": "LORA", **fields, "bias": "none",
        "base_model_name_or_path": config.base_model_name_or_path, "task_type": "CAUSAL_LM"})
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
    on = sorted(k for k in _MUST_BE_OFF if not _is_off(raw.get(k)))
    if on:
        raise ValueError(f"{where}: {on} {'is' if len(on) == 1 else 'are'} not supported by fastlora")
    init = raw.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        raise ValueError(f"{where}: init_lora_weights={init!r} changed the base model's weights when the adapter "
                         "was made, which fastlora does not implement, so its outputs would be wrong; in peft, "
                         "save it converted to a plain LoRA adapter (save_pretrained(..., "
                         "path_initial_model_for_weight_conversion=...)) and load that")
    unknown = sorted(set(raw) - _USED - _HARMLESS - _MUST_BE_OFF)
    switched_on = [k for k in unknown if not _is_off(raw[k])]
    if switched_on:
        raise ValueError(f"{where}: {switched_on[0]}={raw[switched_on[0]]!r} is an adapter option fastlora does not "
                         "know; it may change the adapter's outputs, so the adapter is refused rather than loaded wrong")
    if unknown:
        warnings.warn(f"{where}: ignoring unknown adapter_config keys {unknown} (each is off)", UserWarning,
                      stacklevel=2)
    try:
        return LoraConfig(r=raw["r"], lora_alpha=raw["lora_alpha"], target_modules=raw.get("target_modules"),
                          lora_dropout=raw.get("lora_dropout", 0.0), use_rslora=raw.get("use_rslora", False),
                          bias=raw.get("bias", "none") or "none",
                          base_model_name_or_path=raw.get("base_model_name_or_path"),
                          rank_pattern=raw.get("rank_pattern") or {},
                          alpha_pattern=raw.get("alpha_pattern") or {},
                          fan_in_fan_out=bool(raw.get("fan_in_fan_out", False))).validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _is_off(value):
    return any(value is v or (type(value) is type(v) and value == v) for v in _OFF_VALUES)


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


def read_for_model(base_model, directory, name="default"):
    """read_adapter, with the module paths of `base_model`: a GPT-2 adapter's c_attn/c_proj/c_fc
    become the GPT's q/k/v_proj, out_proj, fc1 and fc2 when the GPT was loaded from GPT-2.

    Returns (LoraConfig, {module path: (A, B)}), checked to fit `base_model`.
    """
    config, arrays = read_adapter(directory, name)
    where = describe(directory, name)
    from fastlora.lora.targets import adaptable_modules
    own_paths = {p for p, _ in adaptable_modules(base_model)}
    if peft_gpt2.applies_to(base_model) and not set(arrays) <= own_paths:
        config, arrays = peft_gpt2.from_peft(base_model, config, arrays, where)
    elif config.fan_in_fan_out:
        raise ValueError(f"{where}: fan_in_fan_out is true, so the adapter was made for GPT-2's Conv1D layers "
                         "(c_attn, c_proj, c_fc); load it onto a GPT read by fastlora.from_pretrained from a "
                         "Hugging Face GPT-2 folder")
    check_fits(base_model, config, arrays, where)
    return config, arrays


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
        r = config.rank_for(path)
        want_a, want_b = (r, m.in_features), (m.out_features, r)
        if A.shape != want_a:
            raise ValueError(f"{where}: {path}.lora_A has shape {A.shape}, the model expects {want_a} "
                             f"(r={r}, in_features={m.in_features})")
        if B.shape != want_b:
            raise ValueError(f"{where}: {path}.lora_B has shape {B.shape}, the model expects {want_b} "
                             f"(out_features={m.out_features}, r={r})")
    return paths


def apply_adapter(model, name, config, arrays):
    """Copy checked arrays into adapter `name` (present in every arrays path) and adopt its config."""
    for path, (A, B) in arrays.items():
        layer = model.get_submodule(path)
        np.copyto(layer.lora_A[name].data, A, casting="same_kind")
        np.copyto(layer.lora_B[name].data, B, casting="same_kind")
        layer.adapter_configs[name] = config.for_layer(path)
    model.peft_config[name] = config


def describe(directory, name):
    return f"adapter {name!r} from {_find_folder(directory, name)}"


def load_adapter(model, directory, name="default"):
    """Load into the LoRAModel `model`: a new adapter is added (not activated); an existing one is overwritten."""
    config, arrays = read_for_model(model.model, directory, name)
    where = describe(directory, name)
    paths = check_fits(model.model, config, arrays, where)
    if name in model.peft_config:
        have = set(model._targets[name])
        if have != set(arrays):
            extra, lacking = sorted(set(arrays) - have), sorted(have - set(arrays))
            raise ValueError(f"{where}: the model's adapter {name!r} covers other modules (file only: "
                             f"{extra}, model only: {lacking}); delete_adapter({name!r}) first or load "
                             "under another name")
        ranks = {p: model.get_submodule(p).adapter_configs[name].r for p in have}
        clash = next((p for p in sorted(have) if ranks[p] != config.rank_for(p)), None)
        if clash is not None:
            raise ValueError(f"{where}: the model's adapter {name!r} has rank {ranks[clash]}, the file rank "
                             f"{config.rank_for(clash)} (at {clash}); load it under another name, or build the "
                             "model with LoRAModel.from_pretrained")
        if model._merged_name() == name:
            raise ValueError(f"{where}: adapter {name!r} is merged into the weights; unmerge before loading")
    else:
        model._install(name, config, paths)
    apply_adapter(model, name, config, arrays)
