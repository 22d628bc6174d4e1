"""LoRALinear: a frozen Linear plus one or more low-rank adapters, W' = W + s * B @ A.

It is a Module that takes a Linear's place in a model tree and keeps the Linear's
parameter names (`weight`, `bias`); each adapter adds `lora_A.<adapter>` (R, I) and
`lora_B.<adapter>` (O, R). A is Kaiming-uniform and B zeros, so a fresh adapter changes
nothing. One adapter is active at a time; the forward pass is the fused op of
fastlora.lora.ops. `delta_weight()` is the one place the delta is computed: merging adds
it to W, unmerging subtracts it.

QLoRA hook: the fused op reads the base weight only through `base_weight()`: a Tensor
(O, I) here; a subclass holding a quantized weight returns an object with `.shape`,
`.matmul(x2) -> x2 W^T` and `.matmul_t(g2) -> g2 W` instead (see fastlora.lora.ops), and
overrides `base_forward()`, the adapter-free path, to match.
"""
import contextlib

import numpy as np

from fastlora.autograd import ops as base_ops
from fastlora.autograd.tensor import Tensor, no_grad
from fastlora.lora.config import (LoraConfig, check_adapter_name, check_alpha, check_dropout,
                                  check_rank)
from fastlora.lora.ops import lora_linear
from fastlora.nn.layers import Linear
from fastlora.nn.module import Module, Parameter


class AdapterDict(Module):
    """One Parameter per adapter name, registered so names read `<layer>.lora_A.<adapter>`.

    Entries go straight into `_parameters` (not through setattr) so that an adapter called,
    say, "training" or "forward" cannot shadow an attribute.
    """

    def __getitem__(self, name):
        return self._parameters[name]

    def __setitem__(self, name, param):
        self._parameters[name] = param

    def __delitem__(self, name):
        del self._parameters[name]

    def __contains__(self, name):
        return name in self._parameters

    def __len__(self):
        return len(self._parameters)

    def keys(self):
        return list(self._parameters)

    def extra_repr(self):
        return ", ".join(f"{k}: {tuple(p.shape)}" for k, p in self._parameters.items())


