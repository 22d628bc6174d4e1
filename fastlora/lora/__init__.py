"""LoRA for fastlora models: LoRALinear, LoRAModel, LoRAMerger, PEFT-layout adapter files, PEFT's
options (DoRA, PiSSA/OLoRA inits, several active and weighted adapters, layer selection, biases,
modules_to_save), the seed's functional API (apply_lora, merge_lora, ...), and QLoRA (LoRA over
NF4 base weights: apply_qlora, QLoRAModel, QLoRALinear, NF4Weight).

See docs/DESIGN.md ("LoRA", "On-disk formats") for the semantics these follow.
"""
from fastlora.lora.adapters import read_adapter
from fastlora.lora.config import LoraConfig
from fastlora.lora.dora import dora_linear
from fastlora.lora.functional import (apply_lora, disable_lora, enable_lora, get_lora_parameters, merge_lora,
                                      unmerge_lora)
from fastlora.lora.layer import LoRALinear
from fastlora.lora.merge import LoRAMerger, lora_layers
from fastlora.lora.model import LoRAModel
from fastlora.lora.ops import lora_linear
from fastlora.lora.qlora import NF4Weight, QLoRALinear, QLoRAModel, apply_qlora, get_qlora_parameters
from fastlora.lora.qlora_io import load_quantized_base, save_quantized_base
from fastlora.lora.targets import resolve_targets

__all__ = ["LoRALinear", "LoRAModel", "LoRAMerger", "LoraConfig", "lora_linear", "lora_layers",
           "resolve_targets", "read_adapter", "NF4Weight", "QLoRALinear", "QLoRAModel", "apply_qlora",
           "get_qlora_parameters", "save_quantized_base", "load_quantized_base", "dora_linear", "apply_lora",
           "get_lora_parameters", "merge_lora", "unmerge_lora", "disable_lora", "enable_lora"]
