"""LoRALinear: a frozen Linear plus one or more low-rank adapters, W' = W + s * B @ A.

It is a Module that takes a Linear's place in a model tree and keeps the Linear's
parameter names (`weight`, `bias`); each adapter adds `lora_A.<adapter>` (R, I) and
`lora_B.<adapter>` (O, R), and a DoRA adapter `lora_magnitude_vector.<adapter>` (O,). By
default A is Kaiming-uniform and B zeros, so a fresh adapter changes nothing (other inits:
fastlora.lora.init). Several adapters can be active at once: their outputs add up, as in
PEFT. The forward pass is the fused op of fastlora.lora.ops (fastlora.lora.dora for DoRA).
`delta_weight()` is the one place the LoRA delta is computed: merging adds it to W (DoRA
then rescales the rows), unmerging takes it out again.

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
from fastlora.lora.dora import dora_linear, weight_norm
from fastlora.lora.init import initial_weights
from fastlora.lora.layer_merge import LayerMerging
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


class _NoBase:
    """A base 'weight' whose products are zero: lora_linear on it gives one adapter's branch alone
    (for the second and later of several active adapters, whose base product is already counted)."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype

    def matmul(self, x2):
        return np.zeros((x2.shape[0], self.shape[0]), dtype=x2.dtype)

    def matmul_t(self, g2):
        return np.zeros((g2.shape[0], self.shape[1]), dtype=g2.dtype)


