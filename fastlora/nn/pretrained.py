"""Models in and out of the Hugging Face folder layout: `from_pretrained` and `save_pretrained`.

from_pretrained(path) reads a folder transformers wrote (config.json + model.safetensors or a
sharded index), dispatching on config.json's model_type (gpt2 -> GPT; llama, qwen2, mistral ->
Llama), or a model fastlora saved with
GPT.save (a .safetensors file with its .json sidecar, or a folder holding model.safetensors
and model.safetensors.json). Nothing is half-loaded: the config, tensor names and shapes are
checked before any weight is read into the model.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np

from fastlora._typing import DTypeLike, PathLike
from fastlora.nn import hf_gpt2, hf_llama
from fastlora.nn.gpt import GPT, GPTConfig, config_path
from fastlora.nn.hf_files import CONFIG_NAME, WEIGHTS_NAME, WeightFiles, read_config
from fastlora.nn.llama import Llama

# model_type -> loader(folder, config, dtype, dropout)
_LOADERS = {}


def _load_gpt2(folder, config, dtype, dropout):
    where = os.path.join(folder, CONFIG_NAME)
    files = WeightFiles(folder)
    kwargs = hf_gpt2.config_to_kwargs(config, where)
    try:
        gpt_config = GPTConfig(**kwargs, dropout=dropout)
        gpt_config.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    files.check_holds(gpt_config, where)
    model = GPT(**kwargs, dropout=dropout, dtype=dtype)
    hf_gpt2.load_weights(model, files)
    model.hf_config = dict(config)
    return model


def _load_llama(folder, config, dtype, dropout):
    where = os.path.join(folder, CONFIG_NAME)
    if dropout:
        raise ValueError(f"{where}: dropout={dropout} is not supported for {config['model_type']} models "
                         "(fastlora's Llama has no dropout; LoRA adapters have their own)")
    return hf_llama.from_folder(folder, config, dtype, where)


_LOADERS[hf_gpt2.MODEL_TYPE] = _load_gpt2
_LOADERS.update(dict.fromkeys(hf_llama.MODEL_TYPES, _load_llama))
_SAVERS = {GPT: hf_gpt2.save, Llama: hf_llama.save}  # model class -> save(model, folder)


def supported_model_types():
    return sorted(_LOADERS)


def from_pretrained(path: PathLike, dtype: DTypeLike = np.float32, dropout: float = 0.0) -> Union[GPT, Llama]:
    """The model saved at `path` (see the module docstring), computing in `dtype` (float32/float64).

    Dropout is off unless asked for: a Hugging Face config's attn/resid/embd_pdrop are not applied
    (fastlora has no dropout on attention probabilities); `dropout=p` drops embeddings and residual
    branches with probability p, as GPT-2's embd_pdrop and resid_pdrop do.
    """
    path = os.fspath(path)
    dtype = np.dtype(dtype)
    if os.path.isfile(path):
        return GPT.load(path, dtype=dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    own = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(os.path.join(path, CONFIG_NAME)) and os.path.isfile(config_path(own)):
        return GPT.load(own, dtype=dtype)
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in _LOADERS:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: model_type {model_type!r} is not supported; "
                         f"fastlora loads {supported_model_types()}")
    return _LOADERS[model_type](path, config, dtype, dropout)


def save_pretrained(model, folder, tokenizer=None):
    """Write `model` as a Hugging Face folder (and `tokenizer`'s files, when given); returns the folder."""
    folder = os.fspath(folder)
    if type(model) not in _SAVERS:
        raise TypeError(f"save_pretrained takes a GPT or Llama, got {type(model).__name__}; a LoRAModel saves "
                        "its adapters with save_pretrained, or merge_and_unload() gives the model to save")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no Hugging Face files to write; "
                        "load one with fastlora.load_tokenizer(folder) or save yours with tokenizer.save(path)")
    _SAVERS[type(model)](model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