def kaiming_uniform(rng, shape, dtype):
    """PyTorch's kaiming_uniform_(a=sqrt(5)) as PEFT uses for A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(shape[1])
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _as_weight(original_weight):
    """The base weight as a frozen Parameter: a given Parameter is shared, anything else copied.

    A frozen weight object that is not a Tensor (QLoRA's NF4Weight: shape, dtype, matmul,
    matmul_t) is kept as it is, so the float weight never exists; see fastlora.lora.qlora.
    """
    if isinstance(original_weight, Parameter) or (
            not isinstance(original_weight, Tensor) and hasattr(original_weight, "matmul_t")):
        w = original_weight
    else:
        arr = original_weight.data if isinstance(original_weight, Tensor) else np.asarray(original_weight)
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"original_weight must be numeric, got dtype {arr.dtype}")
        dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.float32
        w = Parameter(np.array(arr, dtype=dtype, copy=True), requires_grad=False)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"original_weight must be a non-empty 2-D (out_features, in_features) array, "
                         f"got shape {w.shape}")
    return w


def _as_bias(bias, weight):
    if bias is None:
        return None
    if isinstance(bias, Parameter):
        b = bias
    else:
        arr = bias.data if isinstance(bias, Tensor) else np.asarray(bias)
        b = Parameter(np.array(arr, dtype=weight.dtype, copy=True), requires_grad=False)
    if b.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match original_weight "
                         f"{weight.shape}, got {b.shape}")
    if b.dtype != weight.dtype:
        raise TypeError(f"bias has dtype {b.dtype} but original_weight is {weight.dtype}")
    return b


class LoRALinear(Module):
    """y = x W^T + b + s * dropout(x) A^T B^T with W (and b) frozen; s = alpha/rank (rsLoRA: alpha/sqrt(rank)).

    `LoRALinear(original_weight, rank=4, alpha=1.0, bias=None, dropout=0.0, use_rslora=False)`
    copies an ndarray weight; `LoRALinear.from_linear(linear, ...)` shares the Linear's
    Parameters (the model's base weights stay the same objects). `forward(x)` takes an ndarray
    (returns an ndarray, no graph) or a Tensor (returns a Tensor).
    """

    def __init__(self, original_weight, rank=4, alpha=1.0, bias=None, dropout=0.0, use_rslora=False,
                 adapter_name="default", seed=0, rng=None):
        super().__init__()
        weight = _as_weight(original_weight)
        bias = _as_bias(bias, weight)
        out_features, in_features = weight.shape
        # check every argument before touching the (possibly shared) weight's flags
        spec = _adapter_spec(rank, alpha, dropout, use_rslora, in_features, out_features)
        check_adapter_name(adapter_name)
        # remembered so that unloading gives back a Linear as trainable as it came in
        self._base_requires_grad = (weight.requires_grad, bias.requires_grad if bias is not None else False)
        weight.requires_grad = False
        if bias is not None:
            bias.requires_grad = False
        self.weight = weight
        self.bias = bias
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = AdapterDict()
        self.lora_B = AdapterDict()
        self.adapter_configs = {}  # adapter name -> LoraConfig (r, lora_alpha, lora_dropout, use_rslora)
        self.active_adapter = None
        self.lora_enabled = True
        self.merged_adapter = None  # name of the adapter whose delta is currently inside W
        self._rng = rng if rng is not None else np.random.default_rng(seed)
        self._add(adapter_name, spec)
        self.set_adapter(adapter_name)

    @classmethod
    def from_linear(cls, linear, rank=4, alpha=1.0, dropout=0.0, use_rslora=False, adapter_name="default",
                    seed=0, rng=None):
        """Wrap `linear` (a fastlora Linear), sharing and freezing its weight and bias."""
        if not isinstance(linear, Linear):
            raise TypeError(f"from_linear needs a fastlora Linear, got {type(linear).__name__}")
        return cls(linear.weight, rank=rank, alpha=alpha, bias=linear.bias, dropout=dropout,
                   use_rslora=use_rslora, adapter_name=adapter_name, seed=seed, rng=rng)

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name, rank=4, alpha=1.0, dropout=0.0, use_rslora=False):
        """Add a fresh adapter (A Kaiming-uniform, B zeros); it is not made active."""
        check_adapter_name(name)
        if name in self.adapter_configs:
            raise ValueError(f"adapter {name!r} already exists (adapters: {list(self.adapter_configs)})")
        self._add(name, _adapter_spec(rank, alpha, dropout, use_rslora, self.in_features, self.out_features))

    def _add(self, name, spec):
        dtype = self.weight.dtype
        self.lora_A[name] = Parameter(kaiming_uniform(self._rng, (spec.r, self.in_features), dtype),
                                      requires_grad=False)
        self.lora_B[name] = Parameter(np.zeros((self.out_features, spec.r), dtype=dtype), requires_grad=False)
        self.adapter_configs[name] = spec

    def _require(self, name):
        if name is None:
            name = self.active_adapter
            if name is None:
                raise ValueError("no adapter is active; pass an adapter name")
        if name not in self.adapter_configs:
            raise ValueError(f"no adapter named {name!r} (adapters: {list(self.adapter_configs)})")
        return name

    def set_adapter(self, name):
        """Make `name` the adapter used in forward; only its A and B require grad.

        None leaves the layer with no active adapter (a model-wide adapter this layer lacks).
        """
        if name is not None:
            name = self._require(name)
        if self.merged_adapter is not None and self.merged_adapter != name:
            raise ValueError(f"adapter {self.merged_adapter!r} is merged into the weight; unmerge it "
                             f"before switching to {name!r}")
        for other in self.adapter_configs:
            self.lora_A[other].requires_grad = other == name
            self.lora_B[other].requires_grad = other == name
        self.active_adapter = name

    def delete_adapter(self, name):
        name = self._require(name)
        if self.merged_adapter == name:
            raise ValueError(f"adapter {name!r} is merged into the weight; unmerge it before deleting it")
        del self.lora_A[name], self.lora_B[name], self.adapter_configs[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def enable_lora(self):
        self.lora_enabled = True

    def disable_lora(self):
        if self.merged_adapter is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is merged into the weight, so it cannot "
                             "be switched off; unmerge first")
        self.lora_enabled = False

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this block the layer is its base Linear."""
        was = self.lora_enabled
        self.disable_lora()
        try:
            yield self
        finally:
            self.lora_enabled = was

    def lora_parameters(self, name=None):
        """[A, B] of the active adapter (or of `name`)."""
        name = self._require(name)
        return [self.lora_A[name], self.lora_B[name]]

    def scaling(self, name=None):
        return self.adapter_configs[self._require(name)].scaling

    # --- forward --------------------------------------------------------------------------------
    def base_weight(self):
        """The base weight W (O, I) the fused op multiplies by (the QLoRA override point)."""
        return self.weight

    def base_forward(self, x):
        """x W^T + b, the layer without any adapter."""
        return base_ops.linear(x, self.base_weight(), self.bias)

    def forward(self, x):
        if not isinstance(x, Tensor):
            arr = np.asarray(x)
            if arr.dtype.kind not in "fiub":
                raise TypeError(f"x must be numeric, got dtype {arr.dtype}")
            with no_grad():  # an ndarray in means an ndarray out: no graph to keep
                return self.forward(Tensor(arr.astype(self.weight.dtype, copy=False))).data
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be (..., {self.in_features}) for in_features={self.in_features}, "
                             f"got shape {x.shape}")
        name = self.active_adapter
        if name is None or not self.lora_enabled or self.merged_adapter is not None:
            return self.base_forward(x)  # merged: W already holds the delta
        spec = self.adapter_configs[name]
        p = spec.lora_dropout if self.training else 0.0
        seed = int(self._rng.integers(0, 2 ** 32)) if p > 0.0 else 0
        return lora_linear(x, self.base_weight(), self.bias, self.lora_A[name], self.lora_B[name],
                           spec.scaling, p, seed)

    # --- merging ----------------------------------------------------------------------------------
    def delta_weight(self, name=None):
        """s * B @ A (O, I) for the active adapter (or `name`), in the weight's dtype."""
        name = self._require(name)
        B, A = self.lora_B[name].data, self.lora_A[name].data
        return (np.matmul(B, A) * self.adapter_configs[name].scaling).astype(self.weight.dtype, copy=False)

    def merged_weight(self, name=None):
        """W + delta as a new array (W itself when that adapter is already merged)."""
        name = self._require(name)
        if self.merged_adapter == name:
            return self.weight.data.copy()
        return self.weight.data + self.delta_weight(name)

    def prepare_merge(self, name=None, safe_merge=False):
        """Checks and computes a merge without applying it -> (name, delta, new W or None).

        LoRAMerger prepares every layer before applying any, so a refused merge changes nothing.
        """
        name = self._require(name)
        if self.merged_adapter is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged into this layer; "
                             "unmerge it before merging again")
        if name != self.active_adapter:  # forward would then show one adapter while W holds another
            raise ValueError(f"adapter {name!r} is not the active adapter ({self.active_adapter!r}); "
                             "set_adapter() it before merging")
        delta = self.delta_weight(name)
        new = None
        if safe_merge:
            new = self.weight.data + delta
            if not np.all(np.isfinite(new)):
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; refusing (safe_merge)")
        return name, delta, new

    def apply_merge(self, prepared):
        name, delta, new = prepared
        if new is not None:
            np.copyto(self.weight.data, new)
        else:
            self.weight.data += delta
        self.merged_adapter = name

    def merge(self, name=None, safe_merge=False):
        """W += delta_weight(name); forward then uses W alone."""
        self.apply_merge(self.prepare_merge(name, safe_merge))

    def unmerge(self):
        """W -= delta_weight of the merged adapter, restoring the base weight."""
        if self.merged_adapter is None:
            raise ValueError("no adapter is merged into this layer; nothing to unmerge")
        self.weight.data -= self.delta_weight(self.merged_adapter)
        self.merged_adapter = None

    def to_linear(self):
        """A plain Linear on this layer's weight and bias (merged or not), as trainable as before wrapping."""
        linear = Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        rng=np.random.default_rng(0), dtype=self.weight.dtype)
        linear.weight = self.weight
        linear.bias = self.bias
        self.weight.requires_grad = self._base_requires_grad[0]
        if self.bias is not None:
            self.bias.requires_grad = self._base_requires_grad[1]
        return linear

    def extra_repr(self):
        adapters = ", ".join(f"{k}(r={c.r}, alpha={c.lora_alpha:g})" for k, c in self.adapter_configs.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, adapters=[{adapters}], active={self.active_adapter!r}, "
                f"merged={self.merged_adapter!r}")

    def __repr__(self):
        return f"LoRALinear({self.extra_repr()})"


def _adapter_spec(rank, alpha, dropout, use_rslora, in_features, out_features):
    rank = check_rank(rank, in_features, out_features)
    spec = LoraConfig(r=rank, lora_alpha=check_alpha(alpha), lora_dropout=check_dropout(dropout),
                      use_rslora=use_rslora)
    return spec.validate()
