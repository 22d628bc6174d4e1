"""Paths of the bundled data (see README.md in this folder)."""
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
TRAIN_DATA = os.path.join(ASSETS_DIR, "instructions_train.json")
EVAL_DATA = os.path.join(ASSETS_DIR, "instructions_eval.json")
CORPUS = os.path.join(ASSETS_DIR, "corpus.txt")
TOKENIZER = os.path.join(ASSETS_DIR, "tokenizer.json")
BASE_MODEL = os.path.join(ASSETS_DIR, "base.safetensors")


def load_base():
    """(base GPT, tokenizer) bundled with the package."""
    from fastlora.data import load_tokenizer
    from fastlora.nn import GPT
    return GPT.load(BASE_MODEL), load_tokenizer(TOKENIZER)
