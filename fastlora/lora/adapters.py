"""LoRA adapter files in the PEFT layout (docs/DESIGN.md), read and written without pickle.

    <dir>/adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, ...
    <dir>/adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  (R, I)
                                       base_model.model.<module path>.lora_B.weight  (O, R)
                                       base_model.model.<module path>.lora_magnitude_vector  (O,)  DoRA
                                       base_model.model.<module path>.base_layer.bias  bias="lora_only"/"all"
                                       base_model.model.<parameter name>   other biases, modules_to_save

The adapter called "default" lives in <dir> itself, any other in <dir>/<name>/. Both files
are written atomically (fastlora.io). Loading reads and checks everything - config values,
key names, that every module exists and every shape fits - before touching the model, so
a refused load changes nothing.

A PiSSA/OLoRA adapter moved s B0 A0 out of W when it was made, so as trained (A, B) it fits
only that residual W. It is saved by default as PEFT's weight conversion
(path_initial_model_for_weight_conversion) saves it: the plain LoRA [A; A0], [B, -B0] of
rank 2R and the same scaling, whose delta s (B A - B0 A0) is the change from the original
W. That file loads on the untouched base, here or in PEFT, with the same outputs.
"""
import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from fastlora.io import load_safetensors, read_json, save_safetensors, write_json_atomic
from fastlora.lora import peft_gpt2
from fastlora.lora import trainable as _trainable
from fastlora.lora.config import LoraConfig, check_adapter_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
_PART = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m"}

# adapter_config.json keys, as PEFT writes them. Loading a trained adapter never silently
# changes its result: keys fastlora implements are used; keys that provably change nothing
# here (bookkeeping, or options that only decide which modules get an adapter, which the
# weights file already says) are accepted; features fastlora lacks are refused unless off;
# an unknown key is refused unless its value switches nothing on.
_USED = {"peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "bias",
         "fan_in_fan_out", "base_model_name_or_path", "task_type", "rank_pattern", "alpha_pattern",
         "init_lora_weights", "use_dora", "modules_to_save", "layers_to_transform", "layers_pattern"}
_HARMLESS = {"inference_mode", "revision", "auto_mapping", "peft_version", "exclude_modules",
             "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying"}
_MUST_BE_OFF = {"layer_replication", "lora_bias", "megatron_config", "trainable_token_indices", "loftq_config",
                "eva_config", "corda_config", "lora_ga_config", "velora_config", "alora_invocation_tokens",
                "use_qalora", "monteclora_config", "target_parameters", "use_bdlora", "arrow_config", "kasa_config"}
_OFF_VALUES = (None, False, {}, [], "none", "")
# init_lora_weights values that only drew A and B: the saved weights are the whole adapter.
# Any other (pissa, olora, loftq, eva, corda, ...) also rewrote the base weights.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")


@dataclass
class AdapterWeights:
    """One adapter's config and arrays, keyed by module path (or parameter name for biases)."""
    config: LoraConfig
    arrays: dict  # module path -> (A (R, I), B (O, R))
    magnitudes: dict = field(default_factory=dict)  # module path -> DoRA magnitude (O,)
    biases: dict = field(default_factory=dict)  # parameter name ("blocks.0.attn.q_proj.bias") -> (O,)
    modules: dict = field(default_factory=dict)  # modules_to_save path -> {parameter name in it: array}

    def module_paths(self):
        return list(self.modules)


def adapter_folder(directory, name):
    directory = os.fspath(directory)
    return directory if name == "default" else os.path.join(directory, name)


def converted_config(cfg):
    """A layer's settings after PiSSA/OLoRA conversion: rank doubled, alpha so the scaling is unchanged."""
    factor = math.sqrt(2.0) if cfg.use_rslora else 2.0
    return replace(cfg, r=2 * cfg.r, lora_alpha=cfg.lora_alpha * factor, init_lora_weights=True,
                   rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
                   alpha_pattern={k: v * factor for k, v in cfg.alpha_pattern.items()})


