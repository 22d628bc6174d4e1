"""Optimizers (SGD, AdamW), gradient clipping, the warmup-cosine schedule, and the helpers that
turn their state into JSON + arrays for pickle-free checkpoints."""
from fastlora.optim.adamw import AdamW
from fastlora.optim.clip import NonFiniteGradientWarning, clip_grad_norm, clip_grad_norm_
from fastlora.optim.optimizer import Optimizer
from fastlora.optim.schedule import WarmupCosineSchedule
from fastlora.optim.sgd import SGD
from fastlora.optim.state import join_state, split_state

__all__ = ["Optimizer", "SGD", "AdamW", "clip_grad_norm", "clip_grad_norm_",
           "NonFiniteGradientWarning", "WarmupCosineSchedule", "split_state", "join_state"]
