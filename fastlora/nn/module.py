"""Module and Parameter: the containers that name, collect, save and load a model's weights."""
import copy
from collections import OrderedDict

import numpy as np

from fastlora._runtime import blas as _blas
from fastlora.autograd.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module registers as a weight; requires grad unless frozen."""

    __slots__ = ()

    def __init__(self, data, requires_grad=True, dtype=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)
        if self.data.dtype.kind != "f":
            raise TypeError(f"a Parameter must be floating, got dtype {self.data.dtype}")

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"


class Module:
    """Base class: attributes that are Parameters or Modules are registered in assignment order."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        params = self.__dict__.get("_parameters")
        if params is None:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               f"before assigning {name!r}")
        # replacing a parameter or child keeps its place (as torch does), so swapping a Linear
        # for a LoRALinear leaves named_parameters() and state_dict() in the same order
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            self._modules[name] = value
        else:
            params.pop(name, None)
            self._modules.pop(name, None)
        object.__setattr__(self, name, value)

    def __call__(self, *args, **kwargs):
        with _blas.kept():  # NumPy's BLAS keeps the caller's thread count (fastlora._runtime.blas)
            return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    # --- traversal ----------------------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) for every parameter, each shared one once."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def get_submodule(self, path):
        module = self
        for part in path.split(".") if path else []:
            if part not in module._modules:
                raise KeyError(f"no submodule {path!r} (stopped at {part!r})")
            module = module._modules[part]
        return module

    def set_submodule(self, path, new):
        parent_path, _, name = path.rpartition(".")
        parent = self.get_submodule(parent_path)
        if name not in parent._modules:
            raise KeyError(f"no submodule {path!r}")
        setattr(parent, name, new)

    # --- modes --------------------------------------------------------------------------------
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, flag=True):
        for p in self.parameters():
            p.requires_grad = bool(flag)
        return self

    def num_parameters(self, trainable_only=False):
        return int(np.sum([p.size for p in self.parameters() if p.requires_grad or not trainable_only]))

    def copy(self):
        """A deep copy: new arrays, no shared state with this module."""
        return copy.deepcopy(self)

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self):
        """{name: ndarray}; the arrays are the live weights (copy them to keep a snapshot)."""
        return OrderedDict((name, p.data) for name, p in self.named_parameters())

    def load_state_dict(self, state, strict=True):
        """Copy arrays into this module's parameters, checking names and shapes first.

        Nothing is written unless every key is valid, so a failed load leaves the model as it was.
        With strict=False, missing and unexpected keys are returned instead of raised.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            raise ValueError("load_state_dict: " + "; ".join(parts))
        checked = {}
        for name, value in state.items():
            if name not in own:
                continue
            arr = np.asarray(value.data if isinstance(value, Tensor) else value)
            if arr.shape != own[name].shape:
                raise ValueError(f"load_state_dict: {name} has shape {arr.shape}, "
                                 f"the model expects {own[name].shape}")
            if arr.dtype.kind != "f":
                raise ValueError(f"load_state_dict: {name} has non-floating dtype {arr.dtype}")
            checked[name] = arr
        for name, arr in checked.items():
            np.copyto(own[name].data, arr, casting="same_kind")
        return {"missing_keys": missing, "unexpected_keys": unexpected}

    def to_dtype(self, dtype):
        """Cast every parameter to float32 or float64 in place."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def __repr__(self):
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + ")" if len(lines) > 1 else f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self):
        return ""


class ModuleList(Module):
    """A list of modules registered as '0', '1', ... (so names read blocks.0.attn...)."""

    def __init__(self, modules):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]