def collect(model, name, convert_to_lora=True):
    """Adapter `name` of the LoRAModel `model` as AdapterWeights (PiSSA/OLoRA converted when asked);
    each layer's own settings are in `layer_configs` {path: LoraConfig}."""
    config = model.peft_config[name]
    convert = convert_to_lora and config.rewrites_base
    arrays, layer_configs, magnitudes = {}, {}, {}
    for path in model._targets[name]:
        layer = model.get_submodule(path)
        A, B, cfg = layer.lora_A[name].data, layer.lora_B[name].data, layer.adapter_configs[name]
        if convert and name in layer.initial_weights:
            A0, B0 = layer.initial_weights[name]
            A, B, cfg = np.concatenate([A, A0]), np.concatenate([B, -B0], axis=1), converted_config(cfg)
        arrays[path], layer_configs[path] = (A, B), cfg
        if name in layer.lora_magnitude_vector:
            magnitudes[path] = layer.lora_magnitude_vector[name].data
    biases = {n: p.data for n, p in _trainable.trained_biases(model.model, model._targets[name], config.bias).items()}
    modules = {path: {n: p.data for n, p in model.get_submodule(path).modules_to_save[name].named_parameters()}
               for path in model._saved[name]}
    config = converted_config(config) if convert else config
    return AdapterWeights(config, arrays, magnitudes, biases, modules), layer_configs


def save_adapter(model, directory, name, convert_to_lora=True):
    """Write adapter `name` of the LoRAModel `model`; returns the folder written.

    Over a GPT loaded from a Hugging Face GPT-2 folder, the adapter takes GPT-2's module names
    (fastlora.lora.peft_gpt2), so real peft loads it onto transformers' GPT2LMHeadModel.
    """
    folder = adapter_folder(directory, name)
    weights, layer_configs = collect(model, name, convert_to_lora)
    config = weights.config
    if peft_gpt2.applies_to(model.model):
        tensors, fields = peft_gpt2.to_peft(model.model, weights, layer_configs, model._targets[name])
    else:
        tensors = _own_tensors(weights)
        targets = config.target_modules
        fields = {"r": config.r, "lora_alpha": config.lora_alpha,
                  # PEFT expands "all-linear" only as a plain string, never inside a list
                  "target_modules": targets if isinstance(targets, str) else
                  ("all-linear" if list(targets) == ["all-linear"] else list(targets)),
                  "lora_dropout": config.lora_dropout, "use_rslora": config.use_rslora, "fan_in_fan_out": False,
                  "rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern,
                  "layers_to_transform": config.layers_to_transform,
                  "layers_pattern": config.layers_pattern or _layers_pattern_for_peft(config, weights.arrays),
                  "modules_to_save": config.modules_to_save}
    fields.update(use_dora=config.use_dora, init_lora_weights=config.init_lora_weights)
    for key, default in (("rank_pattern", {}), ("alpha_pattern", {}), ("use_dora", False), ("layers_to_transform", None),
                         ("layers_pattern", None), ("modules_to_save", None), ("init_lora_weights", True)):
        if fields.get(key) == default and type(fields.get(key)) is type(default):  # PEFT's defaults need not be written
            fields.pop(key, None)
    save_safetensors(os.path.join(folder, WEIGHTS_NAME), {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                     metadata={"format": "pt"})
    write_json_atomic(os.path.join(folder, CONFIG_NAME), {
        "peft_type": "LORA", **fields, "bias": config.bias,
        "base_model_name_or_path": config.base_model_name_or_path, "task_type": "CAUSAL_LM"})
    return folder


def _layers_pattern_for_peft(config, paths):
    """PEFT reads a layer index without layers_pattern only after a named part ("model.layers.3.");
    for the GPT's "blocks.3..." name the part, so peft picks the same layers."""
    if config.layers_to_transform is None:
        return None
    first = next(iter(paths))
    return None if re.match(r".*?\.[^.]*\.(\d+)\.", first) else first.split(".")[0]


def _own_tensors(weights):
    """Keys for fastlora's own module names (the GPT's blocks.<i>...)."""
    tensors = {}
    for path, (A, B) in weights.arrays.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = A
        tensors[f"base_model.model.{path}.lora_B.weight"] = B
    for path, m in weights.magnitudes.items():
        tensors[f"base_model.model.{path}.lora_magnitude_vector"] = m
    for pname, b in weights.biases.items():
        module = pname.rsplit(".", 1)[0]
        tensors["base_model.model." + (f"{module}.base_layer.bias" if module in weights.arrays else pname)] = b
    for path, params in weights.modules.items():
        for pname, arr in params.items():
            tensors[f"base_model.model.{path}.{pname}"] = arr
    return tensors


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
                         "was made, and this file holds the adapter for that changed model, so on the original "
                         "base its outputs would be wrong; save it converted to a plain LoRA adapter (fastlora "
                         "does by default; in peft: save_pretrained(..., path_initial_model_for_weight_conversion="
                         "...)) and load that")
    unknown = sorted(set(raw) - _USED - _HARMLESS - _MUST_BE_OFF)
    switched_on = [k for k in unknown if not _is_off(raw[k])]
    if switched_on:
        raise ValueError(f"{where}: {switched_on[0]}={raw[switched_on[0]]!r} is an adapter option fastlora does not "
                         "know; it may change the adapter's outputs, so the adapter is refused rather than loaded wrong")
    if unknown:
        warnings.warn(f"{where}: ignoring unknown adapter_config keys {unknown} (each is off)", UserWarning,
                      stacklevel=2)
    try:
        config = LoraConfig(r=raw["r"], lora_alpha=raw["lora_alpha"], target_modules=raw.get("target_modules"),
                            lora_dropout=raw.get("lora_dropout", 0.0), use_rslora=raw.get("use_rslora", False),
                            bias=raw.get("bias", "none") or "none",
                            base_model_name_or_path=raw.get("base_model_name_or_path"),
                            rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
                            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
                            use_dora=bool(raw.get("use_dora") or False),
                            layers_to_transform=raw.get("layers_to_transform"),
                            layers_pattern=raw.get("layers_pattern"),
                            modules_to_save=raw.get("modules_to_save") or None)
        config.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    config.init_lora_weights = init if init in (True, False, "gaussian") else True  # drew A and B only
    return config


