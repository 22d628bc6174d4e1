"""The seed's functional LoRA API: change a model in place, then act on it by plain functions.

    apply_lora(model, rank=8, alpha=16.0, dropout=0.1, target_modules=["qkv_proj", "out_proj"])
    optimizer = AdamW(get_lora_parameters(model), lr=1e-4)
    merge_lora(model)            # W += delta; unmerge_lora(model) takes it out again
    disable_lora(model)          # run as the base model until enable_lora(model)

`apply_lora` builds a LoRAModel around `model` (the targets become LoRALinear in the model
itself, as PEFT does) and returns `model`, which keeps a reference to that LoRAModel so the
other functions find its bookkeeping. Each function also takes the LoRAModel itself, or any
module tree holding LoRALinear layers (one that apply_qlora changed, say).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from fastlora.lora.merge import lora_layers, merge_layers, unmerge_layers
from fastlora.lora.model import LoRAModel
from fastlora.nn.module import Module

# The seed's recommendation: the attention's q, k, v ("qkv_proj") and output projections.
DEFAULT_TARGETS = ("qkv_proj", "out_proj")
_HANDLE = "_lora_model"  # attribute of the changed model that holds its LoRAModel


def apply_lora(model: Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: Union[str, Sequence[str]] = DEFAULT_TARGETS, **options: Any) -> Module:
    """Put LoRA adapters on `model`'s target Linear layers, in place, and return `model`.

    Afterwards `model(ids)` runs with the adapter and only the adapter's weights train.
    `options` are LoRAModel's other keywords (use_rslora, use_dora, init_lora_weights, bias,
    modules_to_save, layers_to_transform, rank_pattern, adapter_name, seed, ...). Every
    argument is checked before the model is touched.
    """
    if isinstance(model, LoRAModel):
        raise TypeError("apply_lora takes the base model, not a LoRAModel; use its add_adapter() "
                        "for another adapter")
    lm = LoRAModel(model, list(target_modules) if isinstance(target_modules, tuple) else target_modules,
                   rank=rank, alpha=alpha, dropout=dropout, **options)
    lm.inject_lora()
    object.__setattr__(model, _HANDLE, lm)  # not a registered child: its names stay the model's own
    return model


def lora_model_of(model):
    """The LoRAModel behind `model` (itself, or the one apply_lora attached), or None."""
    if isinstance(model, LoRAModel):
        return model
    lm = model.__dict__.get(_HANDLE)
    if isinstance(lm, LoRAModel) and lm.model is model and lm._state == "injected":
        return lm
    return None


def _require_layers(model):
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; call apply_lora(model) first")
    return layers


def get_lora_parameters(model: Module) -> List[Any]:
    """What the optimizer trains: the active adapters' weights (A, B, DoRA magnitudes, and the
    biases or module copies the adapter trains with bias= / modules_to_save=)."""
    lm = lora_model_of(model)
    if lm is not None:
        return lm.lora_parameters()
    return [p for _, layer in _require_layers(model) for name in layer.active_adapters
            for p in layer.lora_parameters(name)]


def merge_lora(model: Module, adapter_name: Optional[str] = None, safe_merge: bool = False) -> Module:
    """Add the active adapter's delta into the base weights: no extra cost per forward."""
    lm = lora_model_of(model)
    if lm is not None:
        lm.merge_adapter(adapter_name, safe_merge)
    else:
        merge_layers(model, adapter_name, safe_merge)
    return model


def unmerge_lora(model: Module) -> Module:
    """Take the merged delta out of the base weights again."""
    lm = lora_model_of(model)
    if lm is not None:
        lm.unmerge_adapter()
    else:
        unmerge_layers(model)
    return model


def disable_lora(model: Module) -> Module:
    """Run as the base model (adapters kept, not used) until enable_lora(model)."""
    return _switch(model, False)


def enable_lora(model: Module) -> Module:
    """Use the adapters again after disable_lora(model)."""
    return _switch(model, True)


def _switch(model, on):
    lm = lora_model_of(model)
    if lm is not None:
        lm.enable_lora() if on else lm.disable_lora()
        return model
    layers = _require_layers(model)
    merged = next((p for p, m in layers if m.merged_adapters), None)
    if not on and merged is not None:  # checked for every layer before any is switched off
        raise ValueError(f"an adapter is merged into the weights ({merged}) and cannot be switched off; "
                         "unmerge_lora(model) first")
    for _, layer in layers:
        layer.enable_lora() if on else layer.disable_lora()
    return model
