"""Modules: Module, Parameter, Linear, Embedding, LayerNorm, Dropout, MLP, the GPT and the Llama."""
from fastlora.nn.causal_lm import CausalLM, causal_lm_loss
from fastlora.nn.gpt import GPT, Block, CausalSelfAttention, GPTConfig
from fastlora.nn.layers import MLP, Dropout, Embedding, LayerNorm, Linear
from fastlora.nn.llama import Llama, LlamaConfig, RMSNorm
from fastlora.nn.module import Module, ModuleList, Parameter

__all__ = ["Module", "ModuleList", "Parameter", "Linear", "Embedding", "LayerNorm", "Dropout", "MLP",
           "CausalSelfAttention", "Block", "GPT", "GPTConfig", "Llama", "LlamaConfig", "RMSNorm",
           "CausalLM", "causal_lm_loss"]
