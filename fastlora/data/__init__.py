"""The data pipeline: tokenizers, the instruction template, dataset, collator and loader.

    records --InstructionFormatter--> prompt + response text
            --tokenizer--> FinetuneDataset items {"input_ids", "labels"} (prompt masked with -100)
            --DataLoader + DataCollator--> batches of (B, T) int64 arrays
"""
from fastlora.data.bpe import BPETokenizer
from fastlora.data.collator import DataCollator
from fastlora.data.dataset import IGNORE_INDEX, FinetuneDataset
from fastlora.data.formatter import InstructionFormatter
from fastlora.data.hf_tokenizer import HFTokenizer
from fastlora.data.loader import DataLoader
from fastlora.data.records import load_records, train_test_split
from fastlora.data.tokenizer import CharTokenizer, Tokenizer, check_tokenizer, load_tokenizer

__all__ = ["BPETokenizer", "CharTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer",
           "check_tokenizer",
           "InstructionFormatter", "FinetuneDataset", "DataCollator", "DataLoader",
           "load_records", "train_test_split", "IGNORE_INDEX"]