def _is_off(value):
    return any(value is v or (type(value) is type(v) and value == v) for v in _OFF_VALUES)


def read_adapter(directory, name="default"):
    """Read and check one adapter's files -> AdapterWeights in the file's module names; the model is
    not involved."""
    check_adapter_name(name)
    folder = _find_folder(directory, name)
    config_file = os.path.join(folder, CONFIG_NAME)
    config = parse_config(read_json(config_file), config_file)
    weights_file = os.path.join(folder, WEIGHTS_NAME)
    tensors = load_safetensors(weights_file)
    parts, others = {}, {}
    for key, arr in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None and not (key.startswith("base_model.model.") and _is_saved_key(config, key)):
            raise ValueError(f"{weights_file}: unexpected key {key!r} (expected "
                             "'base_model.model.<module path>.lora_A.weight' or '....lora_B.weight'"
                             + (", or a bias or modules_to_save weight the config names" if config.bias != "none"
                                or config.modules_to_save else "") + ")")
        if arr.dtype.kind != "f":
            raise ValueError(f"{weights_file}: {key} has non-floating dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{weights_file}: {key} holds NaN or infinite values")
        if m is None:
            others[key[len("base_model.model."):]] = arr
        else:
            parts.setdefault(m.group(1), {})[_PART[m.group(2)]] = arr
    if not parts:
        raise ValueError(f"{weights_file}: holds no LoRA weights")
    for path, ab in parts.items():
        if not {"A", "B"} <= set(ab):
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ValueError(f"{weights_file}: {path} has no {missing}.weight")
        if ("m" in ab) != config.use_dora:
            raise ValueError(f"{weights_file}: {path} " + ("has no lora_magnitude_vector, but use_dora is true"
                                                           if config.use_dora else
                                                           "has a lora_magnitude_vector, but use_dora is false"))
    weights = AdapterWeights(config, {p: (ab["A"], ab["B"]) for p, ab in parts.items()},
                             {p: ab["m"] for p, ab in parts.items() if "m" in ab})
    _split_others(weights, others)
    return weights


def _saved_module(config, name):
    """The modules_to_save path that parameter `name` belongs to (the outermost matching module), or None."""
    parts = name.split(".")[:-1]
    for k in range(1, len(parts) + 1):
        path = ".".join(parts[:k])
        if any(_trainable.module_matches(m, path) for m in config.modules_to_save or ()):
            return path
    return None


def _is_saved_key(config, key):
    name = key[len("base_model.model."):]
    return (config.bias != "none" and "bias" in name) or _saved_module(config, name) is not None


def _split_others(weights, others):
    """Sort the non-LoRA keys into modules_to_save parameters and biases.

    PEFT with bias="all" and modules_to_save also writes the wrapper's inner biases:
    `<module>.modules_to_save.bias` (the copy's, again) and `<module>.original_module.bias` (the
    base's own, which the adapter does not use); the first is kept only if the copy's plain key is
    missing, the second is dropped.
    """
    for name, arr in list(others.items()):
        if ".original_module." in name:
            continue
        if ".modules_to_save." in name:
            plain = name.replace(".modules_to_save.", ".")
            if plain in others:
                continue
            name = plain
        owner = _saved_module(weights.config, name)
        if owner is not None:
            weights.modules.setdefault(owner, {})[name[len(owner) + 1:]] = arr
        else:
            weights.biases[name.replace(".base_layer.bias", ".bias")] = arr


