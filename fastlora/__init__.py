"""fastlora: fine-tune small GPT models on a CPU, fully or with LoRA, on NumPy + Cython kernels.

    import fastlora as fl
    model = fl.GPT(vocab_size=100, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64)
    loss = fl.cross_entropy(model(input_ids), labels)   # shift inside, -100 ignored
    loss = model.loss(input_ids, labels)                # the same, the head fused into the loss
    loss.backward()
"""
from fastlora import kernels
from fastlora._runtime.process import runtime, set_num_threads
from fastlora._runtime.threads import get_num_threads
from fastlora.autograd import Tensor, cross_entropy, no_grad
from fastlora.data import (BPETokenizer, CharTokenizer, DataCollator, DataLoader, FinetuneDataset,
                           HFTokenizer, InstructionFormatter, load_tokenizer, train_test_split)
from fastlora.errors import FastloraError
from fastlora.eval import Benchmark, format_table, train_full_finetune, train_lora, train_qlora
from fastlora.lora import LoRALinear, LoRAMerger, LoRAModel
from fastlora.lora.functional import (apply_lora, disable_lora, enable_lora, get_lora_parameters, merge_lora,
                                      unmerge_lora)
from fastlora.log import get_verbosity, set_verbosity
from fastlora.lora.nf4 import dequantize_nf4, quantize_nf4
from fastlora.lora.qlora import apply_qlora, get_qlora_parameters
from fastlora.nn import GPT, Llama, causal_lm_loss
from fastlora.nn.pretrained import from_pretrained
from fastlora.optim import SGD, AdamW, WarmupCosineSchedule, clip_grad_norm
from fastlora.train import Trainer

__version__ = "0.1.0"

__all__ = [
    "Tensor", "no_grad", "GPT", "Llama", "from_pretrained", "cross_entropy", "causal_lm_loss", "SGD", "AdamW", "clip_grad_norm", "WarmupCosineSchedule",
    "BPETokenizer", "CharTokenizer", "HFTokenizer", "InstructionFormatter", "FinetuneDataset", "DataCollator", "DataLoader",
    "train_test_split", "load_tokenizer", "Trainer", "LoRALinear", "LoRAModel", "LoRAMerger", "Benchmark", "train_full_finetune",
    "train_lora", "quantize_nf4", "dequantize_nf4", "apply_qlora", "get_qlora_parameters", "kernels",
    "apply_lora", "get_lora_parameters", "merge_lora", "unmerge_lora", "disable_lora", "enable_lora", "get_num_threads", "set_num_threads",
    "FastloraError", "runtime", "format_table", "train_qlora", "set_verbosity", "get_verbosity",
]
