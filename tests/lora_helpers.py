"""Helpers the LoRA test files share: token ids for a small GPT, and a few training steps."""
import numpy as np

import fastlora as fl


def token_ids(seed=0, vocab=40, shape=(2, 10)):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


def train_steps(model, ids, steps=3, lr=0.05, optimizer=fl.AdamW):
    """`steps` optimizer steps of the next-token loss on `ids`, over what the adapters train
    (get_lora_parameters: A, B, magnitudes, trained biases and module copies); returns the model in
    eval mode."""
    opt = optimizer(fl.get_lora_parameters(model), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        fl.cross_entropy(model(ids), ids).backward()
        opt.step()
    return model.eval()
