"""Modules: Module, Parameter, Linear, Embedding, LayerNorm, Dropout, MLP and the GPT."""
from fastlora.nn.gpt import GPT, Block, CausalSelfAttention, GPTConfig
from fastlora.nn.layers import MLP, Dropout, Embedding, LayerNorm, Linear
from fastlora.nn.module import Module, ModuleList, Parameter

__all__ = ["Module", "ModuleList", "Parameter", "Linear", "Embedding", "LayerNorm", "Dropout", "MLP",
           "CausalSelfAttention", "Block", "GPT", "GPTConfig"]
