"""Benchmark (loss, perplexity, accuracy, exact match) and the train-and-measure helpers."""
from fastlora.eval.benchmark import Benchmark, format_table
from fastlora.eval.finetune import train_full_finetune, train_lora, train_qlora

__all__ = ["Benchmark", "format_table", "train_full_finetune", "train_lora", "train_qlora"]