class LoRALinear(LayerMerging, Module):
    """y = x W^T + b + s * dropout(x) A^T B^T with W (and b) frozen; s = alpha/rank (rsLoRA: alpha/sqrt(rank)).

    `LoRALinear(original_weight, rank=4, alpha=1.0, bias=None, dropout=0.0, use_rslora=False,
    use_dora=False, init_lora_weights=True)` copies an ndarray weight; `LoRALinear.from_linear(
    linear, ...)` shares the Linear's Parameters (the model's base weights stay the same
    objects; an init that rewrites W, PiSSA or OLoRA, rewrites them in place). `forward(x)`
    takes an ndarray (returns an ndarray, no graph) or a Tensor (returns a Tensor).
    """

    def __init__(self, original_weight, rank=4, alpha=1.0, bias=None, dropout=0.0, use_rslora=False,
                 adapter_name="default", seed=0, rng=None, *, use_dora=False, init_lora_weights=True):
        super().__init__()
        weight = _as_weight(original_weight)
        bias = _as_bias(bias, weight)
        out_features, in_features = weight.shape
        # check every argument before touching the (possibly shared) weight's flags
        spec = _adapter_spec(rank, alpha, dropout, use_rslora, in_features, out_features, use_dora,
                             init_lora_weights)
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
        self.lora_magnitude_vector = AdapterDict()  # DoRA adapters only
        self.adapter_configs = {}  # adapter name -> LoraConfig (r, lora_alpha, lora_dropout, use_rslora, use_dora)
        self.active_adapters = []
        self.lora_enabled = True
        self.merged_adapters = []  # the adapters whose deltas are currently inside W
        self._merge_norms = {}  # DoRA adapter -> the row norms its merge divided by (unmerge multiplies back)
        # adapter -> (A0, B0) of an init that moved s B0 A0 out of W (PiSSA, OLoRA): with them the
        # trained adapter converts to a plain LoRA of the original W (fastlora.lora.adapters)
        self.initial_weights = {}
        self._rng = rng if rng is not None else np.random.default_rng(seed)
        self._check_spec(spec)
        self._add(adapter_name, spec)
        self.set_adapter(adapter_name)

    @classmethod
    def from_linear(cls, linear, rank=4, alpha=1.0, dropout=0.0, use_rslora=False, adapter_name="default",
                    seed=0, rng=None, **options):
        """Wrap `linear` (a fastlora Linear), sharing and freezing its weight and bias."""
        if not isinstance(linear, Linear):
            raise TypeError(f"from_linear needs a fastlora Linear, got {type(linear).__name__}")
        return cls(linear.weight, rank=rank, alpha=alpha, bias=linear.bias, dropout=dropout,
                   use_rslora=use_rslora, adapter_name=adapter_name, seed=seed, rng=rng, **options)

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name, rank=4, alpha=1.0, dropout=0.0, use_rslora=False, use_dora=False,
                    init_lora_weights=True):
        """Add a fresh adapter (see fastlora.lora.init for the inits); it is not made active."""
        check_adapter_name(name)
        if name in self.adapter_configs:
            raise ValueError(f"adapter {name!r} already exists (adapters: {list(self.adapter_configs)})")
        spec = _adapter_spec(rank, alpha, dropout, use_rslora, self.in_features, self.out_features, use_dora,
                             init_lora_weights)
        self._check_spec(spec)
        self._add(name, spec)

    def _check_spec(self, spec):
        """Refuse an adapter this layer cannot hold (a subclass with a quantized W refuses more)."""
        if spec.rewrites_base and self.merged_adapters:
            raise ValueError(f"init_lora_weights={spec.init_lora_weights!r} rewrites the base weight, which holds "
                             f"the merged adapters {self.merged_adapters}; unmerge first")

    def _add(self, name, spec):
        dtype = self.weight.dtype
        A, B, residual = initial_weights(spec.init_lora_weights, self.base_array(), spec.r, spec.scaling,
                                         self._rng, dtype)
        if residual is not None:  # W becomes W - s B0 A0, so the model's output is unchanged
            np.copyto(self.weight.data, residual)
            self.initial_weights[name] = (A.copy(), B.copy())
        self.lora_A[name] = Parameter(A, requires_grad=False)
        self.lora_B[name] = Parameter(B, requires_grad=False)
        if spec.use_dora:  # m starts at the norms, so f = m / n = 1: a fresh DoRA adapter changes nothing
            self.lora_magnitude_vector[name] = Parameter(weight_norm(self.base_array(), A, B, spec.scaling),
                                                         requires_grad=False)
        self.adapter_configs[name] = spec

    def _require(self, name):
        if name is None:
            if len(self.active_adapters) != 1:
                raise ValueError("no adapter is active; pass an adapter name" if not self.active_adapters else
                                 f"adapters {self.active_adapters} are active; pass an adapter name")
            name = self.active_adapters[0]
        if name not in self.adapter_configs:
            raise ValueError(f"no adapter named {name!r} (adapters: {list(self.adapter_configs)})")
        return name

    @property
    def active_adapter(self):
        """The active adapter's name (the first when several are active), or None."""
        return self.active_adapters[0] if self.active_adapters else None

    @property
    def merged_adapter(self):
        return self.merged_adapters[0] if self.merged_adapters else None

    def set_adapter(self, names):
        """Use and train adapter `names` (a name or a list: their outputs add up) from now on.

        None (or []) leaves the layer with no active adapter (a model-wide adapter this layer lacks).
        """
        names = [] if names is None else [names] if isinstance(names, str) else list(names)
        names = [self._require(n) for n in names]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat in {names}")
        dora = [n for n in names if self.adapter_configs[n].use_dora]
        if dora and len(names) > 1:
            raise ValueError(f"DoRA adapter {dora[0]!r} cannot be active together with other adapters "
                             f"({names}): DoRA rescales the whole weight, so the sum is not defined; "
                             "activate it alone")
        if self.merged_adapters and self.merged_adapters != names:
            raise ValueError(f"adapter {self.merged_adapter!r} is merged into the weight; unmerge it "
                             f"before switching to {names[0] if len(names) == 1 else names!r}")
        for other in self.adapter_configs:
            for p in self._adapter_params(other):
                p.requires_grad = other in names
        self.active_adapters = names

    def delete_adapter(self, name):
        name = self._require(name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weight; unmerge it before deleting it")
        del self.lora_A[name], self.lora_B[name], self.adapter_configs[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.initial_weights.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def enable_lora(self):
        self.lora_enabled = True

    def disable_lora(self):
        if self.merged_adapters:
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

    def _adapter_params(self, name):
        params = [self.lora_A[name], self.lora_B[name]]
        return params + ([self.lora_magnitude_vector[name]] if name in self.lora_magnitude_vector else [])

    def lora_parameters(self, name=None):
        """[A, B] (and a DoRA adapter's magnitude) of the active adapter, or of `name`."""
        return self._adapter_params(self._require(name))

    def scaling(self, name=None):
        return self.adapter_configs[self._require(name)].scaling

    # --- forward --------------------------------------------------------------------------------
    def base_weight(self):
        """The base weight W (O, I) the fused op multiplies by (the QLoRA override point)."""
        return self.weight

    def base_array(self):
        """W as a float ndarray (O, I) (QLoRA: dequantized)."""
        return self.weight.data

    def base_forward(self, x):
        """x W^T + b, the layer without any adapter."""
        return base_ops.linear(x, self.base_weight(), self.bias)

    def dora_norm(self, name):
        """||W + s B A|| per output row for DoRA adapter `name` (a constant for the gradient, as in PEFT)."""
        return weight_norm(self.base_array(), self.lora_A[name].data, self.lora_B[name].data,
                           self.adapter_configs[name].scaling)

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
        if not self.active_adapters or not self.lora_enabled or self.merged_adapters:
            return self.base_forward(x)  # merged: W already holds the delta
        out = None
        for name in self.active_adapters:
            spec = self.adapter_configs[name]
            p = spec.lora_dropout if self.training else 0.0
            seed = int(self._rng.integers(0, 2 ** 32)) if p > 0.0 else 0
            A, B = self.lora_A[name], self.lora_B[name]
            if spec.use_dora:  # active alone (set_adapter makes sure)
                return dora_linear(x, self.base_weight(), self.bias, A, B, self.lora_magnitude_vector[name],
                                   spec.scaling, self.dora_norm(name), p, seed)
            if out is None:
                out = lora_linear(x, self.base_weight(), self.bias, A, B, spec.scaling, p, seed)
            else:  # a further adapter adds its branch alone
                out = out + lora_linear(x, _NoBase(self.weight.shape, self.weight.dtype), None, A, B,
                                        spec.scaling, p, seed)
        return out

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
        adapters = ", ".join(f"{k}(r={c.r}, alpha={c.lora_alpha:g}{', dora' if c.use_dora else ''})"
                             for k, c in self.adapter_configs.items())
        active = self.active_adapter if len(self.active_adapters) < 2 else self.active_adapters
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, adapters=[{adapters}], active={active!r}, "
                f"merged={self.merged_adapter if len(self.merged_adapters) < 2 else self.merged_adapters!r}")

    def __repr__(self):
        return f"LoRALinear({self.extra_repr()})"


def _adapter_spec(rank, alpha, dropout, use_rslora, in_features, out_features, use_dora=False,
                  init_lora_weights=True):
    rank = check_rank(rank, in_features, out_features)
    spec = LoraConfig(r=rank, lora_alpha=check_alpha(alpha), lora_dropout=check_dropout(dropout),
                      use_rslora=use_rslora, use_dora=use_dora, init_lora_weights=init_lora_weights)
    return spec.validate()
