"""The training loop and its checkpoints."""
from fastlora.errors import TrainingDiverged
from fastlora.train.trainer import Trainer, evaluate_loss

__all__ = ["Trainer", "TrainingDiverged", "evaluate_loss"]
