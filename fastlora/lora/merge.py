"""Merging adapters into base weights and taking LoRA layers out of a model.

merge adds each layer's `delta_weight()` to W, unmerge subtracts it: the one delta of
LoRALinear, so merged logits equal unmerged ones to rounding. Every layer is checked (and,
with safe_merge, its merged weight computed and checked for NaN/inf) before any layer is
written, so a refused merge leaves every weight as it was.

These functions take any module tree holding LoRALinear layers (a LoRAModel or the model
it wraps); LoRAMerger is the class-shaped front of the seed spec.
"""
from __future__ import annotations

from typing import Any, Optional

from fastlora.lora.layer import LoRALinear
from fastlora.lora.targets import replace_module


def lora_layers(model):
    """[(path, LoRALinear)] in tree order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def _layers_or_error(model):
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (was inject_lora() called, "
                         "or was the model already unloaded?)")
    return layers


def _adapters_to_merge(model, layers, adapter_names):
    """The names to merge: `adapter_names` (a name or a list), else the active adapters."""
    if adapter_names is None:
        adapter_names = getattr(model, "active_adapters", None)
    if adapter_names is None:
        active = {tuple(m.active_adapters) for _, m in layers} - {()}
        if len(active) != 1:
            raise ValueError(f"pass adapter_name: the layers have active adapters {sorted(active)}")
        adapter_names = list(active.pop())
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = {n for _, m in layers for n in m.adapter_configs}
    for name in names:
        if name not in known:
            raise ValueError(f"no adapter named {name!r} (adapters: {sorted(known)})")
    return names


def merge_layers(model, adapter_names=None, safe_merge=False):
    """W += the deltas of the adapters (default: the active ones) in every layer that has them;
    returns their names."""
    layers = _layers_or_error(model)
    merged = [(p, m.merged_adapter) for p, m in layers if m.merged_adapters]
    if merged:
        raise ValueError(f"adapter {merged[0][1]!r} is already merged ({len(merged)} layers, e.g. "
                         f"{merged[0][0]}); unmerge before merging again")
    disabled = [p for p, m in layers if not m.lora_enabled]
    if disabled:
        raise ValueError(f"LoRA is disabled (e.g. {disabled[0]}); enable_lora() before merging")
    names = _adapters_to_merge(model, layers, adapter_names)
    targets = [(p, m, [n for n in names if n in m.adapter_configs]) for p, m in layers]
    targets = [t for t in targets if t[2]]
    prepared = []
    for path, m, here in targets:  # all checks and all arithmetic first, nothing written yet
        try:
            prepared.append(m.prepare_merge(here, safe_merge))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    for (_, m, _), prep in zip(targets, prepared):
        m.apply_merge(prep)
    return names


def unmerge_layers(model):
    """W -= delta_weight(merged adapter) in every merged layer."""
    layers = _layers_or_error(model)
    merged = [m for _, m in layers if m.merged_adapters]
    if not merged:
        raise ValueError("nothing is merged: merge() first (unmerge only undoes a merge)")
    for m in merged:
        m.unmerge()


def unload_layers(model):
    """Replace every LoRALinear by a plain Linear on its (possibly merged) weight; returns `model`."""
    for path, m in _layers_or_error(model):
        replace_module(model, path, m.to_linear())
    return model


class LoRAMerger:
    """merge(model) / unmerge(model) in place, and merge_and_unload(model) -> the plain base model.

    `model` is a LoRAModel or any module tree holding LoRALinear layers. safe_merge=True
    refuses a merge that would put NaN or inf into a weight.
    """

    def __init__(self, safe_merge: bool = False) -> None:
        self.safe_merge = bool(safe_merge)

    def _safe(self, safe_merge):
        return self.safe_merge if safe_merge is None else bool(safe_merge)

    def merge(self, model: Any, adapter_name: Optional[str] = None, safe_merge: Optional[bool] = None) -> Any:
        """Merge the active adapter (or `adapter_name`) into the base weights."""
        merge_layers(model, adapter_name, self._safe(safe_merge))

    def unmerge(self, model: Any) -> Any:
        """Subtract the merged adapter's delta again, restoring the base weights."""
        unmerge_layers(model)

    def merge_and_unload(self, model, adapter_name=None, safe_merge=None):
        """Merge (unless already merged) and return the base model with plain Linear layers."""
        if hasattr(model, "merge_and_unload"):  # a LoRAModel: it also restores its bookkeeping
            return model.merge_and_unload(adapter_name=adapter_name, safe_merge=self._safe(safe_merge))
        if not any(m.merged_adapters for _, m in _layers_or_error(model)):
            merge_layers(model, adapter_name, self._safe(safe_merge))
        return unload_layers(model)
