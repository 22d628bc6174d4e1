"""The several-adapters half of LoRAModel: add, install, activate (one or several), delete, combine.

Adapters live side by side in the same LoRA layers and module copies; one, or several whose
outputs add up (set_adapter([...]), as PEFT), are active: used in forward and trained. Every
call checks all of its arguments before it changes the model.
"""
from fastlora.lora import trainable as _trainable
from fastlora.lora.config import check_adapter_name, make_config
from fastlora.lora.targets import check_targets, replace_module


class AdapterManagement:
    """Mixed into LoRAModel; uses its model, peft_config, _targets, _saved, _active, _place,
    _check_config, _sync_active, _known, _merged_names and _require_injected."""

    def add_adapter(self, name, rank=4, alpha=None, dropout=0.0, use_rslora=False, target_modules=None,
                    **options):
        """Add a fresh adapter (B zeros: it changes nothing until trained). It is not made active.

        target_modules defaults to the first adapter's; `options` as for LoRAModel.
        """
        self._require_injected()
        check_adapter_name(name)
        if name in self.peft_config:
            raise ValueError(f"adapter {name!r} already exists (adapters: {list(self.peft_config)}); "
                             "pick another name or delete_adapter() it first")
        if target_modules is None:
            target_modules = next(iter(self.peft_config.values())).target_modules
        options.setdefault("base_model_name_or_path", next(iter(self.peft_config.values())).base_model_name_or_path)
        config = make_config(name, r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=dropout,
                              use_rslora=use_rslora, **options)
        self._check_config(name, config)
        paths, saved = check_targets(self.model, config, name)
        self._install(name, config, paths, saved)

    def _install(self, name, config, paths, saved=()):
        """Add a checked adapter at checked paths (shared by add_adapter and load_adapter)."""
        if config.bias != "none":
            other = next((n for n, c in self.peft_config.items() if c.bias != "none" and n != name), None)
            if other is not None:  # PEFT's rule: the biases are the model's own, shared by every adapter
                raise ValueError(f"adapter {name!r}: bias={config.bias!r}, but adapter {other!r} already trains "
                                 f"biases (bias={self.peft_config[other].bias!r}); only one adapter may, "
                                 "set bias='none' for the others")
        self._place(name, config, paths, saved)
        self.peft_config[name] = config
        self._targets[name] = list(paths)
        self._saved[name] = list(saved)
        self._sync_active()

    def set_adapter(self, name):
        """Use and train adapter `name` from now on; a list of names makes several active at once
        (their outputs add up, as PEFT's set_adapter([...]))."""
        self._require_injected()
        names = [name] if isinstance(name, str) or name is None else list(name)
        if not names:
            raise ValueError("set_adapter needs an adapter name or a non-empty list of them")
        names = [self._known(n) for n in names]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat in {names}")
        dora = [n for n in names if self.peft_config[n].use_dora]
        if dora and len(names) > 1:
            raise ValueError(f"adapter {dora[0]!r} uses DoRA and cannot be active together with other adapters "
                             f"({names}): DoRA rescales the whole weight row by row; activate it alone")
        for path, wrapper in _trainable.wrappers(self.model):
            both = [n for n in names if n in wrapper.modules_to_save]
            if len(both) > 1:
                raise ValueError(f"adapters {both} each train their own copy of {path} (modules_to_save); "
                                 "only one of them can be active at a time")
        merged = self._merged_names()
        if merged and merged != names:
            raise ValueError(f"adapter {merged[0] if len(merged) == 1 else merged!r} is merged into the weights; "
                             f"unmerge before switching to {names[0] if len(names) == 1 else names!r}")
        self._active = names
        self._sync_active()

    def delete_adapter(self, name):
        self._require_injected()
        name = self._known(name)
        if name in self._merged_names():
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
        for path in self._saved[name]:
            wrapper = self.model.get_submodule(path)
            del wrapper.modules_to_save[name]
            if not wrapper.modules_to_save.keys():
                replace_module(self.model, path, wrapper.original_module)
        del self.peft_config[name], self._targets[name], self._saved[name]
        self._active = [n for n in self._active if n != name] or [next(iter(self.peft_config))]
        self._sync_active()

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None):
        """A new adapter mixing `adapters` with `weights`, as PEFT computes it: "linear" (A and B
        averaged with sqrt-weights; equal ranks), "cat" (A and B concatenated: exact, rank the sum)
        or "svd" (the weighted sum of the deltas truncated to svd_rank). It is not made active."""
        from fastlora.lora.weighted import add_weighted_adapter
        self._require_injected()
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)
