"""QLoRA: LoRA adapters over base weights held only as 4-bit NF4 (Dettmers et al., 2023).

    lm = apply_qlora(gpt, rank=8, alpha=16.0, block_size=64)   # targets quantized, float W dropped
    opt = AdamW(get_qlora_parameters(lm), lr=1e-3)            # A and B of the active adapter
    lm.save_adapter("out/")                                    # the same PEFT files as plain LoRA

Three pieces, each reusing its LoRA counterpart:
- NF4Weight: the frozen base weight as an NF4Tensor (~0.516 bytes per weight with double
  quantization). It is the object lora_linear's base-weight hook asks for: `.matmul(x2)` is
  x2 W^T and `.matmul_t(g2)` is g2 W, each dequantizing a bounded tile of W into a scratch
  buffer (nf4_matmul / nf4_matmul_backward), so no call ever holds the whole float W.
- QLoRALinear: a LoRALinear whose `weight` is an NF4Weight. Forward, backward (dx through the
  dequantized weight; only A and B get gradients), adapters and delta_weight() are
  LoRALinear's; merging is dequantize -> add delta -> requantize, which rounds, so it warns.
- QLoRAModel: a LoRAModel that wraps its targets in QLoRALinear; merge_and_unload() gives a
  float GPT whose weights are dequantize(W) + delta, computed in float (no second rounding).

Dimension letters: N rows (batch * time), I in_features, O out_features, R rank.
"""
from __future__ import annotations

import warnings
from typing import Any, List, Optional, Sequence

import numpy as np

from fastlora.autograd.tensor import Tensor, make_result
from fastlora.lora.layer import LoRALinear
from fastlora.lora.merge import lora_layers
from fastlora.lora.model import LoRAModel
from fastlora.lora.nf4 import NF4Tensor, _check_block_size, quantize_nf4
from fastlora.lora.nf4_matmul import nf4_matmul, nf4_matmul_backward
from fastlora.lora.targets import replace_module
from fastlora.nn.layers import Linear
from fastlora.nn.module import Module
from fastlora.nn.module import Parameter

__all__ = ["NF4Weight", "QLoRALinear", "QLoRAModel", "apply_qlora", "get_qlora_parameters", "nf4_linear",
           "QLORA_TARGETS", "DEFAULT_TILE_ROWS", "DEFAULT_TILE_COLS"]

# Every Linear of the GPT: the QLoRA paper adapts all of them (adapting only q/v loses quality
# once the base is rounded to 4 bits), and only targeted weights are quantized.
QLORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# Rows (forward) and columns (backward) of W dequantized per tile: a fixed count, so the
# scratch buffer is at most 128 x max(I, O) floats (1/3 of the base workload's 384 x 384
# attention weights) whatever the weight's size. Measured against one whole-weight tile: the
# base workload's train step costs 0-5% more (bench/qlora_figures.py, mode qlora-whole); fewer
# rows make each tile's GEMM thin (64 rows: products ~10% slower, 16 rows: up to 2x).
DEFAULT_TILE_ROWS = 128
DEFAULT_TILE_COLS = 128

_MERGE_WARNING = ("merging a LoRA adapter into an NF4 base weight requantizes it (dequantize, add the "
                  "delta, quantize again): the rounding changes the outputs slightly. unmerge() "
                  "restores the original NF4 weight exactly; merge_and_unload() gives float weights "
                  "without the second rounding.")


