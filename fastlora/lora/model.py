"""LoRAModel: a base model (the GPT) with LoRA adapters on chosen Linear layers, used like the model.

    lm = LoRAModel(gpt, target_modules=["q_proj", "v_proj"], rank=8, alpha=16)
    lm.inject_lora()                       # targets become LoRALinear, every base weight frozen
    opt = AdamW(lm.lora_parameters())      # the active adapter's A and B only
    logits = lm(input_ids)                 # same call and output as the GPT

The base model is changed in place, as PEFT does, and keeps its parameter names
(`blocks.0.attn.q_proj.weight`); adapters add `<module path>.lora_A.<adapter>` and
`.lora_B.<adapter>`. named_parameters/state_dict/train/eval/generate pass through to the
base model, so the LoRAModel is not a second level in the names. Several adapters can live
side by side; one is active (trained and used in forward) at a time.
"""
import contextlib
import re

import numpy as np

from fastlora.lora import adapters as _adapters
from fastlora.lora.config import LoraConfig, check_adapter_name, check_rank
from fastlora.lora.layer import LoRALinear
from fastlora.lora.merge import lora_layers, merge_layers, unload_layers, unmerge_layers
from fastlora.lora.targets import replace_module, resolve_targets
from fastlora.nn.module import Module


class LoRAModel(Module):
    """LoRAModel(base_model, target_modules, rank=4, alpha=None, dropout=0.0, use_rslora=False).

    alpha=None means alpha = rank (scaling 1). target_modules: short names, full paths,
    regexes, or "all-linear" (see fastlora.lora.targets). Nothing is replaced until
    inject_lora(); every argument is checked here first.
    """

    def __init__(self, base_model, target_modules, rank=4, alpha=None, dropout=0.0, use_rslora=False,
                 adapter_name="default", seed=0, base_model_name_or_path=None, rank_pattern=None,
                 alpha_pattern=None):
        super().__init__()
        if isinstance(base_model, LoRAModel):
            raise TypeError("base_model is already a LoRAModel; use its add_adapter() for another adapter")
        if not isinstance(base_model, Module):
            raise TypeError(f"base_model must be a fastlora Module (e.g. a GPT), got {type(base_model).__name__}")
        if lora_layers(base_model):
            raise ValueError("base_model already holds LoRA layers; use the LoRAModel that added them")
        check_adapter_name(adapter_name)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=dropout,
                            use_rslora=use_rslora, base_model_name_or_path=base_model_name_or_path,
                            rank_pattern=rank_pattern, alpha_pattern=alpha_pattern).validate()
        paths = _check_targets(base_model, config)
        # a plain attribute, not a registered child, so parameter names get no "model." prefix
        object.__setattr__(self, "model", base_model)
        self.peft_config = {adapter_name: config}
        self._targets = {adapter_name: paths}
        self._active = adapter_name
        self._rng = np.random.default_rng(seed)
        self._state = "new"  # "new" -> inject_lora() -> "injected" -> unload -> "unloaded"
        self._base_flags = {}  # parameter name -> requires_grad before injection, restored on unload

    # --- the base model's surface ---------------------------------------------------------------
    @property
    def base_model(self):
        return self.model

    def forward(self, input_ids):
        return self.model(input_ids)

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
        return f"LoRAModel(adapters=[{adapters}], active={self._active!r}, state={self._state})\n{self.model!r}"

    # --- injection and parameters -----------------------------------------------------------------
    def inject_lora(self):
        """Replace the targets with LoRALinear and freeze every base parameter. A second call does nothing."""
        if self._state == "injected":
            return self
        if self._state == "unloaded":
            raise RuntimeError("this LoRAModel was unloaded; wrap the returned model in a new LoRAModel")
        self._base_flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        name = self._active
        for path in self._targets[name]:
            self._wrap(path, name, self.peft_config[name])
        for p in self.base_parameters():
            p.requires_grad = False
        self._state = "injected"
        self._sync_active()
        return self

    def _wrap(self, path, name, config):
        module = self.model.get_submodule(path)
        if isinstance(module, LoRALinear):
            module.add_adapter(name, config.rank_for(path), config.alpha_for(path), config.lora_dropout,
                               config.use_rslora)
            return
        layer = LoRALinear.from_linear(module, config.rank_for(path), config.alpha_for(path), config.lora_dropout,
                                       config.use_rslora, adapter_name=name, rng=self._rng)
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
        for layer in self._layers():
            layer.set_adapter(self._active if self._active in layer.adapter_configs else None)

    def lora_parameters(self, adapter_name=None):
        """The A and B parameters of the active adapter (or `adapter_name`): what the optimizer trains."""
        self._require_injected()
        name = self._known(adapter_name)
        return [p for layer in self._layers() if name in layer.adapter_configs
                for p in layer.lora_parameters(name)]

    def base_parameters(self):
        """Every parameter that is not part of an adapter (frozen after injection)."""
        lora_ids = {id(p) for layer in self._layers() for d in (layer.lora_A, layer.lora_B)
                    for p in d._parameters.values()}
        return [p for p in self.parameters() if id(p) not in lora_ids]

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
        return self._active

    @property
    def adapters(self):
        return list(self.peft_config)

    def _known(self, name):
        name = self._active if name is None else name
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r} (adapters: {list(self.peft_config)})")
        return name

    def _merged_name(self):
        return next((layer.merged_adapter for layer in self._layers() if layer.merged_adapter), None)

    def add_adapter(self, name, rank=4, alpha=None, dropout=0.0, use_rslora=False, target_modules=None):
        """Add a fresh adapter (B zeros: it changes nothing until trained). It is not made active.

        target_modules defaults to the first adapter's.
        """
        self._require_injected()
        check_adapter_name(name)
        if name in self.peft_config:
            raise ValueError(f"adapter {name!r} already exists (adapters: {list(self.peft_config)}); "
                             "pick another name or delete_adapter() it first")
        if target_modules is None:
            target_modules = next(iter(self.peft_config.values())).target_modules
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=dropout,
                            use_rslora=use_rslora,
                            base_model_name_or_path=next(iter(self.peft_config.values())).base_model_name_or_path)
        config.validate()
        self._install(name, config, _check_targets(self.model, config))

    def _install(self, name, config, paths):
        """Add a checked adapter at checked paths (shared by add_adapter and load_adapter)."""
        for path in paths:
            self._wrap(path, name, config)
        self.peft_config[name] = config
        self._targets[name] = list(paths)
        self._sync_active()

    def set_adapter(self, name):
        """Use and train adapter `name` from now on."""
        self._require_injected()
        name = self._known(name)
        merged = self._merged_name()
        if merged is not None and merged != name:
            raise ValueError(f"adapter {merged!r} is merged into the weights; unmerge before switching to {name!r}")
        self._active = name
        self._sync_active()

    def delete_adapter(self, name):
        self._require_injected()
        name = self._known(name)
        if self._merged_name() == name:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        if len(self.peft_config) == 1:
            raise ValueError(f"{name!r} is the only adapter; use unload() or merge_and_unload() to remove LoRA")
        for path in self._targets[name]:
            layer = self.model.get_submodule(path)
            layer.delete_adapter(name)
            if not layer.adapter_configs:  # no adapter left here: back to a plain (still frozen) Linear
                linear = layer.to_linear()
                linear.requires_grad_(False)
                replace_module(self.model, path, linear)
        del self.peft_config[name], self._targets[name]
        if self._active == name:
            self._active = next(iter(self.peft_config))
        self._sync_active()

    def enable_lora(self):
        self._require_injected()
        for layer in self._layers():
            layer.enable_lora()

    def disable_lora(self):
        """Run as the base model until enable_lora(); refused while an adapter is merged."""
        self._require_injected()
        merged = self._merged_name()
        if merged is not None:
            raise ValueError(f"adapter {merged!r} is merged into the weights and cannot be switched off; "
                             "unmerge first")
        for layer in self._layers():
            layer.disable_lora()

    @contextlib.contextmanager
    def disable_adapter(self):
        """`with lm.disable_adapter(): base_logits = lm(ids)` - the previous state comes back after."""
        self._require_injected()
        before = [(layer, layer.lora_enabled) for layer in self._layers()]
        self.disable_lora()
        try:
            yield self
        finally:
            for layer, was in before:
                layer.lora_enabled = was

    # --- merging ------------------------------------------------------------------------------------
    @property
    def merged(self):
        return self._state == "injected" and self._merged_name() is not None

    def merge_adapter(self, adapter_name=None, safe_merge=False):
        """W += delta of the active adapter in every layer (see LoRAMerger)."""
        self._require_injected()
        merge_layers(self, self._known(adapter_name), safe_merge)

    def unmerge_adapter(self):
        self._require_injected()
        unmerge_layers(self)

    def merge_and_unload(self, adapter_name=None, safe_merge=False):
        """Merge the active adapter (unless merged already) and return the base model with plain Linears."""
        self._require_injected()
        merged = self._merged_name()
        if merged is None:
            self.merge_adapter(adapter_name, safe_merge)
        elif adapter_name is not None and adapter_name != merged:
            raise ValueError(f"adapter {merged!r} is merged, not {adapter_name!r}; unmerge first")
        return self._unload()

    def unload(self):
        """Return the base model with every LoRA layer replaced by its Linear, without merging."""
        self._require_injected()
        return self._unload()

    def _unload(self):
        unload_layers(self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad = self._base_flags.get(name, True)
            p.grad = None
        self._state = "unloaded"
        return self.model

    # --- adapter files (PEFT layout; see fastlora.lora.adapters) -------------------------------------
    def save_adapter(self, directory, name=None):
        """Write adapter `name` (default: the active one) to `directory` (a sub-folder unless "default")."""
        self._require_injected()
        return _adapters.save_adapter(self, directory, self._known(name))

    def save_pretrained(self, directory):
        """Every adapter, as PEFT: "default" in `directory`, the others in sub-folders."""
        self._require_injected()
        return [_adapters.save_adapter(self, directory, name) for name in self.peft_config]

    def load_adapter(self, directory, name="default"):
        """Load an adapter saved in the PEFT layout, as `name` (replacing that adapter's weights if it exists)."""
        self._require_injected()
        _adapters.load_adapter(self, directory, name)

    @classmethod
    def from_pretrained(cls, base_model, directory, adapter_name="default", seed=0):
        """A LoRAModel on `base_model` with the saved adapter injected and active."""
        config, arrays = _adapters.read_for_model(base_model, directory, adapter_name)
        exact = ["^" + re.escape(p) + "$" for p in sorted(arrays)]  # the saved paths, matched exactly
        model = cls(base_model, exact, rank=config.r, alpha=config.lora_alpha,
                    dropout=config.lora_dropout, use_rslora=config.use_rslora, adapter_name=adapter_name,
                    seed=seed, base_model_name_or_path=config.base_model_name_or_path,
                    rank_pattern=config.rank_pattern, alpha_pattern=config.alpha_pattern)
        model.inject_lora()
        model.peft_config[adapter_name].target_modules = config.target_modules
        _adapters.apply_adapter(model, adapter_name, config, arrays)
        return model


def _check_targets(model, config):
    """Resolve config.target_modules in `model` and check the rank against every layer's size."""
    paths = resolve_targets(model, config.target_modules)
    for path in paths:
        m = model.get_submodule(path)
        check_rank(config.rank_for(path), m.in_features, m.out_features, where=path)
    return paths
