"""What an adapter trains besides A and B: biases (`bias=`) and whole modules (`modules_to_save=`).

As PEFT:
- bias="lora_only" trains the biases of the adapted layers, bias="all" every parameter named
  `...bias` in the model. The bias is the model's own (there is no copy): training changes it
  for every adapter, and disabling the adapter does not undo it. Saved with the adapter as
  `<path>.base_layer.bias` (an adapted layer) or `<path>.bias` (any other).
- modules_to_save=["ln_f"] wraps each matching module in a ModulesToSaveWrapper holding the
  original (frozen, used when the adapter is off) and a trained copy per adapter. The
  original's parameters keep their names (`ln_f.weight`); the copy's read
  `ln_f.modules_to_save.<adapter>.weight`; saved as `<path>.weight`. A module matches a
  name as PEFT's rule says: its path ends with the name.
"""
import copy

from fastlora.nn.module import Module


class ModuleCopies(Module):
    """One module per adapter name, registered so names read `<path>.modules_to_save.<adapter>...`."""

    def __getitem__(self, name):
        return self._modules[name]

    def __setitem__(self, name, module):
        self._modules[name] = module

    def __delitem__(self, name):
        del self._modules[name]

    def __contains__(self, name):
        return name in self._modules

    def keys(self):
        return list(self._modules)


class ModulesToSaveWrapper(Module):
    """The original module (frozen) and a trained copy per adapter; forward runs the active copy.

    The original's parameters and children are registered here under their own names, so a
    model's parameter names do not change when a module is wrapped.
    """

    def __init__(self, original):
        super().__init__()
        object.__setattr__(self, "original_module", original)
        for name, p in original._parameters.items():
            self._parameters[name] = p
            object.__setattr__(self, name, p)
        for name, child in original._modules.items():
            self._modules[name] = child
            object.__setattr__(self, name, child)
        self.modules_to_save = ModuleCopies()
        object.__setattr__(self, "active_adapter", None)
        object.__setattr__(self, "enabled", True)
        object.__setattr__(self, "training", original.training)

    def __getattr__(self, name):  # the original's other attributes (eps, num_embeddings, ...)
        if name.startswith("_") or name == "original_module":
            raise AttributeError(name)
        return getattr(self.__dict__["original_module"], name)

    def add_adapter(self, name):
        """A trainable copy of the original for adapter `name`."""
        module = copy.deepcopy(self.original_module)
        for p in module.parameters():
            p.requires_grad = False
        module.train(self.training)
        self.modules_to_save[name] = module

    def set_adapter(self, name):
        """Use adapter `name`'s copy (None: the original); only that copy trains."""
        for other in self.modules_to_save.keys():
            for p in self.modules_to_save[other].parameters():
                p.requires_grad = other == name
        object.__setattr__(self, "active_adapter", name)

    def current(self):
        """The module forward runs: the active copy, or the original when none is active or disabled."""
        if self.active_adapter is None or not self.enabled:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def extra_repr(self):
        return f"copies={self.modules_to_save.keys()}, active={self.active_adapter!r}"


def wrappers(model):
    """[(path, ModulesToSaveWrapper)] in tree order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def module_matches(name, path):
    """PEFT's rule for a modules_to_save entry: the path ends with it ("norm" matches model.norm and
    every input_layernorm too, as in PEFT)."""
    return path.endswith(name)


def resolve_modules_to_save(model, names, where="modules_to_save"):
    """The module paths `names` select (outermost matches only), each name matching something; a
    tied input embedding is refused (its copy would leave the output head on the original)."""
    from fastlora.lora.layer import LoRALinear
    found = []
    modules = [(p, m) for p, m in model.named_modules() if p and ".modules_to_save" not in p]  # not the copies
    for name in names:
        hits = [(p, m) for p, m in modules if module_matches(name, p)]
        if not hits:
            raise ValueError(f"{where}: {name!r} matches no module of {type(model).__name__} (modules: "
                             f"{sorted({p.rsplit('.', 1)[-1] for p, _ in modules})})")
        for path, module in hits:
            if isinstance(module, LoRALinear):
                raise ValueError(f"{where}: {path} holds a LoRA adapter; a module is either adapted or saved whole")
            config = getattr(model, "config", None)
            if getattr(config, "tie_word_embeddings", False) and path == "embed":
                raise ValueError(f"{where}: {path} is tied to the output head; a trained copy of it would leave "
                                 "the head on the original. Train it in full instead, or untie the head")
            found.append(path)
    # a module inside another chosen one is covered by the outer copy
    return [p for p in found if not any(p != q and p.startswith(q + ".") for q in found)]


def trained_biases(model, lora_paths, bias):
    """{parameter name: Parameter} of the biases an adapter with `bias` trains."""
    if bias == "none":
        return {}
    named = dict(model.named_parameters())
    if bias == "all":  # not a saved module's original either: the adapter runs its copy instead
        originals = tuple(f"{path}." for path, _ in wrappers(model))
        return {n: p for n, p in named.items() if "bias" in n and ".modules_to_save." not in n
                and not n.startswith(originals)}
    return {f"{path}.bias": named[f"{path}.bias"] for path in lora_paths if f"{path}.bias" in named}
