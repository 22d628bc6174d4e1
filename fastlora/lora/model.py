"""LoRAModel: a base model (the GPT) with LoRA adapters on chosen Linear layers, used like the model.

    lm = LoRAModel(gpt, target_modules=["q_proj", "v_proj"], rank=8, alpha=16)
    lm.inject_lora()                       # targets become LoRALinear, every base weight frozen
    opt = AdamW(lm.lora_parameters())      # what the active adapter trains
    logits = lm(input_ids)                 # same call and output as the GPT

The base model is changed in place, as PEFT does, and keeps its parameter names
(`blocks.0.attn.q_proj.weight`); adapters add `<module path>.lora_A.<adapter>` and
`.lora_B.<adapter>` (DoRA: `.lora_magnitude_vector.<adapter>`; modules_to_save:
`<module path>.modules_to_save.<adapter>...`). named_parameters/state_dict/train/eval/generate
pass through to the base model, so the LoRAModel is not a second level in the names. Several
adapters can live side by side; one, or several whose outputs add up, are active (used in
forward and trained). PEFT's options are LoraConfig's (fastlora.lora.config).
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from fastlora._typing import PathLike
from fastlora.lora import adapters as _adapters
from fastlora.lora import trainable as _trainable
from fastlora.lora.config import check_adapter_name, make_config, pattern_key
from fastlora.lora.layer import LoRALinear
from fastlora.lora.merge import lora_layers, merge_layers, unload_layers, unmerge_layers
from fastlora.lora.model_adapters import AdapterManagement
from fastlora.lora.targets import check_targets, replace_module
from fastlora.nn.causal_lm import with_positions
from fastlora.nn.module import Module


class LoRAModel(AdapterManagement, Module):
    """LoRAModel(base_model, target_modules, rank=4, alpha=None, dropout=0.0, use_rslora=False, ...).

    alpha=None means alpha = rank (scaling 1). target_modules: short names, full paths,
    regexes, or "all-linear" (see fastlora.lora.targets). The other keywords are PEFT's
    LoraConfig options: rank_pattern, alpha_pattern, use_dora, init_lora_weights,
    layers_to_transform, layers_pattern, bias, modules_to_save. Nothing is replaced until
    inject_lora(); every argument is checked here first.
    """

    def __init__(self, base_model: Module, target_modules: Union[str, Sequence[str]], rank: int = 4,
                 alpha: Optional[float] = None, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_name: str = "default", seed: int = 0, base_model_name_or_path: Optional[str] = None,
                 rank_pattern: Optional[Dict[str, int]] = None, alpha_pattern: Optional[Dict[str, float]] = None,
                 **options: Any) -> None:
        super().__init__()
        if isinstance(base_model, LoRAModel):
            raise TypeError("base_model is already a LoRAModel; use its add_adapter() for another adapter")
        if not isinstance(base_model, Module):
            raise TypeError(f"base_model must be a fastlora Module (e.g. a GPT), got {type(base_model).__name__}")
        if lora_layers(base_model):
            raise ValueError("base_model already holds LoRA layers; use the LoRAModel that added them")
        check_adapter_name(adapter_name)
        config = make_config(adapter_name, r=rank, lora_alpha=alpha, target_modules=target_modules,
                              lora_dropout=dropout, use_rslora=use_rslora,
                              base_model_name_or_path=base_model_name_or_path, rank_pattern=rank_pattern,
                              alpha_pattern=alpha_pattern, **options)
        self._check_config(adapter_name, config)
        paths, saved = check_targets(base_model, config, adapter_name)
        # a plain attribute, not a registered child, so parameter names get no "model." prefix
        object.__setattr__(self, "model", base_model)
        self.peft_config = {adapter_name: config}
        self._targets = {adapter_name: paths}
        self._saved = {adapter_name: saved}  # the modules_to_save paths of each adapter
        self._active = [adapter_name]
        self._rng = np.random.default_rng(seed)
        self._state = "new"  # "new" -> inject_lora() -> "injected" -> unload -> "unloaded"
        self._base_flags = {}  # parameter name -> requires_grad before injection, restored on unload

    def _check_config(self, name, config):
        """Refuse options this kind of model cannot hold (QLoRAModel refuses more)."""

    # --- the base model's surface ---------------------------------------------------------------
    @property
    def base_model(self):
        return self.model

    def forward(self, input_ids, position_ids=None):
        return with_positions(self.model, input_ids, position_ids)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def named_modules(self, prefix=""):
        return self.model.named_modules(prefix)

    def get_submodule(self, path):
        return self.model.get_submodule(path)

    def set_submodule(self, path, new):
        self.model.set_submodule(path, new)

    def train(self, mode=True):
        self.model.train(mode)
        object.__setattr__(self, "training", bool(mode))
        return self

    def __getattr__(self, name):
        # Only reached when normal lookup fails: hand the base model's attributes through
        # (config, dtype, check_input_ids, blocks, ...), as PEFT's PeftModel does.
        if name.startswith("_") or name == "model":
            raise AttributeError(name)
        if name in ("save", "load"):
            raise AttributeError(f"LoRAModel has no {name}(): save_adapter(dir) writes the adapter, "
                                 "merge_and_unload() gives a plain model to save")
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(name)
        return getattr(model, name)

    def __repr__(self):
        adapters = ", ".join(f"{k}(r={c.r}, alpha={c.lora_alpha:g})" for k, c in self.peft_config.items())
        return f"LoRAModel(adapters=[{adapters}], active={self.active_adapter!r}, state={self._state})\n{self.model!r}"

    # --- injection and parameters -----------------------------------------------------------------
    def inject_lora(self) -> LoRAModel:
        """Replace the targets with LoRALinear and freeze every base parameter. A second call does nothing."""
        if self._state == "injected":
            return self
        if self._state == "unloaded":
            raise RuntimeError("this LoRAModel was unloaded; wrap the returned model in a new LoRAModel")
        self._base_flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        name = self._active[0]
        self._place(name, self.peft_config[name], self._targets[name], self._saved[name])
        for p in self.base_parameters():
            p.requires_grad = False
        self._state = "injected"
        self._sync_active()
        return self

    def _place(self, name, config, paths, saved):
        for path in paths:
            self._wrap(path, name, config)
        for path in saved:
            module = self.model.get_submodule(path)
            if not isinstance(module, _trainable.ModulesToSaveWrapper):
                module = _trainable.ModulesToSaveWrapper(module)
                replace_module(self.model, path, module)
            module.add_adapter(name)

    def _layer_options(self, path, config):
        return dict(use_dora=config.use_dora, init_lora_weights=config.init_lora_weights)

    def _wrap(self, path, name, config):
        module = self.model.get_submodule(path)
        args = (config.rank_for(path), config.alpha_for(path), config.lora_dropout, config.use_rslora)
        if isinstance(module, LoRALinear):
            module.add_adapter(name, *args, **self._layer_options(path, config))
            return
        layer = LoRALinear.from_linear(module, *args, adapter_name=name, rng=self._rng,
                                       **self._layer_options(path, config))
        layer.train(module.training)
        replace_module(self.model, path, layer)

    def _require_injected(self):
        if self._state == "new":
            raise RuntimeError("call inject_lora() first: no LoRA layers are in the model yet")
        if self._state == "unloaded":
            raise RuntimeError("this LoRAModel was unloaded; its LoRA layers are gone")

    def _layers(self):
        return [m for _, m in lora_layers(self.model)]

    def _sync_active(self):
        """Every layer, module copy and bias follows the model's active adapters."""
        for layer in self._layers():
            layer.set_adapter([n for n in self._active if n in layer.adapter_configs])
        for _, wrapper in _trainable.wrappers(self.model):
            names = [n for n in self._active if n in wrapper.modules_to_save]
            wrapper.set_adapter(names[0] if names else None)
        trained = self._trained_biases(self._active)
        for n, p in self.model.named_parameters():
            if "bias" in n and not _is_adapter_param(n):
                p.requires_grad = id(p) in trained

    def _trained_biases(self, names):
        """{id: Parameter} of the biases adapters `names` train (bias="lora_only" / "all")."""
        out = {}
        for name in names:
            config = self.peft_config[name]
            for p in _trainable.trained_biases(self.model, self._targets[name], config.bias).values():
                out[id(p)] = p
        return out

    def lora_parameters(self, adapter_name: Optional[str] = None) -> List[Any]:
        """What the active adapters (or `adapter_name`) train: A, B, DoRA magnitudes, and the biases
        and module copies their bias= / modules_to_save= options add. Give these to the optimizer."""
        self._require_injected()
        names = self._active if adapter_name is None else [self._known(adapter_name)]
        params = [p for layer in self._layers() for n in names if n in layer.adapter_configs
                  for p in layer.lora_parameters(n)]
        for _, wrapper in _trainable.wrappers(self.model):
            params += [p for n in names if n in wrapper.modules_to_save
                       for p in wrapper.modules_to_save[n].parameters()]
        return params + list(self._trained_biases(names).values())

    def base_parameters(self):
        """Every parameter that is not part of an adapter (frozen after injection, except trained biases)."""
        adapter_ids = {id(p) for n, p in self.model.named_parameters() if _is_adapter_param(n)}
        return [p for p in self.parameters() if id(p) not in adapter_ids]

    def get_nb_trainable_parameters(self):
        """(trainable, total) parameter counts; total includes every adapter."""
        sizes = [(p.size, p.requires_grad) for p in self.parameters()]
        return int(sum(s for s, t in sizes if t)), int(sum(s for s, _ in sizes))

    def trainable_percentage(self):
        trainable, total = self.get_nb_trainable_parameters()
        return 100.0 * trainable / total if total else 0.0

    def print_trainable_parameters(self):
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {self.trainable_percentage():.4f}")

    # --- several adapters -------------------------------------------------------------------------
    @property
    def active_adapter(self):
        """The active adapter's name; a list of names when several are active (as PEFT)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_adapters(self):
        return list(self._active)

    @property
    def adapters(self):
        return list(self.peft_config)

    def _known(self, name):
        name = self._active[0] if name is None and len(self._active) == 1 else name
        if name is None:
            raise ValueError(f"adapters {self._active} are active; pass an adapter name")
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r} (adapters: {list(self.peft_config)})")
        return name

    def _merged_names(self):
        return next((list(layer.merged_adapters) for layer in self._layers() if layer.merged_adapters), [])

    def enable_lora(self):
        self._require_injected()
        for layer in self._layers():
            layer.enable_lora()
        for _, wrapper in _trainable.wrappers(self.model):
            object.__setattr__(wrapper, "enabled", True)

    def disable_lora(self):
        """Run as the base model until enable_lora(); refused while an adapter is merged."""
        self._require_injected()
        merged = self._merged_names()
        if merged:
            raise ValueError(f"adapter {merged[0]!r} is merged into the weights and cannot be switched off; "
                             "unmerge first")
        for layer in self._layers():
            layer.disable_lora()
        for _, wrapper in _trainable.wrappers(self.model):
            object.__setattr__(wrapper, "enabled", False)

    @contextlib.contextmanager
    def disable_adapter(self):
        """`with lm.disable_adapter(): base_logits = lm(ids)` - the previous state comes back after."""
        self._require_injected()
        before = [(layer, layer.lora_enabled) for layer in self._layers()]
        wrapped = [(w, w.enabled) for _, w in _trainable.wrappers(self.model)]
        self.disable_lora()
        try:
            yield self
        finally:
            for layer, was in before:
                layer.lora_enabled = was
            for wrapper, was in wrapped:
                object.__setattr__(wrapper, "enabled", was)

    # --- merging ------------------------------------------------------------------------------------
    @property
    def merged(self):
        return self._state == "injected" and bool(self._merged_names())

    def merge_adapter(self, adapter_name=None, safe_merge=False):
        """W += delta of the active adapters in every layer (see LoRAMerger)."""
        self._require_injected()
        names = self._active if adapter_name is None else (
            [adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        merge_layers(self, [self._known(n) for n in names], safe_merge)

    def unmerge_adapter(self):
        self._require_injected()
        unmerge_layers(self)

    def merge_and_unload(self, adapter_name: Optional[str] = None, safe_merge: bool = False) -> Module:
        """Merge the active adapters (unless merged already) and return the base model with plain
        Linears (and, for modules_to_save, the active adapter's trained copy)."""
        self._require_injected()
        merged = self._merged_names()
        if not merged:
            self.merge_adapter(adapter_name, safe_merge)
        elif adapter_name is not None and [adapter_name] != merged and adapter_name != merged:
            raise ValueError(f"adapter {merged[0]!r} is merged, not {adapter_name!r}; unmerge first")
        return self._unload()

    def unload(self):
        """Return the base model with every LoRA layer replaced by its Linear, without merging."""
        self._require_injected()
        return self._unload()

    def _unload(self):
        unload_layers(self.model)
        for path, wrapper in _trainable.wrappers(self.model):
            replace_module(self.model, path, wrapper.current())
        for name, p in self.model.named_parameters():
            p.requires_grad = self._base_flags.get(name, True)
            p.grad = None
        self._state = "unloaded"
        return self.model

    # --- adapter files (PEFT layout; see fastlora.lora.adapters) -------------------------------------
    def save_adapter(self, directory: PathLike, name: Optional[str] = None, convert_to_lora: bool = True) -> str:
        """Write adapter `name` (default: the active one) to `directory` (a sub-folder unless "default").

        A PiSSA/OLoRA adapter is written as a plain LoRA of the original weights (see
        fastlora.lora.adapters); convert_to_lora=False writes it as it is, for the residual model.
        """
        self._require_injected()
        return _adapters.save_adapter(self, directory, self._known(name), convert_to_lora)

    def save_pretrained(self, directory: PathLike, convert_to_lora: bool = True) -> str:
        """Every adapter, as PEFT: "default" in `directory`, the others in sub-folders."""
        self._require_injected()
        return [_adapters.save_adapter(self, directory, name, convert_to_lora) for name in self.peft_config]

    def load_adapter(self, directory: PathLike, name: str = "default") -> LoRAModel:
        """Load an adapter saved in the PEFT layout, as `name` (replacing that adapter's weights if it exists)."""
        self._require_injected()
        _adapters.load_adapter(self, directory, name)

    @classmethod
    def from_pretrained(cls, base_model: Module, directory: PathLike, adapter_name: str = "default",
                        seed: int = 0) -> LoRAModel:
        """A LoRAModel on `base_model` with the saved adapter injected and active."""
        saved = _adapters.read_for_model(base_model, directory, adapter_name)
        config, arrays = saved.config, saved.arrays
        exact = ["^" + re.escape(p) + "$" for p in sorted(arrays)]  # the saved paths, matched exactly
        ranks = {k: v for k, v in config.rank_pattern.items() if any(pattern_key({k: v}, p) for p in arrays)}
        alphas = {k: v for k, v in config.alpha_pattern.items() if any(pattern_key({k: v}, p) for p in arrays)}
        model = cls(base_model, exact, rank=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    use_rslora=config.use_rslora, adapter_name=adapter_name, seed=seed,
                    base_model_name_or_path=config.base_model_name_or_path, rank_pattern=ranks,
                    alpha_pattern=alphas, use_dora=config.use_dora, bias=config.bias,
                    modules_to_save=saved.module_paths() or None)
        model.inject_lora()
        model.peft_config[adapter_name] = config
        _adapters.apply_adapter(model, adapter_name, saved)
        return model


def _is_adapter_param(name):
    return ".lora_A." in name or ".lora_B." in name or ".lora_magnitude_vector." in name \
        or ".modules_to_save." in name