def _check_tile(name, value, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int (rows/columns per tile) or None, got {value!r}")
    return int(value)


class NF4Weight:
    """A frozen (O, I) base weight stored only as NF4 codes and scales (no float copy).

    `NF4Weight(q, dtype=None, tile_rows=None, tile_cols=None)` wraps a 2-D NF4Tensor;
    `NF4Weight.quantize(w, block_size=64, double_quant=True)` quantizes a float array. dtype
    is the compute dtype of the products (float32 unless q was quantized from float64).
    """

    def __init__(self, q, dtype=None, tile_rows=None, tile_cols=None):
        if not isinstance(q, NF4Tensor):
            raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
        if q.ndim != 2:
            raise ValueError(f"an NF4Weight is a 2-D (out_features, in_features) weight, got shape {q.shape}")
        if dtype is None:
            dtype = np.float64 if q.dtype == np.float64 else np.float32
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self._q = q
        self._dtype = dtype
        self.tile_rows = _check_tile("tile_rows", tile_rows, DEFAULT_TILE_ROWS)
        self.tile_cols = _check_tile("tile_cols", tile_cols, DEFAULT_TILE_COLS)

    @classmethod
    def quantize(cls, w, block_size=64, double_quant=True, dtype=None, tile_rows=None, tile_cols=None):
        """Quantize the float (O, I) array (or Tensor) `w`; dtype defaults to float64 for float64 w, else float32."""
        arr = w.data if isinstance(w, Tensor) else np.asarray(w)
        if arr.ndim != 2:
            raise ValueError(f"w must be a 2-D (out_features, in_features) weight, got shape {arr.shape}")
        if dtype is None and arr.dtype != np.float64:
            dtype = np.float32
        return cls(quantize_nf4(arr, block_size, double_quant), dtype, tile_rows, tile_cols)

    def like(self, w):
        """A new NF4Weight quantizing `w` with this one's block size, double quantization, dtype and tiles."""
        return NF4Weight.quantize(w, self.block_size, self.double_quant, self._dtype, self.tile_rows,
                                  self.tile_cols)

    quantized = property(lambda self: self._q, doc="The NF4Tensor holding the codes and scales.")
    shape = property(lambda self: self._q.shape)
    ndim = property(lambda self: 2)
    size = property(lambda self: self._q.size)
    dtype = property(lambda self: self._dtype)
    block_size = property(lambda self: self._q.block_size)
    double_quant = property(lambda self: self._q.double_quant)
    nbytes = property(lambda self: self._q.nbytes, doc="Every stored byte: codes, scales, double-quant constants.")
    grad = property(lambda self: None)

    @property
    def requires_grad(self):
        return False

    @requires_grad.setter
    def requires_grad(self, flag):
        # LoRALinear freezes its base weight by setting this False; training it is not possible
        if flag:
            raise ValueError("an NF4 weight is frozen: it cannot require grad (train the LoRA adapter, "
                             "or dequantize it into a Parameter for full fine-tuning)")

    def matmul(self, x2):
        """x2 (N, I) -> x2 W^T (N, O), dequantizing tile_rows rows of W at a time."""
        return nf4_matmul(x2, self._q, tile_rows=self.tile_rows)

    def matmul_t(self, g2):
        """g2 (N, O) -> g2 W (N, I), dequantizing tile_cols columns of W at a time."""
        return nf4_matmul_backward(g2, self._q, tile_cols=self.tile_cols)

    def dequantize(self):
        """The whole float W (O, I) in the compute dtype: for merging and unloading, not for forward."""
        return self._q.dequantize(self._dtype)

    def __repr__(self):
        return (f"NF4Weight(shape={self.shape}, dtype={self.dtype}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}, {self.nbytes / self.size:.4f} bytes/weight)")


def nf4_linear(x, weight, bias=None):
    """x (..., I) -> x W^T + b for a frozen NF4Weight W: the layer without adapters.

    Backward gives dx = g W through the dequantized tiles and db; W gets no gradient.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    O, I = weight.shape
    if x.ndim < 1 or x.shape[-1] != I:
        raise ValueError(f"x must be (..., {I}) for in_features={I}, got shape {x.shape}")
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the NF4 weight computes in {weight.dtype}")
    xd = x.data
    x2 = xd.reshape(-1, I)
    out = weight.matmul(x2)
    if bias is not None:
        out += bias.data
    out = out.reshape(*xd.shape[:-1], O)

    def backward(g):
        g2 = g.reshape(-1, O)
        dx = weight.matmul_t(g2).reshape(xd.shape) if x.requires_grad else None
        if bias is None:
            return (dx,)
        return dx, (g2.sum(axis=0) if bias.requires_grad else None)

    return make_result(out, (x,) if bias is None else (x, bias), backward)


class QLoRALinear(LoRALinear):
    """A LoRALinear whose frozen base weight is an NF4Weight: y = x W^T + b + s * dropout(x) A^T B^T.

    `QLoRALinear(original_weight, rank=4, alpha=1.0, bias=None, ..., block_size=64,
    double_quant=True, tile_rows=None, tile_cols=None)` quantizes a float weight (or takes an
    NF4Weight as it is); `QLoRALinear.from_linear(linear, ...)` quantizes a Linear's weight and
    shares its bias. While an adapter is merged the pre-merge NF4 weight is kept (another
    ~0.52 bytes/weight), so unmerge() restores it exactly instead of rounding a second time.
    """

    def __init__(self, original_weight, rank=4, alpha=1.0, bias=None, dropout=0.0, use_rslora=False,
                 adapter_name="default", seed=0, rng=None, block_size=64, double_quant=True,
                 tile_rows=None, tile_cols=None):
        if not isinstance(original_weight, NF4Weight):
            original_weight = NF4Weight.quantize(original_weight, block_size, double_quant,
                                                 tile_rows=tile_rows, tile_cols=tile_cols)
        super().__init__(original_weight, rank=rank, alpha=alpha, bias=bias, dropout=dropout,
                         use_rslora=use_rslora, adapter_name=adapter_name, seed=seed, rng=rng)
        self._unmerged_weight = None  # the NF4Weight from before a merge, while one is merged
        self._fold_on_unload = None  # adapter to_linear() adds in float (QLoRAModel.merge_and_unload)

    @classmethod
    def from_linear(cls, linear, rank=4, alpha=1.0, dropout=0.0, use_rslora=False, adapter_name="default",
                    seed=0, rng=None, block_size=64, double_quant=True, tile_rows=None, tile_cols=None,
                    weight=None):
        """Wrap `linear`, quantizing its weight (or using `weight`, an NF4Weight of it) and sharing its bias.

        The Linear's float weight is not referenced afterwards: once the Linear is dropped it is freed.
        """
        if not isinstance(linear, Linear):
            raise TypeError(f"from_linear needs a fastlora Linear, got {type(linear).__name__}")
        trainable = linear.weight.requires_grad
        if weight is None:
            weight = NF4Weight.quantize(linear.weight.data, block_size, double_quant,
                                        tile_rows=tile_rows, tile_cols=tile_cols)
        layer = cls(weight, rank=rank, alpha=alpha, bias=linear.bias, dropout=dropout, use_rslora=use_rslora,
                    adapter_name=adapter_name, seed=seed, rng=rng)
        layer._base_requires_grad = (trainable, layer._base_requires_grad[1])  # for to_linear()
        return layer

    def base_forward(self, x):
        return nf4_linear(x, self.weight, self.bias)

    def base_array(self):
        return self.weight.dequantize()

    def _check_spec(self, spec):
        if spec.use_dora:
            raise ValueError("use_dora is not supported on a quantized (QLoRA) base weight: DoRA renormalises "
                             "W + s B A row by row, which the NF4 weight does not hold in float; use LoRAModel")
        if spec.rewrites_base:
            raise ValueError(f"init_lora_weights={spec.init_lora_weights!r} rewrites the base weight, which is "
                             "quantized here; initialise on the float model (LoRAModel) instead")
        super()._check_spec(spec)

    # --- merging: dequantize, add, requantize ------------------------------------------------
    def prepare_merge(self, names=None, safe_merge=False):
        # LoRALinear's checks and merged weight (dequantize(W) + delta), always checked for NaN/inf here
        names, new, norms = super().prepare_merge(names, safe_merge=True)
        return names, self.weight.like(new), norms

    def apply_merge(self, prepared):
        names, new, _ = prepared
        warnings.warn(_MERGE_WARNING, UserWarning, stacklevel=2)  # here, not in prepare: a refused merge rounds nothing
        self._unmerged_weight = self.weight
        self.weight = new
        self.merged_adapters = list(names)

    def unmerge(self):
        """Put back the NF4 weight from before the merge (exact: no dequantize-subtract-requantize)."""
        if not self.merged_adapters:
            raise ValueError("no adapter is merged into this layer; nothing to unmerge")
        self.weight = self._unmerged_weight
        self._unmerged_weight = None
        self.merged_adapters = []

    def to_linear(self, fold=None):
        """A plain float Linear on dequantize(W) (+ the deltas of adapters `fold`, added in float), sharing the bias."""
        fold = self._fold_on_unload if fold is None else fold
        fold = [n for n in ([fold] if isinstance(fold, str) else fold or []) if n in self.adapter_configs]
        w = self.weight.dequantize()
        if fold and not self.merged_adapters:
            w = self._merged(fold, w)[0]
        linear = Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        rng=np.random.default_rng(0), dtype=self.weight.dtype)
        linear.weight = Parameter(w, requires_grad=self._base_requires_grad[0])
        linear.bias = self.bias
        if self.bias is not None:
            self.bias.requires_grad = self._base_requires_grad[1]
        return linear

    def extra_repr(self):
        return (super().extra_repr() + f", nf4(block_size={self.weight.block_size}, "
                f"double_quant={self.weight.double_quant}, {self.weight.nbytes / self.weight.size:.4f} B/weight)")

    def __repr__(self):
        return f"QLoRALinear({self.extra_repr()})"


class QLoRAModel(LoRAModel):
    """A LoRAModel whose targeted Linears become QLoRALinear (NF4 base weight + LoRA adapters).

    Takes LoRAModel's arguments plus block_size, double_quant, tile_rows and tile_cols (the
    NF4 settings of every weight it quantizes). Adapters, training, save_adapter/load_adapter
    and from_pretrained work as for LoRAModel; the adapter files are the same.
    """

    def __init__(self, base_model, target_modules=QLORA_TARGETS, rank=8, alpha=16.0, dropout=0.0,
                 use_rslora=False, adapter_name="default", seed=0, base_model_name_or_path=None,
                 block_size=64, double_quant=True, tile_rows=None, tile_cols=None, rank_pattern=None,
                 alpha_pattern=None, **options):
        quant = dict(block_size=_check_block_size(block_size),
                     double_quant=_check_bool("double_quant", double_quant),
                     tile_rows=_check_tile("tile_rows", tile_rows, None),
                     tile_cols=_check_tile("tile_cols", tile_cols, None))
        super().__init__(base_model, target_modules, rank=rank, alpha=alpha, dropout=dropout,
                         use_rslora=use_rslora, adapter_name=adapter_name, seed=seed,
                         base_model_name_or_path=base_model_name_or_path, rank_pattern=rank_pattern,
                         alpha_pattern=alpha_pattern, **options)
        self.quant_config = quant
        self._pending = {}  # path -> NF4Weight quantized ahead of replacing that Linear

    def _quantize_ahead(self, paths, given=None):
        """Quantize every still-float target first, so a weight that cannot be quantized (NaN, inf)
        is reported, naming its layer, before any layer of the model is replaced."""
        pending = {}
        for path in paths:
            module = self.model.get_submodule(path)
            if isinstance(module, LoRALinear):
                continue
            if given and path in given:
                w = pending[path] = given[path]
                if not isinstance(w, NF4Weight) or w.shape != module.weight.shape:
                    raise ValueError(f"weights[{path!r}] must be an NF4Weight of shape {module.weight.shape}, "
                                     f"got {w!r}")
                continue
            try:
                pending[path] = NF4Weight.quantize(module.weight.data, **self.quant_config)
            except ValueError as exc:
                raise ValueError(f"{path}.weight: {exc}") from None
        return pending

    def inject_lora(self, weights=None):
        """Replace the targets with QLoRALinear; `weights` {path: NF4Weight} (e.g. read from a file)
        are used as they are instead of quantizing those Linears' weights."""
        if self._state == "new":
            self._pending = self._quantize_ahead(self._targets[self._active[0]], weights)
        try:
            return super().inject_lora()
        finally:
            self._pending = {}

    def _check_config(self, name, config):
        if config.use_dora:
            raise ValueError(f"adapter {name!r}: use_dora is not supported on a quantized (QLoRA) base: DoRA "
                             "renormalises W + s B A row by row, which the NF4 weight does not hold in float; "
                             "use LoRAModel")
        if config.rewrites_base:
            raise ValueError(f"adapter {name!r}: init_lora_weights={config.init_lora_weights!r} rewrites the base "
                             "weights, which are quantized here; initialise on the float model (LoRAModel)")

    def _install(self, name, config, paths, saved=()):
        self._pending = self._quantize_ahead(paths)
        try:
            super()._install(name, config, paths, saved)
        finally:
            self._pending = {}

    def _wrap(self, path, name, config):
        module = self.model.get_submodule(path)
        if isinstance(module, LoRALinear):
            module.add_adapter(name, config.rank_for(path), config.alpha_for(path), config.lora_dropout,
                               config.use_rslora)
            return
        layer = QLoRALinear.from_linear(module, config.rank_for(path), config.alpha_for(path), config.lora_dropout,
                                        config.use_rslora, adapter_name=name, rng=self._rng,
                                        weight=self._pending.pop(path, None), **self.quant_config)
        layer.train(module.training)
        replace_module(self.model, path, layer)

    def quantized_weights(self):
        """[(module path, NF4Weight)] of every quantized base weight, in tree order."""
        self._require_injected()
        return [(p, m.weight) for p, m in lora_layers(self.model) if isinstance(m.weight, NF4Weight)]

    def get_nb_trainable_parameters(self):
        """(trainable, total); total counts the NF4 weights too (they are weights, just not Parameters)."""
        trainable, total = super().get_nb_trainable_parameters()
        if self._state == "injected":
            total += sum(w.size for _, w in self.quantized_weights())
        return trainable, total

    def merge_and_unload(self, adapter_name=None, safe_merge=False):
        """The base model with float Linears: W = dequantize(W_nf4) + delta, added in float.

        When an adapter is already merged (into the NF4 codes), its weights are dequantized as they are.
        """
        self._require_injected()
        merged = self._merged_names()
        layers = self._layers()
        if merged:
            if adapter_name is not None and [adapter_name] != merged and adapter_name != merged:
                raise ValueError(f"adapter {merged[0]!r} is merged, not {adapter_name!r}; unmerge first")
            return self._unload()
        names = self._active if adapter_name is None else (
            [adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        names = [self._known(n) for n in names]
        if not all(layer.lora_enabled for layer in layers):
            raise ValueError("LoRA is disabled; enable_lora() before merging")
        if safe_merge:
            for path, layer in lora_layers(self.model):
                here = [n for n in names if n in layer.adapter_configs]
                if here and not np.all(np.isfinite(layer.merged_weight(here))):
                    raise ValueError(f"{path}: merging adapter {here[0]!r} gives non-finite weights; "
                                     "refusing (safe_merge)")
        for layer in layers:
            layer._fold_on_unload = names  # LoRAModel._unload calls to_linear() with no arguments
        return self._unload()


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def apply_qlora(model: Module, rank: int = 8, alpha: float = 16.0, target_modules: Sequence[str] = QLORA_TARGETS,
                block_size: int = 64, double_quant: bool = True, dropout: float = 0.0, use_rslora: bool = False,
                adapter_name: str = "default", seed: int = 0, tile_rows: Optional[int] = None,
                tile_cols: Optional[int] = None) -> QLoRAModel:
    """Quantize the targeted Linear weights of `model` to NF4 and put LoRA adapters on them.

    `model` (a GPT) is changed in place, as PEFT does, and the returned QLoRAModel (a LoRAModel)
    wraps it; the targets' float weights are dropped. Only the adapters' A and B are trainable.
    """
    lm = QLoRAModel(model, target_modules, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                    adapter_name=adapter_name, seed=seed, block_size=block_size, double_quant=double_quant,
                    tile_rows=tile_rows, tile_cols=tile_cols)
    return lm.inject_lora()


def get_qlora_parameters(model: Module) -> List[Any]:
    """The trainable A and B of the active adapter: of a (Q)LoRAModel, or of a model apply_qlora changed."""
    if isinstance(model, LoRAModel):
        return model.lora_parameters()
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; call apply_qlora(model) first")
    return [p for _, layer in layers for name in layer.active_adapters for p in layer.lora_parameters(name)]