def read_for_model(base_model, directory, name="default"):
    """read_adapter, with the module paths of `base_model`: a GPT-2 adapter's c_attn/c_proj/c_fc
    become the GPT's q/k/v_proj, out_proj, fc1 and fc2 when the GPT was loaded from GPT-2.

    Returns AdapterWeights checked to fit `base_model`.
    """
    weights = read_adapter(directory, name)
    where = describe(directory, name)
    from fastlora.lora.targets import adaptable_modules
    own_paths = {p for p, _ in adaptable_modules(base_model)}
    if peft_gpt2.applies_to(base_model) and not set(weights.arrays) <= own_paths:
        weights = peft_gpt2.from_peft(base_model, weights, where)
    elif weights.config.fan_in_fan_out:
        raise ValueError(f"{where}: fan_in_fan_out is true, so the adapter was made for GPT-2's Conv1D layers "
                         "(c_attn, c_proj, c_fc); load it onto a GPT read by fastlora.from_pretrained from a "
                         "Hugging Face GPT-2 folder")
    check_fits(base_model, weights, where)
    return weights


def check_fits(base_model, weights, where="adapter"):
    """Every module exists in base_model as a Linear/LoRALinear and every shape fits; ValueError otherwise.

    Returns the adapter's module paths in tree order.
    """
    from fastlora.lora.targets import adaptable_modules
    config, arrays = weights.config, weights.arrays
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
        if path in weights.magnitudes and weights.magnitudes[path].shape != (m.out_features,):
            raise ValueError(f"{where}: {path}.lora_magnitude_vector has shape {weights.magnitudes[path].shape}, "
                             f"the model expects ({m.out_features},)")
    own = {n: p for n, p in base_model.named_parameters()}
    for pname, arr in weights.biases.items():
        if pname not in own:
            raise ValueError(f"{where} has a bias for {pname}, which is not a parameter of this model")
        if arr.shape != own[pname].shape:
            raise ValueError(f"{where}: bias {pname} has shape {arr.shape}, the model expects {own[pname].shape}")
    for path, params in weights.modules.items():
        try:
            module = base_model.get_submodule(path)
        except KeyError:
            raise ValueError(f"{where} saves module {path} (modules_to_save), which this model lacks") from None
        have = dict(module.named_parameters())
        if set(have) != set(params):
            raise ValueError(f"{where}: module {path} (modules_to_save) has parameters {sorted(params)} in the "
                             f"file, {sorted(have)} in the model")
        for pname, arr in params.items():
            if arr.shape != have[pname].shape:
                raise ValueError(f"{where}: {path}.{pname} has shape {arr.shape}, the model expects "
                                 f"{have[pname].shape}")
    return paths


def apply_adapter(model, name, weights):
    """Copy checked arrays into adapter `name` (present in every arrays path) and adopt its config."""
    config = weights.config
    for path, (A, B) in weights.arrays.items():
        layer = model.get_submodule(path)
        np.copyto(layer.lora_A[name].data, A, casting="same_kind")
        np.copyto(layer.lora_B[name].data, B, casting="same_kind")
        if path in weights.magnitudes:
            np.copyto(layer.lora_magnitude_vector[name].data, weights.magnitudes[path], casting="same_kind")
        layer.adapter_configs[name] = config.for_layer(path)
    own = dict(model.model.named_parameters())
    for pname, arr in weights.biases.items():
        np.copyto(own[pname].data, arr, casting="same_kind")
    for path, params in weights.modules.items():
        copy = dict(model.get_submodule(path).modules_to_save[name].named_parameters())
        for pname, arr in params.items():
            np.copyto(copy[pname].data, arr, casting="same_kind")
    model.peft_config[name] = config


def describe(directory, name):
    return f"adapter {name!r} from {_find_folder(directory, name)}"


def load_adapter(model, directory, name="default"):
    """Load into the LoRAModel `model`: a new adapter is added (not activated); an existing one is overwritten."""
    weights = read_for_model(model.model, directory, name)
    config, arrays = weights.config, weights.arrays
    where = describe(directory, name)
    paths = check_fits(model.model, weights, where)
    if name in model.peft_config:
        have = set(model._targets[name])
        if have != set(arrays) or set(model._saved[name]) != set(weights.modules):
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
        if model.peft_config[name].use_dora != config.use_dora:
            raise ValueError(f"{where}: use_dora is {config.use_dora} in the file and "
                             f"{model.peft_config[name].use_dora} in the model's adapter {name!r}")
        if name in model._merged_names():
            raise ValueError(f"{where}: adapter {name!r} is merged into the weights; unmerge before loading")
    else:
        model._check_config(name, config)
        model._install(name, config, paths, weights.module_paths())
    apply_adapter(model, name, weights)
